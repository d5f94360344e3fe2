"""Real ``VenueLink`` clients against real ``bookcast simulate`` processes, one per venue, on real captures:
every message parses, venue seqs are contiguous, and the books built from the link equal the capture's."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

import pytest

from feed.capture import read_capture
from feed.model import Side, Trade, VenueSeqFault
from feed.sequencer import BookEngine, DeltaBeforeSnapshot
from feed.simulator.world import target_symbol
from feed.upstream import LinkEvent, ProviderSpec, UpstreamError
from feed.upstream.links import VenueLink
from feed.venues import parser_for, session_for
from tests.feed.upstream.simproc import simulator

SOURCES = {
    # The Exchange recording, served in the Advanced Trade schema (the Advanced recording itself runs end
    # to end through ingest and gateway in tests/e2e/test_replay.py and is parsed in test_venue_samples.py).
    "coinbase": "coinbase/coinbase-level2-20210417.jsonl",
    "polymarket": "polymarket/sol-15m-20251211.jsonl",
    "kalshi": "polymarket/sol-15m-20251211.jsonl",
}
SPEED = {"coinbase": "10", "polymarket": "400", "kalshi": "400"}


def capture_books(venue: str, path) -> dict[str, tuple]:
    """The final book of every instrument of a capture, keyed by the simulated venue's instrument id."""
    engine = BookEngine("capture")
    for record in read_capture(path):
        for event in parser_for(record.venue)(record.msg).events:
            with contextlib.suppress(DeltaBeforeSnapshot):
                engine.apply(event)
    return {f"{venue}:{target_symbol(venue, inst)}": levels(st.book) for inst, st in engine.instruments.items()}


def levels(book) -> tuple:
    return tuple(book.wire_levels(Side.BID)), tuple(book.wire_levels(Side.ASK))


class Collector:
    """What a pool would do with one link, minimally: a session per connection, one engine."""

    def __init__(self, venue: str) -> None:
        self.session = session_for(venue)
        self.engine = BookEngine("link")
        self.events: Counter[str] = Counter()
        self.faults: list[VenueSeqFault] = []
        self.trades = 0
        self.errors: list[str] = []

    def on_message(self, record) -> None:
        for event in self.session.parse(record.msg).events:
            if isinstance(event, VenueSeqFault):
                self.faults.append(event)
            if isinstance(event, Trade):
                self.trades += 1
            self.engine.apply(event)

    def on_event(self, event: LinkEvent, detail: str) -> None:
        self.events[event] += 1
        if event is LinkEvent.CONNECTED:
            self.session.reset()
        if event is LinkEvent.ERROR:
            self.errors.append(detail)

    def books(self) -> dict[str, tuple]:
        return {inst: levels(st.book) for inst, st in self.engine.instruments.items()}


async def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("venue", ["coinbase", "polymarket", "kalshi"])
async def test_link_books_equal_capture(venue, shared_data, tmp_path):
    source = shared_data / SOURCES[venue]
    expected = capture_books(venue, source)
    assert expected, "the capture must have books"
    with simulator(venue, source, extra=["--once", "--speed", SPEED[venue], "--paused"],
                   log_path=tmp_path / "sim.log") as sim:
        symbols = sim.status()["instruments"]
        link = VenueLink(ProviderSpec("sim-1", venue, sim.ws_url, rest_url=sim.base), ping_interval_s=0.2)
        got = Collector(venue)
        task = asyncio.create_task(link.run(symbols, got.on_message, got.on_event))
        try:
            await wait_for(lambda: got.events[LinkEvent.CONNECTED] and sim.status()["connections"] == 1, 20, "connected")
            sim.start()
            await wait_for(lambda: sim.status()["done"], 60, "the simulator to finish its pass")
            await wait_for(lambda: got.books() == expected, 20, "link books == capture books")
            # REST snapshots agree with the live book too.
            for symbol in symbols:
                snap = parser_for(venue)(await link.fetch_snapshot(symbol)).events[0]
                engine = BookEngine("rest")
                engine.apply(snap)
                assert levels(engine.instruments[snap.instrument].book) == expected[snap.instrument]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert got.events[LinkEvent.CONNECTED] == 1
    assert got.events[LinkEvent.ALIVE] > 0, "pongs / heartbeats must prove the socket alive"
    assert got.faults == [], "a clean provider has contiguous venue seqs"
    assert got.trades > 0
    assert got.errors == []


async def test_rest_errors_are_upstream_errors(shared_data):
    source = shared_data / SOURCES["polymarket"]
    with simulator("polymarket", source, extra=["--fault", "rest_429=true", "--once", "--speed", "1000"]) as sim:
        symbol = sim.status()["instruments"][0]
        await wait_for(lambda: sim.status()["done"], 30, "the pass")
        link = VenueLink(ProviderSpec("sim-1", "polymarket", sim.ws_url, rest_url=sim.base))
        try:
            with pytest.raises(UpstreamError, match="HTTP 429") as caught:
                await link.fetch_snapshot(symbol)
            assert caught.value.throttled and caught.value.status == 429
            sim.faults(rest_429=False, error_rate=1.0)
            with pytest.raises(UpstreamError, match="HTTP 503") as caught:
                await link.fetch_snapshot(symbol)
            assert not caught.value.throttled
            sim.faults(error_rate=0.0)
            with pytest.raises(UpstreamError, match="HTTP 404"):
                await link.fetch_snapshot("no-such-token")
            assert (await link.fetch_snapshot(symbol))["event_type"] == "book"
        finally:
            await link.close()
