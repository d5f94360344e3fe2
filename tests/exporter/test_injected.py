"""Known injected delays show up in the right hop: in the services' Prometheus histograms, in the probe's
window quantiles, and in the report's verdict.

Real components: nats-server, a gateway process (its slow-gateway hook), the ingest (its lagging-upstream
hook; run in this test's event loop so the hook can be set without a CLI flag), a probe process writing to
chDB, and ``bookcast latency report`` reading it after the probe stopped. Every wait polls asynchronously
(the ingest shares this loop) with a deadline.

Tolerances: the bundled Coinbase capture's own upstream hop is -13 ms at the median (recorder clock behind
the venue; counted as skew, recorded as 0) and under 40 ms at p99, so a lag L shows as an upstream median in
[L - 50 ms, L + 50 ms]; a fan-out delay D is a floor on the NATS + gateway hop, whose median we expect in
[D, D + 60 ms] on a loaded two-core machine.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from exporter.clickhouse import BOOK_EVENTS, DATABASE, open_backend
from feed.book import L2Book
from feed.ingest import Ingest, IngestConfig
from feed.natsserver import NatsServer
from feed.procs import free_port, stop_process
from feed.stack import bundled_capture
from tests.e2e.harness import REPO, spawn_cli

pytestmark = pytest.mark.e2e
MS = 1e-3


async def _get(session: aiohttp.ClientSession, url: str) -> str | None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
            return await r.text() if r.status == 200 else None
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


async def _until(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not true after {timeout_s} s")
        await asyncio.sleep(interval_s)


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


def _value(text: str, name: str, **labels: str) -> float:
    return sum(v for lab, v in _samples(text, name) if all(lab.get(k) == x for k, x in labels.items()))


def median_bucket(text: str, histogram: str) -> tuple[float, float]:
    """The (lower, upper] bucket bounds holding the median of a histogram (summed over label sets)."""
    cumulative: dict[float, float] = {}
    for labels, value in _samples(text, f"{histogram}_bucket"):
        le = float(labels["le"])
        cumulative[le] = cumulative.get(le, 0.0) + value
    bounds = sorted(cumulative)
    total = cumulative[float("inf")]
    assert total > 0, f"{histogram} observed nothing"
    lower = 0.0
    for le in bounds:
        if cumulative[le] >= total / 2:
            return lower, le
        lower = le
    raise AssertionError("unreachable")


async def _promtool_ok(text: str) -> None:
    proc = await asyncio.create_subprocess_exec("promtool", "check", "metrics", stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate(text.encode())
    assert proc.returncode == 0, out.decode()


async def run_scenario(tmp: Path, *, lag_ms: float, delay_ms: float, workers: int) -> dict:
    """Run the stack with the hooks set until the probe measured enough; return every exposition and the report."""
    nats_server = NatsServer(port=0, name="exporter-e2e", workdir=str(tmp))
    nats_server.start()
    gateway = probe = None
    ingest = Ingest(IngestConfig(nats_url=nats_server.url, captures=[bundled_capture()], speed=1.0, loop=True,
                                 upstream_lag_ns=int(lag_ms * 1e6)), registry=CollectorRegistry())
    runner = web.AppRunner(ingest.http_app())
    replay = None
    try:
        gw_port, ingest_port, probe_port = free_port(), free_port(), free_port()
        gateway = spawn_cli(["gateway", "--nats", nats_server.url, "--port", str(gw_port), "--workers", str(workers),
                             "--test-fanout-delay-ms", str(delay_ms)], tmp / "gateway.log")
        await ingest.start()
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", ingest_port).start()
        replay = asyncio.get_running_loop().create_task(ingest.run())
        base = f"http://127.0.0.1:{gw_port}"
        async with aiohttp.ClientSession() as http:
            async def listed():
                body = await _get(http, base + "/v1/instruments")
                return body is not None and len(json.loads(body)["instruments"]) >= 10
            await _until(listed, 30, "gateway lists the bundled capture's 10 instruments")
            chdb = tmp / "chdb"
            probe = spawn_cli(["probe", "--region", f"eu=ws://127.0.0.1:{gw_port}/v1/ws", "--http-port", str(probe_port),
                               "--clickhouse", str(chdb), "--stale-after-s", "60"], tmp / "probe.log")

            async def measured():
                text = await _get(http, f"http://127.0.0.1:{probe_port}/metrics")
                if text and _value(text, "bookcast_probe_latency_window_seconds_count", hop="e2e", window="1m") >= 1500:
                    return text
                assert probe.poll() is None, (tmp / "probe.log").read_text()
                return None
            probe_text = await _until(measured, 60, "probe measured 1,500 deltas in its 1m window")
            ingest_text = await _get(http, f"http://127.0.0.1:{ingest_port}/metrics")
            gateway_text = await _get(http, base + "/metrics")
        assert stop_process(probe, grace_s=20) == 0, (tmp / "probe.log").read_text()
        report = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "feed.cli", "latency", "report", "--since", "10m", "--format", "json",
            "--clickhouse", str(chdb), cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await report.communicate()
        assert report.returncode == 0, err.decode()
        ticks = await asyncio.get_running_loop().run_in_executor(None, _tick_history, chdb)
        return {"probe": probe_text, "ingest": ingest_text, "gateway": gateway_text, "report": json.loads(out),
                "ticks": ticks}
    finally:
        for proc in (probe, gateway):
            if proc is not None:
                stop_process(proc, grace_s=10)
        if replay is not None:
            replay.cancel()
        await runner.cleanup()
        await ingest.stop()
        nats_server.stop()


def _tick_history(chdb: Path) -> list[tuple]:
    backend = open_backend(chdb)
    try:
        return backend.query(f"SELECT instrument, epoch, seq, prev_seq, kind, checksum, side, price, size "
                             f"FROM {DATABASE}.{BOOK_EVENTS.name} ORDER BY ts_recv_ns")
    finally:
        backend.close()


def assert_tick_history_rebuilds_every_book(ticks: list[tuple]) -> None:
    """Replaying the stored book events (snapshot, then deltas in order) gives every checksum the wire had."""
    books: dict[str, tuple[L2Book, int]] = {}
    deltas = 0
    for instrument, epoch, seq, prev_seq, kind, checksum, side, price, size in ticks:
        if kind == "snapshot":
            book = L2Book(instrument)
            book.apply_wire_changes(list(zip(side, price, size)))
        else:
            book, held = books[instrument]
            assert prev_seq == held, (instrument, held, prev_seq)
            book.apply_wire_changes(list(zip(side, price, size)))
            deltas += 1
        assert book.checksum() == checksum, (instrument, seq)
        books[instrument] = (book, seq)
    assert len(books) == 10 and deltas >= 1500


def _window_p50_s(text: str, hop: str) -> float:
    return _value(text, "bookcast_probe_latency_window_seconds", hop=hop, window="1m", quantile="0.5")


async def test_a_lagging_upstream_shows_in_the_upstream_hop(tmp_path):
    lag_ms = 350
    r = await run_scenario(tmp_path, lag_ms=lag_ms, delay_ms=0, workers=1)
    for name in ("probe", "ingest", "gateway"):
        await _promtool_ok(r[name])
    # services' Prometheus: upstream in the (250 ms, 500 ms] bucket, the other hops far below it
    assert median_bucket(r["ingest"], "bookcast_hop_upstream_seconds") == (0.25, 0.5)
    assert median_bucket(r["ingest"], "bookcast_hop_ingest_seconds")[1] <= 0.01
    assert median_bucket(r["gateway"], "bookcast_hop_nats_gateway_seconds")[1] <= 0.1
    # the probe's exact window quantiles
    assert (lag_ms - 50) * MS <= _window_p50_s(r["probe"], "upstream") <= (lag_ms + 50) * MS
    assert _window_p50_s(r["probe"], "nats_gateway") < 0.1
    # the report, from chDB after the probe flushed on stop
    assert_tick_history_rebuilds_every_book(r["ticks"])
    report = r["report"]
    assert report["samples"] >= 1500
    assert (lag_ms - 50) * 1e6 <= report["hops"]["upstream"]["p50_ns"] <= (lag_ms + 50) * 1e6
    assert report["verdict"]["culprit"] == "upstream" and report["verdict"]["ours"] is False, report["verdict"]


async def test_a_slow_gateway_shows_in_the_nats_gateway_hop(tmp_path):
    delay_ms = 150
    r = await run_scenario(tmp_path, lag_ms=0, delay_ms=delay_ms, workers=2)
    for name in ("probe", "ingest", "gateway"):
        await _promtool_ok(r[name])
    assert median_bucket(r["gateway"], "bookcast_hop_nats_gateway_seconds") == (0.1, 0.25)
    assert median_bucket(r["ingest"], "bookcast_hop_upstream_seconds")[1] <= 0.1
    assert delay_ms * MS <= _window_p50_s(r["probe"], "nats_gateway") <= (delay_ms + 60) * MS
    assert _window_p50_s(r["probe"], "upstream") < 0.05
    # the capture's recorder clock is behind the venue: most upstream samples are skewed, and counted
    assert _value(r["ingest"], "bookcast_ingest_upstream_clock_skew_total") > 0
    assert _value(r["probe"], "bookcast_probe_clock_skew_total", hop="upstream") > 0
    assert _value(r["ingest"], "bookcast_ingest_provider_up", provider=f"replay:{bundled_capture().name}") == 1
    report = r["report"]
    assert delay_ms * 1e6 <= report["hops"]["nats_gateway"]["p50_ns"] <= (delay_ms + 60) * 1e6
    assert report["verdict"]["culprit"] == "nats_gateway" and report["verdict"]["ours"] is True, report["verdict"]
    assert report["slowest"] and all(s["nats_gateway_ns"] >= delay_ms * 1e6 for s in report["slowest"])
