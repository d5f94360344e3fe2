"""Graceful gateway stop and client failover: shutdown notice, close 1001, SDK moves on and resumes."""
from __future__ import annotations

import asyncio
import signal

import aiohttp
import orjson
import pytest

from feed.client import BookClient
from feed.procs import stop_process
from feed.stack import bundled_capture
from tests.e2e.harness import Stack, ingest_snapshot

pytestmark = pytest.mark.e2e


async def test_gateway_stop_sends_shutdown_and_sdk_fails_over_to_the_next_gateway(make_stack, tmp_path):
    a = make_stack(workers=1)
    a.start_nats()
    a.start_gateway()
    a.start_ingest([bundled_capture()], speed=2.0)
    b = Stack(tmp_path / "b", workers=1, nats=a.nats)  # a second gateway on the same NATS
    (tmp_path / "b").mkdir()
    b.start_gateway()
    try:
        instruments = await asyncio.to_thread(a.wait_instruments, 10)
        await asyncio.to_thread(b.wait_instruments, 10)
        async with aiohttp.ClientSession() as s, s.ws_connect(a.ws_url) as raw:
            async with BookClient([a.ws_url, b.ws_url], instruments) as client:
                await client.wait_for(lambda: all(client.book(i) is not None for i in instruments)
                                      and client.stats.deltas > 50, 30)
                assert client.connected_url == a.ws_url
                a.gateway.send_signal(signal.SIGTERM)
                # An outside client sees the notice, then close 1001.
                seen = []
                while True:
                    m = await raw.receive(timeout=10)
                    if m.type is not aiohttp.WSMsgType.TEXT:
                        break
                    seen.append(orjson.loads(m.data)["type"])
                assert "shutdown" in seen and raw.close_code == 1001
                await client.wait_for(lambda: client.connected and client.connected_url == b.ws_url, 20)
                final = await asyncio.to_thread(a.wait_ingest_done, 120)
                await client.wait_for(lambda: all((lb := client.local_book(i)) is not None
                                                  and (lb.epoch, lb.seq) == final[i] for i in instruments), 60)
                for inst in instruments:
                    snap = await ingest_snapshot(a.nats.url, inst)
                    assert client.book(inst).checksum() == snap["checksum"]
                st = client.stats
                assert st.gaps == 0 and st.checksum_mismatches == 0 and st.reconnects == 1, st
    finally:
        if b.gateway is not None:
            stop_process(b.gateway)
    assert a.gateway.wait(timeout=15) == 0  # drained and exited cleanly
