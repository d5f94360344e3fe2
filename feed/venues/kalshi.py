"""Kalshi trade API v2 WebSocket parser (``orderbook_delta`` channel, ``trade``, ``ticker``).

Follows https://docs.kalshi.com/api-reference/websockets (``wss://api.elections.kalshi.com/trade-api/ws/v2``).
Instrument ids are ``kalshi:<market_ticker>``, e.g. ``kalshi:KXBTCD-26FEB1217-T67749.99``.

The YES/NO mapping. A Kalshi book holds only bids, on YES and on NO; a NO bid at ``q`` is an offer to
sell YES at ``1 - q``. bookcast publishes each market as one book in YES terms:

* bid levels = YES bids, as they are: ``(p, size)``;
* ask levels = NO bids, mirrored: a NO bid ``(q, size)`` is a YES ask ``(1 - q, size)``;
  so YES best ask = 1 - best NO bid, exactly (``Decimal``), and a NO delta at ``q`` changes the ask at ``1 - q``.

Numbers: the fixed-point fields are read first (``*_dollars`` prices as strings of dollars, ``*_fp``
counts as strings of contracts, ``delta_fp`` signed), falling back to the legacy integer cents /
integer counts. Every value is an exact ``Decimal``; a float is refused. ``orderbook_delta``'s delta is
signed and relative, so it becomes a ``BookIncrement`` that the book engine adds exactly to the held size.

Envelope: ``{"type": ..., "sid": <subscription id>, "seq": <n>, "msg": {...}}``; ``seq`` (per ``sid``) is
carried as ``venue_seq`` and checked per sid by ``feed.venues.seqcheck`` (``seq_key``).

Pure and stateless: no I/O, no clock.
"""
from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from feed.errors import VenueMessageError
from feed.model import (
    AggressorSide,
    BookIncrement,
    BookSnapshot,
    LevelIncrement,
    ParseResult,
    Side,
    Trade,
    VenueEvent,
    instrument_id,
)
from feed.venues._fields import decimal_value, field, nonempty_str, price_value
from feed.venues.coinbase import parse_time_ns

VENUE = "kalshi"
ONE = Decimal(1)
_CENTS = Decimal(100)
_NS_PER_S = 1_000_000_000
# A taker buying YES lifts the YES ask (a BUY of the YES book); buying NO hits the YES bid (a SELL).
_TAKER = {"yes": AggressorSide.BUY, "no": AggressorSide.SELL}
_BOOK_SIDE = {"yes": Side.BID, "no": Side.ASK}
_IGNORED = {"ticker", "ticker_v2", "subscribed", "unsubscribed", "ok", "market_lifecycle_v2", "event_lifecycle",
            "list_subscriptions"}


