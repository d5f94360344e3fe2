"""A region's gateway (``--region``) whose snapshot requests no ingest answers (issue 9): the leader's region died
and the standby ingest, subscribed to the snapshot subjects, stays silent (it is not the leader), so NATS never
says "no responders". The region's KV books are served as soon as the live deltas the gateway holds chain onto
them, not after ``--snapshot-timeout-s``; a leader that starts answering after the request went out (the standby
that took over) is heard from a repeated send, not after the timeout; and a KV book older than the live stream
(the old epoch after a lossy takeover) is never served, however long nobody answers.

Real nats-server with JetStream (the region's ``md_books_<region>`` bucket), real gateway process, real WebSocket
client; a scripted leader publishes deltas, writes its KV book and answers (or stops answering) snapshot requests.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from decimal import Decimal

import aiohttp
import nats
import orjson
import pytest

from feed import wire
from feed.book import L2Book
from feed.ha import books_bucket, kv_key
from feed.model import LevelChange, Side
from feed.natsserver import NatsServer
from feed.sequencer import SequencedDelta
from feed.subjects import PREFIX, delta_subject, directory_subject, snapshot_subject

pytestmark = pytest.mark.e2e
REGION = "a"


class ScriptedLeader:
    """One instrument's leading ingest, as far as the gateway can tell: deltas, directory, snapshot answers, and
    the KV book the real leader writes every second (``feed.ha``)."""

    def __init__(self, nc, instrument: str, epoch: str, bid: str) -> None:
        self.nc, self.instrument, self.epoch, self.seq = nc, instrument, epoch, 0
        self.book = L2Book(instrument)
        self.book.apply_snapshot([(Decimal(bid), Decimal("5"))], [(Decimal("2"), Decimal("5"))])
        self.sub = None

    def snapshot_bytes(self) -> bytes:
        return wire.dumps(wire.snapshot_message(self.instrument, self.epoch, self.seq, self.book, ts_event_ns=None,
                                                ts_ingest_ns=1, ts_publish_ns=2))

    async def answer(self) -> None:
        async def on_request(msg) -> None:
            await msg.respond(self.snapshot_bytes())

        self.sub = await self.nc.subscribe(snapshot_subject(self.instrument), cb=on_request)
        await self.nc.flush()

    async def stop_answering(self) -> None:
        await self.sub.unsubscribe()
        await self.nc.flush()

    async def announce(self) -> None:
        venue = self.instrument.split(":")[0]
        await self.nc.publish(directory_subject(venue), orjson.dumps(
            {"ingest": "scripted", "venue": venue, "done": False,
             "instruments": [{"instrument": self.instrument, "venue": venue, "epoch": self.epoch, "seq": self.seq}]}))
        await self.nc.flush()

    async def delta(self, size: str, *, publish: bool = True) -> None:
        change = LevelChange(Side.BID, Decimal("1"), Decimal(size))
        self.book.apply_changes([change])
        self.seq += 1
        d = SequencedDelta(self.instrument, self.epoch, self.seq - 1, self.seq, [change], self.book.checksum(), None)
        if publish:
            await self.nc.publish(delta_subject(self.instrument),
                                  wire.dumps(wire.delta_message(d, ts_ingest_ns=1, ts_publish_ns=2)))
            await self.nc.flush()

    async def write_kv(self, kv) -> None:
        await kv.put(kv_key("snap", self.instrument), self.snapshot_bytes())


class SilentStandby:
    """The standby ingest's snapshot subscription as a gateway sees it: it is not the leader, so it says nothing
    (``feed.ingest``); it counts the requests it swallowed."""

    def __init__(self) -> None:
        self.requests = 0

    async def start(self, nc) -> SilentStandby:
        async def swallow(msg) -> None:
            self.requests += 1

        await nc.subscribe(f"{PREFIX}.snap.*.*", cb=swallow)
        await nc.flush()
        return self


async def _books_kv(js):
    """The region's KV books as ``feed.ha.bind_bucket`` makes them (direct get on), on a server of no cluster."""
    from nats.js.api import DiscardPolicy, StreamConfig

    bucket = books_bucket(REGION)
    await js.add_stream(StreamConfig(name=f"KV_{bucket}", subjects=[f"$KV.{bucket}.>"], allow_direct=True,
                                     allow_rollup_hdrs=True, deny_delete=True, discard=DiscardPolicy.NEW,
                                     max_msgs_per_subject=1))
    return await js.key_value(bucket)


