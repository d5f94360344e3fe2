"""Kalshi v2 parser: the real ``trade``/``ticker`` samples, the documented book schema, exact fixed point,
derived YES asks, signed deltas accumulated exactly by the engine, and bad input."""
from __future__ import annotations

import json
import re
from decimal import Decimal as D

import pytest

from feed.errors import VenueMessageError
from feed.model import AggressorSide, BookIncrement, BookSnapshot, LevelIncrement, ParseResult, Side, Trade
from feed.sequencer import BookEngine, NegativeLevel
from feed.venues import kalshi, parser_for

T = "KXBTCD-26FEB1217-T67749.99"
INST = f"kalshi:{T}"


def snapshot(yes, no, seq=1, **extra):
    return {"type": "orderbook_snapshot", "sid": 2, "seq": seq,
            "msg": {"market_ticker": T, "market_id": "9b0f", "yes_dollars_fp": yes, "no_dollars_fp": no} | extra}


def delta(price, amount, side, seq=2, **extra):
    return {"type": "orderbook_delta", "sid": 2, "seq": seq,
            "msg": {"market_ticker": T, "price_dollars": price, "delta_fp": amount, "side": side,
                    "ts": "2026-02-12T17:26:21.123Z"} | extra}


def test_real_trade_samples(shared_data):
    lines = (shared_data / "kalshi" / "ws-trade-20260212.jsonl").read_text().splitlines()
    trades = [e for line in lines for e in kalshi.parse(json.loads(line)).events]
    assert len(trades) == len(lines) == 10
    first = trades[0]
    assert first == Trade("kalshi:KXSOLD-26FEB1217-T79.9999", D("0.7700"), D("75.00"), AggressorSide.BUY,
                          1770897981 * 10**9, "f851595a-6d92-424e-09f8-0d2669de70ae", venue_seq=10)
    for line, trade in zip(lines, trades):
        raw = json.loads(line)
        assert trade.venue_seq == raw["seq"]
        assert trade.price == D(raw["msg"]["yes_price_dollars"])  # exact, from the fixed-point string
        assert trade.price + D(raw["msg"]["no_price_dollars"]) == 1
        assert trade.side is (AggressorSide.BUY if raw["msg"]["taker_side"] == "yes" else AggressorSide.SELL)


def test_real_ticker_samples_are_ignored(shared_data):
    for line in (shared_data / "kalshi" / "ws-ticker-20260212.jsonl").read_text().splitlines():
        assert kalshi.parse(json.loads(line)) == ParseResult([], "type 'ticker'")


def test_snapshot_derives_yes_asks_from_no_bids():
    result = kalshi.parse(snapshot([["0.5600", "120.00"], ["0.5700", "24.64"]], [["0.4100", "300.00"], ["0.0100", "5"]]))
    assert result.events == [BookSnapshot(INST, ((D("0.56"), D(120)), (D("0.57"), D("24.64"))),
                                          ((D("0.59"), D(300)), (D("0.99"), D(5))), None, venue_seq=1)]
    engine = BookEngine("t")
    engine.apply(result.events[0])
    book = engine.instruments[INST].book
    assert book.best_ask() == (D("0.59"), D(300))  # YES ask = 1 - best NO bid (0.41)
    assert book.best_bid() == (D("0.57"), D("24.64"))


def test_legacy_cent_fields():
    msg = {"type": "orderbook_snapshot", "sid": 1, "seq": 1,
           "msg": {"market_ticker": T, "yes": [[8, 300]], "no": [[54, 20]]}}
    assert kalshi.parse(msg).events == [BookSnapshot(INST, ((D("0.08"), D(300)),), ((D("0.46"), D(20)),), venue_seq=1)]
    legacy = {"type": "orderbook_delta", "sid": 1, "seq": 2, "msg": {"market_ticker": T, "price": 54, "delta": -5, "side": "no"}}
    assert kalshi.parse(legacy).events == [BookIncrement(INST, (LevelIncrement(Side.ASK, D("0.46"), D(-5)),), None, 2)]


