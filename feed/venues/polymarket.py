"""Polymarket CLOB market channel parser: raw WebSocket messages in, normalized venue events out.

Follows https://docs.polymarket.com (Market Channel, ``wss://ws-subscriptions-clob.polymarket.com/ws/market``).
Instrument ids are ``polymarket:<asset_id>``; asset ids (token ids) are opaque strings, in production
70-odd-digit decimal strings.

Pure and stateless: no I/O, no clock. Every price and size is parsed once here into ``Decimal``.
"""
from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from feed.errors import VenueMessageError
from feed.model import (
    AggressorSide,
    BestBidAsk,
    BookDelta,
    BookSnapshot,
    LevelChange,
    ParseResult,
    InstrumentListed,
    MarketResolved,
    Side,
    TickSizeChange,
    Trade,
    VenueEvent,
    instrument_id,
)
from feed.venues._fields import decimal_value, field, field_path, list_field, nonempty_str, price_value

VENUE = "polymarket"
_NS_PER_MS = 1_000_000
# Order side of a price level (BUY rests on the bid) and aggressor side of a trade, either case.
_LEVEL_SIDES = {"buy": Side.BID, "sell": Side.ASK}
_AGGRESSOR_SIDES = {"buy": AggressorSide.BUY, "sell": AggressorSide.SELL}


def parse(msg: Any) -> ParseResult:
    """Parse one raw market-channel message (already JSON-decoded).

    Wire samples and what they become (timestamps are Unix ms strings -> ``ts_event_ns``)::

        {"event_type": "book", "asset_id": "6581...5422", "market": "0xbd31...84af",
         "bids": [{"price": ".48", "size": "30"}, {"price": ".49", "size": "20"}],
         "asks": [{"price": ".52", "size": "25"}], "timestamp": "1765450842197", "hash": "0x0..."}
            -> BookSnapshot (levels in any order: Polymarket sends bids ascending, asks descending)
        {"event_type": "price_change", "market": "0x5f65...f8f1", "timestamp": "1757908892351",
         "price_changes": [{"asset_id": "7132...2563", "price": "0.5", "size": "200", "side": "BUY",
                            "hash": "5662...", "best_bid": "0.5", "best_ask": "1"}]}
            -> one BookDelta per asset id, in order of first appearance (BUY = bid, SELL = ask;
               ``size`` is the level's new absolute size)
        {"event_type": "price_change", "asset_id": "7132...2563", "market": "0x5f65...f8f1",
         "changes": [{"price": "0.4", "side": "SELL", "size": "0"}], "timestamp": "1729084877448"}
            -> BookDelta (the legacy schema, before September 2025)
        {"event_type": "last_trade_price", "asset_id": "7132...2563", "market": "0x5f65...f8f1",
         "price": "0.456", "size": "219.22", "side": "BUY", "fee_rate_bps": "0", "timestamp": "1750428146322"}
            -> Trade; ``side`` (BUY/SELL, either case) is the taker's side
        {"event_type": "tick_size_change", "asset_id": "7132...2563", "market": "0x5f65...f8f1",
         "old_tick_size": "0.01", "new_tick_size": "0.001", "timestamp": "100000000"}
            -> TickSizeChange
        {"event_type": "best_bid_ask", "asset_id": "7132...2563", "market": "0x5f65...f8f1",
         "best_bid": "0.73", "best_ask": "0.77", "spread": "0.04", "timestamp": "1766789469958"}
            -> BestBidAsk (``custom_feature_enabled``)
        {"event_type": "new_market", "market": "0x...", "assets_ids": ["7132...", "5211..."], "timestamp": "..."}
            -> InstrumentListed per asset id (``custom_feature_enabled``)
        {"event_type": "market_resolved", "market": "0x...", "assets_ids": ["7132...", "5211..."],
         "winning_asset_id": "7132...", "timestamp": "..."}
            -> MarketResolved per asset id, ``winner`` true for the winning one (``custom_feature_enabled``)

    ``hash`` is passed through unverified as ``venue_hash`` (its recipe has changed several times:
    py-clob-client issues 124 and 209): on ``book`` snapshots, and on ``price_change`` deltas the hash of
    the asset's last entry. ``price_change`` entries' ``best_bid``/``best_ask`` (the venue's top of book
    after the change) become ``venue_best_bid``/``venue_best_ask`` of the asset's delta (last entry wins),
    so a burst can be checked against them at its end.

    A JSON array of such objects (sent on subscribe) is parsed element by element. Messages of any
    other ``event_type``, objects without one and text frames (the ``"PONG"`` keepalive reply) are
    ignored: ``ParseResult(events=[], ignored=<reason>)``.

    Raises:
        VenueMessageError: a known message type with a missing field, a field of the wrong type, a bad,
            negative or (for prices and tick sizes) zero number, or an unknown side. The message names
            the type and field, e.g. ``polymarket book: missing field 'asset_id'``.
    """
    if isinstance(msg, list):
        events: list[VenueEvent] = []
        reasons: list[str] = []
        for item in msg:
            result = _parse_one(item)
            events.extend(result.events)
            if result.ignored:
                reasons.append(result.ignored)
        if events:
            return ParseResult(events)
        return ParseResult(ignored="; ".join(reasons) or "empty list")
    return _parse_one(msg)


