"""The drills' independent checker (``chaos.clients.Checker``) against a real nats-server and a scripted ingest.

The checker reads the ingest's deltas and asks it for snapshots over NATS, on different subscriptions. nats-py
runs each subscription's callbacks in its own task, so a burst of deltas published right after a snapshot reply
can be handled before the task awaiting the reply resumes. The checker used to drop those deltas (no book yet)
and then sit at the snapshot's seq: once the stream went quiet, the drill counted the faultless clients ahead
of it as "undetected gaps" (upstream-crossed-book in CI: "client seq=390 checker seq=355").
"""
from __future__ import annotations

import asyncio
import threading
import time
from decimal import Decimal

import nats
import pytest

from chaos.clients import Checker, deltas_past
from feed import wire
from feed.book import L2Book
from feed.model import LevelChange, Side
from feed.natsserver import NatsServer
from feed.sequencer import SequencedDelta
from feed.subjects import delta_subject, snapshot_subject

INSTRUMENT = "coinbase:ETH-USD"
EPOCH = "e1"


def test_deltas_past_drops_only_what_the_snapshot_covers():
    held = [("e1", 9, b"9"), ("e1", 10, b"10"), ("e1", 11, b"11"), ("e2", 1, b"e2-1"), ("e1", 12, b"12")]
    assert deltas_past(held, "e1", 10) == [b"11", b"e2-1", b"12"]
    assert deltas_past(held, "e2", 1) == [b"9", b"10", b"11", b"12"]
    assert deltas_past([], "e1", 0) == []


class ScriptedIngest:
    """One instrument's ingest: a book, its deltas, and snapshot answers followed at once by a burst."""

    def __init__(self, nc) -> None:
        self.nc, self.seq = nc, 0
        self.book = L2Book(INSTRUMENT)
        self.book.apply_snapshot([(Decimal("1"), Decimal("5"))], [(Decimal("2"), Decimal("5"))])
        self.burst_after_reply = 0
        self.answer_seq: int | None = None   # answer with the snapshot of this seq (a stale reply) when set
        self.snapshots: dict[int, bytes] = {}
        self.answered = 0

    def _snapshot(self) -> bytes:
        return wire.dumps(wire.snapshot_message(INSTRUMENT, EPOCH, self.seq, self.book, ts_event_ns=None,
                                                ts_ingest_ns=1, ts_publish_ns=2))

    async def delta(self) -> None:
        self.snapshots[self.seq] = self._snapshot()
        change = LevelChange(Side.BID, Decimal("1"), Decimal(self.seq + 6))
        self.book.apply_changes([change])
        self.seq += 1
        d = SequencedDelta(INSTRUMENT, EPOCH, self.seq - 1, self.seq, [change], self.book.checksum(), None)
        await self.nc.publish(delta_subject(INSTRUMENT), wire.dumps(wire.delta_message(d, ts_ingest_ns=1,
                                                                                       ts_publish_ns=2)))

    async def on_request(self, msg) -> None:
        self.answered += 1
        if self.answer_seq is not None:
            await msg.respond(self.snapshots[self.answer_seq])
            return
        await msg.respond(self._snapshot())
        for _ in range(self.burst_after_reply):   # no flush between: one write, read in one chunk
            await self.delta()
        await self.nc.flush()


@pytest.fixture
def nats_url(tmp_path):
    server = NatsServer(port=0, name="checker-nats", workdir=str(tmp_path))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def test_a_burst_that_overtakes_the_snapshot_reply_is_applied_and_a_stale_reply_rolls_nothing_back(nats_url):
    loop = asyncio.new_event_loop()
    nc = loop.run_until_complete(nats.connect(nats_url, name="scripted-ingest"))
    ingest = ScriptedIngest(nc)
    checker = Checker(nats_url, [INSTRUMENT])
    try:
        for _ in range(20):
            loop.run_until_complete(ingest.delta())
        ingest.burst_after_reply = 35
        loop.run_until_complete(nc.subscribe(snapshot_subject(INSTRUMENT), cb=ingest.on_request))
        loop.run_until_complete(nc.flush())

        def serve_until(predicate, timeout_s: float, what: str) -> None:
            deadline = time.monotonic() + timeout_s
            while not predicate():
                if time.monotonic() > deadline:
                    raise AssertionError(f"{what}: not true after {timeout_s:g} s; checker at {checker.seqs()}")
                loop.run_until_complete(asyncio.sleep(0.05))   # the scripted ingest answers on this loop

        started = threading.Thread(target=checker.start)
        started.start()
        serve_until(lambda: not started.is_alive(), 30, "the checker started")
        # the snapshot answered was seq 20; the 35 deltas after it went out in the same write
        serve_until(lambda: checker.seqs().get(INSTRUMENT) == 55, 10, "the checker at the ingest's seq 55")
        assert ingest.seq == 55
        assert checker.books()[INSTRUMENT][1] == ingest.book

        ingest.burst_after_reply, ingest.answer_seq = 0, 30   # a late reply to a second request: seq 30 < 55
        answered = ingest.answered
        again = threading.Thread(target=checker.resnapshot)
        again.start()
        serve_until(lambda: not again.is_alive(), 30, "the second snapshot request answered and handled")
        assert ingest.answered == answered + 1
        assert checker.seqs().get(INSTRUMENT) == 55
        loop.run_until_complete(ingest.delta())   # seq 56 chains on 55, not on 30
        serve_until(lambda: checker.seqs().get(INSTRUMENT) == 56, 10, "the checker at 56")
        assert checker.resyncs == 0
        assert checker.books()[INSTRUMENT][1] == ingest.book
    finally:
        checker.stop()
        loop.run_until_complete(nc.close())
        loop.close()
