"""CPU per delivery of the gateway's own fan-out code, write-through on and off, in one process.

The socket-level benchmark (``bookcast bench fanout``) needs a quiet machine; this one does not: it
measures *process CPU time* (``time.process_time``), not wall time, of exactly the gateway's fan-out
path (``Gateway._execute`` -> ``_fan_out`` -> write-through or queue -> writer tasks -> transport
writes) for ``--connections`` connections subscribed to one instrument, with the real
``InstrumentMachine``, ``Session`` and ``Connection`` classes and a uvloop event loop. Only the socket is
replaced: each connection's transport counts the bytes written to it (no syscalls: what the kernel
costs is the socket benchmark's to show). NATS is replaced by feeding deltas to the machine, ``--batch``
per loop pass (nats-py hands over every message read in one pass).

Modes alternate (off, on, off, on, ...) ``--repeat`` times, so a busy spell of a shared machine hits both;
the output gives microseconds of CPU per delivery for each mode (median and range) and on / off.

    python -m loadtest.bench.fanoutcpu --connections 1000 --messages 2000 --batch 1 --repeat 5

``--heartbeats``: instead, ``--connections`` idle connections (subscribed to nothing) and ``--messages``
ticks, each making a heartbeat due on every connection: CPU per heartbeat when the ticker wakes each
connection's writer task (``Session.tick``) against the ticker writing it in its own pass
(``Connection.tick``).

Exit codes: 0 printed, 2 usage.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from decimal import Decimal

import orjson
import uvloop
from prometheus_client import CollectorRegistry

from feed import wire
from feed.book import L2Book
from feed.gateway.app import Connection, Gateway
from feed.gateway.config import GatewayConfig
from feed.gateway.instrument import InstrumentMachine
from feed.gateway.session import Session

INST = "bench:I0000"


class CountingTransport:
    """The transport surface ``Connection`` and the fan-out use; every write is counted, never sent."""

    def __init__(self) -> None:
        self.bytes = 0
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        self.writes += 1

    def writelines(self, frames) -> None:
        for frame in frames:
            self.bytes += len(frame)
        self.writes += 1

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name, default=None):
        return default


class OpenWebSocket:
    closed = False


class NoDrain:
    async def drain(self) -> None:
        return None


def _ingest():
    book = L2Book(INST)
    book.apply_snapshot([(Decimal("0.40"), Decimal(100))], [(Decimal("0.60"), Decimal(100))])
    return book


async def one_mode(write_through: bool, connections: int, messages: int, batch: int) -> float:
    """CPU seconds per delivery (process time) of ``messages`` deltas fanned out to ``connections``."""
    config = GatewayConfig(write_through=write_through, instrumented=True)
    gw = Gateway(config, CollectorRegistry())
    machine = InstrumentMachine(INST)
    gw.machines[INST] = machine
    gw.links[INST] = {}
    gw.trade_links[INST] = set()
    gw._hops[INST] = gw.metrics.hop_nats_gateway("bench")
    book = _ingest()
    epoch, seq = "e1", 0
    snap = wire.dumps(wire.snapshot_message(INST, epoch, seq, book, ts_event_ns=None, ts_ingest_ns=1, ts_publish_ns=1))
    machine.start()
    gw._execute(machine, machine.on_snapshot_reply(snap, time.time_ns()))
    conns, transports = [], []
    for _ in range(connections):
        session = Session(gw, gw.limits, time.time_ns(), tally=gw.tally)  # one tally per worker, as ws_handler
        transport = CountingTransport()
        conn = Connection(gw, OpenWebSocket(), session, transport, NoDrain())  # type: ignore[arg-type]
        gw.connections.add(conn)
        gw._apply_links(session, session.on_text(orjson.dumps({"op": "subscribe", "id": 1, "instruments": [INST]}),
                                                 time.time_ns()))
        conns.append(conn)
        transports.append(transport)
    for _ in range(3):
        await asyncio.sleep(0)  # replies and snapshots go out; writers go idle
    payloads = []
    for i in range(messages):
        price = Decimal(1 + i % 39) / 100
        changes = [["bid", format(price, "f"), str(i + 1)]]
        book.apply_wire_changes(changes)
        payloads.append(orjson.dumps({"type": "delta", "instrument": INST, "epoch": epoch, "seq": i + 1,
                                      "prev_seq": i, "changes": changes, "checksum": book.checksum(),
                                      "ts_ingest_ns": 1, "ts_publish_ns": time.time_ns()}))
    bytes_before = sum(t.bytes for t in transports)
    started = time.process_time()
    for i in range(0, messages, batch):
        for payload in payloads[i:i + batch]:
            gw._execute(machine, machine.on_message(payload, time.time_ns()))
        await asyncio.sleep(0)  # the pass ends: flushes and woken writers run
        await asyncio.sleep(0)
    cpu_s = time.process_time() - started
    delivered = gw.tally[("sent", "delta")]
    await _stop_writers(conns)
    expected = messages * connections
    if delivered != expected or sum(t.bytes for t in transports) <= bytes_before:
        raise RuntimeError(f"write_through={write_through}: {delivered} deliveries counted, {expected} expected")
    return cpu_s / delivered


async def _stop_writers(conns: list[Connection]) -> None:
    """Cancel the writer tasks the connections started (a connection starts one at its first wakeup)."""
    writers = [c.writer for c in conns if c.writer is not None]
    for w in writers:
        w.cancel()
    await asyncio.gather(*writers, return_exceptions=True)


async def heartbeat_mode(inline: bool, connections: int, ticks: int) -> float:
    """CPU seconds (process time) per heartbeat of ``connections`` idle connections over ``ticks`` ticks."""
    gw = Gateway(GatewayConfig(), CollectorRegistry())
    t0 = time.time_ns()
    conns = []
    for _ in range(connections):
        conn = Connection(gw, OpenWebSocket(), Session(gw, gw.limits, t0, tally=gw.tally), CountingTransport(), NoDrain())  # type: ignore[arg-type]
        conns.append(conn)
    for _ in range(3):
        await asyncio.sleep(0)
    limit_bytes = gw.config.ws_writer_limit_bytes
    started = time.process_time()
    now = t0
    for _ in range(ticks):
        now += 2 * 10**9  # a heartbeat is due on every connection at every tick
        for conn in conns:
            if inline:
                conn.tick(now, limit_bytes)
            else:
                conn.session.tick(now)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    cpu_s = time.process_time() - started
    sent = gw.tally[("sent", "control")]
    await _stop_writers(conns)
    if sent != connections * ticks:
        raise RuntimeError(f"{sent} heartbeats sent, {connections * ticks} expected")
    return cpu_s / sent


async def run(args: argparse.Namespace) -> int:
    results: dict[bool, list[float]] = {False: [], True: []}
    names = ("writer wake", "inline") if args.heartbeats else ("write-through off", "write-through on")
    for n in range(args.repeat):
        for mode in (False, True):
            if args.heartbeats:
                per = await heartbeat_mode(mode, args.connections, args.messages)
                results[mode].append(per)
                print(f"run {n + 1}: heartbeats {names[mode]}: {per * 1e6:.2f} us CPU per heartbeat", file=sys.stderr)
                continue
            per = await one_mode(mode, args.connections, args.messages, args.batch)
            results[mode].append(per)
            print(f"run {n + 1}: write-through {'on ' if mode else 'off'}: {per * 1e6:.2f} us CPU per delivery",
                  file=sys.stderr, flush=True)
    off, on = statistics.median(results[False]), statistics.median(results[True])
    ratios = [a / b for a, b in zip(results[True], results[False])]
    if args.heartbeats:
        print(f"heartbeat CPU per idle connection, {args.connections} connections, {args.messages} ticks, {args.repeat} "
              f"runs: {names[0]} {off * 1e6:.2f} us, {names[1]} {on * 1e6:.2f} us; {names[1]} / {names[0]} "
              f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")
        return 0
    print(f"fan-out CPU per delivery, {args.connections} connections, batch {args.batch}, {args.messages} messages, "
          f"{args.repeat} runs: write-through off {off * 1e6:.2f} us [{min(results[False]) * 1e6:.2f}-"
          f"{max(results[False]) * 1e6:.2f}], on {on * 1e6:.2f} us [{min(results[True]) * 1e6:.2f}-"
          f"{max(results[True]) * 1e6:.2f}]; on / off {statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.fanoutcpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--batch", type=int, default=1, help="deltas handed to the gateway per loop pass (default 1)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--heartbeats", action="store_true", help="measure heartbeats of idle connections instead")
    args = p.parse_args()
    if min(args.connections, args.messages, args.batch, args.repeat) < 1:
        p.error("every count must be >= 1")
    return uvloop.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
