"""A small but real OTLP/gRPC receiver for tests: opentelemetry-proto's generated services on grpcio.

It decodes every ``Export`` it receives (traces and metrics) into plain records; no collector binary is
available as a package here, so this stands in for one. Started on a free loopback port, stopped by the test.
"""
from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def _attrs(kvs) -> dict[str, Any]:
    out = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


@dataclass(frozen=True, slots=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Metric:
    service: str
    name: str
    unit: str
    kind: str  # the OTLP data field: sum, gauge, histogram, exponential_histogram, summary
    points: list[dict[str, Any]] = field(default_factory=list)


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.metrics: list[Metric] = []
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.endpoint = ""

    def start(self) -> str:
        """Listen on a free loopback port; returns the endpoint (``http://127.0.0.1:<port>``)."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(self), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        self.endpoint = f"http://127.0.0.1:{port}"
        return self.endpoint

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1).wait()

    def snapshot(self) -> tuple[list[Span], list[Metric]]:
        with self._lock:
            return list(self.spans), list(self.metrics)


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.r = receiver

    def Export(self, request, context):  # noqa: N802 - the generated service's name
        spans = []
        for rs in request.resource_spans:
            service = _attrs(rs.resource.attributes).get("service.name", "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(Span(service, s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                      s.start_time_unix_nano, s.end_time_unix_nano, _attrs(s.attributes)))
        with self.r._lock:
            self.r.spans += spans
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.r = receiver

    def Export(self, request, context):  # noqa: N802
        metrics = []
        for rm in request.resource_metrics:
            service = _attrs(rm.resource.attributes).get("service.name", "")
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    points = []
                    if kind == "exponential_histogram":
                        for p in m.exponential_histogram.data_points:
                            points.append({"attributes": _attrs(p.attributes), "count": p.count, "sum": p.sum,
                                           "scale": p.scale, "zero_count": p.zero_count,
                                           "positive_buckets": sum(p.positive.bucket_counts)})
                    metrics.append(Metric(service, m.name, m.unit, kind, points))
        with self.r._lock:
            self.r.metrics += metrics
        return metrics_service_pb2.ExportMetricsServiceResponse()
