"""``bookcast dashboards build``: deterministic JSON, unique panel ids, catalog names only, provisioning."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from dashboards import boards, cli, slo
from feed.catalog import CATALOG, MetricType

UIDS = {"bookcast-feed", "bookcast-latency", "bookcast-kernel", "bookcast-slo", "bookcast-drills"}


def _build(out: Path) -> dict[str, bytes]:
    cli.build(out, config=slo.RuleConfig(), prometheus_url="http://127.0.0.1:9090", dashboards_path="/var/lib/grafana/bookcast")
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_input_same_bytes(tmp_path):
    first, second = _build(tmp_path / "a"), _build(tmp_path / "b")
    assert first == second
    assert {f"dashboards/{u}.json" for u in UIDS} <= set(first)


def test_panel_ids_unique_and_every_panel_has_a_grid_position(tmp_path):
    _build(tmp_path)
    for path in (tmp_path / "dashboards").glob("*.json"):
        dash = json.loads(path.read_text())
        panels = list(cli._walk_panels(dash["panels"]))
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids), path.name
        assert all(p["gridPos"]["w"] <= 24 and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels)
        assert dash["uid"] in UIDS


def _declared(name: str) -> bool:
    if name in CATALOG:
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and base in CATALOG and CATALOG[base].type in (MetricType.HISTOGRAM, MetricType.SUMMARY):
            return suffix != "_bucket" or CATALOG[base].type is MetricType.HISTOGRAM
    return False


def test_every_metric_a_dashboard_uses_is_in_the_catalog_and_every_record_exists(tmp_path):
    _build(tmp_path)
    records = {r["record"] for g in slo.build_rules()["groups"] for r in g["rules"] if "record" in r}
    used_records, used_metrics = set(), set()
    for path in (tmp_path / "dashboards").glob("*.json"):
        for q in cli.queries_of(json.loads(path.read_text())):
            used_metrics.update(re.findall(r"(?<![A-Za-z0-9_:])bookcast_[a-z0-9_]+", q.expr))
            used_records.update(re.findall(r"bookcast:[a-z0-9_]+:[a-z0-9_]+", q.expr))
            other = set(re.findall(r"\b([a-z_]+)\{", q.expr)) - {"bookcast"}
            assert {o for o in other if not o.startswith("bookcast_")} <= {"up", "ALERTS"}, q
    unknown = {m for m in used_metrics if not _declared(m)}
    assert not unknown, unknown
    assert used_records and used_records <= records, used_records - records
    assert len(used_metrics) >= 50


def test_queries_cover_what_the_issue_names():
    text = "\n".join(cli.dashboard_json(d) for d, _ in boards.all_boards())
    for needle in ("bookcast_gateway_errors_total", "bookcast_gateway_resyncs_total",
                   "bookcast_gateway_slow_consumer_closes_total", "bookcast_ingest_integrity_faults_total",
                   "bookcast_ingest_provider_selected", "bookcast_ingest_provider_score",
                   "bookcast_ebpf_runqueue_latency_seconds_bucket", "bookcast_ebpf_offcpu_seconds",
                   "bookcast_ebpf_tcp_retransmits_total", "bookcast_ebpf_tcp_srtt_seconds_bucket",
                   "bookcast_ebpf_socket_queue_seconds_bucket", "bookcast_drill_detect_seconds",
                   "bookcast_drill_failover_seconds", "bookcast_drill_recover_seconds", "ALERTS",
                   "Us or upstream?", "histogram_quantile(0.999", '"type": "heatmap"', '"name": "drills"'):
        assert needle in text, needle


def test_exceptions_have_reasons_and_are_listed_in_the_build(tmp_path):
    _build(tmp_path)
    listed = json.loads((tmp_path / "exceptions.json").read_text())
    assert listed and all(e["reason"] and e["needs"] in {n.value for n in boards.Needs} for e in listed)
    assert {e["needs"] for e in listed} == {n.value for n in boards.Needs}


def test_provisioning_points_at_the_datasource_and_the_dashboards(tmp_path):
    _build(tmp_path)
    ds = yaml.safe_load((tmp_path / "provisioning/datasources/bookcast.yml").read_text())
    assert ds["datasources"][0]["uid"] == boards.DATASOURCE["uid"] and ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((tmp_path / "provisioning/dashboards/bookcast.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/bookcast"
    dash = json.loads((tmp_path / "dashboards/bookcast-latency.json").read_text())
    assert {v["name"] for v in dash["templating"]["list"]} == {"region", "instance", "venue"}


def test_cli_build_and_usage_errors(tmp_path, capsys):
    from feed.cli import main

    assert main(["dashboards", "build", "--out", str(tmp_path / "out")]) == 0
    assert "bookcast-rules.yml" in capsys.readouterr().out
    assert (tmp_path / "out/prometheus/bookcast-rules.yml").read_text() == slo.dump_rules(slo.build_rules())
    assert main(["dashboards", "build", "--out", str(tmp_path / "bad"), "--e2e-objective-s", "0.3"]) == 2
    assert "bucket boundary" in capsys.readouterr().err
    assert main(["dashboards", "check", "--prometheus", "http://127.0.0.1:9", "--dir", str(tmp_path / "none")]) == 2
    assert "no dashboards" in capsys.readouterr().err
    assert main(["dashboards", "check", "--prometheus", "http://127.0.0.1:9", "--dir", str(tmp_path / "out")]) == 1
    try:
        main(["dashboards", "build", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "examples:" in capsys.readouterr().out