def test_signed_fractional_deltas_accumulate_exactly():
    engine = BookEngine("t")
    engine.apply(kalshi.parse(snapshot([["0.5600", "0.10"]], [])).events[0])
    # 0.1 + 0.2 - 0.3 is exactly 0 in decimal (never a phantom 5.55e-17 level as with floats).
    for seq, amount in ((2, "0.20"), (3, "-0.30")):
        out = engine.apply(kalshi.parse(delta("0.5600", amount, "yes", seq)).events[0])
        assert out and out[0].seq == seq - 1
    assert engine.instruments[INST].book.best_bid() is None
    out = engine.apply(kalshi.parse(delta("0.3000", "12.34", "no", 4)).events[0])
    assert out[0].changes[0].price == D("0.7") and out[0].changes[0].size == D("12.34")


def test_negative_level_is_a_remote_fault():
    engine = BookEngine("t")
    engine.apply(kalshi.parse(snapshot([["0.5600", "10.00"]], [])).events[0])
    with pytest.raises(NegativeLevel, match=r"instrument=kalshi:KXBTCD.* held=10.00 delta=-10.01"):
        engine.apply(kalshi.parse(delta("0.5600", "-10.01", "yes")).events[0])
    assert engine.instruments[INST].book.best_bid() == (D("0.56"), D(10))  # nothing applied


def test_delta_event_time_forms():
    assert kalshi.parse(delta("0.5", "1", "yes")).events[0].ts_event_ns == 1770917181123000000
    assert kalshi.parse(delta("0.5", "1", "yes", ts=1770917181)).events[0].ts_event_ns == 1770917181 * 10**9
    assert kalshi.parse(delta("0.5", "1", "yes", ts_ms=1770917181123)).events[0].ts_event_ns == 1770917181123000000


@pytest.mark.parametrize(("msg", "reason"), [
    ({"type": "subscribed", "id": 1, "msg": {"channel": "orderbook_delta", "sid": 1}}, "type 'subscribed'"),
    ({"type": "error", "id": 1, "msg": {"code": 8, "msg": "Unknown channel name"}}, "error code=8 msg='Unknown channel name'"),
    ({"type": "market_lifecycle_v2", "msg": {}}, "type 'market_lifecycle_v2'"),
])
def test_ignored(msg, reason):
    assert kalshi.parse(msg) == ParseResult([], reason)


@pytest.mark.parametrize(("msg", "error"), [
    ("PONG", "kalshi: message must be an object"),
    ({"sid": 1}, "kalshi: field 'type' must be a string"),
    ({"type": "orderbook_delta", "sid": 1, "seq": 2}, "kalshi orderbook_delta: missing field 'msg'"),
    (delta("0.5", "1", "maybe"), "kalshi orderbook_delta: bad field 'msg.side': expected yes or no"),
    (delta("0.5", 1.5, "yes"), "kalshi orderbook_delta: bad field 'msg.delta_fp': expected a decimal string, got 1.5"),
    (delta("0.5", "NaN", "yes"), "not finite"),
    (delta("1.0000", "1", "no"), "a price must be between 0 and 1"),
    (delta("1.0000", "1", "yes"), "a price must be below 1"),
    (delta(0.5, "1", "yes"), "bad field 'msg.price_dollars'"),
    (delta("0.5", "1", "yes", seq=-1), "bad field 'seq'"),
    (snapshot([["0.5", "-1"]], []), "bad field 'msg.yes_dollars_fp[0][1]'"),
    (snapshot([["0.5"]], []), "field 'msg.yes_dollars_fp[0]' must be a list of 2"),
    (snapshot("x", []), "field 'msg.yes_dollars_fp' must be a list"),
    ({"type": "trade", "sid": 1, "seq": 1, "msg": {"market_ticker": T, "yes_price_dollars": "0.5", "count_fp": "1",
                                                  "taker_side": "up"}}, "bad field 'msg.taker_side'"),
])
def test_malformed(msg, error):
    with pytest.raises(VenueMessageError, match=re.escape(error)):
        kalshi.parse(msg)


def test_registry_and_seq_key():
    assert parser_for("kalshi") is kalshi.parse
    assert kalshi.seq_key(delta("0.5", "1", "yes", seq=7)) == ("sid=2", 7)
    assert kalshi.seq_key({"type": "subscribed", "msg": {}}) is None
    assert kalshi.yes_ask_of_no_bid(D("0.4100")) == D("0.59")
