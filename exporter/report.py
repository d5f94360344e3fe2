"""``bookcast latency report``: per-hop tail latency from the probe's ClickHouse samples, and who owns the tail.

Reads ``latency_samples`` (``exporter.clickhouse``) received in the last ``--since`` (by the probe's receive
time), optionally one instrument and one region, and prints per hop p50/p99/p99.9/p99.99/max (exact, computed
by ClickHouse's ``quantilesExact``), the slowest messages with their hop breakdown, and a verdict line
(``exporter.verdict``) naming upstream, ingest, NATS/gateway or client. Hops are signed (clock skew shows as a
negative value); the verdict counts negatives as 0.

Exit codes: 0 report printed, 1 ClickHouse unreadable or no samples in the window, 2 bad usage.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

import orjson

from exporter.clickhouse import DATABASE, DEFAULT_CHDB_PATH, LATENCY_SAMPLES, Backend, ClickHouseError, open_backend, sql_string
from exporter.latency import PATH_HOPS, Hop
from exporter.verdict import Verdict, attribute_tail

EXAMPLES = """examples:
  bookcast latency report                                   # last 10 minutes from the default chDB store (.bookcast/chdb)
  bookcast latency report --since 1h --instrument coinbase:BTC-USD
  bookcast latency report --since 30m --format json --clickhouse clickhouse://127.0.0.1:9000
  bookcast latency report --region eu --top 20
  bookcast latency report --probe http://127.0.0.1:9475        # ask the running probe (it holds the chDB store)

An embedded chDB store is held by the probe writing it: while it runs, use --probe, or point both at a
ClickHouse server."""

REPORT_QUANTILES: tuple[float, ...] = (0.5, 0.99, 0.999, 0.9999)
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# Signed hop values (ns) as ClickHouse expressions over latency_samples; upstream only where the venue
# gave an event time (ts_event_ns > 0), e2e from the ingest stamp otherwise.
_HOP_SQL: dict[Hop, str] = {
    Hop.UPSTREAM: "if(ts_event_ns > 0, toInt64(ts_ingest_ns) - toInt64(ts_event_ns), 0)",
    Hop.INGEST: "toInt64(ts_publish_ns) - toInt64(ts_ingest_ns)",
    Hop.NATS_GATEWAY: "toInt64(ts_send_ns) - toInt64(ts_publish_ns)",
    Hop.CLIENT: "toInt64(ts_recv_ns) - toInt64(ts_send_ns)",
    Hop.E2E: "toInt64(ts_recv_ns) - toInt64(if(ts_event_ns > 0, ts_event_ns, ts_ingest_ns))",
}
_HOP_COND: dict[Hop, str] = {Hop.UPSTREAM: "ts_event_ns > 0"}


def parse_duration_s(text: str) -> float:
    """``"10m"`` -> 600.0; units s, m, h, d; a bare number is seconds. Raises ValueError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"duration must look like 30s, 10m, 2h or 1d, got {text!r}")
    return float(m.group(1)) * _UNITS_S[m.group(2) or "s"]


@dataclass(frozen=True, slots=True)
class HopStats:
    count: int
    quantiles_ns: dict[float, int]
    max_ns: int


@dataclass(frozen=True, slots=True)
class Report:
    since_s: float
    from_ns: int
    to_ns: int
    source: str
    instrument: str | None
    region: str | None
    samples: int
    hops: dict[Hop, HopStats]
    slowest: list[dict[str, Any]]
    tail_count: int
    tail_mean_ns: dict[Hop, float]
    verdict: Verdict

    def to_json(self) -> dict[str, Any]:
        return {
            "since_s": self.since_s, "from_ns": self.from_ns, "to_ns": self.to_ns, "source": self.source,
            "instrument": self.instrument, "region": self.region, "samples": self.samples,
            "hops": {h.value: {"count": s.count, **{f"p{q * 100:g}_ns": v for q, v in s.quantiles_ns.items()},
                               "max_ns": s.max_ns} for h, s in self.hops.items()},
            "slowest": self.slowest,
            "tail": {"e2e_p99_ns": self.hops[Hop.E2E].quantiles_ns[0.99], "count": self.tail_count,
                     "mean_ns": {h.value: v for h, v in self.tail_mean_ns.items()}},
            "verdict": {"culprit": self.verdict.culprit.value if self.verdict.culprit else None,
                        "ours": self.verdict.ours, "shares": {h.value: s for h, s in self.verdict.shares.items()},
                        "text": self.verdict.text},
        }


