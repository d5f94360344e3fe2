"""Field readers shared by the venue parsers.

Each reads one field of a decoded JSON message (or checks one value taken from it) and raises
``VenueMessageError`` naming where it was (``"<venue> <message type>"``, e.g. ``coinbase l2update``) and
the field, possibly nested: ``bids[0].size`` (``prefix`` ``bids[0]``, name ``size``) or ``asks[0][1]``.
Pure: no I/O.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Any

from feed.errors import InvalidDecimal, VenueMessageError
from feed.model import parse_decimal


def field_path(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` alone when there is no prefix."""
    return f"{prefix}.{name}" if prefix else name


def field(obj: dict, name: str, where: str, prefix: str = "") -> Any:
    """``obj[name]``; missing -> ``<where>: missing field '<prefix.name>'``."""
    try:
        return obj[name]
    except KeyError:
        raise VenueMessageError(f"{where}: missing field {field_path(prefix, name)!r}") from None


def nonempty_str(obj: dict, name: str, where: str, prefix: str = "") -> str:
    """``obj[name]``, which must be a non-empty string."""
    value = field(obj, name, where, prefix)
    if not isinstance(value, str) or not value:
        raise VenueMessageError(
            f"{where}: field {field_path(prefix, name)!r} must be a non-empty string, got {value!r}"
        )
    return value


def list_field(obj: dict, name: str, where: str) -> list:
    """``obj[name]``, which must be a JSON array."""
    value = field(obj, name, where)
    if not isinstance(value, list):
        raise VenueMessageError(f"{where}: field {name!r} must be a list, got {type(value).__name__}")
    return value


def decimal_value(value: Any, name: str, where: str) -> Decimal:
    """``value`` (the field ``name``) as a finite, non-negative ``Decimal`` (see ``parse_decimal``)."""
    try:
        return parse_decimal(value, what=name)
    except InvalidDecimal as exc:
        raise VenueMessageError(f"{where}: bad field {name!r}: {exc}") from None


def price_value(value: Any, name: str, where: str, *, echo_parsed: bool = False) -> Decimal:
    """Like ``decimal_value``, but zero is refused too (a price or tick size).

    The zero error ends ``got <value>``: the wire value's ``repr`` (``got '0.00'``), or with
    ``echo_parsed`` the parsed ``Decimal`` (``got 0.00``), as each parser has always worded it.
    """
    price = decimal_value(value, name, where)
    if not price:
        got = price if echo_parsed else repr(value)
        raise VenueMessageError(f"{where}: bad field {name!r}: must be positive, got {got}")
    return price
