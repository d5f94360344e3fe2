"""Parser tests on real venue messages (issue 16): the Coinbase Advanced Trade recording, the Polymarket
``book``-with-``hash`` and ``last_trade_price`` samples; venue seq checks (``VenueSession``)."""
from __future__ import annotations

import json
from collections import Counter
from decimal import Decimal as D

import pytest

from feed.capture import read_capture
from feed.errors import VenueMessageError
from feed.model import (
    AggressorSide,
    BestBidAsk,
    BookDelta,
    BookSnapshot,
    InstrumentListed,
    LevelChange,
    MarketResolved,
    Side,
    Trade,
    VenueSeqFault,
    VenueSeqKind,
)
from feed.sequencer import BookEngine
from feed.venues import coinbase, polymarket, session_for
from feed.venues.seqcheck import SeqTracker

ADVANCED = "coinbase-advanced/coinbase-advanced-level2-20260809.jsonl.gz"


@pytest.fixture(scope="module")
def advanced(shared_data):
    return list(read_capture(shared_data / ADVANCED))


def test_advanced_recording_parses_with_contiguous_sequence(advanced):
    """Every message of the real recording parses; sequence_num has no hole; books never cross; and
    Advanced Trade's trade ``side`` is the maker's (a taker BUY prints at the live best ask)."""
    session = session_for("coinbase")
    engine = BookEngine("t")
    kinds: Counter[str] = Counter()
    at_ask = at_bid = 0
    for record in advanced:
        result = session.parse(record.msg)
        assert not any(isinstance(e, VenueSeqFault) for e in result.events), record.msg.get("sequence_num")
        for event in result.events:
            kinds[type(event).__name__] += 1
            assert event.venue_seq == record.msg["sequence_num"]
            if isinstance(event, Trade) and event.instrument in engine.instruments:
                book = engine.instruments[event.instrument].book
                if event.price == book.best_ask()[0]:
                    at_ask += 1
                    assert event.side is AggressorSide.BUY
                elif event.price == book.best_bid()[0]:
                    at_bid += 1
                    assert event.side is AggressorSide.SELL
            engine.apply(event)
    assert session.tracker.last("connection") == 1029  # sequence_num 0..1029 without a hole
    assert kinds["BookSnapshot"] == 2 and kinds["BookDelta"] == 773 and kinds["Trade"] > 50
    assert set(engine.instruments) == {"coinbase:BTC-USD", "coinbase:ETH-USD"}
    assert engine.crossed == 0
    assert at_ask > 10 and at_bid > 10


def test_advanced_message_shapes(advanced):
    by_channel = {}
    for record in advanced:
        by_channel.setdefault(record.msg["channel"], record.msg)
    assert coinbase.parse(by_channel["heartbeats"]).ignored == "channel 'heartbeats'"
    assert coinbase.is_heartbeat(by_channel["heartbeats"])
    assert coinbase.parse(by_channel["subscriptions"]).ignored == "channel 'subscriptions'"
    assert coinbase.parse(by_channel["ticker"]).ignored == "channel 'ticker'"
    assert coinbase.parse(by_channel["market_trades"]).ignored == "market_trades snapshot"  # history, not prints
    update = {"channel": "l2_data", "timestamp": "2026-08-09T21:05:48.505350477Z", "sequence_num": 14, "events": [
        {"type": "update", "product_id": "BTC-USD", "updates": [
            {"side": "bid", "event_time": "2026-08-09T21:05:48.210883Z", "price_level": "65061.91", "new_quantity": "0"},
            {"side": "offer", "event_time": "2026-08-09T21:05:48.264069Z", "price_level": "65106.54",
             "new_quantity": "0.15361938"}]}]}
    assert coinbase.parse(update).events == [BookDelta(
        "coinbase:BTC-USD", (LevelChange(Side.BID, D("65061.91"), D(0)), LevelChange(Side.ASK, D("65106.54"), D("0.15361938"))),
        1786309548264069000, venue_seq=14)]
    assert coinbase.seq_key(update) == ("connection", 14)


