"""OTLP export (adapter): metrics as exponential histograms and sampled per-message traces, over OTLP/gRPC.

Off unless an endpoint is configured: a command's ``--otlp-endpoint`` flag, else the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` environment variable (``http://127.0.0.1:4317``; plain-text gRPC unless the
scheme is ``https``).

Traces: one trace per sampled delta, one span per hop, all sharing the trace id the ingest chose
(W3C Trace Context, https://www.w3.org/TR/trace-context/):

=============  ===========  ==========================================  ===================================
span           emitted by   start .. end (the message's own stamps)     parent
=============  ===========  ==========================================  ===================================
ingest         ingest       ts_ingest_ns .. ts_publish_ns               none (the trace's root)
upstream       ingest       ts_event_ns .. ts_ingest_ns                 ingest
nats_gateway   gateway      ts_publish_ns .. ts_send_ns                 ingest, from the NATS ``traceparent``
                                                                        header
client         probe        ts_send_ns .. receive time                  ingest, from the delta's
                                                                        ``traceparent`` field
=============  ===========  ==========================================  ===================================

The ingest puts the ``traceparent`` both in the NATS message headers and, as an additive field, in the
delta itself, so a WebSocket client (which sees no NATS headers) can join the trace.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from opentelemetry.trace import Span

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACEPARENT = "traceparent"


def endpoint_from(flag: str | None) -> str | None:
    """The OTLP endpoint to use: ``flag`` if given, else ``$OTEL_EXPORTER_OTLP_ENDPOINT``, else None (off)."""
    return flag or os.environ.get(ENDPOINT_ENV) or None


class Otlp:
    """Tracer and meter of one process, exporting to ``endpoint`` (OTLP/gRPC) until ``shutdown``.

    Histograms use the exponential-bucket aggregation (base-2 scale chosen by the SDK, 160 buckets), so
    the receiver can compute quantiles without our bucket choice. ``export_interval_s`` is the metric
    export period. The providers are this object's own, never the process-global ones. The SDK is imported
    here, so a process with OTLP off never loads it.
    """

    def __init__(self, endpoint: str, service_name: str, *, export_interval_s: float = 10.0) -> None:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import Histogram, MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        insecure = urlsplit(endpoint).scheme != "https"
        resource = Resource.create({"service.name": service_name})
        self.tracer_provider = TracerProvider(resource=resource)
        self.tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure)))
        self.tracer = self.tracer_provider.get_tracer("bookcast")
        reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint, insecure=insecure),
                                               export_interval_millis=export_interval_s * 1000)
        self.meter_provider = MeterProvider(
            resource=resource, metric_readers=[reader],
            views=[View(instrument_type=Histogram, aggregation=ExponentialBucketHistogramAggregation())],
        )
        self.meter = self.meter_provider.get_meter("bookcast")

    def shutdown(self) -> None:
        """Export what is pending (spans, a last metric collection) and stop. Blocks up to a few seconds."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()

    # -- hop spans ------------------------------------------------------------------------------
    def start_ingest_trace(self, *, ts_event_ns: int | None, ts_ingest_ns: int,
                           attributes: Mapping[str, str | int]) -> tuple[Span, str]:
        """Start the ``ingest`` root span, emit its ``upstream`` child, and return the root (the caller ends
        it at ``ts_publish_ns``: ``span.end(end_time=ts_publish_ns)``) with the W3C ``traceparent`` to carry."""
        root = self.tracer.start_span("ingest", start_time=ts_ingest_ns, kind=self._trace.SpanKind.PRODUCER,
                                      attributes=attributes)
        ctx = self._trace.set_span_in_context(root)
        if ts_event_ns is not None:
            # A skewed upstream clock can put the event after our receive: the span then has no length.
            up = self.tracer.start_span("upstream", context=ctx, start_time=min(ts_event_ns, ts_ingest_ns),
                                        attributes=attributes)
            up.end(end_time=ts_ingest_ns)
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=ctx)
        return root, carrier[TRACEPARENT]

    def hop_span(self, name: str, traceparent: str, start_ns: int, end_ns: int,
                 attributes: Mapping[str, str | int]) -> None:
        """Emit one span ``name`` from ``start_ns`` to ``end_ns`` (clamped to >= start) as a child of ``traceparent``."""
        ctx = self._propagator.extract({TRACEPARENT: traceparent})
        span = self.tracer.start_span(name, context=ctx, start_time=start_ns, kind=self._trace.SpanKind.CONSUMER,
                                      attributes=attributes)
        span.end(end_time=max(end_ns, start_ns))
