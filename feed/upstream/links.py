"""``VenueLink``: one live WebSocket connection to one provider, with keepalive, reconnect and REST books.

Adapter (network I/O, clock). What is sent and how responses convert is in ``venue_protocol`` (pure).

Keepalive, per venue: every ``ping_interval_s`` the link sends a WebSocket ping (all venues), and for
Polymarket also the text ``PING`` every 10 s. Pong frames, Polymarket's ``PONG``, server pings (Kalshi
pings every 10 s) and Coinbase ``heartbeats`` messages each report ``LinkEvent.ALIVE``: the socket is
alive even when no data flows (the pool's stall-while-alive detection compares the two). A socket with no
frame at all for ``dead_after_s`` is closed and reconnected.

Bad frames: a text frame that is not JSON (other than ``PONG``) and binary frames are reported as
``LinkEvent.ERROR`` ("bad frame: ...") and not passed on. Everything else is passed on unchanged.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from feed.capture import CaptureRecord
from feed.upstream import LinkEvent, ProviderSpec, UpstreamError
from feed.upstream import venue_protocol as vp
from feed.venues.coinbase import is_heartbeat

log = logging.getLogger("bookcast.upstream")


def load_private_key(path: str) -> Any:
    """Load a PEM RSA private key (Kalshi API key file). Raises ``UpstreamError`` naming the path only."""
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise UpstreamError(f"cannot load Kalshi private key from {path}: {type(exc).__name__}") from None


class VenueLink:
    """A ``feed.upstream.Link`` for Polymarket, Coinbase Advanced Trade or Kalshi (see the module text)."""

    def __init__(self, spec: ProviderSpec, *, backoff: vp.Backoff | None = None, ping_interval_s: float = 1.0,
                 dead_after_s: float = 10.0, connect_timeout_s: float = 5.0, rest_timeout_s: float = 5.0,
                 clock_ns: Callable[[], int] = time.time_ns, rng: random.Random | None = None) -> None:
        self.spec = spec
        self.backoff = backoff or vp.Backoff()
        self.ping_interval_s = ping_interval_s
        self.dead_after_s = dead_after_s
        self.connect_timeout_s = connect_timeout_s
        self.rest_timeout_s = rest_timeout_s
        self.clock_ns = clock_ns
        self.rng = rng or random.Random()
        self.connects = 0
        self._key = None
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"VenueLink({self.spec!r})"

    # -- auth -----------------------------------------------------------------------------------
    def _auth_headers(self, method: str, path: str) -> dict[str, str]:
        if self.spec.venue != "kalshi" or not self.spec.auth:
            return {}
        if self._key is None:
            self._key = load_private_key(self.spec.auth["private_key_path"])
        return vp.kalshi_auth_headers(self._key, self.spec.auth["key_id"], self.clock_ns() // 1_000_000, method, path)

    async def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # -- WebSocket --------------------------------------------------------------------------------
    async def run(self, symbols: Sequence[str], on_message: Callable[[CaptureRecord], None],
                  on_event: Callable[[LinkEvent, str], None]) -> None:
        attempt = 0
        try:
            while True:
                got_data = False
                try:
                    got_data = await self._connect_once(symbols, on_message, on_event)
                except asyncio.CancelledError:
                    raise
                except UpstreamError as exc:
                    on_event(LinkEvent.THROTTLED if exc.throttled else LinkEvent.ERROR, str(exc))
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    on_event(LinkEvent.ERROR, f"{self.spec.name}: {type(exc).__name__}: {exc}")
                except Exception as exc:  # noqa: BLE001 - a link never dies of one bad connection
                    log.exception("provider %s: unexpected error", self.spec.name)
                    on_event(LinkEvent.ERROR, f"{self.spec.name}: {type(exc).__name__}: {exc}")
                attempt = 0 if got_data else attempt + 1
                delay_s = self.backoff.delay_s(attempt, self.rng.random())
                log.debug("provider %s: reconnect in %.3f s (attempt %d)", self.spec.name, delay_s, attempt)
                await asyncio.sleep(delay_s)
        finally:
            await self.close()

    async def _connect_once(self, symbols, on_message, on_event) -> bool:
        """One connection's life; True if it delivered any data (the backoff starts again)."""
        session = await self._http()
        path = urlsplit(self.spec.ws_url).path or vp.KALSHI_WS_PATH
        headers = self._auth_headers("GET", path)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                ws = await session.ws_connect(self.spec.ws_url, headers=headers, autoping=False, max_msg_size=0,
                                              timeout=aiohttp.ClientWSTimeout(ws_close=2.0))
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamError(f"{self.spec.name}: WebSocket handshake refused: HTTP {exc.status}",
                                status=exc.status, throttled=exc.status == 429) from None
        got_data = False
        venue = self.spec.venue
        keepalive = asyncio.create_task(self._keepalive(ws))
        try:
            for frame in vp.subscribe_frames(venue, symbols):
                await ws.send_str(orjson.dumps(frame).decode())
            self.connects += 1
            on_event(LinkEvent.CONNECTED, self.spec.ws_url)
            while True:
                try:
                    frame = await ws.receive(timeout=self.dead_after_s)
                except TimeoutError:
                    on_event(LinkEvent.DISCONNECTED, f"{self.spec.name}: no frame for {self.dead_after_s:.1f} s")
                    return got_data
                kind = frame.type
                if kind is aiohttp.WSMsgType.TEXT:
                    recv_ts_ns = self.clock_ns()
                    text = frame.data
                    if text == vp.POLYMARKET_PONG_TEXT:
                        on_event(LinkEvent.ALIVE, "PONG")
                        continue
                    try:
                        msg = orjson.loads(text)
                    except orjson.JSONDecodeError as exc:
                        on_event(LinkEvent.ERROR, f"{self.spec.name}: bad frame: not JSON ({exc}): {text[:80]!r}")
                        continue
                    if is_heartbeat(msg):
                        on_event(LinkEvent.ALIVE, "heartbeats")
                    else:
                        got_data = True
                    on_message(CaptureRecord(recv_ts_ns, venue, msg))
                elif kind is aiohttp.WSMsgType.PING:
                    await ws.pong(frame.data)
                    on_event(LinkEvent.ALIVE, "ping")
                elif kind is aiohttp.WSMsgType.PONG:
                    on_event(LinkEvent.ALIVE, "pong")
                elif kind is aiohttp.WSMsgType.BINARY:
                    on_event(LinkEvent.ERROR, f"{self.spec.name}: bad frame: binary ({len(frame.data)} bytes)")
                elif kind is aiohttp.WSMsgType.ERROR:
                    on_event(LinkEvent.DISCONNECTED, f"{self.spec.name}: WebSocket error: {ws.exception()!r}")
                    return got_data
                else:  # CLOSE / CLOSING / CLOSED
                    on_event(LinkEvent.DISCONNECTED, f"{self.spec.name}: closed by provider (code {ws.close_code})")
                    return got_data
        finally:
            keepalive.cancel()
            await asyncio.gather(keepalive, return_exceptions=True)
            await ws.close()

    async def _keepalive(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        next_text_s = 0.0
        elapsed_s = 0.0
        while not ws.closed:
            await asyncio.sleep(self.ping_interval_s)
            elapsed_s += self.ping_interval_s
            try:
                await ws.ping()
                if self.spec.venue == "polymarket" and elapsed_s >= next_text_s:
                    await ws.send_str(vp.POLYMARKET_PING_TEXT)
                    next_text_s = elapsed_s + vp.POLYMARKET_PING_INTERVAL_S
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                return

    # -- REST -------------------------------------------------------------------------------------
    async def fetch_snapshot(self, symbol: str) -> Any:
        rest_url = self.spec.rest_url or vp.DEFAULT_REST_URLS[self.spec.venue]
        url, path = vp.book_request(self.spec.venue, rest_url, symbol)
        session = await self._http()
        try:
            async with session.get(url, headers=self._auth_headers("GET", path),
                                   timeout=aiohttp.ClientTimeout(total=self.rest_timeout_s)) as resp:
                if resp.status == 429:
                    raise UpstreamError(f"{self.spec.name}: GET {url}: HTTP 429 (throttled)", status=429, throttled=True)
                if resp.status != 200:
                    raise UpstreamError(f"{self.spec.name}: GET {url}: HTTP {resp.status}", status=resp.status)
                raw = await resp.read()
        except TimeoutError:
            raise UpstreamError(f"{self.spec.name}: GET {url}: timeout after {self.rest_timeout_s:.1f} s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{self.spec.name}: GET {url}: {type(exc).__name__}: {exc}") from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"{self.spec.name}: GET {url}: bad JSON") from None
        try:
            return vp.snapshot_message(self.spec.venue, symbol, body)
        except vp.SnapshotFormatError as exc:
            raise UpstreamError(f"{self.spec.name}: GET {url}: {exc}") from None

