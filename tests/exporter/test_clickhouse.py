"""Latency samples and book events through both ClickHouse backends, and the report built from them."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from exporter.clickhouse import BOOK_EVENTS, DATABASE, LATENCY_SAMPLES, ClickHouseWriter, open_backend
from exporter.latency import Hop
from exporter.report import build_report, format_text

MS = 1_000_000
NOW_NS = 1_800_000_000 * 10**9


def sample(i: int, *, upstream_ms: float, gateway_ms: float, instrument: str = "coinbase:BTC-USD") -> tuple:
    """A latency_samples row received i ms before NOW_NS with the given hops (ingest 0.1 ms, client 1 ms)."""
    recv = NOW_NS - i * MS
    send = recv - 1 * MS
    publish = send - int(gateway_ms * MS)
    ingest = publish - MS // 10
    event = ingest - int(upstream_ms * MS)
    return (recv, "eu", instrument, "e1", i + 1, event, ingest, publish, send)


@pytest.fixture(params=["chdb", "server"])
def backend_target(request, tmp_path):
    if request.param == "chdb":
        return str(tmp_path / "chdb")
    return request.getfixturevalue("clickhouse_url")


def test_round_trip_and_report(backend_target):
    backend = open_backend(backend_target)
    registry = CollectorRegistry()
    try:
        backend.execute(f"TRUNCATE TABLE {DATABASE}.{LATENCY_SAMPLES.name}")
        backend.execute(f"TRUNCATE TABLE {DATABASE}.{BOOK_EVENTS.name}")
        writer = ClickHouseWriter(backend, registry=registry, batch_rows=700)
        writer.start()
        # 2,000 ordinary messages (gateway 1 ms, upstream 2 ms), and 20 with a 300 ms upstream stall.
        for i in range(2000):
            assert writer.add(LATENCY_SAMPLES.name, sample(i, upstream_ms=2, gateway_ms=1))
        for i in range(2000, 2020):
            writer.add(LATENCY_SAMPLES.name, sample(i, upstream_ms=300, gateway_ms=1, instrument="coinbase:ETH-USD"))
        writer.add(LATENCY_SAMPLES.name, sample(10 * 60 * 1000 + 5, upstream_ms=900, gateway_ms=1))  # too old
        tick = (NOW_NS, "eu", "polymarket:123", "e1", 7, 6, "delta", 4_294_967_295, NOW_NS - 5 * MS, NOW_NS - 4 * MS,
                ["bid", "ask"], ["0.52", "0.55"], ["0", "120.5"])
        writer.add(BOOK_EVENTS.name, tick)
        writer.stop()  # flushes everything
        assert writer.written_rows == {LATENCY_SAMPLES.name: 2021, BOOK_EVENTS.name: 1}
        assert registry.get_sample_value("bookcast_clickhouse_rows_written_total", {"table": "latency_samples"}) == 2021

        assert backend.query(f"SELECT * FROM {DATABASE}.{BOOK_EVENTS.name}") == [tick]
        (first,) = backend.query(f"SELECT * FROM {DATABASE}.{LATENCY_SAMPLES.name} WHERE seq = 1 AND instrument = 'coinbase:BTC-USD'")
        assert first == sample(0, upstream_ms=2, gateway_ms=1)

        report = build_report(backend, since_s=600, now_ns=NOW_NS, top=5)
        assert report.samples == 2020
        assert report.hops[Hop.UPSTREAM].quantiles_ns[0.5] == 2 * MS
        assert report.hops[Hop.UPSTREAM].max_ns == 300 * MS
        assert report.hops[Hop.NATS_GATEWAY].quantiles_ns[0.9999] == 1 * MS
        assert report.hops[Hop.E2E].max_ns == pytest.approx(302.1 * MS)
        assert [r["instrument"] for r in report.slowest] == ["coinbase:ETH-USD"] * 5
        assert report.slowest[0]["upstream_ns"] == 300 * MS and report.slowest[0]["client_ns"] == 1 * MS
        assert report.verdict.culprit is Hop.UPSTREAM and report.verdict.ours is False
        assert "upstream" in format_text(report).splitlines()[-1]

        only_btc = build_report(backend, since_s=600, now_ns=NOW_NS, instrument="coinbase:BTC-USD")
        assert only_btc.samples == 2000 and only_btc.hops[Hop.UPSTREAM].max_ns == 2 * MS
        assert build_report(backend, since_s=600, now_ns=NOW_NS, region="us").samples == 0
        assert build_report(backend, since_s=600, now_ns=NOW_NS, instrument="x' OR '1'='1").samples == 0
    finally:
        backend.close()


def test_a_full_buffer_drops_and_counts(tmp_path):
    backend = open_backend(tmp_path / "chdb")
    registry = CollectorRegistry()
    try:
        writer = ClickHouseWriter(backend, registry=registry, max_buffer_rows=3)
        results = [writer.add(LATENCY_SAMPLES.name, sample(i, upstream_ms=1, gateway_ms=1)) for i in range(5)]
        assert results == [True, True, True, False, False]
        assert registry.get_sample_value("bookcast_clickhouse_rows_dropped_total", {"table": "latency_samples"}) == 2
        writer.start()
        writer.stop()
        assert backend.query(f"SELECT count() FROM {DATABASE}.{LATENCY_SAMPLES.name}") == [(3,)]
        assert registry.get_sample_value("bookcast_clickhouse_buffer_rows", {"table": "latency_samples"}) == 0
    finally:
        backend.close()
