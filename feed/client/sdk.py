"""bookcast client SDK: verified local order books over WebSocket, with failover between gateways.

Usage::

    import asyncio
    from feed.client import BookClient, BookUpdated, GapDetected

    async def main() -> None:
        urls = ["ws://eu.example:8080/v1/ws", "ws://us.example:8080/v1/ws"]
        async with BookClient(urls, ["coinbase:BAND-GBP"]) as client:
            async for event in client:
                if isinstance(event, BookUpdated):
                    print(event.instrument, event.seq, event.book.best_bid(), event.latency_ns)
                elif isinstance(event, GapDetected):
                    print("resyncing:", event.detail)

    asyncio.run(main())

What it does (PROTOCOL.md sections 3, 4 and 7): connects to ``urls[0]``, subscribes, and feeds every message
to ``feed.client.verify.VerifiedBooks``, which checks seq, epoch and checksum; on a gap or mismatch it
drops that one book and the client sends ``resync``. When the connection closes, fails to open, or the
gateway sends ``shutdown``, it moves to the next URL (round-robin) after an exponential backoff with jitter
(or the ``reconnect_after_ms`` of ``shutdown``) and subscribes again with ``resume`` set to the
``(epoch, seq)`` of every book it holds; missed deltas and a fresh snapshot both work. Heartbeats are only
checked, never answered; WebSocket pings are answered by aiohttp.

Backpressure: the reader never waits for the user. Events go to a bounded queue; when it is full the
oldest event is dropped (``stats.events_dropped``). Books keep updating whether or not anyone iterates,
so ``client.books`` is always current; ``BookUpdated.book`` is that same live book.
"""
from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from feed import wire
from feed.book import L2Book
from feed.client.verify import ClientStats, Event, LocalBook, SendResync, Shutdown, VerifiedBooks

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Connected:
    """A connection opened and ``subscribe`` was sent with this ``resume`` map (empty: none)."""

    url: str
    reconnect: bool
    resume: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Disconnected:
    """A connection ended. ``close_code``: the WebSocket close code (section 5), ``None`` if none."""

    url: str
    close_code: int | None
    error: str | None


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    url: str
    error: str


ClientEvent = Event | Connected | Disconnected | ConnectFailed

_CLOSED = object()  # queue sentinel: the client was closed
_WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=1.0)  # a draining gateway may not answer close


