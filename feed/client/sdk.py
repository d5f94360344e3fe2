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

Regions: ``BookClient(regions=[["ws://a1/v1/ws", "ws://a2/v1/ws"], ["ws://b1/v1/ws"]], instruments=[...])``
(preferred region first). Besides disconnects and ``shutdown`` it moves to the next region when nothing (no
data, no heartbeat) arrived for ``stale_after_s``, when the gateway's ``/readyz`` fails (it lost its NATS;
polled every ``health_interval_s``), when ``/readyz`` goes unanswered for ``2 x health_interval_s`` while
nothing arrived for half of ``stale_after_s`` (a stuck gateway: its close handshake is then not awaited), or
when the gateway marks a subscribed instrument ``stale``
(``instrument_status``, section 11); it resumes with the seqs it holds and emits one ``RegionMoved`` per move
(reason, duration from detection to every book correct again, and the ``recovered`` map). It returns to the
preferred region only after ``failback_after_s`` away and ``failback_after_s`` of the preferred region being
ready without a break (``feed.client.regions``).

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
from feed.client.regions import MoveReason, RegionMoved, RegionPolicy
from feed.client.verify import (BookUpdated, ClientStats, Event, LocalBook, SendResync, Shutdown, StatusReceived,
                                Subscribed, UpdateKind, VerifiedBooks)
from feed.errors import WireError

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


