"""Core vocabulary: sides, canonical decimals, instrument ids, level changes and normalized venue events.

Pure: no I/O, no clock, no environment. Timestamps are integers in nanoseconds since the Unix epoch
(wall clock) and are always passed in by the caller.

Prices and sizes are parsed once, at the venue edge, into ``decimal.Decimal``; a float is never a book
key. The canonical decimal string form follows PROTOCOL.md section 6:
``format(Decimal(s).normalize(), "f")``.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from decimal import Context, Decimal, InvalidOperation

from feed.errors import InvalidDecimal, InvalidInstrument

ZERO = Decimal(0)
MAX_DECIMAL_EXPONENT = 64
"""Largest ``abs(adjusted exponent)`` a price or size may have: ``1e999999999`` is a finite Decimal, but
its canonical form (PROTOCOL.md section 6) is a gigabyte of digits; real venue numbers are far inside."""


class Side(enum.StrEnum):
    """Side of the book. The wire spelling is the enum value (PROTOCOL.md section 4)."""

    BID = "bid"
    ASK = "ask"


class AggressorSide(enum.StrEnum):
    """Side of the taker in a trade, as sent in ``trade`` messages."""

    BUY = "buy"
    SELL = "sell"


def parse_decimal(text: object, *, what: str = "value") -> Decimal:
    """Parse a venue price or size into an exact, finite, non-negative ``Decimal``.

    Accepts ``str`` (the normal case: venues send decimal strings) and ``int``. Floats are refused:
    they cannot carry an exact price.

    Raises:
        InvalidDecimal: not a string/int, not a number, NaN/Infinity, negative, or (not zero and) outside
            ``1e-64 .. 1e64`` (``MAX_DECIMAL_EXPONENT``: its canonical string would be huge).
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise InvalidDecimal(f"{what} must be a decimal string, got {type(text).__name__} {text!r}")
    try:
        value = Decimal(text)
    except (InvalidOperation, ValueError):
        raise InvalidDecimal(f"{what} is not a decimal number: {text!r}") from None
    if not value.is_finite():
        raise InvalidDecimal(f"{what} is not finite: {text!r}")
    if value < 0:
        raise InvalidDecimal(f"{what} is negative: {text!r}")
    if value and abs(value.adjusted()) > MAX_DECIMAL_EXPONENT:
        raise InvalidDecimal(f"{what} is out of range (exponent beyond +-{MAX_DECIMAL_EXPONENT}): {text!r}")
    return value


def canonical(value: Decimal) -> str:
    """Canonical decimal string of ``value`` (PROTOCOL.md section 6).

    ``Decimal("0.50")`` -> ``"0.5"``, ``Decimal("1.000E2")`` -> ``"100"``, ``Decimal("0")`` -> ``"0"``.
    """
    if not value:
        return "0"
    text = str(value)
    if "E" not in text and ("." not in text or text[-1] != "0") and value.is_finite():
        # already canonical (no exponent, no trailing fractional zero): most venue numbers are, and str()
        # is ~7x cheaper than normalize + format; the SDK calls this twice per level of every snapshot
        return text
    # normalize() rounds to the context's precision (28 digits by default); give it exactly as many
    # digits as the value has so no venue number is ever rounded.
    return format(value.normalize(_exact_context(len(value.as_tuple().digits))), "f")


@functools.lru_cache(maxsize=128)
def _exact_context(digits: int) -> Context:
    """A decimal context of exactly ``digits`` digits of precision (one per length, shared: building a Context
    per call was half of ``canonical``'s cost, and the SDK calls it twice per level of every snapshot)."""
    return Context(prec=max(digits, 1))


def canonical_str(text: str) -> str:
    """Canonical form of a decimal string. Raises ``InvalidDecimal`` if it is not one."""
    return canonical(parse_decimal(text))


def instrument_id(venue: str, venue_symbol: str) -> str:
    """Build an instrument id ``<venue>:<venue's own id>``.

    Raises:
        InvalidInstrument: empty venue or symbol, or a venue containing ``:``.
    """
    if not venue or not venue_symbol or ":" in venue:
        raise InvalidInstrument(f"bad instrument parts venue={venue!r} symbol={venue_symbol!r}")
    return f"{venue}:{venue_symbol}"


def split_instrument(instrument: str) -> tuple[str, str]:
    """Split ``<venue>:<venue's own id>`` into its two parts (the id may itself contain ``:``).

    Raises:
        InvalidInstrument: not a string, no ``:``, or an empty part.
    """
    if not isinstance(instrument, str):
        raise InvalidInstrument(f"instrument must be a string, got {type(instrument).__name__}")
    venue, sep, symbol = instrument.partition(":")
    if not sep or not venue or not symbol:
        raise InvalidInstrument(f"instrument must look like '<venue>:<id>', got {instrument!r}")
    return venue, symbol


@dataclass(frozen=True, slots=True)
class LevelChange:
    """One level's new absolute size on one side. ``size == 0`` removes the level."""

    side: Side
    price: Decimal
    size: Decimal


# ---------------------------------------------------------------------------------------------------
# Normalized venue events: what venue parsers produce and the ingest consumes.


