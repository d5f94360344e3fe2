"""Upstream providers: live connections to venue WebSocket feeds (and their REST books), one per provider.

The interface part B's provider pool is written against (issue 16):

* ``ProviderSpec``: one configured provider (a direct venue endpoint, a relay, a simulator).
* ``Link``: a running connection to it. ``run`` connects, subscribes, keeps the socket alive (Polymarket's
  text ``PING`` every 10 s, Coinbase ``heartbeats``, Kalshi WebSocket pings), reconnects with exponential
  backoff and full jitter, and hands every raw venue message to ``on_message`` as a
  ``feed.capture.CaptureRecord`` whose ``msg`` is exactly what ``feed.venues.parser_for(venue)`` (or a
  per-provider ``feed.venues.VenueSession``) accepts. ``fetch_snapshot`` gets the venue's REST book as a
  raw venue message that parses into a ``BookSnapshot``.
* ``open_link(spec)``: the ``Link`` for a spec's venue.

Adapter package (network I/O, clock); the pure parts (subscribe frames, REST-book conversion, Kalshi
request signing, backoff schedule) live in ``feed.upstream.venue_protocol`` and are tested by feeding
them data.
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from feed.capture import CaptureRecord
from feed.errors import RemoteError

VENUES = ("polymarket", "coinbase", "kalshi")


@dataclass(frozen=True)
class ProviderSpec:
    """One upstream provider of one venue.

    ``auth`` (Kalshi: ``{"key_id": ..., "private_key_path": ...}``) is never logged: ``repr`` hides it.
    """

    name: str                 # "poly-direct", "sim-1", ...
    venue: str                # "polymarket" | "coinbase" | "kalshi"
    ws_url: str
    rest_url: str | None = None
    weight: float = 1.0
    auth: Mapping[str, str] | None = None   # kalshi: {"key_id": ..., "private_key_path": ...}; never logged

    def __repr__(self) -> str:
        auth = "<hidden>" if self.auth else None
        return (f"ProviderSpec(name={self.name!r}, venue={self.venue!r}, ws_url={self.ws_url!r}, "
                f"rest_url={self.rest_url!r}, weight={self.weight!r}, auth={auth})")


class LinkEvent(enum.StrEnum):
    """What a ``Link`` reports about its connection through ``on_event(event, detail)``."""

    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    ERROR = "error"            # detail str says which (connect refused, HTTP 503, bad frame, ...)
    ALIVE = "alive"            # a ping/pong or venue heartbeat proved the socket alive (stall detection)
    THROTTLED = "throttled"    # the venue refused with 429 / a rate-limit error


class UpstreamError(RemoteError):
    """A provider failed a request: the message names the provider, the URL and the reason
    (``HTTP 503``, ``HTTP 429``, ``timeout``, ``bad JSON``). ``throttled`` is true for a 429."""

    def __init__(self, message: str, *, status: int | None = None, throttled: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.throttled = throttled


class Link(Protocol):
    spec: ProviderSpec

    async def run(self, symbols: Sequence[str],
                  on_message: Callable[[CaptureRecord], None],
                  on_event: Callable[[LinkEvent, str], None]) -> None:
        """Until cancelled: connect, subscribe to ``symbols`` (venue symbols: token ids, product ids,
        market tickers), keep alive, reconnect with backoff + jitter. Every raw venue message ->
        ``on_message(CaptureRecord(recv_ts_ns, venue, msg))``. Never raises but ``CancelledError``."""
        ...

    async def fetch_snapshot(self, symbol: str) -> Any:
        """The venue REST book of ``symbol`` as a raw venue message the venue parser turns into a
        ``BookSnapshot``. Raises ``UpstreamError`` (HTTP status; 429 -> ``throttled``)."""
        ...


def open_link(spec: ProviderSpec) -> Link:
    """The ``Link`` of ``spec.venue``.

    Raises:
        ValueError: an unknown venue (the message lists the known ones).
    """
    from feed.upstream.links import VenueLink

    if spec.venue not in VENUES:
        raise ValueError(f"unknown venue {spec.venue!r} for provider {spec.name!r}; known: {', '.join(VENUES)}")
    return VenueLink(spec)
