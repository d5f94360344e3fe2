"""What each venue's live protocol expects of a client, as data: subscribe frames, keepalive, REST book
requests and their conversion into raw venue messages, Kalshi request signing, the reconnect backoff.

Pure: no network, no clock (timestamps and random draws are passed in). Signing takes a loaded key.

Sources: Polymarket market channel (https://docs.polymarket.com/market-data/websocket/market-channel),
Polymarket ``GET /book`` (https://docs.polymarket.com/api-reference/orderbook/get-order-book-summary);
Coinbase Advanced Trade WebSocket channels (https://docs.cdp.coinbase.com/advanced-trade/docs/ws-channels)
and ``GET /api/v3/brokerage/market/product_book``; Kalshi WebSocket
(https://docs.kalshi.com/getting_started/quick_start_websockets), API keys
(https://docs.kalshi.com/getting_started/api_keys) and ``GET /trade-api/v2/markets/{ticker}/orderbook``.
"""
from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from feed.errors import RemoteError

# Public endpoints (a ProviderSpec names its own; these are the venues' documented defaults).
DEFAULT_WS_URLS = {
    "polymarket": "wss://ws-subscriptions-clob.polymarket.com/ws/market",
    "coinbase": "wss://advanced-trade-ws.coinbase.com",
    "kalshi": "wss://api.elections.kalshi.com/trade-api/ws/v2",
}
DEFAULT_REST_URLS = {
    "polymarket": "https://clob.polymarket.com",
    "coinbase": "https://api.coinbase.com",
    "kalshi": "https://api.elections.kalshi.com",
}
# Polymarket closes market-channel connections that do not send the text "PING" about every 10 s.
POLYMARKET_PING_TEXT = "PING"
POLYMARKET_PONG_TEXT = "PONG"
POLYMARKET_PING_INTERVAL_S = 10.0
KALSHI_WS_PATH = "/trade-api/ws/v2"


class SnapshotFormatError(RemoteError):
    """A venue's REST book response did not have the documented shape (the message names the field)."""


def subscribe_frames(venue: str, symbols: Sequence[str]) -> list[dict[str, Any]]:
    """The JSON frames to send after connecting, in order.

    polymarket: one frame, ``{"assets_ids": [...], "type": "market", "initial_dump": true,
    "custom_feature_enabled": true}`` (a ``book`` per asset first; ``best_bid_ask``, ``new_market``,
    ``market_resolved`` enabled). coinbase (Advanced Trade): one ``subscribe`` per channel, ``level2``,
    ``market_trades`` and ``heartbeats`` (the heartbeats keep the connection open and carry
    ``sequence_num``). kalshi: ``{"id": 1, "cmd": "subscribe", "params": {"channels": ["orderbook_delta"],
    "market_tickers": [...]}}`` then the same for ``trade`` (id 2).

    Raises:
        ValueError: unknown venue.
    """
    symbols = list(symbols)
    if venue == "polymarket":
        return [{"assets_ids": symbols, "type": "market", "initial_dump": True, "custom_feature_enabled": True}]
    if venue == "coinbase":
        return [{"type": "subscribe", "product_ids": symbols, "channel": channel}
                for channel in ("level2", "market_trades", "heartbeats")]
    if venue == "kalshi":
        return [{"id": i, "cmd": "subscribe", "params": {"channels": [channel], "market_tickers": symbols}}
                for i, channel in enumerate(("orderbook_delta", "trade"), start=1)]
    raise ValueError(f"unknown venue {venue!r}")


def book_request(venue: str, rest_url: str, symbol: str) -> tuple[str, str]:
    """``(url, path)`` of the venue's REST book of ``symbol``; ``path`` (without query) is what Kalshi signs.

    polymarket ``GET /book?token_id=<id>``, coinbase ``GET /api/v3/brokerage/market/product_book?product_id=<id>``,
    kalshi ``GET /trade-api/v2/markets/<ticker>/orderbook``.
    """
    base = rest_url.rstrip("/")
    if venue == "polymarket":
        return f"{base}/book?token_id={quote(symbol, safe='')}", "/book"
    if venue == "coinbase":
        path = "/api/v3/brokerage/market/product_book"
        return f"{base}{path}?product_id={quote(symbol, safe='')}", path
    if venue == "kalshi":
        path = f"/trade-api/v2/markets/{quote(symbol, safe='')}/orderbook"
        return f"{base}{path}", path
    raise ValueError(f"unknown venue {venue!r}")