@dataclass(frozen=True, slots=True)
class BookSnapshot:
    """A venue's full book for one instrument. Levels are ``(price, size)``, in any order.

    Sizes of zero are ignored. ``ts_event_ns`` is the venue's event time, or ``None`` if it gives none.
    """

    instrument: str
    bids: tuple[tuple[Decimal, Decimal], ...]
    asks: tuple[tuple[Decimal, Decimal], ...]
    ts_event_ns: int | None = None
    venue_seq: int | None = None  # issue 16: the venue's sequence number (Coinbase sequence_num, Kalshi seq)
    venue_hash: str | None = None  # issue 16: Polymarket's book ``hash``, passed through unverified


@dataclass(frozen=True, slots=True)
class BookDelta:
    """A venue's incremental change of one instrument's book (absolute new sizes per level)."""

    instrument: str
    changes: tuple[LevelChange, ...]
    ts_event_ns: int | None = None
    venue_seq: int | None = None  # issue 16: the venue's sequence number (Coinbase sequence_num, Kalshi seq)
    venue_hash: str | None = None  # issue 16: Polymarket price_change ``hash`` (of the last entry for this asset)
    venue_best_bid: Decimal | None = None  # issue 16: Polymarket ``best_bid`` after this change (burst check)
    venue_best_ask: Decimal | None = None  # issue 16: Polymarket ``best_ask`` after this change


@dataclass(frozen=True, slots=True)
class Trade:
    """A trade print. ``side`` is the aggressor (taker) side."""

    instrument: str
    price: Decimal
    size: Decimal
    side: AggressorSide
    ts_event_ns: int | None = None
    trade_id: str | None = None
    venue_seq: int | None = None  # issue 16: the venue's sequence number, if it gives one


@dataclass(frozen=True, slots=True)
class TickSizeChange:
    """The venue changed an instrument's minimum price increment."""

    instrument: str
    tick_size: Decimal
    ts_event_ns: int | None = None


VenueEvent = BookSnapshot | BookDelta | Trade | TickSizeChange  # | the issue-16 kinds below (VENUE_INFO_EVENTS, BookIncrement)


@dataclass(slots=True)
class ParseResult:
    """What a venue parser made of one raw message: events, plus messages it knowingly ignored."""

    events: list[VenueEvent] = field(default_factory=list)
    ignored: str | None = None  # why the message produced no events (e.g. "subscriptions"), else None


# ---------------------------------------------------------------------------------------------------
# Issue 16 (upstream providers, engineer "venues"): event kinds added for live venue connections.
# ``BookIncrement`` changes a book (Kalshi's signed deltas); the others carry no book change and pass
# through ``BookEngine.apply`` unchanged (``VENUE_INFO_EVENTS``), for the ingest / provider pool to act on.


@dataclass(frozen=True, slots=True)
class LevelIncrement:
    """A signed change of one level's size (Kalshi ``orderbook_delta``): new size = old size + ``delta``.

    ``delta`` is an exact ``Decimal`` and may be negative; a result below zero is a venue fault.
    """

    side: Side
    price: Decimal
    delta: Decimal


@dataclass(frozen=True, slots=True)
class BookIncrement:
    """A venue's relative change of one instrument's book (Kalshi). The engine turns it into absolute sizes."""

    instrument: str
    changes: tuple[LevelIncrement, ...]
    ts_event_ns: int | None = None
    venue_seq: int | None = None


@dataclass(frozen=True, slots=True)
class BestBidAsk:
    """The venue's own top of book (Polymarket ``best_bid_ask``); ``None`` for an empty side."""

    instrument: str
    best_bid: Decimal | None
    best_ask: Decimal | None
    ts_event_ns: int | None = None


@dataclass(frozen=True, slots=True)
class InstrumentListed:
    """The venue announced a new market (Polymarket ``new_market``): one event per asset id."""

    instrument: str
    market: str
    ts_event_ns: int | None = None


@dataclass(frozen=True, slots=True)
class MarketResolved:
    """The venue resolved a market (Polymarket ``market_resolved``): one event per asset id;
    ``winner`` is true for the winning asset, false for the others, None if the venue did not say."""

    instrument: str
    market: str
    winner: bool | None
    ts_event_ns: int | None = None


class VenueSeqKind(enum.StrEnum):
    """What a venue sequence number said about a stream (``feed.venues.seqcheck``)."""

    GAP = "gap"              # seq jumped forward: messages were lost, the books of the stream are not exact
    DUPLICATE = "duplicate"  # seq already seen: the message was dropped
    RESET = "reset"          # seq went backwards: the venue restarted the stream (a new snapshot follows)


@dataclass(frozen=True, slots=True)
class VenueSeqFault:
    """A venue sequence fault on one stream (Kalshi: a subscription ``sid``; Coinbase Advanced Trade: the
    connection's ``sequence_num``). ``expected`` is the seq that should have come, ``got`` the one that did.
    ``instruments`` are those seen on the stream so far (all of them are affected)."""

    kind: VenueSeqKind
    venue: str
    stream: str
    expected: int
    got: int
    instruments: tuple[str, ...] = ()


VENUE_INFO_EVENTS = (BestBidAsk, InstrumentListed, MarketResolved, VenueSeqFault)
