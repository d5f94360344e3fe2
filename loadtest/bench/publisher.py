"""The benchmark's synthetic ingest: an open-loop publisher of protocol-shaped deltas to NATS.

It plays the ingest's part of ARCHITECTURE.md for ``instruments`` synthetic books (``bench:I0000``,
...) so a real ``bookcast gateway`` serves them: deltas on ``md.v1.bench.<symbol>`` (the PROTOCOL.md
delta object without ``ts_send_ns``, built by ``feed.wire`` as the ingest builds it), snapshot replies on
``md.v1.snap.bench.<symbol>``, the directory on ``md.v1.meta.instruments.bench`` every second and on
``md.v1.ctl.announce``. Nothing is published until ``run``; seqs start at 1, so a subscriber that joined
before ``run`` is owed every delta of it.

Open loop: message ``i`` of a run is due at ``t0 + i / rate_per_s`` whatever the consumers do, and is
stamped with that *scheduled* time as ``ts_event_ns``, ``ts_ingest_ns`` and ``ts_publish_ns``, so a
receiver's ``recv - ts_publish_ns`` counts every delay, the publisher's own lateness included (no
coordinated omission). Instruments take turns (message ``i`` goes to instrument ``i % instruments``).

    python -m loadtest.bench.publisher --nats nats://127.0.0.1:4222 --instruments 10

Lines (``loadtest.bench.ipc``): out ``ready {instruments}``; in ``run {rate_per_s, count}``; out
``started {t0_ns}`` then ``done {published, final_seqs: {instrument: seq}, late_max_ns}``. Exits when
stdin closes.
"""
from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from decimal import Decimal

import nats
import uvloop

from feed import wire
from feed.book import L2Book
from feed.model import LevelChange, Side
from feed.sequencer import SequencedDelta
from feed.subjects import ANNOUNCE_REQUEST, PREFIX, delta_subject, directory_subject
from loadtest.bench.ipc import commands, emit

VENUE = "bench"
START_LEAD_NS = 200_000_000  # t0 is this far after the run command, so message 0 is not born late
_CENT = Decimal("0.01")


def instrument_names(count: int) -> list[str]:
    return [f"{VENUE}:I{i:04d}" for i in range(count)]


class SyntheticBook:
    """One instrument's book of record. Bids live in 0.01..0.40 and asks in 0.60..0.99, so it never crosses."""

    def __init__(self, instrument: str, epoch: str) -> None:
        self.instrument = instrument
        self.epoch = epoch
        self.seq = 0
        self.ts_ns = time.time_ns()
        self.book = L2Book(instrument)
        self.book.apply_snapshot([(Decimal(40 - i) * _CENT, Decimal(100)) for i in range(5)],
                                 [(Decimal(60 + i) * _CENT, Decimal(100)) for i in range(5)])

    def next_delta(self, ts_ns: int) -> bytes:
        """Advance one seq and return the encoded delta stamped ``ts_ns``: one ask level gets a new size, and
        a bid level gets one too, except every 10th seq removes the best bid instead. Every change is
        effective (sizes are the new seq, never seen before at that level)."""
        seq = self.seq + 1
        size = Decimal(seq)
        best_bid = self.book.best_bid()
        bid = (LevelChange(Side.BID, best_bid[0], Decimal(0)) if seq % 10 == 0 and best_bid is not None
               else LevelChange(Side.BID, Decimal(1 + seq * 7 % 40) * _CENT, size))
        ask = LevelChange(Side.ASK, Decimal(60 + seq * 11 % 40) * _CENT, size)
        changes = self.book.apply_changes([bid, ask])
        delta = SequencedDelta(self.instrument, self.epoch, self.seq, seq, changes, self.book.checksum(), ts_ns)
        self.seq, self.ts_ns = seq, ts_ns
        return wire.dumps(wire.delta_message(delta, ts_ingest_ns=ts_ns, ts_publish_ns=ts_ns))

    def snapshot(self) -> bytes:
        return wire.dumps(wire.snapshot_message(self.instrument, self.epoch, self.seq, self.book, ts_event_ns=self.ts_ns,
                                                ts_ingest_ns=self.ts_ns, ts_publish_ns=time.time_ns()))


class Publisher:
    def __init__(self, nats_url: str, instruments: int) -> None:
        self.nats_url = nats_url
        epoch = f"bench-{secrets.token_hex(3)}"
        self.books = {name: SyntheticBook(name, epoch) for name in instrument_names(instruments)}
        self.subjects = {name: delta_subject(name) for name in self.books}
        self.nc: nats.NATS | None = None

    async def start(self) -> None:
        self.nc = await nats.connect(self.nats_url, name="bench-publisher", pending_size=256 * 1024 * 1024)
        await self.nc.subscribe(f"{PREFIX}.snap.{VENUE}.*", cb=self._on_snapshot_request)
        await self.nc.subscribe(ANNOUNCE_REQUEST, cb=self._announce)
        await self._announce(None)
        await self.nc.flush()

    async def _on_snapshot_request(self, msg) -> None:
        book = self.books.get(f"{VENUE}:{msg.subject.rsplit('.', 1)[1]}")
        if book is not None and msg.reply:
            await msg.respond(book.snapshot())

    async def _announce(self, _msg) -> None:
        entries = [{"instrument": b.instrument, "venue": VENUE, "epoch": b.epoch, "seq": b.seq}
                   for b in self.books.values()]
        body = {"ingest": "bench-publisher", "venue": VENUE, "done": False, "instruments": entries}
        await self.nc.publish(directory_subject(VENUE), wire.dumps(body))

    async def announcer(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self._announce(None)

    async def run(self, rate_per_s: float, count: int) -> None:
        """Publish ``count`` deltas, message ``i`` due at ``t0 + i / rate_per_s``; emit ``started`` and ``done``."""
        books = list(self.books.values())
        period_ns = 1e9 / rate_per_s
        t0_ns = time.time_ns() + START_LEAD_NS
        emit("started", t0_ns=t0_ns)
        late_max_ns = 0
        for i in range(count):
            due_ns = t0_ns + int(i * period_ns)
            wait_ns = due_ns - time.time_ns()
            if wait_ns > 0:
                await asyncio.sleep(wait_ns / 1e9)
            late_max_ns = max(late_max_ns, time.time_ns() - due_ns)
            book = books[i % len(books)]
            await self.nc.publish(self.subjects[book.instrument], book.next_delta(due_ns))
        # An overloaded server (5,000 clients x 100/s offers 500,000 deliveries/s) can take long to
        # acknowledge the flush; the clients' drain deadline, not this, decides what counts as lost.
        await self.nc.flush(timeout=120)
        emit("done", published=count, final_seqs={b.instrument: b.seq for b in books}, late_max_ns=late_max_ns)


async def main_async(args: argparse.Namespace) -> int:
    publisher = Publisher(args.nats, args.instruments)
    await publisher.start()
    announcer = asyncio.get_running_loop().create_task(publisher.announcer())
    emit("ready", instruments=list(publisher.books))
    async for command in commands():
        if command["cmd"] == "run":
            await publisher.run(float(command["rate_per_s"]), int(command["count"]))
    announcer.cancel()
    await publisher.nc.close()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.publisher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nats", required=True, help="NATS URL")
    p.add_argument("--instruments", type=int, required=True, help="number of synthetic instruments")
    return uvloop.run(main_async(p.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
