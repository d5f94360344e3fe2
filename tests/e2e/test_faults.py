"""Faults: a slow consumer beside a fast one, and NATS restarting under a running stream."""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import orjson
import pytest

from feed.client import BookClient, VerifiedBooks
from feed.model import Side
from feed.stack import bundled_capture
from feed.procs import stop_process
from tests.e2e.harness import REPO, http_ok, ingest_snapshot, wait_async
from tests.e2e.wsraw import RawWebSocket

pytestmark = pytest.mark.e2e


def _metric(stack, name: str, labels: str = "") -> float:
    import urllib.request

    with urllib.request.urlopen(stack.base + "/metrics", timeout=2) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + (("{" + labels) if labels else "")) and not line.startswith("#"):
            if labels or line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


async def test_slow_consumer_gets_resync_then_4008_while_fast_client_stays_contiguous(make_stack):
    # Small buffers below the queue so a few seconds of stall overflow it; pings every 30 s so the stall
    # is not mistaken for a dead peer.
    stack = make_stack(workers=1, gateway_args=["--max-queue-bytes", "65536", "--ws-writer-limit-bytes", "16384",
                                                "--socket-sndbuf-bytes", "16384", "--ws-ping-interval-s", "30"])
    stack.start_nats()
    stack.start_gateway()
    # One pass at 1.5x (about 20 s): a loop restart would send one huge diff delta per instrument.
    stack.start_ingest([bundled_capture()], speed=1.5)
    instruments = await asyncio.to_thread(stack.wait_instruments, 10)

    fast = subprocess.Popen([sys.executable, "-m", "tests.e2e.client_proc", stack.ws_url, *instruments],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert (await asyncio.to_thread(fast.stdout.readline)).strip() == "READY"
        slow = RawWebSocket("127.0.0.1", stack.gateway_port, rcvbuf_bytes=4096)
        slow.send_json({"op": "subscribe", "id": 1, "instruments": instruments})
        verifier = VerifiedBooks()
        types: list[tuple[str, str | None, str | None]] = []  # (type, instrument, reason)
        deadline = time.monotonic() + 90
        # Stall (read nothing) long enough for the socket buffers and then the 64 KiB queue to fill,
        # then read everything there is; repeat until the gateway closes us after 3 overflows.
        while slow.close_code is None and time.monotonic() < deadline:
            await asyncio.sleep(4.0)  # the stall is the behaviour under test, not a synchronisation
            while slow.close_code is None and await slow.recv_some(1 << 20, timeout_s=0.3):
                for opcode, payload in slow.frames():
                    if opcode == 1:
                        m = orjson.loads(payload)
                        types.append((m["type"], m.get("instrument"), m.get("reason")))
                        verifier.on_message(m, time.time_ns())
        slow.close()
        assert slow.close_code == 4008, f"close code {slow.close_code}; last types {types[-5:]}"
        resyncs = [i for i, t in enumerate(types) if t[0] == "resync"]
        assert resyncs and all(types[i][2] == "slow_consumer" for i in resyncs)
        # Every resync is followed by a snapshot of that instrument before any delta of it.
        for i in resyncs:
            inst = types[i][1]
            following = [t[0] for t in types[i + 1:] if t[1] == inst and t[0] in ("snapshot", "delta")]
            assert not following or following[0] == "snapshot", (inst, following[:3])
        assert verifier.stats.gaps == 0 and verifier.stats.checksum_mismatches == 0, verifier.stats
        assert verifier.stats.snapshots > len(instruments)  # the first ones plus at least one resync snapshot

        fast.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(fast.communicate, timeout=20)
        st = json.loads(out.strip().splitlines()[-1])
        assert st["deltas"] > 500 and st["snapshots"] == len(instruments), st
        assert st["gaps"] == 0 and st["resyncs"] == 0 and st["closed"] is None, st
    finally:
        stop_process(fast)


async def test_nats_restart_mid_stream_recovers_correct_books(make_stack):
    """NATS restarts under the stream; the gateway loses deltas (it reconnects after the ingest), detects
    the gap, fetches snapshots; every client ends with the ingest's exact book, never a wrong one."""
    stack = make_stack(workers=1, gateway_args=["--nats-reconnect-wait-s", "1.5"])
    stack.start_nats()
    nats_port = stack.nats.port
    stack.start_gateway()
    stack.start_ingest([bundled_capture()], speed=2.0)
    instruments = await asyncio.to_thread(stack.wait_instruments, 10)
    clients = [BookClient(stack.ws_url, instruments), BookClient(stack.ws_url, instruments, conflate_ms=20)]
    for c in clients:
        await c.__aenter__()
    try:
        for c in clients:
            await c.wait_for(lambda c=c: all(c.book(i) is not None for i in instruments) and c.stats.deltas > 100, 30)
        stack.nats.stop(grace_s=0.5)
        await asyncio.to_thread(stack.start_nats, nats_port)
        await wait_async(lambda: http_ok(stack.base + "/readyz"), 20, "gateway reconnected to NATS")
        final = await asyncio.to_thread(stack.wait_ingest_done, 120)
        for c in clients:
            await c.wait_for(lambda c=c: all((lb := c.local_book(i)) is not None and (lb.epoch, lb.seq) == final[i]
                                             for i in instruments), 60)
        for inst in instruments:
            snap = await ingest_snapshot(stack.nats.url, inst)
            for c in clients:
                assert c.book(inst).wire_levels(Side.BID) == snap["bids"]
                assert c.book(inst).wire_levels(Side.ASK) == snap["asks"]
        gaps = await asyncio.to_thread(_metric, stack, "bookcast_gateway_gaps_total")
        assert gaps >= 1, "the restart lost nothing: the test did not exercise recovery"
        for c in clients:
            assert c.stats.checksum_mismatches == 0, c.stats
            assert c.stats.resyncs_received.get("upstream_gap", 0) >= 1, c.stats
    finally:
        for c in clients:
            await c.close()
