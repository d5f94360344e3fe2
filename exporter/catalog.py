"""The metric catalog: every bookcast metric declared once (name, type, help, unit, labels, buckets).

Services, eBPF specs, dashboards and alert rules refer to these names; ``tests/exporter`` fails on a
metric used anywhere that is not declared here or that breaks Prometheus naming (base units, counters
ending in ``_total``). Pure: declarations only; ``feed.metrics`` builds prometheus-client objects.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class MetricType(enum.StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


# 10 µs to 10 s, roughly 1-2.5-5 per decade: resolves the microsecond tail of a loopback hop and the
# seconds of a stalled upstream with the same buckets.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    type: MetricType
    help: str
    unit: str = ""  # base unit the name ends in: "seconds", "bytes", or "" for counts
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None


def _c(name: str, help: str, labels: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(name, MetricType.COUNTER, help, "", labels)


def _g(name: str, help: str, unit: str = "", labels: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(name, MetricType.GAUGE, help, unit, labels)


def _h(name: str, help: str, labels: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(name, MetricType.HISTOGRAM, help, "seconds", labels, LATENCY_BUCKETS_S)


SPECS: tuple[MetricSpec, ...] = (
    # ingest
    _c("bookcast_ingest_messages_total", "Raw venue messages read by the ingest.", ("venue",)),
    _c("bookcast_ingest_parse_errors_total", "Venue messages that could not be parsed (dropped, logged).", ("venue",)),
    _c("bookcast_ingest_ignored_total", "Venue messages knowingly ignored (subscriptions, tickers, unknown types).", ("venue",)),
    _c("bookcast_ingest_deltas_published_total", "Sequenced deltas published to NATS.", ("venue",)),
    _c("bookcast_ingest_trades_published_total", "Trades published to NATS.", ("venue",)),
    _c("bookcast_ingest_dropped_deltas_total", "Venue deltas dropped because no snapshot of the book was seen yet.", ("venue",)),
    _c("bookcast_ingest_crossed_books_total", "Books left crossed by venue input (remote fault of the venue).", ("venue",)),
    _c("bookcast_ingest_snapshot_requests_total", "Snapshot requests answered over NATS request/reply."),
    _g("bookcast_ingest_instruments", "Instruments whose book the ingest holds."),
    _h("bookcast_hop_upstream_seconds", "Venue event time to ingest receive (ts_ingest_ns - ts_event_ns).", ("venue",)),
    _h("bookcast_hop_ingest_seconds", "Ingest receive to NATS publish (ts_publish_ns - ts_ingest_ns).", ("venue",)),
    # gateway
    _g("bookcast_gateway_clients", "Open WebSocket connections."),
    _g("bookcast_gateway_instruments", "Instruments with a NATS subscription on this gateway."),
    _g("bookcast_gateway_queue_bytes", "Bytes queued for clients, summed over connections.", "bytes"),
    _c("bookcast_gateway_nats_messages_total", "Deltas received from NATS."),
    _c("bookcast_gateway_messages_sent_total", "Frames written to clients.", ("type",)),
    _c("bookcast_gateway_bytes_sent_total", "Bytes of frames written to clients."),
    _c("bookcast_gateway_requests_total", "Client requests received.", ("op",)),
    _c("bookcast_gateway_errors_total", "Error replies sent, by error code.", ("code",)),
    _c("bookcast_gateway_resyncs_total", "resync notices sent to clients, by reason.", ("reason",)),
    _c("bookcast_gateway_slow_consumer_closes_total", "Connections closed with 4008 after repeated overflows."),
    _c("bookcast_gateway_closes_total", "Connections closed by the gateway, by close code.", ("code",)),
    _c("bookcast_gateway_conflated_total", "Deltas merged into a conflated delta."),
    _c("bookcast_gateway_gaps_total", "Upstream gaps and epoch changes detected on NATS deltas."),
    _c("bookcast_gateway_snapshot_fetch_failures_total", "Failed snapshot requests to the ingest (retried)."),
    _c("bookcast_gateway_bad_upstream_total", "Malformed messages received from NATS (dropped, logged)."),
    _h("bookcast_hop_nats_gateway_seconds", "NATS publish to gateway queueing (ts_send_ns - ts_publish_ns)."),
)

CATALOG: dict[str, MetricSpec] = {s.name: s for s in SPECS}


def naming_problems(spec: MetricSpec) -> list[str]:
    """Prometheus naming rules a spec breaks (empty if none)."""
    problems = []
    if not spec.name.startswith("bookcast_"):
        problems.append("name must start with bookcast_")
    if spec.type is MetricType.COUNTER and not spec.name.endswith("_total"):
        problems.append("counter must end in _total")
    if spec.type is not MetricType.COUNTER and spec.name.endswith("_total"):
        problems.append("only counters end in _total")
    if spec.unit and not (spec.name.endswith(f"_{spec.unit}") or spec.name.endswith(f"_{spec.unit}_total")):
        problems.append(f"name must end in its unit _{spec.unit}")
    for bad in ("_ms", "_us", "_ns", "_milliseconds", "_microseconds", "_kb", "_mb"):
        if spec.name.endswith(bad):
            problems.append(f"non-base unit suffix {bad}")
    if spec.type is MetricType.HISTOGRAM and not spec.buckets:
        problems.append("histogram needs buckets")
    return problems
