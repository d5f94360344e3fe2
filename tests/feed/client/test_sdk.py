"""BookClient and tail against scripted gateways: real WebSockets on 127.0.0.1, two "regions" sharing one
ingest history (PROTOCOL.md sections 3 and 4)."""
from __future__ import annotations

import argparse
import asyncio
import io
import random
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import orjson
import pytest
from aiohttp import WSMsgType, web

from feed.book import L2Book
from feed.client import (BookClient, BookUpdated, ConnectFailed, Connected, GapDetected, GapReason, MoveReason,
                         RegionMoved, StatusReceived)
from feed.client.tail import TailState, add_arguments, main_async, render, render_line, tail
from feed.model import Side

I = "coinbase:BAND-GBP"
DEAD_URL = "ws://127.0.0.1:1/v1/ws"  # nothing listens on port 1: connection refused
DEADLINE_S = 5.0
FAST = {"reconnect_backoff_s": (0.01, 0.05)}


class Ingest:
    """The book of record both regions serve: one instrument's epoch, seq, book and every delta."""

    def __init__(self) -> None:
        self.epoch, self.seq = "e1", 0
        self.book = L2Book(I)
        self.book.apply_snapshot([(Decimal("0.50"), Decimal(10))], [(Decimal("0.55"), Decimal(7))])
        self.history: list[dict[str, Any]] = []
        self.gateways: list[Gateway] = []
        self.rng = random.Random(7)

    def snapshot(self) -> dict[str, Any]:
        return _stamp({
            "type": "snapshot", "instrument": I, "epoch": self.epoch, "seq": self.seq,
            "bids": self.book.wire_levels(Side.BID), "asks": self.book.wire_levels(Side.ASK),
            "checksum": self.book.checksum(),
        })

    async def publish(self, *, lost: bool = False) -> None:
        """One random delta to every gateway; ``lost``: it never reaches any client."""
        side = self.rng.choice(["bid", "ask"])
        price = f"0.{self.rng.randint(40, 50) if side == 'bid' else self.rng.randint(55, 65)}"
        changes = [[side, price, self.rng.choice(["0", "1", "2.5", "30"])]]
        self.book.apply_wire_changes(changes)
        self.seq += 1
        msg = _stamp({
            "type": "delta", "instrument": I, "epoch": self.epoch, "seq": self.seq, "prev_seq": self.seq - 1,
            "changes": changes, "checksum": self.book.checksum(),
        })
        self.history.append(msg)
        for gateway in self.gateways:
            await gateway.forward(msg, lost=lost)


def _stamp(msg: dict[str, Any]) -> dict[str, Any]:
    now_ns = time.time_ns()
    return msg | {
        "ts_event_ns": now_ns - 3_000_000, "ts_ingest_ns": now_ns - 2_000_000, "ts_publish_ns": now_ns - 1_000_000
    }


class Gateway:
    """A scripted gateway: subscribe (with resume), resync, heartbeat and shutdown, for one instrument."""

    def __init__(self, ingest: Ingest, *, resume_ok: bool = True) -> None:
        self.ingest, self.resume_ok = ingest, resume_ok
        self.requests: list[dict[str, Any]] = []
        self.clients: set[web.WebSocketResponse] = set()
        self.transports: list[Any] = []  # of every connection, to crash them
        self.draining = False  # stop forwarding deltas
        self.lock = asyncio.Lock()  # a delta is either in a client's recovery or forwarded to it, never lost
        self.runner: web.AppRunner | None = None
        self.url = ""
        ingest.gateways.append(self)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/ws", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"ws://{host}:{port}/v1/ws"

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    def ops(self, op: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r.get("op") == op]

    async def forward(self, msg: dict[str, Any], *, lost: bool) -> None:
        async with self.lock:
            if lost or self.draining:
                return
            for ws in list(self.clients):
                await _send(ws, msg)

    async def heartbeat(self) -> None:
        for ws in list(self.clients):
            await _send(ws, {"type": "heartbeat", "seqs": {I: [self.ingest.epoch, self.ingest.seq]}})

    async def server_resync(self, reason: str) -> None:
        async with self.lock:
            for ws in list(self.clients):
                await _send(ws, {"type": "resync", "instrument": I, "reason": reason})
                await _send(ws, self.ingest.snapshot())

    async def crash(self) -> None:
        """Reset every connection (no close frame), then stop listening."""
        for transport in self.transports:
            if transport is not None:
                transport.abort()
        await self.stop()

    async def shutdown(self, reconnect_after_ms: int) -> None:
        for ws in list(self.clients):
            await _send(ws, {"type": "shutdown", "reconnect_after_ms": reconnect_after_ms})
            await ws.close(code=1001)

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.transports.append(request.transport)
        try:
            async for frame in ws:
                if frame.type is not WSMsgType.TEXT:
                    continue
                req = orjson.loads(frame.data)
                self.requests.append(req)
                if req["op"] == "subscribe":
                    await self._subscribe(ws, req)
                elif req["op"] == "resync":
                    async with self.lock:
                        await _send(ws, self.ingest.snapshot())
        finally:
            self.clients.discard(ws)
        return ws

    async def _subscribe(self, ws: web.WebSocketResponse, req: dict[str, Any]) -> None:
        unknown = [i for i in req["instruments"] if i != I]
        if unknown:
            await _send(ws, {"type": "error", "id": req.get("id"), "code": "unknown_instrument",
                             "message": f"no instrument {unknown[0]!r}"})
            return
        async with self.lock:
            held = req.get("resume", {}).get(I)
            recovered = (
                self.resume_ok and held is not None and held["epoch"] == self.ingest.epoch
                and held["seq"] <= self.ingest.seq
            )
            reply = {"type": "subscribed", "id": req.get("id"), "instruments": [I], "recovered": {I: recovered}}
            await _send(ws, reply)
            if recovered:
                for msg in self.ingest.history[held["seq"]:]:  # history[k] has seq k + 1
                    await _send(ws, msg)
            else:
                await _send(ws, self.ingest.snapshot())
            self.clients.add(ws)