@pytest.mark.parametrize(("msg", "error"), [
    ({"channel": "l2_data", "sequence_num": 1, "events": [{"type": "update", "product_id": "X", "updates": [
        {"side": "buy", "price_level": "1", "new_quantity": "1"}]}]}, "bad field 'events[0].updates[0].side'"),
    ({"channel": "l2_data", "sequence_num": 1, "events": [{"type": "update", "product_id": "X", "updates": [
        {"side": "bid", "price_level": 1.5, "new_quantity": "1"}]}]}, "events[0].updates[0].price_level"),
    ({"channel": "l2_data", "sequence_num": "1", "events": []}, "bad field 'sequence_num'"),
    ({"channel": "l2_data", "sequence_num": 1, "events": [{"type": "update", "updates": []}]}, "events[0].product_id"),
    ({"channel": "l2_data", "sequence_num": 1, "events": "x"}, "field 'events' must be a list"),
    ({"channel": 5}, "field 'channel' must be a string"),
])
def test_advanced_malformed(msg, error):
    with pytest.raises(VenueMessageError, match=error.replace("[", r"\[").replace("]", r"\]")):
        coinbase.parse(msg)


# -- Polymarket real samples ------------------------------------------------------------------------
def test_polymarket_book_with_hash_samples(shared_data):
    lines = (shared_data / "polymarket" / "ws-book-with-hash-20260212.jsonl").read_text().splitlines()
    assert len(lines) == 10
    for line in lines:
        raw = json.loads(line)
        (snap,) = polymarket.parse(raw).events
        assert isinstance(snap, BookSnapshot)
        assert snap.venue_hash == raw["hash"] and len(snap.venue_hash) == 40
        assert snap.instrument == f"polymarket:{raw['asset_id']}"
        assert len(snap.bids) == len(raw["bids"]) and len(snap.asks) == len(raw["asks"])
        assert snap.ts_event_ns == int(raw["timestamp"]) * 1_000_000
        engine = BookEngine("t")
        engine.apply(snap)
        book = engine.instruments[snap.instrument].book
        if raw["bids"] and raw["asks"]:
            assert book.best_bid()[0] == max(D(b["price"]) for b in raw["bids"])
            assert book.best_ask()[0] == min(D(a["price"]) for a in raw["asks"])


def test_polymarket_last_trade_price_samples(shared_data):
    lines = (shared_data / "polymarket" / "ws-last-trade-price-20260212.jsonl").read_text().splitlines()
    trades = [e for line in lines for e in polymarket.parse(json.loads(line)).events]
    assert len(trades) == 10
    for line, trade in zip(lines, trades):
        raw = json.loads(line)
        assert trade == Trade(f"polymarket:{raw['asset_id']}", D(raw["price"]), D(raw["size"]),
                              AggressorSide(raw["side"].lower()), int(raw["timestamp"]) * 1_000_000)


def test_polymarket_custom_feature_events():
    ts = "1766789469958"
    assert polymarket.parse({"event_type": "best_bid_ask", "asset_id": "A", "market": "M", "best_bid": "0.73",
                             "best_ask": "0.77", "spread": "0.04", "timestamp": ts}).events == [
        BestBidAsk("polymarket:A", D("0.73"), D("0.77"), 1766789469958000000)]
    assert polymarket.parse({"event_type": "new_market", "market": "M", "assets_ids": ["A", "B"], "timestamp": ts}).events == [
        InstrumentListed("polymarket:A", "M", 1766789469958000000), InstrumentListed("polymarket:B", "M", 1766789469958000000)]
    assert polymarket.parse({"event_type": "market_resolved", "market": "M", "assets_ids": ["A", "B"],
                             "winning_asset_id": "B", "timestamp": ts}).events == [
        MarketResolved("polymarket:A", "M", False, 1766789469958000000), MarketResolved("polymarket:B", "M", True, 1766789469958000000)]
    with pytest.raises(VenueMessageError, match="assets_ids"):
        polymarket.parse({"event_type": "new_market", "market": "M", "assets_ids": [7], "timestamp": ts})
    # informational events pass through the engine untouched
    assert BookEngine("t").apply(BestBidAsk("polymarket:A", None, D("0.5"))) == [BestBidAsk("polymarket:A", None, D("0.5"))]