def snapshot_message(venue: str, symbol: str, body: Any) -> dict[str, Any]:
    """Convert a REST book response into the raw venue message its parser turns into a ``BookSnapshot``.

    polymarket: the ``/book`` object (``market, asset_id, timestamp, hash, bids, asks, tick_size``) with
    ``event_type: "book"`` added. coinbase: ``{"pricebook": {"product_id", "bids": [{"price", "size"}],
    "asks": [...], "time"}}`` -> an ``l2_data`` ``snapshot`` (no ``sequence_num``: REST is not on the
    socket's numbering). kalshi: ``{"orderbook_fp": {"yes_dollars": [[p, n]], "no_dollars": [...]}}`` (or
    the older ``{"orderbook": {"yes": [[cents, n]], "yes_dollars": ..., ...}}``) -> ``orderbook_snapshot``
    without ``sid``/``seq``.

    Raises:
        SnapshotFormatError: not the documented shape.
    """
    if not isinstance(body, dict):
        raise SnapshotFormatError(f"{venue} REST book for {symbol!r}: expected a JSON object, got {type(body).__name__}")
    if venue == "polymarket":
        for name in ("bids", "asks"):
            if not isinstance(body.get(name), list):
                raise SnapshotFormatError(f"polymarket REST book for {symbol!r}: field {name!r} must be a list")
        msg = dict(body)
        msg["event_type"] = "book"
        msg.setdefault("asset_id", symbol)
        return msg
    if venue == "coinbase":
        book = body.get("pricebook")
        if not isinstance(book, dict):
            raise SnapshotFormatError(f"coinbase REST book for {symbol!r}: missing object 'pricebook'")
        time_text = book.get("time")
        updates = []
        for name, side in (("bids", "bid"), ("asks", "offer")):
            levels = book.get(name)
            if not isinstance(levels, list):
                raise SnapshotFormatError(f"coinbase REST book for {symbol!r}: field 'pricebook.{name}' must be a list")
            for i, level in enumerate(levels):
                if not isinstance(level, dict):
                    raise SnapshotFormatError(f"coinbase REST book for {symbol!r}: 'pricebook.{name}[{i}]' must be an object")
                update = {"side": side, "price_level": level.get("price"), "new_quantity": level.get("size")}
                if isinstance(time_text, str):
                    update["event_time"] = time_text
                updates.append(update)
        msg = {"channel": "l2_data",
               "events": [{"type": "snapshot", "product_id": book.get("product_id", symbol), "updates": updates}]}
        if isinstance(time_text, str):
            msg["timestamp"] = time_text
        return msg
    if venue == "kalshi":
        if isinstance(body.get("orderbook_fp"), dict):
            book = body["orderbook_fp"]
            out = {"market_ticker": symbol}
            for side in ("yes", "no"):
                levels = book.get(f"{side}_dollars", book.get(f"{side}_dollars_fp")) or []
                out[f"{side}_dollars_fp"] = levels
            return {"type": "orderbook_snapshot", "msg": out}
        if isinstance(body.get("orderbook"), dict):
            book = body["orderbook"]
            out = {"market_ticker": symbol}
            for side in ("yes", "no"):
                for key in (f"{side}_dollars_fp", f"{side}_dollars", side):
                    if book.get(key) is not None:
                        out[key] = book[key]
                        break
            return {"type": "orderbook_snapshot", "msg": out}
        raise SnapshotFormatError(f"kalshi REST book for {symbol!r}: missing object 'orderbook_fp' or 'orderbook'")
    raise ValueError(f"unknown venue {venue!r}")


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: exponential with full jitter (AWS Architecture Blog, "Exponential Backoff And
    Jitter"): attempt ``n`` (from 0) waits ``uniform(0, min(max_s, base_s * 2**n))``, at least ``floor_s``."""

    base_s: float = 0.05
    max_s: float = 5.0
    floor_s: float = 0.01

    def delay_s(self, attempt: int, draw: float) -> float:
        """``draw`` is a uniform random number in [0, 1) passed in by the caller."""
        cap = min(self.max_s, self.base_s * (2 ** min(attempt, 30)))
        return max(self.floor_s, cap * draw)


def kalshi_sign_message(timestamp_ms: int, method: str, path: str) -> bytes:
    """What Kalshi signs: ``<timestamp ms><METHOD><path without query>``, UTF-8."""
    return f"{timestamp_ms}{method.upper()}{urlsplit(path).path}".encode()


def kalshi_auth_headers(private_key: Any, key_id: str, timestamp_ms: int, method: str, path: str) -> dict[str, str]:
    """The three Kalshi API-key headers for one request or WebSocket handshake.

    ``KALSHI-ACCESS-SIGNATURE`` is base64 of RSA-PSS (MGF1-SHA256, salt = digest length) over SHA-256 of
    ``kalshi_sign_message``, made by ``cryptography`` with ``private_key`` (an ``RSAPrivateKey``).
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    signature = private_key.sign(
        kalshi_sign_message(timestamp_ms, method, path),
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH),
        hashes.SHA256(),
    )
    return {
        "KALSHI-ACCESS-KEY": key_id,
        "KALSHI-ACCESS-TIMESTAMP": str(timestamp_ms),
        "KALSHI-ACCESS-SIGNATURE": base64.b64encode(signature).decode(),
    }


def kalshi_verify(public_key: Any, headers: Any, method: str, path: str) -> str | None:
    """Check Kalshi auth headers against ``public_key`` (the simulator's side). None if valid, else why."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    key_id = headers.get("KALSHI-ACCESS-KEY")
    timestamp = headers.get("KALSHI-ACCESS-TIMESTAMP")
    signature = headers.get("KALSHI-ACCESS-SIGNATURE")
    if not key_id or not timestamp or not signature:
        return "missing KALSHI-ACCESS-KEY / -TIMESTAMP / -SIGNATURE headers"
    if not timestamp.isdigit():
        return "KALSHI-ACCESS-TIMESTAMP must be Unix milliseconds"
    try:
        public_key.verify(
            base64.b64decode(signature, validate=True),
            kalshi_sign_message(int(timestamp), method, path),
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH),
            hashes.SHA256(),
        )
    except (InvalidSignature, ValueError):
        return "bad KALSHI-ACCESS-SIGNATURE"
    return None
