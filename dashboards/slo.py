"""SLIs, SLOs and alerts of bookcast as data, and the Prometheus rule file built from them (pure).

Three SLIs, each an error ratio per ``region`` recorded over the windows the alerts need
(``bookcast:sli_<name>:error_ratio_rate<window>``):

=============  ====================================================================  ==================
SLI            good event                                                            source
=============  ====================================================================  ==================
e2e_latency    a delivery to the probe within ``e2e_objective_s`` of the venue event  probe histogram
freshness      a moment when no instrument is stale (no message, no heartbeat)       probe stale gauge
gaps           a delta without an undetected gap (a broken history the SDK found     probe gaps / deltas
               itself: the gateway did not announce it with a resync)
=============  ====================================================================  ==================

Alerting follows the Google SRE Workbook, chapter 5 "Alerting on SLOs", recommendation 6 (multiwindow,
multi-burn-rate): page when the budget burns at 14.4x over 1 h and 5 m (2 % of a 30-day budget in an
hour) or at 6x over 6 h and 30 m (5 % in six hours); open a ticket at 1x over 3 d and 6 h. Burn rate is
the error ratio divided by the budget ``1 - target``. The short window makes an alert stop soon after
the burn stops.

Besides the burn alerts: a stale instrument, upstream integrity faults, every provider of a venue
unhealthy, a region down, the latency probe down, the eBPF exporter down. Every alert carries
``severity`` (page or ticket) and a ``runbook_url`` to its section of ``docs/runbooks.md``
(``RUNBOOK_ANCHORS``). ``for:`` durations come from ``RuleConfig`` so tests can shorten them.

Pure: builds dicts; ``dump_rules`` returns YAML text. No I/O, no clock.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import yaml
from prometheus_client.utils import floatToGoString

from feed.catalog import CATALOG, LATENCY_BUCKETS_S

# (long window, short window, burn-rate factor, severity): SRE Workbook table 5-8.
BURN_WINDOWS: tuple[tuple[str, str, float, str], ...] = (
    ("1h", "5m", 14.4, "page"),
    ("6h", "30m", 6.0, "page"),
    ("3d", "6h", 1.0, "ticket"),
)
# Every window an error ratio is recorded over: the alert windows plus 30 d for the budget panel.
RATIO_WINDOWS: tuple[str, ...] = ("5m", "30m", "1h", "6h", "3d", "30d")
BUDGET_WINDOW = "30d"

RUNBOOK_DOC = "docs/runbooks.md"


@dataclass(frozen=True, slots=True)
class RuleConfig:
    """What the rule file is built from.

    ``e2e_objective_s`` must be a bucket boundary of ``feed.catalog.LATENCY_BUCKETS_S`` (the SLI counts
    the histogram bucket at it). Targets are fractions of good events (0.999 = 99.9 %). ``alert_for``
    maps alert names to ``for:`` durations (Prometheus duration text); ``for_override`` replaces all of
    them (tests use a few seconds). ``runbook_base`` prefixes every ``runbook_url``.
    """

    e2e_objective_s: float = 0.25
    e2e_latency_target: float = 0.999
    freshness_target: float = 0.999
    gaps_target: float = 0.9999
    alert_for: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_FOR))
    for_override: str | None = None
    runbook_base: str = RUNBOOK_DOC

    def target(self, sli: str) -> float:
        return {"e2e_latency": self.e2e_latency_target, "freshness": self.freshness_target,
                "gaps": self.gaps_target}[sli]

    def for_of(self, alert: str) -> str:
        return self.for_override if self.for_override is not None else self.alert_for[alert]

    def with_for(self, duration: str) -> RuleConfig:
        return replace(self, for_override=duration)


SLIS: tuple[str, ...] = ("e2e_latency", "freshness", "gaps")
SLI_TITLES = {"e2e_latency": "E2E latency", "freshness": "Freshness", "gaps": "Gaps"}
# Alert names: <Sli>BudgetBurn (page, 1h/5m and 6h/30m) and <Sli>BudgetBurnTicket (3d/6h).
BURN_ALERTS = {"e2e_latency": "BookcastLatencyBudgetBurn", "freshness": "BookcastFreshnessBudgetBurn",
               "gaps": "BookcastGapBudgetBurn"}

DEFAULT_FOR: dict[str, str] = {
    **{name: "2m" for name in BURN_ALERTS.values()},
    **{f"{name}Ticket": "15m" for name in BURN_ALERTS.values()},
    "BookcastInstrumentStale": "1m",
    "BookcastUpstreamIntegrityFaults": "0s",
    "BookcastAllProvidersUnhealthy": "1m",
    "BookcastRegionDown": "1m",
    "BookcastProbeDown": "2m",
    "BookcastEbpfExporterDown": "5m",
}

DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def validate(config: RuleConfig) -> None:
    """Raises ValueError on an objective off the bucket boundaries, a target outside (0, 1) or a bad
    duration."""
    if not any(abs(b - config.e2e_objective_s) < 1e-12 for b in LATENCY_BUCKETS_S):
        raise ValueError(f"e2e objective {config.e2e_objective_s} s is not a bucket boundary of "
                         f"bookcast_probe_latency_seconds: {LATENCY_BUCKETS_S}")
    for sli in SLIS:
        if not 0.0 < config.target(sli) < 1.0:
            raise ValueError(f"{sli} target must be in (0, 1), got {config.target(sli)}")
    for alert in DEFAULT_FOR:
        if not DURATION.match(config.for_of(alert)):
            raise ValueError(f"for: duration of {alert} is not a Prometheus duration: {config.for_of(alert)!r}")


def le_label(bound_s: float) -> str:
    """The ``le`` label prometheus-client writes for a bucket bound (0.25 -> "0.25", 1.0 -> "1.0")."""
    for b in LATENCY_BUCKETS_S:
        if abs(b - bound_s) < 1e-12:
            return floatToGoString(b)
    raise ValueError(f"{bound_s} is not a latency bucket bound")


def ratio_record(sli: str, window: str) -> str:
    return f"bookcast:sli_{sli}:error_ratio_rate{window}"


FRESH_RECORD = "bookcast:sli_freshness:fresh"  # 1 while no instrument of the region is stale, else 0


def runbook_anchor(alert: str) -> str:
    """GitHub's heading slug of the alert's runbook section (the heading is the alert name)."""
    return alert.lower()


def _error_ratio_expr(sli: str, window: str, config: RuleConfig) -> str:
    if sli == "e2e_latency":
        le = le_label(config.e2e_objective_s)
        good = f'sum by (region) (rate(bookcast_probe_latency_seconds_bucket{{hop="e2e",le="{le}"}}[{window}]))'
        total = f'sum by (region) (rate(bookcast_probe_latency_seconds_count{{hop="e2e"}}[{window}]))'
        return f"1 - ({good} / {total})"
    if sli == "freshness":
        return f"1 - avg_over_time({FRESH_RECORD}[{window}])"
    if sli == "gaps":
        return (f"sum by (region) (rate(bookcast_probe_gaps_total[{window}]))\n"
                f"/ sum by (region) (rate(bookcast_probe_messages_total[{window}]))")
    raise KeyError(sli)


def _alert(name: str, expr: str, config: RuleConfig, severity: str, summary: str, description: str,
           labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": config.for_of(name),
        "labels": {"severity": severity, **(labels or {})},
        "annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": f"{config.runbook_base}#{runbook_anchor(name)}",
        },
    }


def _burn_alerts(sli: str, config: RuleConfig) -> list[dict[str, Any]]:
    budget = 1.0 - config.target(sli)
    out = []
    for long_w, short_w, factor, severity in BURN_WINDOWS:
        name = BURN_ALERTS[sli] + ("Ticket" if severity == "ticket" else "")
        threshold = f"{factor * budget:.6g}"
        expr = (f"{ratio_record(sli, long_w)} > ({factor:g} * {budget:.6g})\n"
                f"and {ratio_record(sli, short_w)} > ({factor:g} * {budget:.6g})")
        out.append(_alert(
            name, expr, config, severity,
            f"{SLI_TITLES[sli]} SLO of region {{{{ $labels.region }}}} burns its error budget at over "
            f"{factor:g}x ({long_w} and {short_w})",
            f"Error ratio above {threshold} over both {long_w} and {short_w} (target {config.target(sli):g}, "
            f"budget {budget:.6g}).",
            {"sli": sli, "long_window": long_w, "short_window": short_w}))
    return out


def build_rules(config: RuleConfig | None = None) -> dict[str, Any]:
    """The rule file as a dict: groups ``bookcast-sli`` (recording) and ``bookcast-alerts``.

    Raises:
        ValueError: see ``validate``.
    """
    config = config or RuleConfig()
    validate(config)
    records: list[dict[str, Any]] = [{
        "record": FRESH_RECORD,
        "expr": "max by (region) (bookcast_probe_stale_instruments) == bool 0",
    }]
    for sli in SLIS:
        for window in RATIO_WINDOWS:
            records.append({"record": ratio_record(sli, window), "expr": _error_ratio_expr(sli, window, config)})
    alerts: list[dict[str, Any]] = []
    for sli in SLIS:
        alerts += _burn_alerts(sli, config)
    alerts += [
        _alert("BookcastInstrumentStale",
               "max by (region) (bookcast_probe_stale_instruments) > 0\n"
               'or sum by (region) (bookcast_ingest_instruments_by_status{status="stale"}) > 0',
               config, "page",
               "Instruments stale in region {{ $labels.region }}",
               "The probe saw no message and no heartbeat for the stale threshold on some instruments, or the "
               "ingest marks books stale (PROTOCOL section 11: upstream silent)."),
        _alert("BookcastUpstreamIntegrityFaults",
               "sum by (region, venue, kind) (increase(bookcast_ingest_integrity_faults_total[5m])) > 0\n"
               "or label_replace(sum by (region, venue) (increase(bookcast_ingest_crossed_books_total[5m])) > 0,"
               ' "kind", "crossed", "", "")',
               config, "ticket",
               "Upstream integrity faults ({{ $labels.kind }}) on {{ $labels.venue }} in region {{ $labels.region }}",
               "The ingest saw integrity faults in the last 5 m (crossed books, seq gaps, duplicates, resets)."),
        _alert("BookcastAllProvidersUnhealthy",
               "max by (region, venue) (bookcast_ingest_provider_score) <= 0\n"
               "or max by (region) (bookcast_ingest_provider_up) == 0\n"
               'or max by (region) (up{job="bookcast-ingest"}) == 0',
               config, "page",
               "No healthy upstream in region {{ $labels.region }} {{ $labels.venue }}",
               "Every provider is scored 0 (excluded), no upstream source delivers, or no ingest of the region "
               "answers (down or stalled): books stop moving."),
        _alert("BookcastRegionDown",
               'max by (region) (up{job="bookcast-gateway"}) == 0\nor max by (region) (bookcast_probe_connected) == 0',
               config, "page",
               "Region {{ $labels.region }} is down",
               "No gateway of the region answers scrapes, or the probe cannot hold a connection to it."),
        _alert("BookcastProbeDown", 'up{job="bookcast-probe"} == 0', config, "ticket",
               "Latency probe {{ $labels.instance }} is down",
               "Without the probe the latency, freshness and gap SLIs have no data and cannot alert."),
        _alert("BookcastEbpfExporterDown",
               'up{job="bookcast-ebpf"} == 0\nor max by (region, instance, reason) (bookcast_ebpf_up) == 0',
               config, "ticket",
               "eBPF exporter {{ $labels.instance }} is down or not tracing ({{ $labels.reason }})",
               "Kernel panels have no data; the feed itself is unaffected."),
    ]
    return {"groups": [{"name": "bookcast-sli", "rules": records}, {"name": "bookcast-alerts", "rules": alerts}]}


def alert_names(rules: dict[str, Any]) -> list[str]:
    return sorted({r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r})


def metric_names(rules: dict[str, Any]) -> set[str]:
    """``bookcast_*`` metric names the rules use (each must be declared in ``feed.catalog``)."""
    found = set()
    for g in rules["groups"]:
        for r in g["rules"]:
            found.update(re.findall(r"(?<![A-Za-z0-9_:])bookcast_[a-z0-9_]+", r["expr"]))
    return found


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)

HEADER = ("# Generated by `bookcast dashboards build` from dashboards/slo.py: edit that file, not this one.\n"
          "# Checked by `promtool check rules`; unit tests in dashboards/tests/*.test.yml.\n")


def dump_rules(rules: dict[str, Any]) -> str:
    """YAML text of a rule file (deterministic: key order as built, no timestamps)."""
    return HEADER + yaml.dump(rules, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


# Catalog check at import: the rules only use declared names (a typo fails loudly, not silently empty).
_unknown = {n.removesuffix("_bucket").removesuffix("_count") for n in metric_names(build_rules())} - set(CATALOG)
if _unknown:  # pragma: no cover - a programming error
    raise RuntimeError(f"rules use metrics missing from feed/catalog.py: {sorted(_unknown)}")