def parse(msg: Any) -> ParseResult:
    """Parse one raw Kalshi WebSocket message (already JSON-decoded).

    Wire samples and what they become::

        {"type": "orderbook_snapshot", "sid": 2, "seq": 1,
         "msg": {"market_ticker": "KXBTCD-26FEB1217-T67749.99", "market_id": "9b0f...",
                 "yes_dollars_fp": [["0.5600", "120.00"], ["0.5700", "24.64"]],
                 "no_dollars_fp": [["0.4100", "300.00"]]}}
            -> BookSnapshot(bids=[(0.56, 120), (0.57, 24.64)], asks=[(0.59, 300)], venue_seq=1)
        {"type": "orderbook_delta", "sid": 2, "seq": 2,
         "msg": {"market_ticker": "KXBTCD-26FEB1217-T67749.99", "price_dollars": "0.4100",
                 "delta_fp": "-54.50", "side": "no", "ts": "2026-02-12T17:26:21.123Z"}}
            -> BookIncrement([LevelIncrement(ask, 0.59, -54.50)], venue_seq=2)
        {"type": "trade", "sid": 2, "seq": 10,
         "msg": {"trade_id": "f851...", "market_ticker": "KXSOLD-26FEB1217-T79.9999", "yes_price_dollars": "0.7700",
                 "no_price_dollars": "0.2300", "count_fp": "75.00", "taker_side": "yes", "ts": 1770897981}}
            -> Trade(price=0.77 (the YES price), size=75, side=buy (taker bought YES; "no" -> sell))

    Legacy fields are read when the fixed-point ones are absent: ``yes``/``no`` as ``[[cents, count]]``,
    ``yes_dollars``/``no_dollars`` as ``[[dollars, count]]``, ``price`` in cents, ``delta``, ``yes_price``,
    ``count``. ``ts`` is Unix seconds (int), Unix ms (``ts_ms``) or RFC 3339; it is optional.

    ``ticker``, ``subscribed``, ``ok`` and other control or unknown types are ignored;
    ``error`` is ignored with its code and text as the reason.

    Raises:
        VenueMessageError: a parsed type with a missing field, a wrong type, a float, a bad or negative
            number (negative allowed only in a delta), a price outside (0, 1) or an unknown side; the
            message names the type and field, e.g. ``kalshi orderbook_delta: missing field 'msg.side'``.
    """
    if not isinstance(msg, dict):
        raise VenueMessageError(f"{VENUE}: message must be an object, got {type(msg).__name__}")
    msg_type = msg.get("type")
    if not isinstance(msg_type, str):
        raise VenueMessageError(f"{VENUE}: field 'type' must be a string, got {msg_type!r}")
    where = f"{VENUE} {msg_type}"
    if msg_type == "orderbook_snapshot":
        return ParseResult([_snapshot(_body(msg, where), _seq(msg, where), where)])
    if msg_type == "orderbook_delta":
        return ParseResult([_delta(_body(msg, where), _seq(msg, where), where)])
    if msg_type == "trade":
        return ParseResult([_trade(_body(msg, where), _seq(msg, where), where)])
    if msg_type == "error":
        body = msg.get("msg") if isinstance(msg.get("msg"), dict) else {}
        return ParseResult(ignored=f"error code={body.get('code')!r} msg={body.get('msg')!r}")
    return ParseResult(ignored=f"type {msg_type!r}")


def seq_key(msg: Any) -> tuple[str, int] | None:
    """``("sid=<sid>", seq)`` of a message that carries both, else None (for ``VenueSession``)."""
    if isinstance(msg, dict):
        sid, seq = msg.get("sid"), msg.get("seq")
        if _is_int(sid) and _is_int(seq):
            return f"sid={sid}", seq
    return None


def yes_ask_of_no_bid(no_price: Decimal, where: str = VENUE, name: str = "price") -> Decimal:
    """The YES ask a NO bid at ``no_price`` makes: ``1 - no_price``, exact. Raises outside (0, 1)."""
    if not 0 < no_price < ONE:
        raise VenueMessageError(f"{where}: bad field {name!r}: a price must be between 0 and 1, got {no_price}")
    return ONE - no_price


def _snapshot(body: dict, venue_seq: int | None, where: str) -> VenueEvent:
    ticker = nonempty_str(body, "market_ticker", where, prefix="msg")
    yes = _levels(body, "yes", where)
    no = _levels(body, "no", where)
    asks = tuple((yes_ask_of_no_bid(q, where, "msg.no"), size) for q, size in no)
    return BookSnapshot(instrument_id(VENUE, ticker), yes, asks, _ts_ns(body, where), venue_seq=venue_seq)


def _delta(body: dict, venue_seq: int | None, where: str) -> VenueEvent:
    ticker = nonempty_str(body, "market_ticker", where, prefix="msg")
    side_name = field(body, "side", where, prefix="msg")
    side = _BOOK_SIDE.get(side_name) if isinstance(side_name, str) else None
    if side is None:
        raise VenueMessageError(f"{where}: bad field 'msg.side': expected yes or no, got {side_name!r}")
    price = _price(body, "price", where)
    if side is Side.ASK:
        price = yes_ask_of_no_bid(price, where, "msg.price_dollars")
    elif not price < ONE:
        raise VenueMessageError(f"{where}: bad field 'msg.price_dollars': a price must be below 1, got {price}")
    if "delta_fp" in body:
        delta = _signed(body["delta_fp"], "msg.delta_fp", where)
    else:
        delta = _signed(field(body, "delta", where, prefix="msg"), "msg.delta", where)
    return BookIncrement(instrument_id(VENUE, ticker), (LevelIncrement(side, price, delta),), _ts_ns(body, where),
                         venue_seq=venue_seq)