async def _send(ws: web.WebSocketResponse, msg: dict[str, Any]) -> None:
    if not ws.closed:
        await ws.send_str(orjson.dumps(msg | {"ts_send_ns": time.time_ns()}).decode())


@pytest.fixture
async def regions() -> AsyncIterator[tuple[Ingest, Gateway, Gateway]]:
    ingest = Ingest()
    a, b = Gateway(ingest), Gateway(ingest)
    await a.start()
    await b.start()
    yield ingest, a, b
    for gateway in (a, b):
        if gateway.runner is not None and gateway.runner.server is not None:
            await gateway.stop()


def in_sync(client: BookClient, ingest: Ingest) -> bool:
    local = client.local_book(I)
    return local is not None and local.seq == ingest.seq and local.book == ingest.book


async def test_gap_is_resynced_and_recovered(regions: tuple[Ingest, Gateway, Gateway]) -> None:
    ingest, a, _ = regions
    async with BookClient([a.url], [I], **FAST) as client:
        await client.wait_for(lambda: in_sync(client, ingest), DEADLINE_S)
        for _ in range(5):
            await ingest.publish()
        await client.wait_for(lambda: in_sync(client, ingest), DEADLINE_S)
        assert client.stats.deltas == 5 and client.stats.gaps == 0

        await ingest.publish(lost=True)
        await ingest.publish()  # its prev_seq reveals the loss
        gap = None
        async with asyncio.timeout(DEADLINE_S):
            async for event in client:
                if isinstance(event, GapDetected):
                    gap = event
                if isinstance(event, BookUpdated) and event.seq == ingest.seq:
                    break
        assert gap is not None and gap.reason is GapReason.SEQ_GAP
        assert gap.detail == f"seq gap instrument={I} expected=5 got=6"  # held 5, lost 6, next prev_seq 6
        assert a.ops("resync") == [{"op": "resync", "id": a.ops("resync")[0]["id"], "instrument": I}]
        assert in_sync(client, ingest)
        assert (client.stats.gaps, client.stats.resyncs_requested, client.stats.snapshots) == (1, 1, 2)
        assert a.ops("subscribe")[0]["instruments"] == [I] and "resume" not in a.ops("subscribe")[0]


async def test_tail_loss_is_found_by_heartbeats(regions: tuple[Ingest, Gateway, Gateway]) -> None:
    ingest, a, _ = regions
    async with BookClient([a.url], [I], **FAST) as client:
        await ingest.publish()
        await client.wait_for(lambda: in_sync(client, ingest), DEADLINE_S)
        await ingest.publish(lost=True)
        await a.heartbeat()
        await a.heartbeat()
        await client.wait_for(
            lambda: client.stats.stale_heartbeat_gaps == 1 and in_sync(client, ingest), DEADLINE_S
        )
        assert len(a.ops("resync")) == 1 and client.stats.heartbeats_seen == 2


async def test_server_resync_drops_book_until_snapshot(regions: tuple[Ingest, Gateway, Gateway]) -> None:
    ingest, a, _ = regions
    async with BookClient([a.url], [I], **FAST) as client:
        await client.wait_for(lambda: in_sync(client, ingest), DEADLINE_S)
        await a.server_resync("slow_consumer")
        await ingest.publish()
        await client.wait_for(lambda: client.stats.snapshots == 2 and in_sync(client, ingest), DEADLINE_S)
        assert client.stats.resyncs_received == {"slow_consumer": 1}
        assert client.stats.resyncs_requested == 0 and a.ops("resync") == []


