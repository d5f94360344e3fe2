"""Venue parsers: one pure, stateless ``parse(msg) -> ParseResult`` per upstream venue.

``VENUES`` maps a venue name (the ``<venue>`` part of an instrument id and the ``venue`` field of a
capture record, PROTOCOL.md sections 1 and 9) to its parser.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from feed.errors import RemoteError
from feed.model import ParseResult
from feed.venues import coinbase, kalshi, polymarket
from feed.venues.seqcheck import VenueSession

Parser = Callable[[Any], ParseResult]

VENUES: dict[str, Parser] = {
    "polymarket": polymarket.parse,
    "coinbase": coinbase.parse,
    "kalshi": kalshi.parse,
}
# Venue sequence numbers (issue 16): (stream, seq) of a raw message, for ``VenueSession``.
SEQ_KEYS = {"polymarket": None, "coinbase": coinbase.seq_key, "kalshi": kalshi.seq_key}


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


def session_for(venue: str) -> VenueSession:
    """A fresh ``VenueSession`` (parser + per-stream venue seq checks) for one provider connection of
    ``venue``; call its ``reset()`` on every new connection.

    Raises:
        UnknownVenue: no such venue.
    """
    return VenueSession(venue, parser_for(venue), SEQ_KEYS.get(venue))
