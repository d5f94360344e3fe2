"""The L2 book engine: table cases and hypothesis properties."""
from __future__ import annotations

from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feed.book import L2Book
from feed.errors import InvalidDecimal
from feed.model import LevelChange, Side


def book(bids=(), asks=()):
    b = L2Book("t:x")
    b.apply_snapshot([(D(p), D(s)) for p, s in bids], [(D(p), D(s)) for p, s in asks])
    return b


def test_empty_book_has_no_top():
    b = L2Book("t:x")
    assert b.best_bid() is None and b.best_ask() is None
    assert b.spread() is None and b.mid() is None
    assert not b.is_crossed()
    assert len(b) == 0


def test_best_first_ordering_spread_mid_depth():
    b = book(bids=[("0.01", "1"), ("0.49", "2"), ("0.3", "3")], asks=[("0.99", "1"), ("0.51", "4"), ("0.7", "2")])
    assert b.best_bid() == (D("0.49"), D("2"))
    assert b.best_ask() == (D("0.51"), D("4"))
    assert b.spread() == D("0.02")
    assert b.mid() == D("0.5")
    assert b.depth(Side.BID) == [(D("0.49"), D(2)), (D("0.3"), D(3)), (D("0.01"), D(1))]
    assert b.depth(Side.ASK, 2) == [(D("0.51"), D(4)), (D("0.7"), D(2))]
    assert b.wire_levels(Side.BID, 1) == [["0.49", "2"]]


@pytest.mark.parametrize(
    "change, changed, bids_after",
    [
        (LevelChange(Side.BID, D("0.4"), D("5")), True, [["0.45", "1"], ["0.4", "5"]]),  # add
        (LevelChange(Side.BID, D("0.45"), D("3")), True, [["0.45", "3"]]),  # update
        (LevelChange(Side.BID, D("0.45"), D("0")), True, []),  # delete
        (LevelChange(Side.BID, D("0.45"), D("1.000")), False, [["0.45", "1"]]),  # same size: no-op
        (LevelChange(Side.BID, D("0.2"), D("0")), False, [["0.45", "1"]]),  # delete absent: no-op
    ],
)
def test_set_level_table(change, changed, bids_after):
    b = book(bids=[("0.45", "1")])
    assert b.apply_changes([change]) == ([change] if changed else [])
    assert b.wire_levels(Side.BID) == bids_after


def test_negative_size_is_refused():
    with pytest.raises(InvalidDecimal):
        L2Book().set_level(Side.ASK, D("1"), D("-1"))


def test_crossed_detection():
    b = book(bids=[("0.5", "1")], asks=[("0.6", "1")])
    assert not b.is_crossed()
    b.set_level(Side.BID, D("0.6"), D("1"))
    assert b.is_crossed()


def test_wire_changes_round_trip():
    b = book(bids=[("1", "1")], asks=[("2", "1")])
    b.apply_wire_changes([["bid", "1", "0"], ["ask", "1.5", "2.50"]])
    assert b.wire_levels(Side.ASK) == [["1.5", "2.5"], ["2", "1"]]
    assert b.best_bid() is None


prices = st.integers(min_value=1, max_value=200).map(lambda i: D(i) / 100)
sizes = st.integers(min_value=0, max_value=1000).map(lambda i: D(i) / 10)
levels = st.dictionaries(prices, sizes.filter(bool), max_size=25)


@st.composite
def valid_delta_streams(draw):
    """Random delta streams that keep a book uncrossed: every bid < every ask after each delta.

    Each delta picks a mid, first removes the levels on the wrong side of it (as a venue does when the
    market moves), then sets random bids below it and asks at or above it.
    """
    mid = draw(st.integers(min_value=20, max_value=180))
    out = []
    for _ in range(draw(st.integers(min_value=1, max_value=40))):
        mid = draw(st.integers(min_value=max(2, mid - 3), max_value=min(199, mid + 3)))
        changes = [LevelChange(Side.BID, D(i) / 100, D(0)) for i in range(mid, 201)]
        changes += [LevelChange(Side.ASK, D(i) / 100, D(0)) for i in range(1, mid)]
        for _ in range(draw(st.integers(min_value=1, max_value=6))):
            if draw(st.booleans()):
                changes.append(LevelChange(Side.BID, D(draw(st.integers(1, mid - 1))) / 100, draw(sizes)))
            else:
                changes.append(LevelChange(Side.ASK, D(draw(st.integers(mid, 200))) / 100, draw(sizes)))
        out.append(changes)
    return out


@given(valid_delta_streams())
@settings(max_examples=150, deadline=None)
def test_valid_streams_never_cross(stream):
    b = L2Book("t:x")
    for changes in stream:
        b.apply_changes(changes)
        assert not b.is_crossed()
        bids, asks = b.depth(Side.BID), b.depth(Side.ASK)
        assert [p for p, _ in bids] == sorted((p for p, _ in bids), reverse=True)
        assert [p for p, _ in asks] == sorted(p for p, _ in asks)
        assert all(s > 0 for _, s in bids + asks)


@given(levels, levels, levels, levels)
@settings(max_examples=200, deadline=None)
def test_diff_turns_any_book_into_any_book(bids_a, asks_a, bids_b, asks_b):
    a = L2Book("t:x")
    a.apply_snapshot(bids_a.items(), asks_a.items())
    target = L2Book("t:x")
    target.apply_snapshot(bids_b.items(), asks_b.items())
    changes = a.diff(bids_b.items(), asks_b.items())
    assert a.apply_changes(changes) == changes  # every derived change is effective
    assert a == target
    assert a.checksum() == target.checksum()
    assert a.diff(bids_b.items(), asks_b.items()) == []
