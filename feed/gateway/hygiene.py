"""Connection hygiene of the public listener: timeouts, caps, REST rate limits, RFC 6455 masking, quiet logs.

What an attacker on the public port can do without a single valid request, and the answer here:

* **Silent sockets** (connect, send nothing): closed after ``idle_timeout_s`` (reason ``idle_timeout``).
  A keep-alive connection that goes quiet after a response gets the same timer again.
* **Slowloris** (a request head dribbled a byte at a time): answered ``408`` and closed when the head is
  not complete ``handshake_timeout_s`` after its first byte (``handshake_timeout``). The head's size is
  bounded by aiohttp's ``max_line_size``/``max_field_size``/``max_headers`` (``handler_args``).
* **fd exhaustion**: connections per source address (``per_source_cap``; ``exempt_sources``, by default
  the loopback addresses of local tools, are exempt) and in total (``total_cap``,
  derived from ``RLIMIT_NOFILE`` minus ``fd_reserve`` for NATS, files and logs) are capped; a connection
  over a cap gets ``HTTP 503`` with the reason in the body and ``X-Bookcast-Reject`` and is closed at
  once. WebSocket upgrades stop ``rest_headroom`` connections short of the total (``websocket_cap``), so
  REST, ``/healthz`` and ``/readyz`` keep working while WebSockets are full.
* **REST floods**: a token bucket per source address (``rest_requests_per_s``, ``rest_burst``; health
  checks exempt) answers ``429`` with ``Retry-After``.
* **Unmasked client frames** (RFC 6455 section 5.1: a server MUST close): close ``1002``. aiohttp does
  not check the mask bit, so ``MaskCheck`` walks the frame headers of an upgraded connection's input.
* **Wrong WebSocket version**: ``426`` with ``Sec-WebSocket-Version: 13`` (RFC 6455 section 4.4).
* **Hostile Origin** (browser clients): ``403`` unless the Origin is in the allow-list (when one is set).
* **Log floods**: a malformed HTTP request or a client vanishing mid-handshake is one counted DEBUG line,
  never an ERROR traceback; refusals are counted per reason and logged once per ``reject_log_interval_s``.

Pure parts (``ConnectionTable``, ``RejectLog``, ``SourceRateLimiter``, ``MaskCheck``, ``origin_allowed``)
take time as an argument and are table-tested; ``install`` puts the aiohttp part around a runner:

    runner = web.AppRunner(app, **limits.handler_args())
    await runner.setup()
    guard = install(runner, limits, metrics_registry)
    app.middlewares  # the guard's middleware must be in the app before setup: see ``middleware``
"""
from __future__ import annotations

import asyncio
import enum
import logging
import resource
import struct
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("bookcast.gateway.hygiene")

WEBSOCKET_PATH = "/v1/ws"
HEALTH_PATHS = frozenset({"/healthz", "/readyz"})


class RejectReason(enum.StrEnum):
    """``reason`` label of ``bookcast_gateway_connections_rejected_total``."""

    PER_SOURCE_CAP = "per_source_cap"
    TOTAL_CAP = "total_cap"
    WEBSOCKET_CAP = "websocket_cap"
    TOKEN_CAP = "token_cap"  # connections per token (feed.auth.TokenLimits)
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    IDLE_EVICTED = "idle_evicted"  # a silent socket closed at the total cap to make room for a new client
    BAD_VERSION = "bad_version"
    BAD_ORIGIN = "bad_origin"
    REST_RATE_LIMITED = "rest_rate_limited"


class HandshakeFailure(enum.StrEnum):
    """``reason`` label of ``bookcast_gateway_handshake_failures_total``: quiet, counted DEBUG events."""

    BAD_HTTP = "bad_http"  # a request aiohttp could not parse (400)
    CLIENT_VANISHED = "client_vanished"  # the client went away before the upgrade completed
    UNMASKED_FRAME = "unmasked_frame"  # closed 1002


