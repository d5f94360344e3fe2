"""Coinbase WebSocket feed parser: the Exchange feed (``level2`` / ``level2_batch``, ``matches``) and the
Advanced Trade feed (``level2`` as channel ``l2_data``, ``market_trades``, ``heartbeats``).

Follows https://docs.cdp.coinbase.com/exchange/docs/websocket-channels (``wss://ws-feed.exchange.coinbase.com``)
and https://docs.cdp.coinbase.com/advanced-trade/docs/ws-channels (``wss://advanced-trade-ws.coinbase.com``).
Instrument ids are ``coinbase:<product_id>``, e.g. ``coinbase:BAND-GBP``, for both schemas: a message with
a ``channel`` field is Advanced Trade, one with a ``type`` field is Exchange.

Pure and stateless: no I/O, no clock. Every price and size is parsed once here into ``Decimal``; the
RFC 3339 ``time`` field is converted to integer ns exactly, without floats.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from feed.errors import VenueMessageError
from feed.model import (
    AggressorSide,
    BookDelta,
    BookSnapshot,
    LevelChange,
    ParseResult,
    Side,
    Trade,
    VenueEvent,
    instrument_id,
)
from feed.venues._fields import decimal_value, field, list_field, nonempty_str, price_value

VENUE = "coinbase"
_LEVEL_SIDES = {"buy": Side.BID, "sell": Side.ASK}
# Coinbase's match ``side`` is the maker's side: the taker (aggressor) is on the other one.
_AGGRESSOR_OF_MAKER = {"buy": AggressorSide.SELL, "sell": AggressorSide.BUY}
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_SECOND = timedelta(seconds=1)


def parse(msg: Any) -> ParseResult:
    """Parse one raw Coinbase Exchange feed message (already JSON-decoded).

    Wire samples and what they become::

        {"type": "snapshot", "product_id": "BAND-GBP",
         "bids": [["14.755", "3.1"], ["14.75", "20"]], "asks": [["14.806", "1.2"]]}
            -> BookSnapshot, ``ts_event_ns`` None (a snapshot carries no event time; an optional
               ``time`` is used if present)
        {"type": "l2update", "product_id": "BAND-GBP", "time": "2021-04-17T16:43:37.123456Z",
         "changes": [["buy", "14.755", "0"], ["sell", "14.801", "7.5"]]}
            -> BookDelta (buy = bid, sell = ask; the size is the level's new absolute size)
        {"type": "match", "trade_id": 280232, "maker_order_id": "2a0d...", "taker_order_id": "3c82...",
         "side": "sell", "size": "985", "price": "0.00001305", "product_id": "SKL-BTC",
         "sequence": 177100030, "time": "2021-04-17T16:43:37.089723Z"}
            -> Trade (``last_match`` too). Coinbase's ``side`` is the MAKER's side, so the aggressor is
               the opposite: the sample above is a taker BUY. ``trade_id`` becomes a string.

    ``subscriptions``, ``ticker``, ``heartbeat``, ``error``, full-channel messages
    (``received``/``open``/``done``/``change``) and any other ``type`` are ignored:
    ``ParseResult(events=[], ignored=<reason>)``.

    Raises:
        VenueMessageError: not an object, or a parsed type with a missing field, a field of the wrong
            type, a bad, negative or (for prices) zero number, an unknown side or a bad ``time``. The
            message names the type and field, e.g. ``coinbase l2update: missing field 'time'``.
    """
    if not isinstance(msg, dict):
        raise VenueMessageError(f"{VENUE}: message must be an object, got {type(msg).__name__}")
    if "channel" in msg and "type" not in msg:
        return parse_advanced(msg)
    msg_type = field(msg, "type", VENUE)
    if not isinstance(msg_type, str):
        raise VenueMessageError(f"{VENUE}: field 'type' must be a string, got {msg_type!r}")
    handler = _HANDLERS.get(msg_type)
    if handler is None:
        if msg_type == "error":
            return ParseResult(ignored=f"error {msg.get('message')!r} reason={msg.get('reason')!r}")
        return ParseResult(ignored=f"type {msg_type!r}")
    return ParseResult(handler(msg, f"{VENUE} {msg_type}"))


def parse_time_ns(text: str) -> int:
    """RFC 3339 timestamp (``2021-04-17T16:43:37.123456Z``, up to 9 fraction digits, ``Z`` or ``+hh:mm``)
    -> integer ns since the Unix epoch, exactly.

    Raises:
        ValueError: not of that form, or not a real date/time.
    """
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.group(1, 2, 3, 4, 5, 6))
    fraction, _, sign, offset_h, offset_m = match.group(7, 8, 9, 10, 11)
    offset = timedelta(hours=int(offset_h), minutes=int(offset_m)) if sign else timedelta()
    if sign == "-":
        offset = -offset
    moment = datetime(year, month, day, hour, minute, second, tzinfo=timezone(offset))
    seconds = (moment - _UNIX_EPOCH) // _ONE_SECOND
    return seconds * 1_000_000_000 + int((fraction or "0").ljust(9, "0"))


def _snapshot(msg: dict, where: str) -> list[VenueEvent]:
    return [
        BookSnapshot(
            _instrument(msg, where),
            _levels(msg, "bids", where),
            _levels(msg, "asks", where),
            _time_ns(msg, where) if "time" in msg else None,
        )
    ]


def _l2update(msg: dict, where: str) -> list[VenueEvent]:
    changes = []
    for i, change in enumerate(list_field(msg, "changes", where)):
        name = f"changes[{i}]"
        side, price, size = _tuple(change, 3, name, where)
        level_side = _LEVEL_SIDES.get(side) if isinstance(side, str) else None
        if level_side is None:
            raise VenueMessageError(f"{where}: bad field '{name}[0]': expected buy or sell, got {side!r}")
        changes.append(
            LevelChange(level_side, price_value(price, f"{name}[1]", where), decimal_value(size, f"{name}[2]", where))
        )
    return [BookDelta(_instrument(msg, where), tuple(changes), _time_ns(msg, where))]


def _match(msg: dict, where: str) -> list[VenueEvent]:
    maker_side = field(msg, "side", where)
    aggressor = _AGGRESSOR_OF_MAKER.get(maker_side) if isinstance(maker_side, str) else None
    if aggressor is None:
        raise VenueMessageError(f"{where}: bad field 'side': expected buy or sell, got {maker_side!r}")
    trade_id = field(msg, "trade_id", where)
    if isinstance(trade_id, bool) or not isinstance(trade_id, (int, str)) or trade_id == "":
        raise VenueMessageError(f"{where}: bad field 'trade_id': expected an integer or string, got {trade_id!r}")
    return [
        Trade(
            _instrument(msg, where),
            price_value(field(msg, "price", where), "price", where),
            decimal_value(field(msg, "size", where), "size", where),
            aggressor,
            _time_ns(msg, where),
            str(trade_id),
        )
    ]


_HANDLERS: dict[str, Callable[[dict, str], list[VenueEvent]]] = {
    "snapshot": _snapshot,
    "l2update": _l2update,
    "match": _match,
    "last_match": _match,
}


# -- field readers (the shared ones are in feed.venues._fields) ---------------------------------------
def _instrument(msg: dict, where: str) -> str:
    return instrument_id(VENUE, nonempty_str(msg, "product_id", where))


def _tuple(value: Any, length: int, name: str, where: str) -> list:
    if not isinstance(value, list) or len(value) != length:
        raise VenueMessageError(f"{where}: field {name!r} must be a list of {length}, got {value!r}")
    return value


def _time_ns(msg: dict, where: str) -> int:
    value = field(msg, "time", where)
    try:
        if not isinstance(value, str):
            raise ValueError(f"expected an RFC 3339 string, got {value!r}")
        return parse_time_ns(value)
    except ValueError as exc:
        raise VenueMessageError(f"{where}: bad field 'time': {exc}") from None


def _levels(msg: dict, name: str, where: str) -> tuple[tuple[Decimal, Decimal], ...]:
    levels = []
    for i, level in enumerate(list_field(msg, name, where)):
        price, size = _tuple(level, 2, f"{name}[{i}]", where)
        levels.append((price_value(price, f"{name}[{i}][0]", where), decimal_value(size, f"{name}[{i}][1]", where)))
    return tuple(levels)


# -- Advanced Trade (issue 16) ---------------------------------------------------------------------
_ADVANCED_SIDES = {"bid": Side.BID, "offer": Side.ASK, "ask": Side.ASK}
# market_trades ``side`` is the maker's side, as on the Exchange feed: the aggressor is the other one.
_ADVANCED_AGGRESSOR_OF_MAKER = {"BUY": AggressorSide.SELL, "SELL": AggressorSide.BUY}
ADVANCED_IGNORED = {"heartbeats", "subscriptions", "ticker", "ticker_batch", "candles", "status", "user"}


def parse_advanced(msg: dict) -> ParseResult:
    """Parse one Advanced Trade message (already JSON-decoded; ``channel`` names the kind).

    Wire samples and what they become (``sequence_num`` -> ``venue_seq``; it numbers every message of one
    connection, all channels together, from 0; ``seq_key`` exposes it to ``feed.venues.seqcheck``)::

        {"channel": "l2_data", "timestamp": "2026-08-09T21:05:48.483587501Z", "sequence_num": 13,
         "events": [{"type": "snapshot", "product_id": "BTC-USD", "updates": [
            {"side": "bid", "event_time": "2026-08-09T21:05:48.170326Z", "price_level": "65083.66",
             "new_quantity": "0.20371215"}, {"side": "offer", ...}]}]}
            -> BookSnapshot (``ts_event_ns`` the latest ``event_time``)
        {"channel": "l2_data", ..., "events": [{"type": "update", "product_id": "BTC-USD", "updates": [
            {"side": "bid", "event_time": "...", "price_level": "65061.91", "new_quantity": "0"}]}]}
            -> BookDelta (``new_quantity`` is the level's new absolute size; "0" removes; offer = ask)
        {"channel": "market_trades", ..., "events": [{"type": "update", "trades": [{"product_id": "BTC-USD",
            "trade_id": "1068572091", "price": "65083.67", "size": "0.002", "time": "...", "side": "SELL"}]}]}
            -> Trade per entry; ``side`` is the maker's, so SELL is a taker BUY. ``snapshot`` trade events
               (history sent on subscribe) are ignored: they are not new prints.

    ``heartbeats`` (the ``heartbeat_counter`` keepalive), ``subscriptions``, ``ticker``, ``candles`` and
    other channels are ignored; ``error`` messages are ignored with their text as the reason.

    Raises:
        VenueMessageError: a parsed channel with a missing field, a wrong type, a bad or negative number,
            an unknown side or a bad time, e.g. ``coinbase l2_data: missing field 'events[0].updates'``.
    """
    channel = msg.get("channel")
    if not isinstance(channel, str):
        if msg.get("type") == "error":
            return ParseResult(ignored=f"error {msg.get('message')!r}")
        raise VenueMessageError(f"{VENUE}: field 'channel' must be a string, got {channel!r}")
    where = f"{VENUE} {channel}"
    venue_seq = msg.get("sequence_num")
    if venue_seq is not None and (isinstance(venue_seq, bool) or not isinstance(venue_seq, int) or venue_seq < 0):
        raise VenueMessageError(f"{where}: bad field 'sequence_num': expected a non-negative integer, got {venue_seq!r}")
    if channel == "l2_data":
        return ParseResult(_l2_data(msg, venue_seq, where))
    if channel == "market_trades":
        events = _market_trades(msg, venue_seq, where)
        return ParseResult(events) if events else ParseResult(ignored="market_trades snapshot")
    return ParseResult(ignored=f"channel {channel!r}")


def seq_key(msg: Any) -> tuple[str, int] | None:
    """``("connection", sequence_num)`` of an Advanced Trade message, else None (the Exchange feed's
    level2 carries no sequence)."""
    if isinstance(msg, dict) and "channel" in msg:
        seq = msg.get("sequence_num")
        if isinstance(seq, int) and not isinstance(seq, bool):
            return "connection", seq
    return None


def is_heartbeat(msg: Any) -> bool:
    """True for an Advanced Trade ``heartbeats`` message or an Exchange ``heartbeat``."""
    return isinstance(msg, dict) and (msg.get("channel") == "heartbeats" or msg.get("type") == "heartbeat")


def _events(msg: dict, where: str) -> list[tuple[str, dict]]:
    out = []
    for i, event in enumerate(list_field(msg, "events", where)):
        if not isinstance(event, dict):
            raise VenueMessageError(f"{where}: field 'events[{i}]' must be an object, got {type(event).__name__}")
        out.append((f"events[{i}]", event))
    return out


def _l2_data(msg: dict, venue_seq: int | None, where: str) -> list[VenueEvent]:
    events: list[VenueEvent] = []
    for prefix, event in _events(msg, where):
        kind = nonempty_str(event, "type", where, prefix)
        instrument = instrument_id(VENUE, nonempty_str(event, "product_id", where, prefix))
        updates = field(event, "updates", where, prefix)
        if not isinstance(updates, list):
            raise VenueMessageError(f"{where}: field '{prefix}.updates' must be a list, got {type(updates).__name__}")
        changes = []
        latest_ns = None
        times: dict[str, int] = {}  # one message's updates mostly share one event_time: parse it once
        for j, update in enumerate(updates):
            name = f"{prefix}.updates[{j}]"
            if not isinstance(update, dict):
                raise VenueMessageError(f"{where}: field {name!r} must be an object, got {type(update).__name__}")
            side_name = field(update, "side", where, name)
            side = _ADVANCED_SIDES.get(side_name) if isinstance(side_name, str) else None
            if side is None:
                raise VenueMessageError(f"{where}: bad field '{name}.side': expected bid or offer, got {side_name!r}")
            price = price_value(field(update, "price_level", where, name), f"{name}.price_level", where)
            size = decimal_value(field(update, "new_quantity", where, name), f"{name}.new_quantity", where)
            if "event_time" in update:
                text = update["event_time"]
                ts = times.get(text) if isinstance(text, str) else None
                if ts is None:
                    ts = _advanced_time(text, f"{name}.event_time", where)
                    times[text] = ts
                latest_ns = ts if latest_ns is None or ts > latest_ns else latest_ns
            changes.append(LevelChange(side, price, size))
        if latest_ns is None and "timestamp" in msg:
            latest_ns = _advanced_time(msg["timestamp"], "timestamp", where)
        if kind == "snapshot":
            bids = tuple((c.price, c.size) for c in changes if c.side is Side.BID)
            asks = tuple((c.price, c.size) for c in changes if c.side is Side.ASK)
            events.append(BookSnapshot(instrument, bids, asks, latest_ns, venue_seq=venue_seq))
        elif kind == "update":
            events.append(BookDelta(instrument, tuple(changes), latest_ns, venue_seq=venue_seq))
        else:
            raise VenueMessageError(f"{where}: bad field '{prefix}.type': expected snapshot or update, got {kind!r}")
    return events


def _market_trades(msg: dict, venue_seq: int | None, where: str) -> list[VenueEvent]:
    events: list[VenueEvent] = []
    for prefix, event in _events(msg, where):
        if event.get("type") == "snapshot":
            continue
        for j, trade in enumerate(list_field(event, "trades", where)):
            name = f"{prefix}.trades[{j}]"
            if not isinstance(trade, dict):
                raise VenueMessageError(f"{where}: field {name!r} must be an object, got {type(trade).__name__}")
            maker = field(trade, "side", where, name)
            side = _ADVANCED_AGGRESSOR_OF_MAKER.get(maker.upper()) if isinstance(maker, str) else None
            if side is None:
                raise VenueMessageError(f"{where}: bad field '{name}.side': expected BUY or SELL, got {maker!r}")
            trade_id = field(trade, "trade_id", where, name)
            if isinstance(trade_id, bool) or not isinstance(trade_id, (int, str)) or trade_id == "":
                raise VenueMessageError(f"{where}: bad field '{name}.trade_id': expected an id, got {trade_id!r}")
            events.append(Trade(
                instrument_id(VENUE, nonempty_str(trade, "product_id", where, name)),
                price_value(field(trade, "price", where, name), f"{name}.price", where),
                decimal_value(field(trade, "size", where, name), f"{name}.size", where),
                side,
                _advanced_time(field(trade, "time", where, name), f"{name}.time", where),
                str(trade_id),
                venue_seq=venue_seq,
            ))
    return events


def _advanced_time(value: Any, name: str, where: str) -> int:
    try:
        if not isinstance(value, str):
            raise ValueError(f"expected an RFC 3339 string, got {value!r}")
        return parse_time_ns(value)
    except ValueError as exc:
        raise VenueMessageError(f"{where}: bad field {name!r}: {exc}") from None
