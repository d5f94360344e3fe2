"""bookcast client SDK: verified local order books over WebSocket (see ``feed.client.sdk`` for usage).

``BookClient`` is the async client; ``VerifiedBooks`` is its pure verification core; ``tail`` the
live top-of-book viewer behind ``bookcast tail``.
"""
from feed.client.sdk import BookClient, ClientEvent, ConnectFailed, Connected, Disconnected
from feed.client.tail import render, render_line, tail
from feed.client.verify import (
    Action,
    BookCrossed,
    BookUpdated,
    ClientStats,
    ErrorReceived,
    Event,
    GapDetected,
    GapReason,
    LocalBook,
    Pong,
    ResyncReceived,
    SendResync,
    Shutdown,
    Subscribed,
    TradeEvent,
    Unsubscribed,
    UpdateKind,
    VerifiedBooks,
)

__all__ = [
    "Action",
    "BookClient",
    "BookCrossed",
    "BookUpdated",
    "ClientEvent",
    "ClientStats",
    "ConnectFailed",
    "Connected",
    "Disconnected",
    "ErrorReceived",
    "Event",
    "GapDetected",
    "GapReason",
    "LocalBook",
    "Pong",
    "ResyncReceived",
    "SendResync",
    "Shutdown",
    "Subscribed",
    "TradeEvent",
    "Unsubscribed",
    "UpdateKind",
    "VerifiedBooks",
    "render",
    "render_line",
    "tail",
]
