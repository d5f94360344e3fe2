"""Core vocabulary: sides, canonical decimals, instrument ids, level changes and normalized venue events.

Pure: no I/O, no clock, no environment. Timestamps are integers in nanoseconds since the Unix epoch
(wall clock) and are always passed in by the caller.

Prices and sizes are parsed once, at the venue edge, into ``decimal.Decimal``; a float is never a book
key. The canonical decimal string form follows PROTOCOL.md section 6:
``format(Decimal(s).normalize(), "f")``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from decimal import Context, Decimal, InvalidOperation

from feed.errors import InvalidDecimal, InvalidInstrument

ZERO = Decimal(0)


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
        InvalidDecimal: not a string/int, not a number, NaN/Infinity, or negative.
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
    return value


def canonical(value: Decimal) -> str:
    """Canonical decimal string of ``value`` (PROTOCOL.md section 6).

    ``Decimal("0.50")`` -> ``"0.5"``, ``Decimal("1.000E2")`` -> ``"100"``, ``Decimal("0")`` -> ``"0"``.
    """
    if not value:
        return "0"
    # normalize() rounds to the context's precision (28 digits by default); give it exactly as many
    # digits as the value has so no venue number is ever rounded.
    digits = len(value.as_tuple().digits)
    return format(value.normalize(Context(prec=max(digits, 1))), "f")


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


@dataclass(frozen=True, slots=True)
class BookDelta:
    """A venue's incremental change of one instrument's book (absolute new sizes per level)."""

    instrument: str
    changes: tuple[LevelChange, ...]
    ts_event_ns: int | None = None


@dataclass(frozen=True, slots=True)
class Trade:
    """A trade print. ``side`` is the aggressor (taker) side."""

    instrument: str
    price: Decimal
    size: Decimal
    side: AggressorSide
    ts_event_ns: int | None = None
    trade_id: str | None = None


@dataclass(frozen=True, slots=True)
class TickSizeChange:
    """The venue changed an instrument's minimum price increment."""

    instrument: str
    tick_size: Decimal
    ts_event_ns: int | None = None


VenueEvent = BookSnapshot | BookDelta | Trade | TickSizeChange


@dataclass(slots=True)
class ParseResult:
    """What a venue parser made of one raw message: events, plus messages it knowingly ignored."""

    events: list[VenueEvent] = field(default_factory=list)
    ignored: str | None = None  # why the message produced no events (e.g. "subscriptions"), else None
