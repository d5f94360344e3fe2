"""Pure integrity logic: bursts of one venue timestamp, crossed/locked after a burst, instrument status."""
from __future__ import annotations

from decimal import Decimal as D

import pytest

from feed.book import L2Book
from feed.integrity import (
    BurstChecker,
    Status,
    StatusTracker,
    Verdict,
    judge,
    venue_top,
)
from feed.venues import polymarket

MS = 1_000_000
INST = "polymarket:tok"


def price_change(ts_ms: int, *changes, best_bid: str, best_ask: str) -> dict:
    return {"event_type": "price_change", "market": "0xm", "timestamp": str(ts_ms), "price_changes": [
        {"asset_id": "tok", "price": p, "size": s, "side": side, "hash": "h", "best_bid": best_bid,
         "best_ask": best_ask} for side, p, s in changes]}


def run(messages, *, idle_flush_at_ns: int | None = None):
    """Feed raw Polymarket messages through the real parser into a book, checking bursts as the ingest does."""
    book = L2Book(INST)
    book.apply_snapshot([(D("0.40"), D("10")), (D("0.39"), D("5"))], [(D("0.42"), D("8")), (D("0.43"), D("4"))])
    checker = BurstChecker(burst_idle_s=0.25)
    ends = []
    mid_burst_crossed = False
    for recv_ns, msg in messages:
        for event in polymarket.parse(msg).events:
            top = (book.best_bid() or (None,))[0], (book.best_ask() or (None,))[0]
            end = checker.begin(event.instrument, event.ts_event_ns, top)
            if end is not None:
                ends.append(end)
            book.apply_changes(event.changes)
            mid_burst_crossed |= book.is_crossed()
            checker.end_message(event.instrument, event.ts_event_ns, recv_ns, venue_top(event))
    top_of = lambda _i: ((book.best_bid() or (None,))[0], (book.best_ask() or (None,))[0])  # noqa: E731
    if idle_flush_at_ns is not None:
        ends += checker.flush(idle_flush_at_ns, top_of)
    return ends, mid_burst_crossed, checker, top_of


def test_crossing_inside_a_burst_is_normal():
    # a buy at 0.43 for 12 crosses both asks: Polymarket sends the new bid level first, then the removals
    msgs = [
        (0 * MS, price_change(1000, ("BUY", "0.43", "12"), best_bid="0.43", best_ask="0.44")),
        (1 * MS, price_change(1000, ("SELL", "0.42", "0"), best_bid="0.43", best_ask="0.44")),
        (2 * MS, price_change(1000, ("SELL", "0.43", "0"), ("SELL", "0.44", "3"), best_bid="0.43", best_ask="0.44")),
    ]
    ends, crossed_mid, *_ = run(msgs, idle_flush_at_ns=400 * MS)
    assert crossed_mid, "the test must really cross the book inside the burst"
    assert [e.verdict for e in ends] == [Verdict.OK]


def test_still_crossed_after_the_burst_is_a_fault_named_with_the_prices():
    # the recorder missed the removal of the ask at 0.42
    msgs = [
        (0, price_change(1000, ("BUY", "0.43", "12"), best_bid="0.43", best_ask="0.44")),
        (5 * MS, price_change(2000, ("BUY", "0.38", "1"), best_bid="0.43", best_ask="0.44")),
    ]
    ends, *_ = run(msgs)
    assert len(ends) == 1 and ends[0].verdict is Verdict.CROSSED and ends[0].fault_kind == "crossed"
    assert "best_bid=0.43 best_ask=0.42" in ends[0].describe()


def test_top_mismatch_against_the_venue_best_bid_ask():
    msgs = [(0, price_change(1000, ("BUY", "0.41", "3"), best_bid="0.41", best_ask="0.40"))]
    ends, *_ = run(msgs, idle_flush_at_ns=300 * MS)
    assert [e.verdict for e in ends] == [Verdict.TOP_MISMATCH]
    assert ends[0].venue_top == (D("0.41"), D("0.40"))


def test_idle_burst_is_not_closed_early():
    msgs = [(0, price_change(1000, ("BUY", "0.43", "12"), best_bid="0.43", best_ask="0.44"))]
    ends, _, checker, top_of = run(msgs, idle_flush_at_ns=100 * MS)
    assert ends == []  # still inside burst_idle_s: the removals may be on their way
    late = checker.flush(300 * MS, top_of)
    assert [e.verdict for e in late] == [Verdict.CROSSED]


@pytest.mark.parametrize("top,venue,verdict", [
    ((D("0.5"), D("0.6")), None, Verdict.OK),
    ((D("0.6"), D("0.6")), None, Verdict.LOCKED),
    ((D("0.7"), D("0.6")), None, Verdict.CROSSED),
    ((None, D("0.6")), (D("0"), D("0.6")), Verdict.OK),  # venue bid 0 = empty side
    ((D("0.5"), None), (D("0.5"), D("1")), Verdict.OK),  # venue ask 1 = empty side
    ((D("0.5"), D("0.6")), (D("0.5"), D("0.61")), Verdict.TOP_MISMATCH),
    ((None, None), None, Verdict.OK),
])
def test_judge(top, venue, verdict):
    assert judge(top, venue) is verdict


def test_status_precedence_and_changes():
    tr = StatusTracker()
    assert tr.set(INST, Status.STALE, True, "upstream_silent", 10).status is Status.STALE
    ch = tr.set(INST, Status.RESYNCING, True, "seq_gap", 20)
    assert (ch.status, ch.reason, ch.since_ns) == (Status.RESYNCING, "seq_gap", 20)
    assert tr.set(INST, Status.STALE, False, "", 30) is None  # still resyncing: no change
    ch = tr.set(INST, Status.RESYNCING, False, "", 40)
    assert (ch.status, ch.reason) == (Status.OK, "")
    assert tr.set(INST, Status.CROSSED, False, "", 50) is None
    with pytest.raises(ValueError):
        tr.set(INST, Status.OK, True, "", 60)


def test_venue_top_is_the_last_entry_of_each_asset_and_only_where_the_venue_sent_one():
    msg = price_change(1, ("BUY", "0.4", "1"), ("BUY", "0.41", "1"), best_bid="0.41", best_ask="0.42")
    (delta,) = polymarket.parse(msg).events
    assert venue_top(delta) == (D("0.41"), D("0.42"))
    book = {"event_type": "book", "asset_id": "tok", "market": "0xm", "timestamp": "1", "bids": [], "asks": []}
    assert venue_top(polymarket.parse(book).events[0]) is None
    legacy = {"event_type": "price_change", "asset_id": "tok", "market": "0xm", "timestamp": "1",
              "changes": [{"price": "0.4", "size": "1", "side": "BUY"}]}
    assert venue_top(polymarket.parse(legacy).events[0]) is None
    bba = {"event_type": "best_bid_ask", "asset_id": "tok", "market": "0xm", "best_bid": "0.73", "best_ask": "",
           "spread": "0", "timestamp": "1"}
    assert venue_top(polymarket.parse(bba).events[0]) == (D("0.73"), None)  # an empty ask side