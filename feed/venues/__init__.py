"""Venue parsers: one pure, stateless ``parse(msg) -> ParseResult`` per upstream venue.

``VENUES`` maps a venue name (the ``<venue>`` part of an instrument id and the ``venue`` field of a
capture record, PROTOCOL.md sections 1 and 9) to its parser.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from feed.errors import RemoteError
from feed.model import ParseResult
from feed.venues import coinbase, polymarket

Parser = Callable[[Any], ParseResult]

VENUES: dict[str, Parser] = {
    "polymarket": polymarket.parse,
    "coinbase": coinbase.parse,
}


class UnknownVenue(RemoteError, ValueError):
    """A venue name that has no parser (e.g. in a capture file or a config)."""


def parser_for(venue: str) -> Parser:
    """The parser of ``venue``.

    Raises:
        UnknownVenue: no such venue; the message lists the known ones.
    """
    try:
        return VENUES[venue]
    except (KeyError, TypeError):
        raise UnknownVenue(f"unknown venue {venue!r}; known venues: {', '.join(sorted(VENUES))}") from None
