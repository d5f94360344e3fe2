"""Every metric name used anywhere is declared once in the catalog and follows Prometheus naming."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from feed.catalog import CATALOG, LATENCY_BUCKETS_S, SPECS, MetricSpec, MetricType, naming_problems

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("feed", "exporter", "ebpf", "dashboards", "chaos", "loadtest")
RULE_SUFFIXES = (".yml", ".yaml", ".json")
# A metric name: ``bookcast_`` not preceded by an identifier character (``_bookcast_command`` is a function).
NAME = re.compile(r"(?<![A-Za-z0-9_])bookcast_[a-z0-9_]+")
# Series names Prometheus derives from a declared metric, and the types that have them.
_H, _S = MetricType.HISTOGRAM, MetricType.SUMMARY
DERIVED = {"_bucket": (_H,), "_sum": (_H, _S), "_count": (_H, _S), "_created": (_H, _S)}


def _files() -> list[Path]:
    out = [p for d in SOURCE_DIRS if (REPO / d).is_dir() for p in (REPO / d).rglob("*")
           if p.is_file() and p.suffix in (".py", ".c", ".h", *RULE_SUFFIXES)]
    for suffix in RULE_SUFFIXES:  # rule and dashboard files anywhere outside the venv and tests' own data
        out += [p for p in REPO.rglob(f"*{suffix}") if ".venv" not in p.parts and ".git" not in p.parts]
    return sorted(set(out))


def _declared(name: str) -> bool:
    if name in CATALOG:
        return True
    for suffix, types in DERIVED.items():
        base = name.removesuffix(suffix)
        if base != name and base in CATALOG and CATALOG[base].type in types:
            return True
    base = name.removesuffix("_created")  # a counter's _created series drops its _total
    return base != name and f"{base}_total" in CATALOG


def test_every_metric_name_used_is_in_the_catalog():
    used: dict[str, set[str]] = {}
    for path in _files():
        for name in NAME.findall(path.read_text(errors="replace")):
            used.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert len(used) >= 20, f"the scan found only {sorted(used)}: is it looking in the right places?"
    unknown = {n: sorted(files) for n, files in used.items() if not _declared(n)}
    assert not unknown, f"metric names used but not declared in feed/catalog.py: {unknown}"


def test_every_catalog_entry_follows_prometheus_naming():
    problems = {s.name: naming_problems(s) for s in SPECS if naming_problems(s)}
    assert not problems


def test_names_are_declared_once():
    names = [s.name for s in SPECS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("spec, problem", [
    (MetricSpec("bookcast_x", MetricType.COUNTER, "h"), "counter must end in _total"),
    (MetricSpec("bookcast_x_total", MetricType.GAUGE, "h"), "only counters end in _total"),
    (MetricSpec("bookcast_x_ms", MetricType.GAUGE, "h"), "non-base unit suffix _ms"),
    (MetricSpec("bookcast_x", MetricType.GAUGE, "h", "bytes"), "name must end in its unit _bytes"),
    (MetricSpec("bookcast_x_seconds", MetricType.HISTOGRAM, "h", "seconds"), "histogram needs buckets"),
    (MetricSpec("other_x_total", MetricType.COUNTER, "h"), "name must start with bookcast_"),
])
def test_naming_rules_catch_bad_names(spec, problem):
    assert problem in naming_problems(spec)


def test_hop_histograms_span_10us_to_10s():
    hops = [s for s in SPECS if s.name.startswith("bookcast_hop_") or s.name == "bookcast_probe_latency_seconds"]
    assert len(hops) == 4
    for spec in hops:
        assert spec.buckets == LATENCY_BUCKETS_S, spec.name
    assert LATENCY_BUCKETS_S[0] == pytest.approx(10e-6) and LATENCY_BUCKETS_S[-1] == pytest.approx(10.0)


def test_derived_series_resolve_to_their_metric_only():
    assert _declared("bookcast_hop_ingest_seconds_bucket")
    assert _declared("bookcast_gateway_gaps_created")
    assert not _declared("bookcast_gateway_clients_bucket")  # a gauge has no buckets
    assert _declared("bookcast_probe_latency_window_seconds_count")
    assert not _declared("bookcast_probe_latency_window_seconds_bucket")  # a summary has no buckets
    assert not _declared("bookcast_nope_total")
    assert NAME.findall("x = _bookcast_command(); y = 'bookcast_gateway_clients'") == ["bookcast_gateway_clients"]
