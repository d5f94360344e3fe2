"""promtool unit tests of the alert rules, as scenarios (pure): ``dashboards/tests/bookcast-rules.test.yml``.

Each scenario is a set of synthetic input series (promtool's ``'a+bxN'`` notation, one sample a minute)
and the alerts expected firing at given times. For every alert there is a burn (or fault) starting at
30m that must not fire before the alert's windows and ``for:`` allow and must fire after, and the healthy
scenario (errors at half the budget, one provider of two excluded) in which nothing fires at all.

Check times stay at least a minute away from when an alert starts or stops firing: promtool may evaluate
the alert group before the recording group at a step, so an alert on a recorded series can lag one step.

Expected annotations are the rule's own templates with the expected labels filled in (they only use
``$labels``), so a changed summary does not need the test edited; times and label sets are written here
by hand. ``bookcast dashboards build`` does not write this file; ``python -m dashboards.promtests``
does, and ``tests/dashboards/test_rules.py`` checks it is in sync and runs ``promtool test rules``.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dashboards import slo

OUT = Path(__file__).parent / "tests" / "bookcast-rules.test.yml"
RULES_REL = "../rules/bookcast-rules.yml"
REGION = {"region": "r"}
E2E = 'hop="e2e"'


def _sel(name: str, **labels: str) -> str:
    labels = {**REGION, **labels}
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def latency(good: str, total: str) -> dict[str, str]:
    return {_sel("bookcast_probe_latency_seconds_bucket", hop="e2e", le="0.25"): good,
            _sel("bookcast_probe_latency_seconds_count", hop="e2e"): total}


@dataclass
class Scenario:
    name: str
    series: dict[str, str]
    # (eval time, alert name, [expected labels of each firing alert, besides the rule's own])
    checks: list[tuple[str, str, list[dict[str, str]]]] = field(default_factory=list)


HEALTHY = {
    **latency("0+9995x120", "0+10000x120"),  # 0.05 % slow: half the budget of 0.1 %
    _sel("bookcast_probe_stale_instruments"): "0x120",
    _sel("bookcast_probe_messages_total"): "0+10000x120",
    _sel("bookcast_probe_gaps_total"): "0+0.5x120",  # half the budget of 0.01 %
    _sel("bookcast_probe_connected"): "1x120",
    _sel("bookcast_ingest_integrity_faults_total", venue="coinbase", kind="seq_gap"): "3x120",  # old, flat
    _sel("bookcast_ingest_crossed_books_total", venue="coinbase"): "2x120",
    _sel("bookcast_ingest_provider_score", venue="coinbase", provider="a"): "0x120",  # excluded, b still fine
    _sel("bookcast_ingest_provider_score", venue="coinbase", provider="b"): "0.8x120",
    _sel("bookcast_ingest_provider_up", provider="replay:x.jsonl"): "1x120",
    _sel("bookcast_ingest_instruments_by_status", venue="coinbase", status="ok"): "10x120",
    _sel("bookcast_ingest_instruments_by_status", venue="coinbase", status="stale"): "0x120",
    _sel("up", job="bookcast-ingest", instance="i:1"): "1x120",
    _sel("up", job="bookcast-gateway", instance="g:1"): "1x120",
    _sel("up", job="bookcast-probe", instance="p:1"): "1x120",
    _sel("up", job="bookcast-ebpf", instance="e:1"): "1x120",
    _sel("bookcast_ebpf_up", instance="e:1", job="bookcast-ebpf", reason="ok"): "1x120",
}

FAST, SLOW, TICKET = ({"long_window": "1h"}, {"long_window": "6h"}, {"long_window": "3d"})

SCENARIOS: list[Scenario] = [
    Scenario("healthy: errors at half the budget, one provider excluded: nothing fires", HEALTHY, [
        (t, alert, []) for t in ("30m", "2h") for alert in sorted(slo.DEFAULT_FOR)]),
    Scenario("latency: 10 % of deliveries over the objective from 30m (100x budget)",
             latency("0+10000x30 300000+9000x90", "0+10000x120"), [
                 ("30m", "BookcastLatencyBudgetBurn", []),
                 ("32m", "BookcastLatencyBudgetBurn", []),           # burning, still pending (for: 2m)
                 ("35m", "BookcastLatencyBudgetBurn", [FAST, SLOW]),  # both window pairs burn far above
                 ("40m", "BookcastLatencyBudgetBurn", [FAST, SLOW]),
                 ("40m", "BookcastLatencyBudgetBurnTicket", []),      # for: 15m
                 ("50m", "BookcastLatencyBudgetBurnTicket", [TICKET]),
             ]),
    Scenario("latency: a steady 0.8 % over the objective (8x budget): the 6h/30m page, not the 1h/5m one",
             latency("0+9920x120", "0+10000x120"), [
                 ("1m", "BookcastLatencyBudgetBurn", []),
                 ("8m", "BookcastLatencyBudgetBurn", [SLOW]),
                 ("2h", "BookcastLatencyBudgetBurn", [SLOW]),
             ]),
    Scenario("latency: a steady 0.2 % over the objective (2x budget): a ticket, never a page",
             latency("0+9980x120", "0+10000x120"), [
                 ("10m", "BookcastLatencyBudgetBurnTicket", []),
                 ("20m", "BookcastLatencyBudgetBurnTicket", [TICKET]),
                 ("2h", "BookcastLatencyBudgetBurn", []),
             ]),
    Scenario("freshness: 3 instruments stale from 30m", {_sel("bookcast_probe_stale_instruments"): "0x30 3x90"}, [
        ("30m", "BookcastInstrumentStale", []),
        ("32m", "BookcastInstrumentStale", [{}]),
        ("31m", "BookcastFreshnessBudgetBurn", []),
        ("40m", "BookcastFreshnessBudgetBurn", [FAST, SLOW]),
        ("40m", "BookcastFreshnessBudgetBurnTicket", []),
        ("60m", "BookcastFreshnessBudgetBurnTicket", [TICKET]),
    ]),
    Scenario("freshness: the ingest marks 2 books stale from 30m (upstream silent, gateway heartbeats on)", {
        _sel("bookcast_probe_stale_instruments"): "0x120",
        _sel("bookcast_ingest_instruments_by_status", venue="coinbase", status="stale"): "0x30 2x90",
        _sel("bookcast_ingest_instruments_by_status", venue="coinbase", status="ok"): "10x30 8x90"}, [
        ("30m", "BookcastInstrumentStale", []),
        ("32m", "BookcastInstrumentStale", [{}]),
    ]),
    Scenario("gaps: 1 % of deltas with an undetected gap from 30m", {
        _sel("bookcast_probe_messages_total"): "0+10000x120",
        _sel("bookcast_probe_gaps_total"): "0x30 0+100x90"}, [
        ("30m", "BookcastGapBudgetBurn", []),
        ("40m", "BookcastGapBudgetBurn", [FAST, SLOW]),
        ("40m", "BookcastGapBudgetBurnTicket", []),
        ("60m", "BookcastGapBudgetBurnTicket", [TICKET]),
    ]),
    Scenario("integrity: seq gaps and a crossed book at 30m, then quiet", {
        _sel("bookcast_ingest_integrity_faults_total", venue="coinbase", kind="seq_gap"): "0x30 4x90",
        _sel("bookcast_ingest_crossed_books_total", venue="polymarket"): "0x30 1x90"}, [
        ("29m", "BookcastUpstreamIntegrityFaults", []),
        ("31m", "BookcastUpstreamIntegrityFaults", [{"venue": "coinbase", "kind": "seq_gap"},
                                                    {"venue": "polymarket", "kind": "crossed"}]),
        ("40m", "BookcastUpstreamIntegrityFaults", []),
    ]),
    Scenario("providers: both providers of a venue excluded from 30m", {
        _sel("bookcast_ingest_provider_score", venue="coinbase", provider="a"): "1x30 0x90",
        _sel("bookcast_ingest_provider_score", venue="coinbase", provider="b"): "0.9x30 0x90"}, [
        ("30m", "BookcastAllProvidersUnhealthy", []),
        ("32m", "BookcastAllProvidersUnhealthy", [{"venue": "coinbase"}]),
    ]),
    Scenario("providers: the replay source ended at 30m", {
        _sel("bookcast_ingest_provider_up", provider="replay:x.jsonl"): "1x30 0x90"}, [
        ("30m", "BookcastAllProvidersUnhealthy", []),
        ("32m", "BookcastAllProvidersUnhealthy", [{}]),
    ]),
    Scenario("providers: the ingest stops answering scrapes at 30m (down or stalled)", {
        _sel("up", job="bookcast-ingest", instance="i:1"): "1x30 0x90",
        _sel("bookcast_ingest_provider_up", provider="replay:x.jsonl"): "1x30"}, [
        ("30m", "BookcastAllProvidersUnhealthy", []),
        ("32m", "BookcastAllProvidersUnhealthy", [{}]),
    ]),
    Scenario("region: the gateway stops answering scrapes at 30m", {
        _sel("up", job="bookcast-gateway", instance="g:1"): "1x30 0x90",
        _sel("bookcast_probe_connected"): "1x120"}, [
        ("30m", "BookcastRegionDown", []),
        ("32m", "BookcastRegionDown", [{}]),
    ]),
    Scenario("region: the probe loses its connection at 30m", {
        _sel("up", job="bookcast-gateway", instance="g:1"): "1x120",
        _sel("bookcast_probe_connected"): "1x30 0x90"}, [
        ("30m", "BookcastRegionDown", []),
        ("32m", "BookcastRegionDown", [{}]),
    ]),
    Scenario("probe: down from 30m", {_sel("up", job="bookcast-probe", instance="p:1"): "1x30 0x90"}, [
        ("31m", "BookcastProbeDown", []),
        ("33m", "BookcastProbeDown", [{"job": "bookcast-probe", "instance": "p:1"}]),
    ]),
    Scenario("ebpf: exporter down from 30m", {_sel("up", job="bookcast-ebpf", instance="e:1"): "1x30 0x90"}, [
        ("34m", "BookcastEbpfExporterDown", []),
        ("36m", "BookcastEbpfExporterDown", [{"job": "bookcast-ebpf", "instance": "e:1"}]),
    ]),
    Scenario("ebpf: exporter up but without bcc from the start", {
        _sel("up", job="bookcast-ebpf", instance="e:2"): "1x120",
        _sel("bookcast_ebpf_up", instance="e:2", job="bookcast-ebpf", reason="no_bcc"): "0x120"}, [
        ("4m", "BookcastEbpfExporterDown", []),
        ("6m", "BookcastEbpfExporterDown", [{"instance": "e:2", "reason": "no_bcc"}]),
    ]),
]

_TEMPLATE = re.compile(r"\{\{ \$labels\.([a-z_]+) \}\}")


def _rule_for(rules: dict[str, Any], alert: str, labels: dict[str, str]) -> dict[str, Any]:
    found = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == alert
             and all(labels.get(k, v) == v for k, v in r["labels"].items())]
    if len(found) != 1:
        raise ValueError(f"{alert} {labels}: {len(found)} rules match")
    return found[0]


def _expected(rules: dict[str, Any], alert: str, extra: dict[str, str]) -> dict[str, Any]:
    labels = {**REGION, **extra}
    rule = _rule_for(rules, alert, labels)
    labels = {**labels, **rule["labels"]}
    annotations = {k: _TEMPLATE.sub(lambda m: labels.get(m.group(1), ""), v)
                   for k, v in rule["annotations"].items()}
    return {"exp_labels": labels, "exp_annotations": annotations}


def build_tests(config: slo.RuleConfig | None = None) -> dict[str, Any]:
    rules = slo.build_rules(config)
    tests = []
    for sc in SCENARIOS:
        tests.append({
            "name": sc.name,
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in sc.series.items()],
            "alert_rule_test": [{"eval_time": t, "alertname": alert,
                                 "exp_alerts": [_expected(rules, alert, extra) for extra in expected]}
                                for t, alert, expected in sc.checks],
        })
    return {"rule_files": [RULES_REL], "evaluation_interval": "1m", "tests": tests}


def dump_tests() -> str:
    return ("# Generated by `python -m dashboards.promtests` from dashboards/promtests.py (the scenarios).\n"
            "# Run: promtool test rules dashboards/tests/bookcast-rules.test.yml\n"
            + yaml.safe_dump(build_tests(), sort_keys=False, width=120))


if __name__ == "__main__":
    OUT.write_text(dump_tests())
    print(OUT, file=sys.stderr)
