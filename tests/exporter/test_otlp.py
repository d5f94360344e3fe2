"""OTLP end to end, into a real OTLP/gRPC receiver: one trace per sampled delta with a span per hop, and the
probe's per-hop exponential histograms."""
from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from feed.ingest import Ingest, IngestConfig
from feed.natsserver import NatsServer
from feed.procs import free_port, stop_process
from feed.stack import bundled_capture
from tests.e2e.harness import spawn_cli
from tests.exporter.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.e2e
HOP_SPANS = {"ingest", "upstream", "nats_gateway", "client"}


def complete_traces(spans) -> dict[str, dict[str, object]]:
    """trace id -> {span name: span} for the traces that have every hop's span."""
    by_trace: dict[str, dict[str, object]] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, {})[s.name] = s
    return {t: named for t, named in by_trace.items() if HOP_SPANS <= named.keys()}


async def test_traces_and_exponential_histograms_reach_a_real_receiver(tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "300")  # export spans every 0.3 s, in every process
    receiver = OtlpReceiver()
    endpoint = receiver.start()
    nats_server = NatsServer(port=0, name="otlp-e2e", workdir=str(tmp_path))
    nats_server.start()
    gateway = probe = replay = None
    ingest = Ingest(IngestConfig(nats_url=nats_server.url, captures=[bundled_capture()], speed=1.0, loop=True,
                                 otlp_endpoint=endpoint, trace_sample_every=5), registry=CollectorRegistry())
    try:
        gw_port = free_port()
        gateway = spawn_cli(["gateway", "--nats", nats_server.url, "--port", str(gw_port), "--otlp-endpoint", endpoint],
                            tmp_path / "gateway.log")
        await ingest.start()
        replay = asyncio.get_running_loop().create_task(ingest.run())
        probe = spawn_cli(["probe", "--region", f"eu=ws://127.0.0.1:{gw_port}/v1/ws", "--http-port", "0",
                           "--no-clickhouse", "--otlp-endpoint", endpoint, "--otlp-export-interval-s", "1"],
                          tmp_path / "probe.log")
        deadline = time.monotonic() + 60
        while True:
            spans, metrics = receiver.snapshot()
            traces = complete_traces(spans)
            hist_points = [p for m in metrics if m.name == "bookcast_probe_latency_seconds" for p in m.points]
            if len(traces) >= 3 and {p["attributes"].get("hop") for p in hist_points} >= {"upstream", "e2e"}:
                break
            assert probe.poll() is None, (tmp_path / "probe.log").read_text()
            assert time.monotonic() < deadline, (f"spans={sorted({s.name for s in spans})} traces={len(traces)} "
                                                 f"metrics={sorted({m.name for m in metrics})}")
            await asyncio.sleep(0.2)
    finally:
        for proc in (probe, gateway):
            if proc is not None:
                stop_process(proc, grace_s=10)
        if replay is not None:
            replay.cancel()
        await ingest.stop()
        nats_server.stop()
        receiver.stop()

    for trace_id, named in traces.items():
        root, up, gw, client = (named[n] for n in ("ingest", "upstream", "nats_gateway", "client"))
        assert root.parent_span_id == "" and root.service == "bookcast-ingest"
        for child in (up, gw, client):
            assert child.parent_span_id == root.span_id and child.trace_id == trace_id
        assert gw.service == "bookcast-gateway" and client.service == "bookcast-probe"
        # the spans tile the message's journey with its own stamps: publish stamp, then send stamp
        assert up.end_ns == root.start_ns
        assert gw.start_ns == root.end_ns and client.start_ns == gw.end_ns
        assert client.end_ns >= client.start_ns
        assert root.attributes["instrument"] == client.attributes["instrument"]
        assert root.attributes["seq"] == gw.attributes["seq"] == client.attributes["seq"]

    (hist,) = {m.kind for m in metrics if m.name == "bookcast_probe_latency_seconds"}
    assert hist == "exponential_histogram"
    assert {m.unit for m in metrics if m.name == "bookcast_probe_latency_seconds"} == {"s"}
    last = {}
    for p in hist_points:
        last[p["attributes"]["hop"]] = p
    assert set(last) == {"upstream", "ingest", "nats_gateway", "gateway_queue", "network", "reader", "client", "e2e"}
    for hop, p in last.items():
        assert p["count"] > 0 and p["count"] == p["zero_count"] + p["positive_buckets"], hop
