"""Latency samples and book events through both ClickHouse backends, and the report built from them."""
from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry

from exporter.clickhouse import BOOK_EVENTS, DATABASE, HOST_SAMPLES, LATENCY_SAMPLES, ClickHouseWriter, open_backend
from exporter.latency import Hop
from exporter.report import UnknownInstrument, build_report, format_text, latest_run

MS = 1_000_000
NOW_NS = 1_800_000_000 * 10**9


def sample(i: int, *, upstream_ms: float, gateway_ms: float, instrument: str = "coinbase:BTC-USD",
           run_id: str = "r1", now_ns: int = NOW_NS) -> tuple:
    """A latency_samples row received i ms before ``now_ns`` with the given hops (ingest 0.1 ms, client 1 ms),
    no write stamp, read by the probe 0.05 ms after receipt."""
    recv = now_ns - i * MS
    send = recv - 1 * MS
    publish = send - int(gateway_ms * MS)
    ingest = publish - MS // 10
    event = ingest - int(upstream_ms * MS)
    return (recv, "eu", instrument, "e1", i + 1, event, ingest, publish, send, run_id, 0, recv + MS // 20)


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
        # 2,000 ordinary messages (gateway 1 ms, upstream 2 ms), and 40 with a 300 ms upstream stall.
        for i in range(2000):
            assert writer.add(LATENCY_SAMPLES.name, sample(i, upstream_ms=2, gateway_ms=1))
        for i in range(2000, 2040):
            writer.add(LATENCY_SAMPLES.name, sample(i, upstream_ms=300, gateway_ms=1, instrument="coinbase:ETH-USD"))
        writer.add(LATENCY_SAMPLES.name, sample(10 * 60 * 1000 + 5, upstream_ms=900, gateway_ms=1))  # too old
        tick = (NOW_NS, "eu", "polymarket:123", "e1", 7, 6, "delta", 4_294_967_295, NOW_NS - 5 * MS, NOW_NS - 4 * MS,
                ["bid", "ask"], ["0.52", "0.55"], ["0", "120.5"], "r1")
        writer.add(BOOK_EVENTS.name, tick)
        writer.stop()  # flushes everything
        assert writer.written_rows == {LATENCY_SAMPLES.name: 2041, BOOK_EVENTS.name: 1, HOST_SAMPLES.name: 0}
        assert registry.get_sample_value("bookcast_clickhouse_rows_written_total", {"table": "latency_samples"}) == 2041

        assert backend.query(f"SELECT * FROM {DATABASE}.{BOOK_EVENTS.name}") == [tick]
        (first,) = backend.query(f"SELECT * FROM {DATABASE}.{LATENCY_SAMPLES.name} WHERE seq = 1 AND instrument = 'coinbase:BTC-USD'")
        assert first == sample(0, upstream_ms=2, gateway_ms=1)

        report = build_report(backend, since_s=600, now_ns=NOW_NS, top=5)
        assert report.samples == 2040
        assert report.hops[Hop.UPSTREAM].quantiles_ns[0.5] == 2 * MS
        assert report.hops[Hop.UPSTREAM].max_ns == 300 * MS
        assert report.hops[Hop.NATS_GATEWAY].quantiles_ns[0.9999] == 1 * MS
        assert report.hops[Hop.E2E].max_ns == pytest.approx(302.15 * MS)  # to the probe's read
        assert report.hops[Hop.READER].quantiles_ns[0.5] == MS // 20 and report.hops[Hop.GATEWAY_QUEUE].count == 0
        assert [r["instrument"] for r in report.slowest] == ["coinbase:ETH-USD"] * 5
        assert report.slowest[0]["upstream_ns"] == 300 * MS and report.slowest[0]["client_ns"] == 1 * MS
        assert report.verdict.culprit is Hop.UPSTREAM and report.verdict.ours is False, report.verdict.text
        assert format_text(report).splitlines()[0].startswith("verdict: the upstream")

        only_btc = build_report(backend, since_s=600, now_ns=NOW_NS, instrument="coinbase:BTC-USD")
        assert only_btc.samples == 2000 and only_btc.hops[Hop.UPSTREAM].max_ns == 2 * MS
        assert build_report(backend, since_s=600, now_ns=NOW_NS, region="us").samples == 0
        with pytest.raises(UnknownInstrument):
            build_report(backend, since_s=600, now_ns=NOW_NS, instrument="x' OR '1'='1")
        assert build_report(backend, since_s=600, now_ns=NOW_NS, run_id="r1").samples == 2040
        assert build_report(backend, since_s=600, now_ns=NOW_NS, run_id="r0").samples == 0
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


def test_runs_keep_apart_and_the_report_defaults_to_the_newest(tmp_path):
    backend = open_backend(tmp_path / "chdb")
    try:
        writer = ClickHouseWriter(backend)
        writer.start()
        # an earlier run, stopped, with an upstream stall; the current run is quiet
        for i in range(300):
            writer.add(LATENCY_SAMPLES.name, sample(i, upstream_ms=500, gateway_ms=1, run_id="20261201T080000Z-aaaa"))
            writer.add(LATENCY_SAMPLES.name, sample(i, upstream_ms=1, gateway_ms=1, run_id="20261201T090000Z-bbbb"))
        writer.stop()
        assert latest_run(backend) == "20261201T090000Z-bbbb"
        current = build_report(backend, since_s=600, now_ns=NOW_NS, run_id=latest_run(backend))
        assert current.samples == 300 and current.hops[Hop.UPSTREAM].max_ns == 1 * MS
        assert build_report(backend, since_s=600, now_ns=NOW_NS).samples == 600  # --run all
    finally:
        backend.close()


def test_retention_drops_rows_older_than_the_ttl(tmp_path):
    now_ns = time.time_ns()
    backend = open_backend(tmp_path / "chdb", retention_s=3600)
    try:
        table = f"{DATABASE}.{LATENCY_SAMPLES.name}"
        old = [sample(0, upstream_ms=1, gateway_ms=1, now_ns=now_ns - 2 * 3600 * 10**9)]
        fresh = [sample(i, upstream_ms=1, gateway_ms=1, now_ns=now_ns) for i in range(3)]
        backend.insert(LATENCY_SAMPLES, old + fresh)
        backend.execute(f"OPTIMIZE TABLE {table} FINAL")  # TTL applies on merge; FINAL forces one
        assert backend.query(f"SELECT count() FROM {table}") == [(3,)]
        assert "TTL" in backend.query(f"SHOW CREATE TABLE {table}")[0][0]
    finally:
        backend.close()


def test_an_older_store_gains_the_new_columns(tmp_path):
    backend = open_backend(tmp_path / "chdb")
    try:
        backend.execute(f"DROP TABLE {DATABASE}.{LATENCY_SAMPLES.name}")
        backend.execute(f"CREATE TABLE {DATABASE}.{LATENCY_SAMPLES.name} (ts_recv_ns UInt64, region String, "
                        f"instrument String, epoch String, seq UInt64, ts_event_ns UInt64, ts_ingest_ns UInt64, "
                        f"ts_publish_ns UInt64, ts_send_ns UInt64) ENGINE = MergeTree() ORDER BY ts_recv_ns")
    finally:
        backend.close()
    backend = open_backend(tmp_path / "chdb")
    try:
        backend.insert(LATENCY_SAMPLES, [sample(1, upstream_ms=1, gateway_ms=1)])
        assert backend.query(f"SELECT run_id, ts_write_ns FROM {DATABASE}.{LATENCY_SAMPLES.name}") == [("r1", 0)]
    finally:
        backend.close()