ClientEvent = Event | Connected | Disconnected | ConnectFailed | RegionMoved

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
        regions: instead of ``urls``: a list of regions, each a URL or a list of URLs, preferred first.
        stale_after_s: move when nothing arrived for this long, in s (default 3 with ``regions``, else off).
        failback_after_s: hysteresis of the move back to the preferred region, in s.
        health_interval_s: with ``regions``, poll the gateway's ``/readyz`` this often, in s (0: off).
        move_on_status: ``instrument_status`` values that make the client move region.

    Raises:
        ValueError: no URL, no instrument, an unknown channel, or a bad backoff.
    """

    def __init__(
        self,
        urls: list[str] | str | None = None,
        instruments: Iterable[str] = (),
        *,
        regions: list[list[str] | str] | None = None,
        stale_after_s: float | None = None,
        failback_after_s: float = 10.0,
        health_interval_s: float = 0.25,
        move_on_status: Iterable[str] = ("stale",),
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
        if regions is not None:
            region_urls = [[r] if isinstance(r, str) else list(r) for r in regions]
        else:
            region_urls = [[urls] if isinstance(urls, str) else list(urls or [])]
        self.urls = [u for r in region_urls for u in r]
        self.instruments = list(instruments)
        if not self.urls or not self.instruments:
            raise ValueError(f"need a url and an instrument, got urls={self.urls} instruments={self.instruments}")
        self._policy = RegionPolicy(region_urls, failback_after_s)  # ValueError on an empty region
        self._multi_region = len(region_urls) > 1
        self._stale_after_s = stale_after_s if stale_after_s is not None else (3.0 if self._multi_region else None)
        self._health_interval_s = health_interval_s if self._multi_region else 0.0
        self._move_on_status = frozenset(move_on_status)
        self.moves: list[RegionMoved] = []
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
        self.region: int | None = None  # index into regions of the current connection
        self._last_frame_s = 0.0  # loop time of the last frame received (the health task's silence check)
        self._closing: set[asyncio.Task] = set()  # closes of connections left as stuck (not awaited)

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
        for task in list(self._closing):
            task.cancel()
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
        loop = asyncio.get_running_loop()
        while True:
            region, url = self._policy.target()
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
                self._policy.connect_failed(loop.time())
                if not self._multi_region or failures >= len(self._policy.regions):
                    await asyncio.sleep(self._backoff_delay_s(failures))
                continue
            if connected_before:
                self.stats.reconnects += 1
            self.region = region
            self._policy.connected(loop.time())
            try:
                shutdown_delay_s, reason = await self._serve(ws, url, reconnect=connected_before)
            except Exception as exc:  # a bug in this module: surface it to the user, never spin
                self._failure = exc
                self._emit(_CLOSED)
                self._notify()
                return
            failures, connected_before = 0, True
            self._policy.leave(reason, loop.time())
            if self._multi_region and reason is not MoveReason.SHUTDOWN:
                continue  # another region is there now: go at once
            if shutdown_delay_s is None:
                await asyncio.sleep(self._backoff_delay_s(1))
            else:
                await asyncio.sleep(shutdown_delay_s + random.random() * self._backoff_s[0])

    def _backoff_delay_s(self, failures: int) -> float:
        initial_s, max_s = self._backoff_s
        delay_s = min(max_s, initial_s * 2 ** min(failures - 1, 32))
        return delay_s * (0.5 + random.random() / 2)

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse, url: str, *,
                     reconnect: bool) -> tuple[float | None, MoveReason]:
        """Read one connection until it ends. Returns the time left to wait (s) before reconnecting when
        the gateway sent ``shutdown`` (else ``None``) and why the connection ended."""
        loop = asyncio.get_running_loop()
        leave_at: float | None = None  # loop time to leave, set by ``shutdown``
        error: str | None = None
        reason = MoveReason.DISCONNECT
        moving = self._policy.move is not None
        recovered: dict[str, bool] = {}  # the new gateway's answer to our resume
        awaiting: set[str] = set()  # instruments whose snapshot is still to come after a move
        health: asyncio.Task | None = None
        leave = asyncio.Event()  # set by the health task: ready check failed or time to fail back
        why: list[MoveReason] = []
        if self._health_interval_s > 0:
            health = loop.create_task(self._watch_health(url, leave, why))
        resume = {i: pos for i, pos in self._verified.resume_map().items() if i in self.instruments}
        try:
            await _send(ws, wire.Subscribe(next(self._ids), tuple(self.instruments), self._channels,
                                           self._conflate_ms, wire.resume_positions(resume)))
            self.connected_url = url
            self._last_frame_s = loop.time()
            write_stamp: tuple[int, int] | None = None  # (ts_write_ns, frames it still covers)
            self._emit(Connected(url, reconnect, resume))
            self._notify()
            receive: asyncio.Task | None = None
            while True:
                timeout_s = None if leave_at is None else max(0.0, leave_at - loop.time())
                if self._stale_after_s is not None:
                    timeout_s = self._stale_after_s if timeout_s is None else min(timeout_s, self._stale_after_s)
                if health is None:  # one region: the plain read (no tasks per frame)
                    try:
                        frame = await ws.receive(timeout=timeout_s)
                    except TimeoutError:
                        reason = MoveReason.SHUTDOWN if leave_at is not None else MoveReason.STALE
                        break  # shutdown delay over (move on while the gateway drains), or stale
                    receive = None
                    done = None
                else:
                    frame, done = None, None
                if health is not None and receive is None:
                    receive = loop.create_task(ws.receive())
                if receive is not None:
                    waiter = loop.create_task(leave.wait())
                    done, _ = await asyncio.wait({receive, waiter}, timeout=timeout_s,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    if leave.is_set():
                        reason = why[0]
                        receive.cancel()
                        break
                    if receive not in done:
                        if leave_at is not None and loop.time() >= leave_at:
                            reason = MoveReason.SHUTDOWN
                            receive.cancel()
                            break  # the shutdown delay is over: move on while the gateway drains
                        if leave_at is None:
                            reason = MoveReason.STALE  # no data and no heartbeat for stale_after_s
                            receive.cancel()
                            break
                        continue
                    frame, receive = receive.result(), None
                self._last_frame_s = loop.time()
                if frame.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    if frame.type is aiohttp.WSMsgType.ERROR:
                        error = repr(frame.data)
                    break  # CLOSE / CLOSING / CLOSED / ERROR
                recv_ns = self._clock_ns()
                data = frame.data
                if write_stamp is not None:  # ?write_stamps=1: this frame went out at the notice's time
                    data = wire.with_write_ts(data, write_stamp[0])
                    write_stamp = (write_stamp[0], write_stamp[1] - 1) if write_stamp[1] > 1 else None
                elif data.startswith(wire.WRITE_STAMP_PREFIX):
                    write_stamp = _parse_write_stamp(data)
                    continue
                items = self._verified.on_message(data, recv_ns)
                if self._multi_region and items and isinstance(items[0], StatusReceived) and self._status_moves(items[0]):
                    reason = MoveReason.INSTRUMENT_STATUS
                    self._emit(items[0])
                    break
                for item in items:
                    if isinstance(item, SendResync):
                        await _send(ws, wire.ResyncRequest(next(self._ids), item.instrument))
                        continue
                    if isinstance(item, Shutdown):
                        leave_at = loop.time() + item.reconnect_after_ms / 1000
                        reason = MoveReason.SHUTDOWN
                    if isinstance(item, Subscribed):
                        recovered.update({i: bool(item.recovered.get(i)) for i in self.instruments})
                        awaiting = {i for i in self.instruments if not recovered[i]}
                    elif isinstance(item, BookUpdated) and item.kind is UpdateKind.SNAPSHOT:
                        awaiting.discard(item.instrument)
                    self._emit(item)
                if moving and recovered and not awaiting:
                    moving = False
                    moved = self._policy.recovered(loop.time(), recovered)
                    if moved is not None:
                        self.moves.append(moved)
                        self.stats.failovers[moved.reason.value] += 1
                        self.stats.failover_seconds_total += moved.duration_s
                        self.stats.failover_seconds_max = max(self.stats.failover_seconds_max, moved.duration_s)
                        self._emit(moved)
                self._notify()
        except (aiohttp.ClientError, ConnectionError) as exc:
            error = repr(exc)
        finally:
            if health is not None:
                health.cancel()
            self.connected_url = None
            if reason in (MoveReason.STALE, MoveReason.NOT_READY) and not ws.closed:
                # a stuck gateway does not answer the close handshake: do not wait for it to move on
                task = loop.create_task(ws.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            else:
                await ws.close()
            self._verified.on_disconnect()
            if not self._closed:
                self._emit(Disconnected(url, ws.close_code, error))
            self._notify()
        return (None if leave_at is None else max(0.0, leave_at - loop.time())), reason

    def _status_moves(self, status: StatusReceived) -> bool:
        """An ``instrument_status`` for a subscribed instrument whose status is one of ``move_on_status``."""
        return status.instrument in self.instruments and status.status in self._move_on_status

    async def _watch_health(self, url: str, leave: asyncio.Event, why: list[MoveReason]) -> None:
        """Poll the current gateway's ``/readyz`` (twice not ready in a row: leave) and, while away from the
        preferred region, the preferred region's (for the fail-back hysteresis). A probe the gateway leaves
        unanswered for ``2 x health_interval_s`` while nothing arrived for half of ``stale_after_s`` is a
        stuck gateway (a stopped process, a starved host): leave as ``stale`` at once, before the full stale
        timer runs out. A gateway that sends data or heartbeats, or answers 503, is never taken for stuck."""
        assert self._session is not None
        loop = asyncio.get_running_loop()
        failed = 0
        stuck_after_s = max(0.2, self._health_interval_s * 2)
        while True:
            await asyncio.sleep(self._health_interval_s)
            probe = loop.create_task(self._ready(url, timeout_s=max(2.0, stuck_after_s)))
            started = loop.time()
            try:
                while not probe.done():
                    await asyncio.wait({probe}, timeout=0.05)
                    if (not probe.done() and self._stale_after_s is not None
                            and loop.time() - started >= stuck_after_s
                            and loop.time() - self._last_frame_s >= self._stale_after_s / 2):
                        why.append(MoveReason.STALE)
                        leave.set()
                        return
            finally:
                probe.cancel()
            ready = probe.result()
            failed = 0 if ready else failed + 1
            if failed >= 2:
                why.append(MoveReason.NOT_READY)
                leave.set()
                return
            if self._policy.away:
                preferred = self._policy.regions[0]
                ok = any([await self._ready(u) is True for u in preferred])
                self._policy.preferred_health(ok, loop.time())
                if self._policy.should_fail_back(loop.time()):
                    why.append(MoveReason.FAILBACK)
                    leave.set()
                    return

    async def _ready(self, ws_url: str, timeout_s: float | None = None) -> bool | None:
        """True: ``/readyz`` said 200; False: another status or the connection failed; None: no answer
        within ``timeout_s`` (default ``max(0.2, 2 x health_interval_s)``)."""
        http = ws_url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
        http = http.split("/v1/ws", 1)[0] + "/readyz"
        try:
            total_s = timeout_s if timeout_s is not None else max(0.2, self._health_interval_s * 2)
            async with self._session.get(http, timeout=aiohttp.ClientTimeout(total=total_s),
                                         headers=self._headers) as r:
                return r.status == 200
        except TimeoutError:
            return None
        except (aiohttp.ClientError, OSError):
            return False

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


def _parse_write_stamp(data: bytes) -> tuple[int, int] | None:
    """``(ts_write_ns, frames)`` of a gateway ``write_stamp`` notice (``feed.wire.WriteStamp``), None if
    malformed (the frames after it are then taken as unstamped)."""
    try:
        msg = wire.decode(data)
    except WireError:
        return None
    return (msg.ts_write_ns, msg.frames) if isinstance(msg, wire.WriteStamp) else None