@dataclass(frozen=True, slots=True)
class HygieneLimits:
    """Limits of the public listener (0 disables a cap). Defaults suit one worker with ~20,000 fds.

    Behind a reverse proxy every client has the proxy's address: set ``max_connections_per_source`` and
    the REST rate to 0 there and let the proxy limit per client.
    """

    handshake_timeout_s: float = 5.0  # first byte of a request -> its head complete
    idle_timeout_s: float = 10.0  # connect (or end of a response) -> first byte of a request
    max_connections_per_source: int = 256
    max_connections: int = 0  # 0: RLIMIT_NOFILE - fd_reserve
    fd_reserve: int = 256  # fds never used for client connections (NATS, files, logs, accept)
    rest_headroom: int = 128  # connections kept for REST and health checks when WebSockets fill the rest
    # at the total cap only a connection silent this long is evicted for a newcomer (0: the oldest silent
    # one, whatever its age: a newcomer, e.g. a health check, then always gets in)
    evict_min_idle_s: float = 0.0
    rest_requests_per_s: float = 50.0  # per source; 0 = no REST rate limit
    rest_burst: int = 100
    max_tracked_sources: int = 65536  # the REST limiter forgets the least recently seen beyond this
    allowed_origins: tuple[str, ...] = ()  # empty: no Origin check; else exact "scheme://host[:port]" or "*"
    # Sources the per-source cap and the REST rate limit do not apply to (the total cap and the timers do):
    # local processes (benchmarks, a proxy on the same host, the operator's tools).
    exempt_sources: tuple[str, ...] = ("127.0.0.1", "::1")
    reject_log_interval_s: float = 10.0
    max_request_line_bytes: int = 10 * 1024  # room for ?token=<8 KiB JWT>
    max_header_bytes: int = 10 * 1024  # per header: room for Authorization: Bearer <8 KiB JWT>
    max_headers: int = 32

    def total_cap(self) -> int:
        if self.max_connections:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(16, soft - self.fd_reserve)

    def handler_args(self) -> dict[str, Any]:
        """aiohttp ``RequestHandler`` arguments bounding a request head's memory; aiohttp's own keep-alive
        close stays as a backstop behind the guard's (counted) timers."""
        return {"max_line_size": self.max_request_line_bytes, "max_field_size": self.max_header_bytes,
                "max_headers": self.max_headers,
                "keepalive_timeout": self.idle_timeout_s + self.handshake_timeout_s + 1.0}


# ---------------------------------------------------------------------------------------------------
# Pure parts


@dataclass
class ConnectionTable:
    """Open connections per source and in total, and how many are WebSockets.

    ``open`` admits or refuses a new connection; ``can_upgrade`` keeps ``rest_headroom`` free of
    WebSockets. Memory is one dict entry per source with an open connection.
    """

    per_source_cap: int
    total_cap: int
    rest_headroom: int = 0
    exempt: frozenset[str] = frozenset()
    per_source: dict[str, int] = field(default_factory=dict)
    total: int = 0
    websockets: int = 0

    def open(self, source: str) -> RejectReason | None:
        if self.total_cap and self.total >= self.total_cap:
            return RejectReason.TOTAL_CAP
        n = self.per_source.get(source, 0)
        if self.per_source_cap and n >= self.per_source_cap and source not in self.exempt:
            return RejectReason.PER_SOURCE_CAP
        self.per_source[source] = n + 1
        self.total += 1
        return None

    def close(self, source: str) -> None:
        n = self.per_source.get(source, 0) - 1
        if n > 0:
            self.per_source[source] = n
        else:
            self.per_source.pop(source, None)
        self.total = max(0, self.total - 1)

    @property
    def websocket_cap(self) -> int:
        return max(1, self.total_cap - self.rest_headroom) if self.total_cap else 0

    def can_upgrade(self) -> bool:
        return not self.websocket_cap or self.websockets < self.websocket_cap


@dataclass
class RejectLog:
    """Refusals summarised in one log line per ``interval_s``: ``note`` returns the line when it is due."""

    interval_s: float
    counts: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)
    last_s: float | None = None

    def note(self, reason: str, source: str, now_s: float) -> str | None:
        self.counts[reason] += 1
        self.sources[source] += 1
        if self.last_s is None:
            self.last_s = now_s
            return self._flush(now_s, first=True)
        if now_s - self.last_s >= self.interval_s:
            return self._flush(now_s)
        return None

    def _flush(self, now_s: float, first: bool = False) -> str:
        by_reason = ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items()))
        top = ", ".join(f"{s} ({n})" for s, n in self.sources.most_common(3))
        window = "" if first else f" in the last {now_s - (self.last_s or now_s):.0f} s"
        self.counts.clear()
        self.sources.clear()
        self.last_s = now_s
        return f"refused connections{window}: {by_reason}; top sources {top}"


