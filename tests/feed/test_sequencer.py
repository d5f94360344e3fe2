"""Sequencer and book engine: seq/epoch rules of PROTOCOL.md section 1."""
from __future__ import annotations

from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feed.book import L2Book
from feed.errors import CrossedBook, LocalError
from feed.model import BookDelta, BookSnapshot, LevelChange, Side, Trade, AggressorSide
from feed.sequencer import BookEngine, DeltaBeforeSnapshot, InstrumentAdded, SequencedDelta, Sequencer


def snap(inst, bids, asks, ts=None):
    return BookSnapshot(inst, tuple((D(p), D(s)) for p, s in bids), tuple((D(p), D(s)) for p, s in asks), ts)


def test_seq_starts_at_one_and_grows_by_one():
    s = Sequencer("e1")
    assert [s.next("a:x") for _ in range(3)] == [("e1", 0, 1), ("e1", 1, 2), ("e1", 2, 3)]
    assert s.next("a:y") == ("e1", 0, 1)  # per instrument


def test_reset_starts_a_new_epoch():
    s = Sequencer("e1")
    s.next("a:x")
    e2 = s.reset("a:x")
    assert e2 != "e1"
    assert s.next("a:x") == (e2, 0, 1)
    assert s.reset("a:x") not in ("e1", e2)


def test_first_snapshot_adds_instrument_at_seq_zero():
    eng = BookEngine("e")
    out = eng.apply(snap("coinbase:A-B", [("1", "2")], [("3", "4")]))
    assert out == [InstrumentAdded("coinbase:A-B", "coinbase", "e")]
    assert eng.seq_of("coinbase:A-B") == ("e", 0)


def test_repeated_snapshot_becomes_a_diff_delta():
    eng = BookEngine("e")
    eng.apply(snap("p:x", [("0.5", "10"), ("0.4", "5")], [("0.6", "1")]))
    out = eng.apply(snap("p:x", [("0.5", "10")], [("0.6", "2"), ("0.7", "3")], ts=99))
    assert len(out) == 1 and isinstance(out[0], SequencedDelta)
    d = out[0]
    assert (d.epoch, d.prev_seq, d.seq, d.ts_event_ns) == ("e", 0, 1, 99)
    assert d.changes == [LevelChange(Side.BID, D("0.4"), D(0)), LevelChange(Side.ASK, D("0.6"), D(2)),
                         LevelChange(Side.ASK, D("0.7"), D(3))]
    assert d.checksum == eng.instruments["p:x"].book.checksum()
    assert eng.apply(snap("p:x", [("0.5", "10")], [("0.6", "2"), ("0.7", "3")])) == []  # identical: nothing


def test_delta_before_snapshot_is_refused():
    eng = BookEngine("e")
    with pytest.raises(DeltaBeforeSnapshot, match="instrument=c:x"):
        eng.apply(BookDelta("c:x", (LevelChange(Side.BID, D(1), D(1)),)))


def test_noop_delta_publishes_nothing_and_keeps_seq():
    eng = BookEngine("e")
    eng.apply(snap("c:x", [("1", "1")], []))
    assert eng.apply(BookDelta("c:x", (LevelChange(Side.BID, D(1), D(1)),))) == []
    assert eng.seq_of("c:x") == ("e", 0)


def test_trades_pass_through_without_seq():
    eng = BookEngine("e")
    t = Trade("c:x", D(1), D(2), AggressorSide.BUY, 5)
    assert eng.apply(t) == [t]
    assert eng.seq_of("c:x") == ("e", 0)


def test_crossed_book_from_venue_is_counted():
    eng = BookEngine("e")
    eng.apply(snap("c:x", [("1", "1")], [("2", "1")]))
    eng.apply(BookDelta("c:x", (LevelChange(Side.BID, D(3), D(1)),)))
    assert eng.crossed == 1


def test_crossed_book_built_by_our_engine_raises_crossed_book(monkeypatch):
    """Diffing towards an uncrossed venue snapshot must give an uncrossed book; when our own diff is wrong
    (here: it forgets the removals) the engine raises ``CrossedBook``, a ``LocalError``, naming the prices."""
    eng = BookEngine("e")
    eng.apply(snap("p:x", [("0.5", "10")], [("0.6", "1")]))
    # the venue moves the whole book up: bid 0.5 -> 0.7, ask 0.6 -> 0.8 (uncrossed)
    good = eng.apply(snap("p:x", [("0.7", "1")], [("0.8", "1")]))
    assert len(good) == 1 and not eng.instruments["p:x"].book.is_crossed()
    real_diff = L2Book.diff

    def forgets_removals(self, bids, asks):
        return [c for c in real_diff(self, bids, asks) if c.size != 0]

    monkeypatch.setattr(L2Book, "diff", forgets_removals)
    with pytest.raises(CrossedBook) as info:  # bid 0.9 added, ask 0.8 not removed: crossed by our bug
        eng.apply(snap("p:x", [("0.9", "1")], [("1.0", "1")]))
    assert isinstance(info.value, LocalError)
    assert "instrument=p:x" in str(info.value) and "best_bid=0.9 best_ask=0.8" in str(info.value)
    # a crossed venue snapshot is the venue's fault: counted, never raised
    monkeypatch.setattr(L2Book, "diff", real_diff)
    crossed_before = eng.crossed
    eng.apply(snap("p:x", [("0.9", "1")], [("0.85", "1")]))
    assert eng.crossed == crossed_before + 1


def test_engine_reset_forgets_book_and_changes_epoch():
    eng = BookEngine("e")
    eng.apply(snap("c:x", [("1", "1")], []))
    eng.apply(BookDelta("c:x", (LevelChange(Side.BID, D(1), D(2)),)))
    new_epoch = eng.reset("c:x")
    with pytest.raises(DeltaBeforeSnapshot):
        eng.apply(BookDelta("c:x", (LevelChange(Side.BID, D(1), D(3)),)))
    assert eng.apply(snap("c:x", [("1", "1")], [])) == [InstrumentAdded("c:x", "c", new_epoch)]


side = st.sampled_from([Side.BID, Side.ASK])
price = st.integers(1, 30).map(lambda i: D(i))
size = st.integers(0, 5).map(lambda i: D(i))


@given(st.lists(st.lists(st.tuples(side, price, size), min_size=1, max_size=5), max_size=60))
@settings(max_examples=100, deadline=None)
def test_published_deltas_replay_to_the_engine_book(stream):
    """A client applying every published delta to the first snapshot holds the engine's book, seq contiguous."""
    from feed.book import L2Book

    eng = BookEngine("e")
    eng.apply(snap("c:x", [], []))
    client = L2Book("c:x")
    expected_seq = 0
    for changes in stream:
        for out in eng.apply(BookDelta("c:x", tuple(LevelChange(*c) for c in changes))):
            assert out.prev_seq == expected_seq and out.seq == expected_seq + 1
            expected_seq = out.seq
            client.apply_changes(out.changes)
            assert client.checksum() == out.checksum
    assert client == eng.instruments["c:x"].book
    assert eng.seq_of("c:x") == ("e", expected_seq)