def _trade(body: dict, venue_seq: int | None, where: str) -> VenueEvent:
    ticker = nonempty_str(body, "market_ticker", where, prefix="msg")
    taker = field(body, "taker_side", where, prefix="msg")
    side = _TAKER.get(taker) if isinstance(taker, str) else None
    if side is None:
        raise VenueMessageError(f"{where}: bad field 'msg.taker_side': expected yes or no, got {taker!r}")
    price = _price(body, "yes_price", where)
    if "count_fp" in body:
        size = decimal_value(body["count_fp"], "msg.count_fp", where)
    else:
        size = decimal_value(_int(field(body, "count", where, prefix="msg"), "msg.count", where), "msg.count", where)
    trade_id = body.get("trade_id")
    if trade_id is not None and not isinstance(trade_id, str):
        raise VenueMessageError(f"{where}: bad field 'msg.trade_id': expected a string, got {trade_id!r}")
    return Trade(instrument_id(VENUE, ticker), price, size, side, _ts_ns(body, where), trade_id, venue_seq=venue_seq)


# -- field readers ------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: Any, name: str, where: str) -> int:
    if not _is_int(value):
        raise VenueMessageError(f"{where}: bad field {name!r}: expected an integer, got {value!r}")
    return value


def _body(msg: dict, where: str) -> dict:
    body = field(msg, "msg", where)
    if not isinstance(body, dict):
        raise VenueMessageError(f"{where}: field 'msg' must be an object, got {type(body).__name__}")
    return body


def _seq(msg: dict, where: str) -> int | None:
    seq = msg.get("seq")
    if seq is None:
        return None
    if not _is_int(seq) or seq < 0:
        raise VenueMessageError(f"{where}: bad field 'seq': expected a non-negative integer, got {seq!r}")
    return seq


def _price(body: dict, name: str, where: str) -> Decimal:
    """``<name>_dollars`` (a dollar string), else ``<name>`` in integer cents; must be positive."""
    if f"{name}_dollars" in body:
        return price_value(body[f"{name}_dollars"], f"msg.{name}_dollars", where)
    cents = _int(field(body, name, where, prefix="msg"), f"msg.{name}", where)
    return price_value(format(Decimal(cents) / _CENTS, "f"), f"msg.{name}", where)


def _signed(value: Any, name: str, where: str) -> Decimal:
    """An exact signed decimal from a string or int (Kalshi deltas); floats, NaN and infinities refused."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise VenueMessageError(f"{where}: bad field {name!r}: expected a decimal string, got {value!r}")
    try:
        number = Decimal(value)
    except (InvalidOperation, ValueError):
        raise VenueMessageError(f"{where}: bad field {name!r}: not a decimal number: {value!r}") from None
    if not number.is_finite():
        raise VenueMessageError(f"{where}: bad field {name!r}: not finite: {value!r}")
    return number


def _levels(body: dict, side: str, where: str) -> tuple[tuple[Decimal, Decimal], ...]:
    """``<side>_dollars_fp`` ``[[dollars, count]]``, else ``<side>_dollars`` ``[[dollars, int]]``, else
    ``<side>`` ``[[cents, int]]``; a missing side is empty (Kalshi omits an empty side)."""
    for name, cents in ((f"{side}_dollars_fp", False), (f"{side}_dollars", False), (side, True)):
        if name in body:
            break
    else:
        return ()
    raw = body[name]
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise VenueMessageError(f"{where}: field 'msg.{name}' must be a list, got {type(raw).__name__}")
    levels = []
    for i, level in enumerate(raw):
        label = f"msg.{name}[{i}]"
        if not isinstance(level, list) or len(level) != 2:
            raise VenueMessageError(f"{where}: field {label!r} must be a list of 2, got {level!r}")
        price, size = level
        if cents:
            price = format(Decimal(_int(price, f"{label}[0]", where)) / _CENTS, "f")
        levels.append((price_value(price, f"{label}[0]", where), decimal_value(size, f"{label}[1]", where)))
    return tuple(levels)


def _ts_ns(body: dict, where: str) -> int | None:
    if "ts_ms" in body:
        return _int(body["ts_ms"], "msg.ts_ms", where) * 1_000_000
    value = body.get("ts")
    if value is None:
        return None
    if _is_int(value):
        return value * _NS_PER_S
    if isinstance(value, str):
        try:
            return parse_time_ns(value)
        except ValueError as exc:
            raise VenueMessageError(f"{where}: bad field 'msg.ts': {exc}") from None
    raise VenueMessageError(f"{where}: bad field 'msg.ts': expected Unix seconds or RFC 3339, got {value!r}")
