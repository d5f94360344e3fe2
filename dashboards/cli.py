"""``bookcast dashboards``: build the Grafana dashboards, provisioning and Prometheus rules; check every
panel query against a running Prometheus.

``build --out DIR`` writes (same input, same bytes)::

    DIR/dashboards/bookcast-{feed,latency,kernel,slo,drills}.json   Grafana dashboard JSON (grafanalib)
    DIR/provisioning/datasources/bookcast.yml                        Prometheus datasource (uid bookcast-prometheus)
    DIR/provisioning/dashboards/bookcast.yml                         file provider reading DIR/dashboards
    DIR/prometheus/bookcast-rules.yml                                recording rules and alerts (dashboards.slo)
    DIR/exceptions.json                                              queries allowed to be empty today, with why

``check --prometheus URL --dir DIR`` runs every query of every panel, annotation and variable of the
generated dashboards through Prometheus's HTTP API (instant queries; ``$__rate_interval`` replaced by
``--rate-interval``, variables by "all") and fails (exit 1) when one outside the exception list returns
no series with a value.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml
from grafanalib._gen import DashboardEncoder

from dashboards import boards, slo

EXAMPLES = """examples:
  bookcast dashboards build --out run/grafana                       # dashboards, provisioning, rules
  bookcast dashboards build --out run/grafana --prometheus-url http://127.0.0.1:9090 --alert-for 30s
  bookcast dashboards check --prometheus http://127.0.0.1:9090 --dir run/grafana   # every panel query returns data"""


