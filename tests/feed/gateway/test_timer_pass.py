"""The worker's timer pass (``Gateway.tick_due``): a ``heartbeat`` on every connection silent for one interval
(PROTOCOL.md section 4), written by the pass itself; every connection holding no book is written the same
frame (one per slice), a subscribed one its own ``seqs``; a connection busy writing, asking for write stamps
or over its socket limit goes through its writer; a token that expired closes 4001."""
from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from feed import wire
from feed.gateway.app import Connection, Gateway
from feed.gateway.config import GatewayConfig
from feed.gateway.framing import frame_payload
from feed.gateway.instrument import InstrumentMachine
from feed.gateway.session import Session
from tests.feed.gateway.conftest import INST, Ingest


class Transport:
    """What the gateway writes to one socket (frames kept), and how much it says it still holds."""

    def __init__(self, held_bytes: int = 0) -> None:
        self.writes: list[bytes] = []
        self.held_bytes = held_bytes

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def writelines(self, frames) -> None:
        self.writes.append(b"".join(frames))

    def get_write_buffer_size(self) -> int:
        return self.held_bytes

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name, default=None):
        return default


class OpenWebSocket:
    closed = False


class NoDrain:
    async def drain(self) -> None:
        return None


class Token:
    def __init__(self, expires_at_ns: int) -> None:
        self.expires_at_ns = expires_at_ns

    def allows(self, instrument: str) -> bool:
        return True


def _messages(data: bytes) -> list[dict]:
    """The JSON messages of concatenated unmasked frames, each shorter than 126 bytes or 16-bit sized."""
    out = []
    while data:
        n = data[1] & 0x7F
        head, size = (4, int.from_bytes(data[2:4], "big")) if n == 126 else (2, n)
        out.append(wire.loads(frame_payload(data[:head + size])))
        data = data[head + size:]
    return out


def _gateway() -> Gateway:
    gw = Gateway(GatewayConfig(), CollectorRegistry())
    ing = Ingest()
    machine = InstrumentMachine(INST)
    gw.machines[INST], gw.links[INST], gw.trade_links[INST] = machine, {}, set()
    gw._hops[INST] = gw.metrics.hop_nats_gateway("test")
    machine.start()
    gw._execute(machine, machine.on_snapshot_reply(ing.snapshot(), time.time_ns()))
    return gw


def _connect(gw: Gateway, now_ns: int, transport: Transport | None = None, **session_kw) -> Connection:
    session = Session(gw, gw.limits, now_ns, tally=gw.tally, **session_kw)
    conn = Connection(gw, OpenWebSocket(), session, transport or Transport(), NoDrain())  # type: ignore[arg-type]
    gw.connections.add(conn)
    return conn