def build_report(backend: Backend, *, since_s: float, now_ns: int, instrument: str | None = None,
                 region: str | None = None, top: int = 10) -> Report:
    """Query ``backend`` for the samples received in ``[now_ns - since_s, now_ns]`` and attribute the tail.

    Raises:
        ClickHouseError: a query failed.
    """
    from_ns = now_ns - int(since_s * 1e9)
    where = f"ts_recv_ns >= {from_ns} AND ts_recv_ns <= {now_ns}"
    if instrument:
        where += f" AND instrument = {sql_string(instrument)}"
    if region:
        where += f" AND region = {sql_string(region)}"
    table = f"{DATABASE}.{LATENCY_SAMPLES.name}"
    levels = ", ".join(f"{q:g}" for q in REPORT_QUANTILES)
    cols = []
    for hop in Hop:
        expr, cond = _HOP_SQL[hop], _HOP_COND.get(hop)
        if cond:
            cols += [f"countIf({cond})", f"quantilesExactIf({levels})({expr}, {cond})", f"maxIf({expr}, {cond})"]
        else:
            cols += ["count()", f"quantilesExact({levels})({expr})", f"max({expr})"]
    (row,) = backend.query(f"SELECT {', '.join(cols)} FROM {table} WHERE {where}")
    hops: dict[Hop, HopStats] = {}
    for i, hop in enumerate(Hop):
        count, values, max_ns = row[3 * i], row[3 * i + 1], row[3 * i + 2]
        hops[hop] = HopStats(int(count), dict(zip(REPORT_QUANTILES, (int(v) for v in values))),
                             int(max_ns) if count else 0)
    samples = hops[Hop.E2E].count
    named = ", ".join(f"{_HOP_SQL[h]} AS {h.value}" for h in Hop)
    inner = f"SELECT region, instrument, epoch, seq, ts_recv_ns, {named} FROM {table} WHERE {where}"
    p99 = hops[Hop.E2E].quantiles_ns[0.99]
    tail_count, tail_mean_ns = 0, dict.fromkeys(PATH_HOPS, 0.0)
    slowest: list[dict[str, Any]] = []
    if samples:
        means = ", ".join(f"avg(greatest({h.value}, 0))" for h in PATH_HOPS)
        (tail,) = backend.query(f"SELECT count(), {means} FROM ({inner}) WHERE e2e >= {p99}")
        tail_count = int(tail[0])
        tail_mean_ns = {h: float(v) for h, v in zip(PATH_HOPS, tail[1:])}
        keys = ("region", "instrument", "epoch", "seq", "ts_recv_ns", *(f"{h.value}_ns" for h in Hop))
        rows = backend.query(f"SELECT * FROM ({inner}) ORDER BY e2e DESC, ts_recv_ns LIMIT {int(top)}")
        slowest = [dict(zip(keys, r)) for r in rows]
    verdict = attribute_tail(tail_mean_ns, p99, tail_count)
    return Report(since_s, from_ns, now_ns, backend.target, instrument, region, samples, hops, slowest,
                  tail_count, tail_mean_ns, verdict)


def _ms(ns: float) -> str:
    return f"{ns / 1e6:10.3f}"


def format_text(report: Report) -> str:
    """The report for people: a header, the hop table (ms), the slowest messages, the verdict line."""
    scope = f"instrument {report.instrument or 'all'}, region {report.region or 'all'}"
    lines = [f"bookcast latency report: last {report.since_s:g} s, {report.samples} samples, {scope}, from {report.source}",
             "", f"{'hop (ms)':<14}{'count':>10}" + "".join(f"{'p' + format(q * 100, 'g'):>11}" for q in REPORT_QUANTILES)
             + f"{'max':>11}"]
    for hop, s in report.hops.items():
        lines.append(f"{hop.value:<14}{s.count:>10}" + "".join(f" {_ms(s.quantiles_ns[q])}" for q in REPORT_QUANTILES)
                     + f" {_ms(s.max_ns)}")
    if report.slowest:
        lines += ["", f"slowest {len(report.slowest)} messages (ms):",
                  f"  {'e2e':>10} {'upstream':>10} {'ingest':>10} {'nats_gw':>10} {'client':>10}  instrument seq region"]
        for r in report.slowest:
            lines.append("  " + " ".join(_ms(r[f"{h.value}_ns"]) for h in (Hop.E2E, *PATH_HOPS))
                         + f"  {r['instrument']} {r['seq']} {r['region']}")
    lines += ["", report.verdict.text]
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="latency_command", required=True, metavar="command")
    r = sub.add_parser("report", help="per-hop tail latency and who owns it, from ClickHouse",
                       description=__doc__.splitlines()[0], epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--since", default="10m", help="window ending now: 30s, 10m, 2h, 1d (default %(default)s)")
    r.add_argument("--instrument", help="only this instrument")
    r.add_argument("--region", help="only this probe region")
    r.add_argument("--top", type=int, default=10, help="slowest messages to list (default %(default)s)")
    r.add_argument("--format", choices=["text", "json"], default="text", help="output format (default %(default)s)")
    r.add_argument("--clickhouse", "--clickhouse-url", dest="clickhouse", default=str(DEFAULT_CHDB_PATH),
                   help="chDB path, or clickhouse://host:9000 for a server (default %(default)s)")
    r.add_argument("--probe", metavar="URL",
                   help="ask a running probe (http://host:port) for the report from the store it holds")


def main(args: argparse.Namespace) -> int:
    try:
        since_s = parse_duration_s(args.since)
    except ValueError as exc:
        print(f"bookcast latency report: {exc}", file=sys.stderr)
        return 2
    if args.probe:
        return _from_probe(args, since_s)
    try:
        backend = open_backend(args.clickhouse)
        try:
            report = build_report(backend, since_s=since_s, now_ns=time.time_ns(), instrument=args.instrument,
                                  region=args.region, top=args.top)
        finally:
            backend.close()
    except ClickHouseError as exc:
        hint = " (while a probe holds it, use --probe http://HOST:PORT)" if "chdb" in str(exc).lower() else ""
        print(f"bookcast latency report: {exc}{hint}", file=sys.stderr)
        return 1
    if args.format == "json":
        sys.stdout.buffer.write(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(format_text(report))
    return 0 if report.samples else 1


def _from_probe(args: argparse.Namespace, since_s: float) -> int:
    """The report as computed by a running probe over its own store (``GET /v1/latency/report``)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    params = {"since": f"{since_s:g}s", "top": str(args.top), "format": args.format}
    params.update({k: v for k, v in (("instrument", args.instrument), ("region", args.region)) if v})
    url = f"{args.probe.rstrip('/')}/v1/latency/report?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            body, samples = r.read(), int(r.headers.get("X-Bookcast-Samples", "0"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"bookcast latency report: cannot get the report from {args.probe}: {exc}", file=sys.stderr)
        return 1
    if args.format == "json":
        sys.stdout.buffer.write(orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        sys.stdout.write(body.decode())
    return 0 if samples else 1