@pytest.mark.parametrize("resume_ok", [True, False], ids=["missed-deltas", "snapshot"])
@pytest.mark.parametrize("how", ["shutdown", "crash"])
async def test_failover_to_other_region_resumes(
    regions: tuple[Ingest, Gateway, Gateway], resume_ok: bool, how: str
) -> None:
    ingest, a, b = regions
    b.resume_ok = resume_ok
    async with BookClient([a.url, b.url], [I], **FAST) as client:
        for _ in range(4):
            await ingest.publish()
        await client.wait_for(lambda: in_sync(client, ingest), DEADLINE_S)
        assert client.connected_url == a.url
        held = client.resume_map()
        assert held == {I: {"epoch": "e1", "seq": 4}}

        a.draining = True  # these deltas never reach the client through A
        for _ in range(3):
            await ingest.publish()
        if how == "shutdown":
            await a.shutdown(reconnect_after_ms=30)
        else:
            await a.crash()
        await client.wait_for(lambda: client.connected_url == b.url and in_sync(client, ingest), DEADLINE_S)

        [subscribe] = b.ops("subscribe")
        assert subscribe["resume"] == held
        assert client.stats.reconnects == 1 and client.stats.gaps == 0 and client.stats.resyncs_requested == 0
        assert client.stats.snapshots == (1 if resume_ok else 2)  # resumed by deltas alone, or by a snapshot

        await ingest.publish()  # live again, through B
        await client.wait_for(lambda: in_sync(client, ingest), DEADLINE_S)
        assert client.books == {I: ingest.book}


async def test_instrument_status_stale_moves_to_the_next_region(regions: tuple[Ingest, Gateway, Gateway]) -> None:
    """A gateway marking a subscribed instrument ``stale`` (section 11) sends a multi-region client to the
    next region; the status arrives as a ``StatusReceived`` event decoded by the one wire model."""
    ingest, a, b = regions
    quiet = {"stale_after_s": 60.0, "health_interval_s": 60.0}  # only the status may move it
    async with BookClient(regions=[[a.url], [b.url]], instruments=[I], **FAST, **quiet) as client:
        await ingest.publish()
        await client.wait_for(lambda: client.connected_url == a.url and in_sync(client, ingest), DEADLINE_S)
        for ws in list(a.clients):  # "ok" and another instrument's "stale" move nothing
            await _send(ws, {"type": "instrument_status", "instrument": I, "status": "ok", "reason": "", "since_ns": 1})
            await _send(ws, {"type": "instrument_status", "instrument": "coinbase:OTHER-USD", "status": "stale",
                             "reason": "upstream_silent", "since_ns": 1})
            await _send(ws, {"type": "instrument_status", "instrument": I, "status": "stale",
                             "reason": "upstream_silent", "since_ns": 2})
        seen: list[StatusReceived] = []
        moved = None
        async with asyncio.timeout(DEADLINE_S):
            async for event in client:
                if isinstance(event, StatusReceived):
                    seen.append(event)
                if isinstance(event, RegionMoved):
                    moved = event
                    break
        assert [(e.instrument, e.status) for e in seen] == [(I, "ok"), ("coinbase:OTHER-USD", "stale"), (I, "stale")]
        assert seen[-1].reason == "upstream_silent" and seen[-1].since_ns == 2
        assert moved is not None and moved.reason is MoveReason.INSTRUMENT_STATUS and (moved.from_region, moved.to_region) == (0, 1)
        await client.wait_for(lambda: client.connected_url == b.url and in_sync(client, ingest), DEADLINE_S)


async def test_unreachable_url_is_skipped(regions: tuple[Ingest, Gateway, Gateway]) -> None:
    ingest, a, _ = regions
    async with BookClient([DEAD_URL, a.url], [I], **FAST) as client:
        await client.wait_for(lambda: in_sync(client, ingest), DEADLINE_S)
        first = await client.next_event(DEADLINE_S)
        second = await client.next_event(DEADLINE_S)
        assert isinstance(first, ConnectFailed) and first.url == DEAD_URL
        assert isinstance(second, Connected) and second.url == a.url and not second.reconnect
        assert client.stats.connect_failures == 1 and client.stats.reconnects == 0


async def test_close_ends_iteration(regions: tuple[Ingest, Gateway, Gateway]) -> None:
    ingest, a, _ = regions
    client = BookClient(a.url, [I], **FAST)
    async with client:
        await client.wait_for(lambda: in_sync(client, ingest), DEADLINE_S)
    seen = [event async for event in client]  # drains what was queued, then ends
    assert any(isinstance(e, BookUpdated) for e in seen)
    assert client.closed and not client.connected


# -- tail ----------------------------------------------------------------------------------------------