def dashboard_json(dash: Any) -> str:
    """Grafana JSON of a grafanalib dashboard: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(dash.to_json_data(), cls=DashboardEncoder, sort_keys=True, indent=2) + "\n"


def build(out: Path, *, config: slo.RuleConfig, prometheus_url: str, dashboards_path: str | None = None) -> list[Path]:
    """Write everything ``build`` makes into ``out``; returns the files written."""
    written = []

    def write(rel: str, text: str) -> None:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)

    for dash, _ in boards.all_boards(config):
        write(f"dashboards/{dash.uid}.json", dashboard_json(dash))
    datasource = {"apiVersion": 1, "datasources": [{
        "name": "Prometheus (bookcast)", "type": "prometheus", "uid": boards.DATASOURCE["uid"], "access": "proxy",
        "url": prometheus_url, "isDefault": True, "editable": False, "jsonData": {"timeInterval": "5s"}}]}
    provider = {"apiVersion": 1, "providers": [{
        "name": "bookcast", "folder": "bookcast", "type": "file", "disableDeletion": True,
        "allowUiUpdates": False, "updateIntervalSeconds": 30,
        "options": {"path": dashboards_path or str((out / "dashboards").resolve())}}]}
    write("provisioning/datasources/bookcast.yml", yaml.safe_dump(datasource, sort_keys=False))
    write("provisioning/dashboards/bookcast.yml", yaml.safe_dump(provider, sort_keys=False))
    write("prometheus/bookcast-rules.yml", slo.dump_rules(slo.build_rules(config)))
    exc = [{"expr": expr, "where": where, "needs": needs.value, "reason": boards.REASONS[needs]}
           for expr, (needs, where) in boards.exceptions(config).items()]
    write("exceptions.json", json.dumps(sorted(exc, key=lambda e: (e["where"], e["expr"])), indent=2) + "\n")
    return written


# -- check ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PanelQuery:
    dashboard: str
    where: str  # panel title, "annotation: <name>" or "variable $<name>"
    expr: str


def _walk_panels(panels: list[dict]) -> Iterator[dict]:
    for p in panels:
        yield p
        yield from _walk_panels(p.get("panels") or [])


def queries_of(dashboard: dict) -> list[PanelQuery]:
    """Every PromQL query of a Grafana dashboard JSON: panel targets, annotations, variables."""
    title = dashboard["title"]
    out = []
    for p in _walk_panels(dashboard.get("panels", [])):
        for t in p.get("targets") or []:
            if t.get("expr"):
                out.append(PanelQuery(title, p.get("title", ""), t["expr"]))
    for a in dashboard.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out.append(PanelQuery(title, f"annotation: {a['name']}", a["expr"]))
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query" and v.get("query"):
            out.append(PanelQuery(title, f"variable ${v['name']}", v["query"]))
    return out


LABEL_VALUES = re.compile(r"^label_values\((?P<sel>.*),\s*(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\)$", re.S)


def runnable(expr: str, rate_interval: str) -> tuple[str, str | None]:
    """(PromQL to run, label that must be present or None): variables set to all, ``label_values`` to
    its selector."""
    q = expr.replace("$__rate_interval", rate_interval)
    q = re.sub(r"\$(region|instance|venue|role|drill)\b", ".*", q)
    m = LABEL_VALUES.match(q.strip())
    if m:
        return m.group("sel"), m.group("label")
    return q, None


def instant_query(prometheus_url: str, promql: str, timeout_s: float = 10.0) -> list[dict]:
    """Result vector of an instant query. Raises RuntimeError when Prometheus rejects the query."""
    url = prometheus_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"prometheus rejected {promql!r}: {exc.read().decode(errors='replace')}") from exc
    if body.get("status") != "success":
        raise RuntimeError(f"prometheus rejected {promql!r}: {body}")
    data = body["data"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    return data["result"]


@dataclass(frozen=True, slots=True)
class CheckResult:
    query: PanelQuery
    series: int  # series returned with a finite value (and the label, for variables)
    exception: str | None  # the reason it may be empty, or None
    needs: boards.Needs | None = None  # what the exception waits for

    @property
    def ok(self) -> bool:
        return self.series > 0 or self.exception is not None


def check(prometheus_url: str, dashboard_files: list[Path], *, rate_interval: str = "1m",
          config: slo.RuleConfig | None = None) -> list[CheckResult]:
    """Run every query of the given dashboard files; see ``CheckResult.ok``."""
    allowed = boards.exceptions(config)
    results = []
    for path in dashboard_files:
        for pq in queries_of(json.loads(path.read_text())):
            promql, label = runnable(pq.expr, rate_interval)
            rows = instant_query(prometheus_url, promql)
            n = sum(1 for row in rows
                    if math.isfinite(float(row["value"][1])) and (label is None or row["metric"].get(label)))
            needs = allowed.get(pq.expr)
            results.append(CheckResult(pq, n, None if needs is None else boards.REASONS[needs[0]],
                                       None if needs is None else needs[0]))
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="dashboards_command", required=True, metavar="action")
    b = sub.add_parser("build", help="write dashboards JSON, provisioning YAML and Prometheus rules into --out",
                       description="write dashboards JSON, provisioning YAML and Prometheus rules into --out",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--out", type=Path, required=True, help="output directory (created)")
    b.add_argument("--prometheus-url", default="http://127.0.0.1:9090",
                   help="URL Grafana reaches Prometheus at, for the datasource (default %(default)s)")
    b.add_argument("--dashboards-path", help="where Grafana will read the JSON (default: OUT/dashboards, absolute)")
    b.add_argument("--alert-for", help="one for: duration for every alert, e.g. 30s (default: per alert, dashboards/slo.py)")
    b.add_argument("--e2e-objective-s", type=float, default=slo.RuleConfig().e2e_objective_s,
                   help="e2e latency objective, a histogram bucket bound (default %(default)s)")
    b.add_argument("--runbook-base", default=slo.RUNBOOK_DOC,
                   help="prefix of every runbook_url, e.g. https://git.example/bookcast/blob/main/docs/runbooks.md")
    c = sub.add_parser("check", help="run every panel query against a Prometheus; exit 1 if one has no data",
                       description="run every panel query against a Prometheus; exit 1 if one has no data",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    c.add_argument("--dir", type=Path, required=True, help="a `build --out` directory")
    c.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes (default %(default)s)")
    c.add_argument("--format", choices=["text", "json"], default="text")


def main(args: argparse.Namespace) -> int:
    if args.dashboards_command == "build":
        config = slo.RuleConfig(e2e_objective_s=args.e2e_objective_s, for_override=args.alert_for,
                                runbook_base=args.runbook_base)
        try:
            slo.validate(config)
        except ValueError as exc:
            print(f"bookcast dashboards build: {exc}", file=sys.stderr)
            return 2
        written = build(args.out, config=config, prometheus_url=args.prometheus_url,
                        dashboards_path=args.dashboards_path)
        for path in written:
            print(path)
        return 0
    files = sorted((args.dir / "dashboards").glob("*.json"))
    if not files:
        print(f"bookcast dashboards check: no dashboards in {args.dir / 'dashboards'} (run `build --out` first)",
              file=sys.stderr)
        return 2
    try:
        results = check(args.prometheus, files, rate_interval=args.rate_interval)
    except (OSError, RuntimeError) as exc:
        print(f"bookcast dashboards check: {exc}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps([{"dashboard": r.query.dashboard, "where": r.query.where, "expr": r.query.expr,
                           "series": r.series, "exception": r.exception, "ok": r.ok} for r in results], indent=2))
    else:
        for r in results:
            state = "ok " if r.series else ("exc" if r.exception else "EMPTY")
            print(f"{state:5} {r.series:4d}  {r.query.dashboard} / {r.query.where}")
        bad = sum(not r.ok for r in results)
        print(f"{len(results)} queries: {sum(bool(r.series) for r in results)} with data, "
              f"{sum(r.exception is not None and not r.series for r in results)} empty exceptions, {bad} empty")
    return 1 if any(not r.ok for r in results) else 0