@pytest.fixture
def region_gateway(make_stack, tmp_path):
    """``make(timeout_s)``: a nats-server with JetStream and a region-``a`` gateway on it whose snapshot requests
    time out after ``timeout_s``."""
    def make(timeout_s: float):
        stack = make_stack(workers=1, gateway_args=["--region", REGION, "--snapshot-timeout-s", f"{timeout_s:g}",
                                                    "--ingest-silent-s", "0"])
        stack.nats = NatsServer(name="kv-nats", workdir=str(stack.tmp), jetstream=True)
        stack.nats.start()
        stack.start_gateway()
        return stack
    return make


async def _frame(ws, timeout_s: float = 30) -> dict:
    """The next frame that is not a heartbeat or an instrument status, within ``timeout_s`` (else TimeoutError)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = orjson.loads((await ws.receive(timeout=max(deadline - time.monotonic(), 0.001))).data)
        if m["type"] not in ("heartbeat", "instrument_status"):
            return m


async def _subscribed(ws, instrument: str) -> dict:
    await ws.send_str(json.dumps({"op": "subscribe", "instruments": [instrument]}))
    assert (await _frame(ws))["type"] == "subscribed"
    return await _frame(ws)


async def _wait_listed(stack, instrument: str) -> None:
    deadline = time.monotonic() + 30
    while instrument not in {i["instrument"] for i in await asyncio.to_thread(stack.instruments)}:
        assert time.monotonic() < deadline, f"{instrument} not listed by the gateway"
        await asyncio.sleep(0.05)


def _fetch_failures(stack) -> float:
    with urllib.request.urlopen(stack.base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.search(r"^bookcast_gateway_snapshot_fetch_failures_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def _leading(stack, nc, instrument: str):
    """The region's books bucket, a silent standby subscribed beside a scripted leader of epoch E1 that answers
    snapshot requests, and the instrument listed by the gateway."""
    kv = await _books_kv(nc.jetstream())
    standby = await SilentStandby().start(nc)
    leader = ScriptedLeader(nc, instrument, "E1", "1")
    await leader.answer()
    await leader.announce()
    await _wait_listed(stack, leader.instrument)
    return kv, standby, leader


async def test_kv_book_the_live_deltas_chain_onto_and_a_late_leaders_answer_are_served_without_waiting_out_the_timeout(
        region_gateway):
    stack = region_gateway(600)  # a request waited out would never end within the test
    nc = await nats.connect(stack.nats.url)
    try:
        kv, standby, leader = await _leading(stack, nc, "test:KV-CURRENT")
        async with aiohttp.ClientSession() as s, s.ws_connect(stack.ws_url) as ws:
            snap = await _subscribed(ws, leader.instrument)
            assert (snap["type"], snap["epoch"], snap["seq"]) == ("snapshot", "E1", 0)
            for size in ("6", "7"):
                await leader.delta(size)
                d = await _frame(ws)
                assert (d["type"], d["seq"]) == ("delta", leader.seq)
            await leader.stop_answering()  # its region is gone; only the silent standby is subscribed
            await leader.delta("8", publish=False)  # 3 and 4: lost with the region
            await leader.delta("9", publish=False)
            await leader.write_kv(kv)  # its last KV write reached this region: the book at 4
            await leader.delta("10")  # 5, the gap the gateway sees
            notice = await _frame(ws)
            assert (notice["type"], notice["reason"]) == ("resync", "upstream_gap"), notice
            snap = await _frame(ws)  # KV's 4 with the held 5 applied: long before the 600 s timeout
            assert (snap["type"], snap["epoch"], snap["seq"]) == ("snapshot", "E1", 5), snap
            assert snap["checksum"] == leader.book.checksum()
            await leader.delta("11")
            d = await _frame(ws)
            assert (d["type"], d["seq"]) == ("delta", 6)
            # a lossy takeover: the new leader answers only once it leads, so the gateway's first request reached
            # nobody but the silent standby (and the KV book is the old epoch's): a later send gets the answer
            new = ScriptedLeader(nc, leader.instrument, "E2", "3")
            swallowed = standby.requests
            await new.delta("4")
            notice = await _frame(ws)
            assert (notice["type"], notice["reason"]) == ("resync", "epoch_change"), notice
            deadline = time.monotonic() + 30
            while standby.requests == swallowed:
                assert time.monotonic() < deadline, "the gateway sent no snapshot request"
                await asyncio.sleep(0.02)
            await new.answer()
            snap = await _frame(ws)  # long before the 600 s timeout of the request first sent
            assert (snap["type"], snap["epoch"], snap["seq"]) == ("snapshot", "E2", 1), snap
            assert snap["checksum"] == new.book.checksum()
        assert "from region a's KV books" in stack.log("gateway")
    finally:
        await nc.close()


async def test_kv_book_of_the_old_epoch_is_never_served_after_a_lossy_takeover(region_gateway):
    stack = region_gateway(0.5)  # a gateway that gave up on the ingest this fast used to serve KV at once
    nc = await nats.connect(stack.nats.url)
    try:
        kv, _, old = await _leading(stack, nc, "test:KV-EPOCH")
        async with aiohttp.ClientSession() as s, s.ws_connect(stack.ws_url) as ws:
            snap = await _subscribed(ws, old.instrument)
            assert (snap["type"], snap["epoch"]) == ("snapshot", "E1")
            for size in ("6", "7", "8"):
                await old.delta(size)
                assert (await _frame(ws))["seq"] == old.seq
            await old.write_kv(kv)  # the old leader's last KV book: E1 at 3, ahead of nothing the client lacks
            await old.stop_answering()  # gone
            new = ScriptedLeader(nc, old.instrument, "E2", "3")  # lossy takeover: a new epoch on its own book
            await new.delta("4")  # E2 1: the gateway sees the epoch change
            await new.announce()
            notice = await _frame(ws)
            assert (notice["type"], notice["reason"]) == ("resync", "epoch_change"), notice
            # no ingest answers: the gateway must keep failing (and retrying), never fall back to E1's KV book
            failures_before = _fetch_failures(stack)
            deadline = time.monotonic() + 60
            while _fetch_failures(stack) < failures_before + 2:
                assert time.monotonic() < deadline, "the gateway did not retry its snapshot fetch"
                try:
                    frame = await _frame(ws, timeout_s=0.2)
                except asyncio.TimeoutError:
                    continue
                assert frame["type"] != "snapshot", f"served a book while no ingest answered: {frame}"
            async with s.get(stack.base + f"/v1/book/{old.instrument}") as r:
                assert r.status == 503, (r.status, await r.text())  # REST: no old-epoch book either
            await new.answer()  # the new leader took over: its next answer is served
            snap = await _frame(ws)
            assert (snap["type"], snap["epoch"], snap["seq"]) == ("snapshot", "E2", 1), snap
            assert snap["checksum"] == new.book.checksum()
            await new.delta("5")
            d = await _frame(ws)
            assert (d["type"], d["epoch"], d["seq"]) == ("delta", "E2", 2)
        assert "from region a's KV books" not in stack.log("gateway")
    finally:
        await nc.close()