def _parse_one(msg: Any) -> ParseResult:
    if isinstance(msg, str):
        return ParseResult(ignored=f"text frame {msg[:40]!r}")
    if not isinstance(msg, dict):
        raise VenueMessageError(f"{VENUE}: message must be an object, got {type(msg).__name__}")
    event_type = msg.get("event_type")
    if event_type is None:
        return ParseResult(ignored="no event_type")
    if not isinstance(event_type, str):
        raise VenueMessageError(f"{VENUE}: field 'event_type' must be a string, got {type(event_type).__name__}")
    handler = _HANDLERS.get(event_type)
    if handler is None:
        return ParseResult(ignored=f"event_type {event_type!r}")
    return ParseResult(handler(msg, f"{VENUE} {event_type}"))


def _book(msg: dict, where: str) -> list[VenueEvent]:
    return [
        BookSnapshot(
            _instrument(msg, where),
            _levels(msg, "bids", where),
            _levels(msg, "asks", where),
            _timestamp_ns(msg, where),
            venue_hash=_optional_str(msg, "hash", where),
        )
    ]


def _price_change(msg: dict, where: str) -> list[VenueEvent]:
    ts_event_ns = _timestamp_ns(msg, where)
    if "price_changes" in msg:
        by_asset: dict[str, list[LevelChange]] = {}
        extras: dict[str, dict[str, Any]] = {}
        for i, entry in enumerate(list_field(msg, "price_changes", where)):
            name = f"price_changes[{i}]"
            entry = _object(entry, name, where)
            asset_id = nonempty_str(entry, "asset_id", where, prefix=name)
            by_asset.setdefault(asset_id, []).append(_level_change(entry, name, where))
            extra = extras.setdefault(asset_id, {})
            if "hash" in entry:
                extra["venue_hash"] = _optional_str(entry, "hash", where, name)
            for key in ("best_bid", "best_ask"):
                if key in entry:
                    extra[f"venue_{key}"] = _optional_price(entry, key, where, name)
        return [
            BookDelta(instrument_id(VENUE, asset_id), tuple(changes), ts_event_ns, **extras[asset_id])
            for asset_id, changes in by_asset.items()
        ]
    changes = tuple(
        _level_change(_object(entry, f"changes[{i}]", where), f"changes[{i}]", where)
        for i, entry in enumerate(list_field(msg, "changes", where))
    )
    return [BookDelta(_instrument(msg, where), changes, ts_event_ns)]


def _last_trade_price(msg: dict, where: str) -> list[VenueEvent]:
    return [
        Trade(
            _instrument(msg, where),
            _price(msg, "price", where),
            _decimal(msg, "size", where),
            _choice(msg, "side", _AGGRESSOR_SIDES, where),
            _timestamp_ns(msg, where),
        )
    ]


def _tick_size_change(msg: dict, where: str) -> list[VenueEvent]:
    return [TickSizeChange(_instrument(msg, where), _price(msg, "new_tick_size", where), _timestamp_ns(msg, where))]


def _best_bid_ask(msg: dict, where: str) -> list[VenueEvent]:
    return [BestBidAsk(_instrument(msg, where), _optional_price(msg, "best_bid", where),
                       _optional_price(msg, "best_ask", where), _timestamp_ns(msg, where))]