def _book() -> L2Book:
    book = L2Book(I)
    book.apply_snapshot(
        [(Decimal("0.52"), Decimal(100)), (Decimal("0.5"), Decimal(7612)), (Decimal("0.4"), Decimal(1))],
        [(Decimal("0.55"), Decimal("120.5")), (Decimal("0.6"), Decimal(10))],
    )
    return book


def test_render_shows_top_of_book_and_health() -> None:
    state = TailState(
        I, depth=2, url="ws://x/v1/ws", epoch="e7", seq=43, last_recv_ns=10_000_000,
        latency_ns=123_456, publish_latency_ns=2_000_500, e2e_ns=41_000_001,
        messages_per_s=12.25, gaps=1, resyncs=2, reconnects=3,
    )
    lines = render(_book(), state, now_ns=130_000_000).split("\n")
    assert lines[0] == f"{I}  epoch e7  seq 43  via ws://x/v1/ws"
    assert lines[1] == "bid 0.52 x 100  ask 0.55 x 120.5  spread 0.03  mid 0.535"
    assert lines[2:5] == [
        " size   bid | ask    size",
        "  100  0.52 | 0.55  120.5",
        " 7612   0.5 | 0.6      10",
    ]
    assert lines[5] == (
        "latency ms  send->recv 0.123  publish->recv 2.001  event->recv 41.000  (last update 120.000 ms ago)"
    )
    assert lines[6] == "msgs/s 12.2  gaps 1  resyncs 2  reconnects 3"
    assert len(lines) == 7


def test_render_before_snapshot() -> None:
    text = render(None, TailState(I), now_ns=0)
    assert text.split("\n")[0] == f"{I}  awaiting snapshot  connecting..."
    assert "send->recv -" in text and "bid " not in text
    line = render_line(None, TailState(I), now_ns=0)
    assert line.startswith(f"{I} - awaiting snapshot lat_ms send -") and "\n" not in line


async def test_tail_once_prints_one_frame(
    regions: tuple[Ingest, Gateway, Gateway], capsys: pytest.CaptureFixture[str]
) -> None:
    ingest, a, _ = regions
    await ingest.publish()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([I, "--url", DEAD_URL, "--url", a.url, "--once", "--depth", "1"])
    assert await main_async(args) == 0
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert lines[0] == f"{I}  epoch e1  seq 1  via {a.url}"
    bid, ask = ingest.book.wire_levels(Side.BID, 1)[0], ingest.book.wire_levels(Side.ASK, 1)[0]
    assert lines[1].startswith(f"bid {bid[0]} x {bid[1]}  ask {ask[0]} x {ask[1]}")
    assert len(lines) == 6  # header, top, column titles, 1 level, latency, counters
    assert "send->recv -" not in lines[4]


@pytest.mark.parametrize("tty", [False, True], ids=["pipe", "terminal"])
async def test_tail_refreshes_until_stopped(regions: tuple[Ingest, Gateway, Gateway], tty: bool) -> None:
    ingest, a, _ = regions
    await ingest.publish()
    frame_mark = f"epoch e1  seq 1  via {a.url}" if tty else f"{I} e1:1 bid "

    class Out(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.two_frames = asyncio.Event()

        def isatty(self) -> bool:
            return tty

        def write(self, text: str) -> int:
            n = super().write(text)
            if self.getvalue().count(frame_mark) >= 2:
                self.two_frames.set()
            return n

    out, stop = Out(), asyncio.Event()
    task = asyncio.create_task(tail([a.url], I, refresh_s=0.02, out=out, stop=stop))
    await asyncio.wait_for(out.two_frames.wait(), DEADLINE_S)
    stop.set()
    assert await asyncio.wait_for(task, DEADLINE_S) == 0
    text = out.getvalue()
    if tty:
        assert text.startswith("\x1b[2J\x1b[H") and text.count("\x1b[H") >= 2 and text.endswith("\x1b[K\x1b[J")
    else:
        assert "\x1b" not in text and text.endswith("\n")
        assert text.rstrip("\n").split("\n")[-1].startswith(frame_mark)


async def test_tail_unknown_instrument_exits_1(
    regions: tuple[Ingest, Gateway, Gateway], capsys: pytest.CaptureFixture[str]
) -> None:
    _, a, _ = regions
    assert await asyncio.wait_for(tail([a.url], "coinbase:NOPE", out=io.StringIO()), DEADLINE_S) == 1
    assert "unknown_instrument: no instrument 'coinbase:NOPE'" in capsys.readouterr().err


async def test_tail_no_connection_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert await asyncio.wait_for(tail([DEAD_URL], I, out=io.StringIO(), connect_timeout_s=0.3), DEADLINE_S) == 2
    assert f"could not connect to {DEAD_URL} within 0.3 s" in capsys.readouterr().err
