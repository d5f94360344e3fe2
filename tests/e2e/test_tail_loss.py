"""Tail loss: the last delta is lost and nothing follows to reveal it. The gateway must notice from the
ingest's directory announcements and resync clients, never leave them silently behind.

A scripted ingest (real NATS, real gateway, real WebSocket client) publishes deltas 1-2, "loses" 3, and
announces seq 3.
"""
from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import aiohttp
import nats
import orjson
import pytest

from feed import wire
from feed.book import L2Book
from feed.model import LevelChange, Side
from feed.sequencer import SequencedDelta
from feed.subjects import delta_subject, directory_subject, snapshot_subject

pytestmark = pytest.mark.e2e
INSTRUMENT = "test:TAIL-LOSS"


class ScriptedIngest:
    def __init__(self, nc) -> None:
        self.nc = nc
        self.book = L2Book(INSTRUMENT)
        self.book.apply_snapshot([(Decimal("1"), Decimal("5"))], [(Decimal("2"), Decimal("5"))])
        self.seq = 0

    async def start(self) -> None:
        await self.nc.subscribe(snapshot_subject(INSTRUMENT), cb=self._snapshot)

    async def _snapshot(self, msg) -> None:
        await msg.respond(wire.dumps(wire.snapshot_message(INSTRUMENT, "E", self.seq, self.book, ts_event_ns=None,
                                                           ts_ingest_ns=1, ts_publish_ns=2)))

    async def announce(self) -> None:
        await self.nc.publish(directory_subject("test"), orjson.dumps(
            {"ingest": "scripted", "venue": "test", "done": False,
             "instruments": [{"instrument": INSTRUMENT, "venue": "test", "epoch": "E", "seq": self.seq}]}))
        await self.nc.flush()

    async def delta(self, size: str, *, publish: bool = True) -> None:
        change = LevelChange(Side.BID, Decimal("1"), Decimal(size))
        self.book.apply_changes([change])
        self.seq += 1
        d = SequencedDelta(INSTRUMENT, "E", self.seq - 1, self.seq, [change], self.book.checksum(), None)
        if publish:
            await self.nc.publish(delta_subject(INSTRUMENT), wire.dumps(wire.delta_message(d, ts_ingest_ns=1,
                                                                                             ts_publish_ns=2)))
            await self.nc.flush()


async def _next_data(ws) -> dict:
    while True:
        m = orjson.loads((await ws.receive(timeout=10)).data)
        if m["type"] != "heartbeat":
            return m


async def test_lost_last_delta_is_detected_from_directory_and_resynced(make_stack):
    stack = make_stack(workers=1)
    stack.start_nats()
    stack.start_gateway()
    nc = await nats.connect(stack.nats.url)
    try:
        ingest = ScriptedIngest(nc)
        await ingest.start()
        await ingest.announce()
        await asyncio.to_thread(stack.wait_instruments, 1)
        async with aiohttp.ClientSession() as s, s.ws_connect(stack.ws_url) as ws:
            await ws.send_str(json.dumps({"op": "subscribe", "instruments": [INSTRUMENT]}))
            assert (await _next_data(ws))["type"] == "subscribed"
            snap = await _next_data(ws)
            assert (snap["type"], snap["seq"]) == ("snapshot", 0)
            for size in ("6", "7"):
                await ingest.delta(size)
                d = await _next_data(ws)
                assert (d["type"], d["seq"]) == ("delta", ingest.seq)
            await ingest.delta("8", publish=False)  # lost on the way, and nothing follows it
            await ingest.announce()
            await ingest.announce()  # a second announcement still ahead: the loss is confirmed
            notice = await _next_data(ws)
            assert notice == {"type": "resync", "instrument": INSTRUMENT, "reason": "upstream_gap"}
            snap = await _next_data(ws)
            assert (snap["type"], snap["seq"]) == ("snapshot", 3)
            assert snap["bids"] == [["1", "8"]] and snap["checksum"] == ingest.book.checksum()
    finally:
        await nc.close()