class BookClient:
    """Subscribes to ``instruments`` on one of ``urls`` and keeps verified local books.

    Args:
        urls: gateway WebSocket URLs (``ws://host:port/v1/ws``), tried round-robin; a single string is one.
        instruments: instrument ids to subscribe to.
        channels: ``"book"`` and optionally ``"trades"`` (section 3).
        conflate_ms: server-side conflation window, 0..5000 ms (section 3).
        reconnect_backoff_s: (initial, max) delay between attempts in s; doubles per failed attempt, and
            each delay is drawn uniformly from [d/2, d].
        connect_timeout_s: limit on opening one connection, in s.
        token: JWT sent as ``Authorization: Bearer`` (section 8).
        clock_ns: wall clock in ns since the Unix epoch, read once per received message (``recv_ns``).
        event_queue_size: bound of the event queue (oldest dropped when full).
        ws_heartbeat_s: interval of our WebSocket pings, in s; a missing pong closes the connection.
        max_msg_size_bytes: largest message accepted (snapshots of deep books are large).

    Raises:
        ValueError: no URL, no instrument, an unknown channel, or a bad backoff.
    """

    def __init__(
        self,
        urls: list[str] | str,
        instruments: Iterable[str],
        *,
        channels: Iterable[str] = ("book",),
        conflate_ms: int = 0,
        reconnect_backoff_s: tuple[float, float] = (0.1, 5.0),
        connect_timeout_s: float = 5.0,
        token: str | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        event_queue_size: int = 10_000,
        ws_heartbeat_s: float = 10.0,
        max_msg_size_bytes: int = 64 * 2**20,
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self.instruments = list(instruments)
        if not self.urls or not self.instruments:
            raise ValueError(f"need a url and an instrument, got urls={self.urls} instruments={self.instruments}")
        initial_s, max_s = reconnect_backoff_s
        if not 0 < initial_s <= max_s:
            raise ValueError(f"reconnect_backoff_s must be 0 < initial <= max, got {initial_s, max_s}")
        self._backoff_s = (initial_s, max_s)
        self._channels = frozenset(wire.Channel(c) for c in channels)  # ValueError on an unknown channel
        self._conflate_ms = conflate_ms
        self._connect_timeout_s = connect_timeout_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else None
        self._clock_ns = clock_ns
        self._ws_heartbeat_s = ws_heartbeat_s
        self._max_msg_size_bytes = max_msg_size_bytes
        self._verified = VerifiedBooks()
        self._events: asyncio.Queue[Any] = asyncio.Queue(event_queue_size)
        self._changed = asyncio.Event()
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failure: BaseException | None = None
        self.connected_url: str | None = None

    # -- state -----------------------------------------------------------------------------------
    @property
    def books(self) -> dict[str, L2Book]:
        """Every verified book held now, by instrument. Books being resynced are absent."""
        return {instrument: local.book for instrument, local in self._verified.books.items()}

    def book(self, instrument: str) -> L2Book | None:
        return self._verified.book(instrument)

    def local_book(self, instrument: str) -> LocalBook | None:
        """The book with its epoch, seq and last latencies, or ``None`` while there is none."""
        return self._verified.books.get(instrument)

    def resume_map(self) -> dict[str, dict[str, Any]]:
        return self._verified.resume_map()

    @property
    def stats(self) -> ClientStats:
        return self._verified.stats

    @property
    def connected(self) -> bool:
        return self.connected_url is not None

    @property
    def closed(self) -> bool:
        return self._closed

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> BookClient:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def start(self) -> None:
        """Start connecting in the background (``async with`` does it). Raises RuntimeError if started."""
        if self._task is not None:
            raise RuntimeError("BookClient already started")
        self._session = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._run(), name="bookcast-client")

    async def close(self) -> None:
        """Close the connection and end iteration. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        if self._session is not None:
            await self._session.close()
        self._emit(_CLOSED)
        self._notify()

    # -- consuming -------------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[ClientEvent]:
        return self.events()

    async def events(self) -> AsyncIterator[ClientEvent]:
        """Yield events until the client is closed."""
        while (event := await self.next_event()) is not None:
            yield event

    async def next_event(self, timeout_s: float | None = None) -> ClientEvent | None:
        """The next event, or ``None`` after ``timeout_s`` s without one or once the client is closed.

        Raises:
            RuntimeError: the client was never started.
            Exception: whatever stopped the connection task, if it failed (a bug).
        """
        if self._task is None:
            raise RuntimeError("BookClient not started: use 'async with BookClient(...)'")
        try:
            async with asyncio.timeout(timeout_s):
                event = await self._events.get()
        except TimeoutError:
            return None
        if event is _CLOSED:
            self._events.put_nowait(_CLOSED)  # every consumer sees the end
            if self._failure is not None:
                raise self._failure
            return None
        return event

    async def wait_for(self, predicate: Callable[[], T], timeout_s: float) -> T:
        """Wait until ``predicate()`` (no arguments, re-checked after every message and connection
        change) is truthy, and return its value.

        Raises:
            TimeoutError: not true within ``timeout_s`` s.
            RuntimeError: the client closed first.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while not (result := predicate()):
                    if self._failure is not None:
                        raise self._failure
                    if self._closed:
                        raise RuntimeError("BookClient closed while waiting")
                    await self._changed.wait()
                return result
        except TimeoutError:
            raise TimeoutError(f"condition not met within {timeout_s} s") from None

    # -- connection ------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._session is not None
        failures = 0
        connected_before = False
        for attempt in itertools.count():
            url = self.urls[attempt % len(self.urls)]
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    ws = await self._session.ws_connect(
                        url,
                        heartbeat=self._ws_heartbeat_s,
                        max_msg_size=self._max_msg_size_bytes,
                        headers=self._headers,
                        decode_text=False,
                        timeout=_WS_TIMEOUT,
                    )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                failures += 1
                self.stats.connect_failures += 1
                self._emit(ConnectFailed(url, repr(exc)))
                self._notify()
                await asyncio.sleep(self._backoff_delay_s(failures))
                continue
            if connected_before:
                self.stats.reconnects += 1
            try:
                shutdown_delay_s = await self._serve(ws, url, reconnect=connected_before)
            except Exception as exc:  # a bug in this module: surface it to the user, never spin
                self._failure = exc
                self._emit(_CLOSED)
                self._notify()
                return
            failures, connected_before = 0, True
            if shutdown_delay_s is None:
                await asyncio.sleep(self._backoff_delay_s(1))
            else:
                await asyncio.sleep(shutdown_delay_s + random.random() * self._backoff_s[0])

    def _backoff_delay_s(self, failures: int) -> float:
        initial_s, max_s = self._backoff_s
        delay_s = min(max_s, initial_s * 2 ** min(failures - 1, 32))
        return delay_s * (0.5 + random.random() / 2)

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse, url: str, *, reconnect: bool) -> float | None:
        """Read one connection until it ends. Returns the time left to wait (s) before reconnecting when
        the gateway sent ``shutdown``, else ``None``."""
        loop = asyncio.get_running_loop()
        leave_at: float | None = None  # loop time to leave, set by ``shutdown``
        error: str | None = None
        resume = {i: pos for i, pos in self._verified.resume_map().items() if i in self.instruments}
        try:
            await _send(ws, wire.Subscribe(next(self._ids), tuple(self.instruments), self._channels,
                                           self._conflate_ms, wire.resume_positions(resume)))
            self.connected_url = url
            self._emit(Connected(url, reconnect, resume))
            self._notify()
            while True:
                timeout_s = None if leave_at is None else max(0.0, leave_at - loop.time())
                try:
                    frame = await ws.receive(timeout=timeout_s)
                except TimeoutError:
                    break  # the shutdown delay is over: move on while the gateway drains
                if frame.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    if frame.type is aiohttp.WSMsgType.ERROR:
                        error = repr(frame.data)
                    break  # CLOSE / CLOSING / CLOSED / ERROR
                recv_ns = self._clock_ns()
                for item in self._verified.on_message(frame.data, recv_ns):
                    if isinstance(item, SendResync):
                        await _send(ws, wire.ResyncRequest(next(self._ids), item.instrument))
                        continue
                    if isinstance(item, Shutdown):
                        leave_at = loop.time() + item.reconnect_after_ms / 1000
                    self._emit(item)
                self._notify()
        except (aiohttp.ClientError, ConnectionError) as exc:
            error = repr(exc)
        finally:
            self.connected_url = None
            await ws.close()
            self._verified.on_disconnect()
            if not self._closed:
                self._emit(Disconnected(url, ws.close_code, error))
            self._notify()
        return None if leave_at is None else max(0.0, leave_at - loop.time())

    def _emit(self, event: object) -> None:  # never blocks: drops the oldest event when full
        if self._events.full():
            self._events.get_nowait()
            self.stats.events_dropped += 1
        self._events.put_nowait(event)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


async def _send(ws: aiohttp.ClientWebSocketResponse, request: wire.Request) -> None:
    await ws.send_str(wire.encode_request(request).decode())  # section 2: text frames