def _new_market(msg: dict, where: str) -> list[VenueEvent]:
    market = nonempty_str(msg, "market", where)
    ts = _timestamp_ns(msg, where) if "timestamp" in msg else None
    return [InstrumentListed(instrument_id(VENUE, a), market, ts) for a in _asset_ids(msg, where)]


def _market_resolved(msg: dict, where: str) -> list[VenueEvent]:
    market = nonempty_str(msg, "market", where)
    ts = _timestamp_ns(msg, where) if "timestamp" in msg else None
    winner = _optional_str(msg, "winning_asset_id", where)
    return [MarketResolved(instrument_id(VENUE, a), market, None if winner is None else a == winner, ts)
            for a in _asset_ids(msg, where)]


_HANDLERS: dict[str, Callable[[dict, str], list[VenueEvent]]] = {
    "book": _book,
    "price_change": _price_change,
    "last_trade_price": _last_trade_price,
    "tick_size_change": _tick_size_change,
    "best_bid_ask": _best_bid_ask,
    "new_market": _new_market,
    "market_resolved": _market_resolved,
}


# -- field readers (the shared ones are in feed.venues._fields) ---------------------------------------
def _object(value: Any, name: str, where: str) -> dict:
    if not isinstance(value, dict):
        raise VenueMessageError(f"{where}: field {name!r} must be an object, got {type(value).__name__}")
    return value


def _decimal(obj: dict, name: str, where: str, prefix: str = "") -> Decimal:
    return decimal_value(field(obj, name, where, prefix), field_path(prefix, name), where)


def _price(obj: dict, name: str, where: str, prefix: str = "") -> Decimal:
    return price_value(field(obj, name, where, prefix), field_path(prefix, name), where, echo_parsed=True)


def _choice(obj: dict, name: str, table: dict[str, Any], where: str, prefix: str = "") -> Any:
    value = field(obj, name, where, prefix)
    found = table.get(value.lower()) if isinstance(value, str) else None
    if found is None:
        raise VenueMessageError(f"{where}: bad field {field_path(prefix, name)!r}: expected BUY or SELL, got {value!r}")
    return found


def _optional_str(obj: dict, name: str, where: str, prefix: str = "") -> str | None:
    value = obj.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise VenueMessageError(f"{where}: field {field_path(prefix, name)!r} must be a string, got {value!r}")
    return value


def _optional_price(obj: dict, name: str, where: str, prefix: str = "") -> Decimal | None:
    """A top-of-book price; absent, empty or zero means the side is empty."""
    value = obj.get(name)
    if value is None or value == "":
        return None
    price = decimal_value(value, field_path(prefix, name), where)
    return price if price else None


def _asset_ids(msg: dict, where: str) -> list[str]:
    ids = list_field(msg, "assets_ids", where)
    for i, asset in enumerate(ids):
        if not isinstance(asset, str) or not asset:
            raise VenueMessageError(f"{where}: field 'assets_ids[{i}]' must be a non-empty string, got {asset!r}")
    return ids


def _instrument(msg: dict, where: str) -> str:
    return instrument_id(VENUE, nonempty_str(msg, "asset_id", where))


def _timestamp_ns(msg: dict, where: str) -> int:
    """``timestamp``: Unix milliseconds as a digit string (or an int) -> ns."""
    value = field(msg, "timestamp", where)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value) * _NS_PER_MS
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value * _NS_PER_MS
    raise VenueMessageError(f"{where}: bad field 'timestamp': expected Unix milliseconds, got {value!r}")


def _levels(msg: dict, name: str, where: str) -> tuple[tuple[Decimal, Decimal], ...]:
    levels = []
    for i, level in enumerate(list_field(msg, name, where)):
        prefix = f"{name}[{i}]"
        level = _object(level, prefix, where)
        levels.append((_price(level, "price", where, prefix), _decimal(level, "size", where, prefix)))
    return tuple(levels)


def _level_change(entry: dict, prefix: str, where: str) -> LevelChange:
    return LevelChange(
        _choice(entry, "side", _LEVEL_SIDES, where, prefix),
        _price(entry, "price", where, prefix),
        _decimal(entry, "size", where, prefix),
    )