@dataclass
class SourceRateLimiter:
    """A token bucket per source address (``rate_per_s`` sustained, ``burst`` at once), LRU-bounded."""

    rate_per_s: float
    burst: int
    max_sources: int = 65536
    buckets: OrderedDict = field(default_factory=OrderedDict)  # source -> (tokens, last_s)

    def allow(self, source: str, now_s: float) -> bool:
        if self.rate_per_s <= 0:
            return True
        tokens, last_s = self.buckets.pop(source, (float(self.burst), now_s))
        tokens = min(float(self.burst), tokens + (now_s - last_s) * self.rate_per_s)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self.buckets[source] = (tokens, now_s)
        while len(self.buckets) > self.max_sources:
            self.buckets.popitem(last=False)
        return allowed

    def retry_after_s(self, source: str) -> int:
        tokens, _ = self.buckets.get(source, (0.0, 0.0))
        return max(1, int((1.0 - tokens) / self.rate_per_s + 0.999)) if self.rate_per_s > 0 else 1


class MaskCheck:
    """Walks the frame headers of a client's WebSocket byte stream and reports the first unmasked frame.

    RFC 6455 section 5.1: "The server MUST close the connection upon receiving a frame that is not
    masked", with 1002 (section 7.4.1). Only headers are read; payload bytes are skipped by count.
    ``feed(data)`` returns False once an unmasked frame header is seen (and stays False).
    """

    __slots__ = ("_skip", "_head", "failed")

    def __init__(self) -> None:
        self._skip = 0  # payload (+ mask key) bytes of the current frame still to come
        self._head = b""  # a frame header split across chunks
        self.failed = False

    def feed(self, data: bytes) -> bool:
        if self.failed:
            return False
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n:
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                continue
            need = 2
            head = self._head + bytes(view[i:i + 14 - len(self._head)])
            if len(head) >= 2:
                length = head[1] & 0x7F
                need = 2 + (2 if length == 126 else 8 if length == 127 else 0)
            if len(head) < need:
                self._head = head
                return True
            used = need - len(self._head)
            self._head = b""
            i += used
            if not head[1] & 0x80:
                self.failed = True
                return False
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", head[2:4])[0]
            elif length == 127:
                length = struct.unpack("!Q", head[2:10])[0]
            self._skip = 4 + length
        return True


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a request's ``Origin`` passes the allow-list (RFC 6454 serialisation, compared exactly,
    host case-insensitively). No allow-list: everything passes. No Origin header (a non-browser client):
    passes. ``"*"`` in the list allows any origin."""
    if not allowed or origin is None or "*" in allowed:
        return True
    return _norm_origin(origin) in {_norm_origin(a) for a in allowed}


def _norm_origin(origin: str) -> str:
    scheme, sep, rest = origin.strip().partition("://")
    return f"{scheme.lower()}{sep}{rest.lower().rstrip('/')}"


# ---------------------------------------------------------------------------------------------------
# aiohttp adapter


_CLOSE_1002 = b"\x88\x02" + struct.pack("!H", 1002)


def _canned(status: int, phrase: str, reason: str, extra: str = "") -> bytes:
    body = f'{{"type":"error","code":"{reason}","message":"{phrase.lower()}: {reason}"}}'.encode()
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"X-Bookcast-Reject: {reason}\r\n{extra}Connection: close\r\n\r\n").encode() + body


class Guard:
    """The listener-wide state: the connection table, the REST limiter, counters and the reject log.

    ``metrics``: an object with ``rejected(reason)``, ``handshake_failure(reason)`` and
    ``close_code(code)`` callables (``GuardMetrics`` builds it from the catalog).
    """

    def __init__(self, limits: HygieneLimits, metrics: GuardMetrics | None = None) -> None:
        self.limits = limits
        self.table = ConnectionTable(limits.max_connections_per_source, limits.total_cap(), limits.rest_headroom,
                                     frozenset(limits.exempt_sources))
        self.rest = SourceRateLimiter(limits.rest_requests_per_s, limits.rest_burst, limits.max_tracked_sources)
        self.reject_log = RejectLog(limits.reject_log_interval_s)
        self.metrics = metrics or GuardMetrics(None)
        self.quiet = Counter()  # HandshakeFailure -> count (also in the metric)
        self.idle: OrderedDict = OrderedDict()  # connections that have not sent a request yet, oldest first

    def evict_idle(self) -> bool:
        """Close the oldest connection that has sent no request for ``evict_min_idle_s`` (a silent
        socket), to make room; False when there is none. At the total cap this keeps a flood of silent
        sockets from locking out new clients and health checks: the flood's own sockets are the ones that
        go, not a client accepted a moment ago whose request is still unread."""
        oldest_s = self.now_s() - self.limits.evict_min_idle_s
        while self.idle:
            handler, since_s = next(iter(self.idle.items()))
            if since_s > oldest_s:
                return False
            self.idle.popitem(last=False)
            if handler.transport is not None:
                handler._bc_evicted()
                return True
        return False

    def now_s(self) -> float:
        return asyncio.get_running_loop().time()

    def rejected(self, reason: RejectReason, source: str) -> None:
        self.metrics.rejected(reason)
        line = self.reject_log.note(reason, source, self.now_s())
        if line:
            log.warning("%s", line)

    def quiet_failure(self, reason: HandshakeFailure, source: str, detail: str = "") -> None:
        self.quiet[reason] += 1
        self.metrics.handshake_failure(reason)
        log.debug("%s from %s (%d so far)%s", reason.value, source, self.quiet[reason], f": {detail}" if detail else "")


class GuardMetrics:
    """The guard's counters, from the catalog (``None`` registry: the default one).

    ``bookcast_gateway_closes_total`` belongs to the gateway: ``bind_closes`` hands the guard the gateway's
    counter; unbound (a listener without a gateway), the guard builds its own on first use."""

    def __init__(self, registry) -> None:
        from feed import metrics as prom

        self._registry = registry
        self._rejected = prom.build("bookcast_gateway_connections_rejected_total", registry)
        self._quiet = prom.build("bookcast_gateway_handshake_failures_total", registry)
        self._closes = None

    def bind_closes(self, counter) -> None:
        self._closes = counter

    def rejected(self, reason: RejectReason) -> None:
        self._rejected.labels(reason.value).inc()

    def handshake_failure(self, reason: HandshakeFailure) -> None:
        self._quiet.labels(reason.value).inc()

    def close_code(self, code: int) -> None:
        if self._closes is None:
            from feed import metrics as prom

            self._closes = prom.build("bookcast_gateway_closes_total", self._registry)
        self._closes.labels(str(code)).inc()


class GuardedRequestHandler(RequestHandler):
    """aiohttp's request handler with the guard's caps, timers, mask check and quiet error logging."""

    _guard: Guard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._bc_source = _source_of(transport)
        self._bc_admitted = False
        self._bc_timer: asyncio.TimerHandle | None = None
        self._bc_phase = "idle"  # idle -> head (bytes of a request seen) -> busy (handler running) / ws
        self._bc_mask: MaskCheck | None = None
        super().connection_made(transport)
        guard = self._guard
        reason = guard.table.open(self._bc_source)
        if reason is RejectReason.TOTAL_CAP and guard.evict_idle():
            reason = guard.table.open(self._bc_source)
        if reason is not None:
            guard.rejected(reason, self._bc_source)
            transport.write(_canned(503, "Service Unavailable", reason))
            self.force_close()
            return
        self._bc_admitted = True
        self._arm("idle")

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.idle.pop(self, None)
        if self._bc_timer is not None:
            self._bc_timer.cancel()
            self._bc_timer = None
        if self._bc_admitted:
            self._bc_admitted = False
            self._guard.table.close(self._bc_source)
        self.websocket_finished()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._bc_phase == "idle" and data:
            self._arm("head")
        elif self._bc_mask is not None and not self._bc_mask.feed(data):
            self._bc_mask = None
            self._guard.quiet_failure(HandshakeFailure.UNMASKED_FRAME, self._bc_source)
            self._guard.metrics.close_code(1002)
            if self.transport is not None:
                self.transport.write(_CLOSE_1002)
            self.force_close()
            return
        parsed_before = self._request_count
        super().data_received(data)
        if self._bc_phase == "head" and self._request_count != parsed_before:
            # aiohttp's parser has the whole head: the client has done its part, whatever the event loop's
            # delay before the handler runs (on Python 3.11 a new task, after the queue is already empty)
            self.request_started()

    # -- timers -----------------------------------------------------------------------------------
    def _arm(self, phase: str) -> None:
        if self._bc_timer is not None:
            self._bc_timer.cancel()
            self._bc_timer = None
        self._bc_phase = phase
        if phase == "idle" and self._bc_admitted and self._bc_source not in self._guard.table.exempt:
            # exempt sources (local tools, by default loopback) are never evicted: under a flood accepted
            # in bursts, a local client's connection could be the oldest unread one
            self._guard.idle[self] = self._loop.time()  # (the guard's clock: Guard.now_s)
        else:
            self._guard.idle.pop(self, None)
        limits = self._guard.limits
        delay_s = limits.idle_timeout_s if phase == "idle" else limits.handshake_timeout_s if phase == "head" else 0
        if delay_s > 0:
            self._bc_timer = self._loop.call_later(delay_s, self._expired, phase)

    def _expired(self, phase: str) -> None:
        self._bc_timer = None
        self._guard.idle.pop(self, None)
        if self._bc_phase != phase or self.transport is None:
            return
        if self._messages:
            return  # a complete request waits for a busy event loop: not the client's fault
        if phase == "head":
            if getattr(self, "_upgraded", False) or getattr(self, "_request_in_progress", False):
                return  # the head is complete and waits for a busy event loop: not the client's fault
            self._guard.rejected(RejectReason.HANDSHAKE_TIMEOUT, self._bc_source)
            self.transport.write(_canned(408, "Request Timeout", RejectReason.HANDSHAKE_TIMEOUT))
        else:
            self._guard.rejected(RejectReason.IDLE_TIMEOUT, self._bc_source)
        self.force_close()

    def request_started(self) -> None:
        """Called by the middleware when a request's head is complete."""
        if self._bc_timer is not None:
            self._bc_timer.cancel()
            self._bc_timer = None
        self._bc_phase = "busy"
        self._guard.idle.pop(self, None)

    def _bc_evicted(self) -> None:
        self._guard.rejected(RejectReason.IDLE_EVICTED, self._bc_source)
        self._bc_phase = "evicted"
        if self._bc_admitted:  # its slot is free now, not when the close completes
            self._bc_admitted = False
            self._guard.table.close(self._bc_source)
        self.force_close()

    def request_finished(self) -> None:
        """A plain (non-WebSocket) request is answered: the connection is idle again (keep-alive)."""
        if self.transport is not None and self._bc_phase == "busy":
            self._arm("idle")

    def websocket_started(self) -> None:
        """An upgrade is about to be answered: count it, and check the mask of every frame from now on
        (including any that came in the same read as the request)."""
        self._bc_phase = "ws"
        self._bc_ws_counted = True
        self._guard.table.websockets += 1
        self._bc_mask = MaskCheck()
        tail = self._message_tail
        if tail and not self._bc_mask.feed(tail):
            self._bc_mask.failed = True

    def websocket_finished(self) -> None:
        """The WebSocket handler returned: the connection is closing, or the upgrade was refused (401, 429)
        and it is plain HTTP again (keep-alive): no more mask checks, the idle timer again."""
        if getattr(self, "_bc_ws_counted", False):
            self._bc_ws_counted = False
            self._guard.table.websockets -= 1
        if self._bc_phase == "ws":
            self._bc_mask = None
            self._bc_phase = "busy"
            self.request_finished()

    # -- quiet logs -------------------------------------------------------------------------------
    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status == 400 or isinstance(exc, (ConnectionError, asyncio.IncompleteReadError)):
            reason = HandshakeFailure.BAD_HTTP if status == 400 else HandshakeFailure.CLIENT_VANISHED
            self._guard.quiet_failure(reason, self._bc_source, type(exc).__name__ if exc else "")
            if request.writer.output_size > 0:
                raise ConnectionError("response already started")
            resp = web.Response(status=status, text=f"{status} {'Bad Request' if status == 400 else 'Error'}\n")
            resp.force_close()
            return resp
        return super().handle_error(request, status, exc, message)