async def _settle(conns: list[Connection]) -> None:
    """Let woken writers write what is queued and go idle again (a few loop passes, with a deadline)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        await asyncio.sleep(0)
        if all(not c.session.queue.items and (c.writer is None or c.idle) for c in conns):
            return
    raise AssertionError("writers did not go idle")


async def _stop(conns: list[Connection]) -> None:
    writers = [c.writer for c in conns if c.writer is not None]
    for w in writers:
        w.cancel()
    await asyncio.gather(*writers, return_exceptions=True)


async def test_idle_connections_share_one_heartbeat_frame_and_a_subscribed_one_gets_its_seqs():
    gw = _gateway()
    interval = gw._heartbeat_ns
    t0 = time.time_ns()
    idle = [_connect(gw, t0) for _ in range(3)]
    sub = _connect(gw, t0)
    gw._apply_links(sub.session, sub.session.on_text(b'{"op":"subscribe","id":1,"instruments":["%s"]}' % INST.encode(), t0))
    await _settle([sub])
    assert [m["type"] for m in _messages(b"".join(sub.transport.writes))] == ["subscribed", "snapshot"]
    sub.transport.writes.clear()
    sub.session.last_send_ns = t0  # its snapshot went out at t0
    conns = [*idle, sub]
    sent = gw.tally[("sent", "control")]

    gw._tick_slice(conns, t0 + interval - 1, gw.config.ws_writer_limit_bytes)  # 1 ns short of the interval
    assert all(not c.transport.writes for c in conns) and gw.tally[("sent", "control")] == sent
    assert len(gw.timers.due(t0 + interval + gw.timers.slot_ns)) == 4  # each filed again for its due time

    now = t0 + interval
    gw._tick_slice(conns, now, gw.config.ws_writer_limit_bytes)
    frames = [c.transport.writes for c in idle]
    assert all(len(f) == 1 for f in frames) and frames[0][0] is frames[1][0] is frames[2][0]  # one shared frame
    assert _messages(frames[0][0]) == [{"type": "heartbeat", "ts_send_ns": now, "seqs": {}}]
    (own,) = sub.transport.writes
    assert _messages(own) == [{"type": "heartbeat", "ts_send_ns": now, "seqs": {INST: ["e1", 0]}}]
    assert gw.tally[("sent", "control")] == sent + 4
    # each is due again one interval after this heartbeat, not before
    assert gw.timers.due(now + interval - 1) == []  # never early, at most one slot late
    assert sorted(map(id, gw.timers.due(now + interval + gw.timers.slot_ns))) == sorted(map(id, conns))

    gw._tick_slice(conns, now + interval // 2, gw.config.ws_writer_limit_bytes)  # silent only half an interval
    assert all(len(c.transport.writes) == 1 for c in conns)
    await _stop(conns)


async def test_tick_due_sends_a_heartbeat_after_an_interval_of_silence_in_slices():
    gw = _gateway()
    interval = gw._heartbeat_ns
    now = time.time_ns()
    conns = [_connect(gw, now - 2 * interval) for _ in range(5)]
    quiet = _connect(gw, now + 10 * interval)  # sent something just now (a clock far ahead): nothing due
    for c in (*conns, quiet):
        gw.timers.add(c, now - interval)
    await gw.tick_due(slice_size=2)  # three slices, the loop let run between them
    assert [len(c.transport.writes) for c in conns] == [1] * 5 and not quiet.transport.writes
    assert {_messages(c.transport.writes[0])[0]["type"] for c in conns} == {"heartbeat"}
    assert len(gw.timers) == 6  # every connection filed again
    await _stop([*conns, quiet])


async def test_a_paced_pass_spreads_its_slices_over_the_slot():
    gw = _gateway()
    interval, slot_ns = gw._heartbeat_ns, gw.timers.slot_ns
    now = time.time_ns()
    conns = [_connect(gw, now - 2 * interval) for _ in range(6)]
    for c in conns:
        gw.timers.add(c, now - interval)
    await gw.tick_due(slice_size=2, paced=True)  # three slices, a third of a slot apart
    stamps = [_messages(c.transport.writes[0])[0]["ts_send_ns"] for c in conns]
    assert [len(c.transport.writes) for c in conns] == [1] * 6
    assert stamps[0] == stamps[1] and stamps[2] == stamps[3] and stamps[4] == stamps[5]  # one clock read a slice
    gap_ns = slot_ns // 3
    assert stamps[2] - stamps[0] >= gap_ns - 2_000_000 and stamps[4] - stamps[2] >= gap_ns - 2_000_000
    assert len(gw.timers) == 6
    await _stop(conns)


async def test_busy_stamped_or_full_connections_get_their_heartbeat_through_the_writer():
    gw = _gateway()
    interval = gw._heartbeat_ns
    t0 = time.time_ns()
    busy = _connect(gw, t0)
    busy.idle = False  # its writer is writing (or waiting for the socket to drain)
    stamped = _connect(gw, t0)
    stamped.write_stamps = True
    full = _connect(gw, t0, Transport(held_bytes=gw.config.ws_writer_limit_bytes + 1))
    now = t0 + interval
    gw._tick_slice([busy, stamped, full], now, gw.config.ws_writer_limit_bytes)
    assert not busy.transport.writes and [i.kind.name for i in busy.session.queue.items] == ["HEARTBEAT"]
    (written,) = stamped.transport.writes
    assert [m["type"] for m in _messages(written)] == ["write_stamp", "heartbeat"]
    assert len(full.transport.writes) == 1 and not full.idle and full.must_drain  # no more write-through
    busy.idle = True
    busy._wake()
    await _settle([busy])
    assert [m["type"] for m in _messages(b"".join(busy.transport.writes))] == ["heartbeat"]
    await _stop([busy, stamped, full])


async def test_an_expired_token_closes_4001_instead_of_a_heartbeat():
    gw = _gateway()
    interval = gw._heartbeat_ns
    t0 = time.time_ns()
    conn = _connect(gw, t0, authorization=Token(t0 + interval // 2))
    gw._tick_slice([conn], t0 + interval, gw.config.ws_writer_limit_bytes)
    assert not conn.transport.writes
    assert conn.close_request.done() or [i.kind.name for i in conn.session.queue.items] == ["CLOSE"]
    deadline = time.monotonic() + 10
    while not conn.close_request.done() and time.monotonic() < deadline:
        await asyncio.sleep(0)  # the woken writer reaches the close
    assert conn.close_request.result()[0] == 4001
    await _stop([conn])
