"""bookcast client SDK: verified local order books over WebSocket (see ``feed.client.sdk`` for usage).

``BookClient`` is the async client; ``VerifiedBooks`` is its pure verification core. The live viewer
behind ``bookcast tail`` is the submodule ``feed.client.tail`` (not re-exported, so its name stays the
module's).
"""
from feed.client.regions import MoveReason, RegionMoved
from feed.client.sdk import BookClient, ClientEvent, ConnectFailed, Connected, Disconnected
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
    StatusReceived,
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
    "MoveReason",
    "Pong",
    "RegionMoved",
    "ResyncReceived",
    "SendResync",
    "Shutdown",
    "StatusReceived",
    "Subscribed",
    "TradeEvent",
    "Unsubscribed",
    "UpdateKind",
    "VerifiedBooks",
]