def _source_of(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, (tuple, list)) and peer:
        return str(peer[0])
    return "?"


class _GuardedFactory:
    """Stands in for aiohttp's ``web.Server`` as the listener's protocol factory."""

    def __init__(self, server: web.Server, guard: Guard) -> None:
        self._bc_server = server
        self._bc_guard = guard
        cls = type("BoundGuardedRequestHandler", (GuardedRequestHandler,), {"_guard": guard})
        self._bc_cls = cls

    def __call__(self) -> RequestHandler:
        server = self._bc_server
        return self._bc_cls(server, loop=server._loop, **server._kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bc_server, name)


def install(runner: web.BaseRunner, guard: Guard) -> Guard:
    """Put ``guard`` around a set-up ``runner``'s connections (call after ``runner.setup()``, before the
    sites start). The app must also carry ``middleware(guard)`` (see ``Guard``)."""
    if runner.server is None:
        raise RuntimeError("install() needs runner.setup() first")
    runner._server = _GuardedFactory(runner.server, guard)  # type: ignore[attr-defined]
    return guard


def middleware(guard: Guard, *, websocket_path: str = WEBSOCKET_PATH,
               public_paths: Callable[[str], bool] | None = None):
    """The per-request half of the guard, as an aiohttp middleware.

    Marks the request head complete (stops the handshake timer), answers 404 for paths that are not
    public (``public_paths``, when given), 426 for a wrong WebSocket version, 403 for a refused Origin,
    503 when WebSockets would eat the REST headroom, 429 over the REST rate; marks upgraded connections
    (their mask check starts there)."""

    @web.middleware
    async def guard_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        protocol = request.protocol
        guarded = isinstance(protocol, GuardedRequestHandler)
        source = request.remote or "?"
        if guarded:
            protocol.request_started()
        path = request.path
        if path == websocket_path and request.headers.get("Upgrade", "").lower() == "websocket":
            version = request.headers.get("Sec-WebSocket-Version", "")
            if version.strip() != "13":
                guard.rejected(RejectReason.BAD_VERSION, source)
                raise web.HTTPUpgradeRequired(headers={"Sec-WebSocket-Version": "13", "Connection": "close"},
                                              text="this server speaks WebSocket version 13 (RFC 6455)\n")
            if not origin_allowed(request.headers.get("Origin"), guard.limits.allowed_origins):
                guard.rejected(RejectReason.BAD_ORIGIN, source)
                raise web.HTTPForbidden(text="origin not allowed\n", headers={"Connection": "close"})
            if not guard.table.can_upgrade():
                guard.rejected(RejectReason.WEBSOCKET_CAP, source)
                raise web.HTTPServiceUnavailable(text="websocket_cap: the gateway is full, try another\n",
                                                 headers={"X-Bookcast-Reject": RejectReason.WEBSOCKET_CAP,
                                                          "Retry-After": "1", "Connection": "close"})
            if guarded:
                protocol.websocket_started()
            try:
                return await handler(request)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                guard.quiet_failure(HandshakeFailure.CLIENT_VANISHED, source, type(exc).__name__)
                raise web.HTTPBadRequest() from None
            finally:
                if guarded:
                    protocol.websocket_finished()
        try:
            if public_paths is not None and not public_paths(path):
                raise web.HTTPNotFound(text="not found\n")
            if (path not in HEALTH_PATHS and source not in guard.table.exempt
                    and not guard.rest.allow(source, guard.now_s())):
                guard.rejected(RejectReason.REST_RATE_LIMITED, source)
                raise web.HTTPTooManyRequests(text="rest_rate_limited\n",
                                              headers={"Retry-After": str(guard.rest.retry_after_s(source))})
            return await handler(request)
        finally:
            if guarded:
                protocol.request_finished()

    return guard_middleware