# -- venue seqs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("seqs", "kinds"), [
    ([1, 2, 3], [None, None, None]),
    ([5, 6], [None, None]),                                  # first seq on a stream is accepted as is
    ([1, 2, 4, 5], [None, None, VenueSeqKind.GAP, None]),
    ([1, 2, 3], [None, None, None]),
    ([1, 2, 3, 1, 2], [None, None, None, VenueSeqKind.RESET, None]),
])
def test_seq_tracker_table(seqs, kinds):
    tracker = SeqTracker()
    got = [tracker.check("sid=1", seq, {"seq": seq, "n": n}) for n, seq in enumerate(seqs)]
    assert got == kinds


def test_backwards_with_a_different_message_is_a_reset_not_a_duplicate():
    tracker = SeqTracker()
    assert tracker.check("s", 1, "a") is None
    assert tracker.check("s", 2, "b") is None
    assert tracker.check("s", 2, "b") is VenueSeqKind.DUPLICATE
    assert tracker.check("s", 2, "other") is VenueSeqKind.RESET


def kalshi_delta(seq: int, sid: int = 1) -> dict:
    return {"type": "orderbook_delta", "sid": sid, "seq": seq,
            "msg": {"market_ticker": "K", "price_dollars": "0.5", "delta_fp": "1", "side": "yes"}}


def test_session_gap_duplicate_reset_per_sid():
    session = session_for("kalshi")
    assert len(session.parse(kalshi_delta(1)).events) == 1
    dup = session.parse(kalshi_delta(1)).events
    assert dup == [VenueSeqFault(VenueSeqKind.DUPLICATE, "kalshi", "sid=1", 2, 1, ("kalshi:K",))]
    gap = session.parse(kalshi_delta(4)).events
    assert gap[0] == VenueSeqFault(VenueSeqKind.GAP, "kalshi", "sid=1", 2, 4, ("kalshi:K",)) and len(gap) == 2
    assert session.parse(kalshi_delta(1, sid=2)).events[0].venue_seq == 1  # another sid is its own stream
    reset = session.parse(kalshi_delta(2)).events
    assert reset[0].kind is VenueSeqKind.RESET and reset[0].expected == 5
    session.reset()
    assert len(session.parse(kalshi_delta(1)).events) == 1  # a new connection starts again
    assert session.faults == {VenueSeqKind.GAP: 1, VenueSeqKind.DUPLICATE: 1, VenueSeqKind.RESET: 1}


def test_polymarket_session_has_no_seq_checks():
    session = session_for("polymarket")
    msg = {"event_type": "book", "asset_id": "A", "bids": [], "asks": [], "timestamp": "1"}
    assert session.parse(msg).events == session.parse(msg).events  # no duplicate detection without a seq


def test_replay_check_names_instruments_without_snapshot(tmp_path, capsys):
    from feed.capture import CaptureWriter
    from feed.replaycheck import check_captures

    path = tmp_path / "deltas-only.jsonl"
    with CaptureWriter(path) as w:
        w.write(1, "kalshi", {"type": "orderbook_snapshot", "sid": 1, "seq": 1,
                              "msg": {"market_ticker": "HAS", "yes_dollars_fp": [["0.5", "1"]]}})
        for seq in (2, 3):
            w.write(seq, "kalshi", kalshi_delta(seq))
    assert check_captures([path]) == 1
    out = capsys.readouterr().out
    assert "1 instruments have no snapshot: kalshi:K (2 deltas)" in out
