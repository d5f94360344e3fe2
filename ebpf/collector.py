"""Prometheus view of the eBPF maps: a prometheus-client custom collector that reads them at scrape time.

This is the one place kernel units become Prometheus units: log2 slot k becomes the bucket ``le`` = the
catalog's k-th bound (2**k µs in seconds, or 2**k bytes), the overflow slot only +Inf, and the kernel's
ns sums become seconds. ``bookcast_ebpf_up`` is always exported: 1 with ``reason="ok"``, or 0 with the
reason the probes are not running (the feed never depends on them).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from feed.catalog import CATALOG, MetricType
from ebpf.loader import Probes, Series
from ebpf.spec import SUM_SCALE


def prometheus_buckets(slots: Sequence[int], bounds: Sequence[float]) -> list[tuple[str, int]]:
    """Cumulative (le, count) pairs from kernel log2 slot counts.

    ``slots`` has len(bounds) finite slots then one overflow slot; slot k maps to ``le=bounds[k]``.

    >>> prometheus_buckets([1, 0, 2, 5], [1e-06, 2e-06, 4e-06])
    [('1e-06', 1), ('2e-06', 1), ('4e-06', 3), ('+Inf', 8)]
    """
    if len(slots) != len(bounds) + 1:
        raise ValueError(f"slots={len(slots)} must be bounds={len(bounds)} + 1 (the overflow)")
    out, total = [], 0
    for bound, n in zip(bounds, slots):
        total += n
        out.append((floatToGoString(bound), total))
    out.append(("+Inf", total + slots[-1]))
    return out


def families(series: Iterable[Series]) -> list[Metric]:
    """Metric families (catalog names, help and buckets) from kernel series."""
    by_metric: dict[str, Metric] = {}
    for s in series:
        spec = CATALOG[s.metric]
        fam = by_metric.get(s.metric)
        if fam is None:
            cls = {MetricType.HISTOGRAM: HistogramMetricFamily, MetricType.GAUGE: GaugeMetricFamily}.get(
                spec.type, CounterMetricFamily)
            fam = by_metric[s.metric] = cls(spec.name, spec.help, labels=list(spec.labels))
        values = [v for _, v in s.labels]
        if spec.type is MetricType.HISTOGRAM:
            fam.add_metric(values, prometheus_buckets(s.slots, spec.buckets), s.total * SUM_SCALE[s.kernel_unit])
        else:
            fam.add_metric(values, s.total)
    return list(by_metric.values())


class EbpfCollector:
    """Yields ``bookcast_ebpf_up``, ``bookcast_ebpf_traced_processes`` and every map's series.

    ``probes`` is None when the probes could not start; ``reason`` then says why (a bounded value).
    """

    def __init__(self, probes: Probes | None, reason: str = "ok") -> None:
        self.probes = probes
        self.reason = reason

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("bookcast_ebpf_up", CATALOG["bookcast_ebpf_up"].help, labels=["reason"])
        up.add_metric([self.reason], 1.0 if self.probes is not None else 0.0)
        yield up
        if self.probes is None:
            return
        traced = GaugeMetricFamily("bookcast_ebpf_traced_processes",
                                   CATALOG["bookcast_ebpf_traced_processes"].help, labels=["role"])
        roles = list(self.probes.pids.values())
        for role in sorted(set(roles)):
            traced.add_metric([role], roles.count(role))
        yield traced
        yield from families(self.probes.series())
