"""The aiohttp + NATS adapter of the gateway: PROTOCOL.md v1 over WebSocket and REST, fed from NATS.

The logic lives in two pure state machines; this module only moves bytes and runs timers around them:

* ``feed.gateway.instrument.InstrumentMachine``, one per instrument this worker serves (one NATS
  subscription however many clients): NATS messages and snapshot replies in, actions out;
* ``feed.gateway.session.Session``, one per WebSocket client: text frames in, queued frames out.

``Gateway`` owns the links between them (``links``: instrument -> {session: conflate_ms}; ``trade_links``),
so neither machine knows the other and nothing imports in a circle. Each client has a reader (the
WebSocket handler) and a writer task draining its session's bounded queue; the fan-out never awaits a
client, it only appends to queues. Frames are made once per delta (``feed.gateway.framing``, wsproto) and
whatever a writer finds queued goes out as one ``transport.write``; flow control waits, through the
request's public stream writer ``drain()``, while the transport holds more than ``ws_writer_limit_bytes``.

An instrument nobody subscribes to any more keeps its machine for ``instrument_linger_s`` (a client that
reconnects finds it warm), then its NATS subscriptions are dropped and it is released.

Hooks for other parts (all optional): ``authenticator(request) -> authorization`` (may be async; raises an
``aiohttp.web.HTTPException`` such as 401 to refuse) runs before the upgrade and on REST routes, and its
result goes to the session (``allows(instrument)``, ``expires_at_ns``); routes are registered in one
function, ``add_routes``.

Instrumentation (names in ``feed.catalog``): per delta, ``bookcast_hop_nats_gateway_seconds`` observes
``ts_send_ns - ts_publish_ns``; frames, bytes and requests are tallied per session and folded into their
counters every ``queue_sample_interval_s`` (and after each request), when queue depth is sampled.
``instrumented=False`` turns the per-message part off, only to measure its cost. With OTLP on, a delta
whose NATS headers carry a ``traceparent`` gets a ``nats_gateway`` span.

Test hook, off by default: ``fanout_delay_s`` holds every delta from NATS for a fixed time before the
machine handles it, in arrival order ("a slow gateway").
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry

from feed import metrics as prom
from feed import natsauth, wire
from feed.gateway import instrument as im
from feed.gateway import viewer
from feed.gateway.config import GatewayConfig  # noqa: F401 - re-exported: declared once, in feed.gateway.config
from feed.gateway.config import HEARTBEAT_SLOTS, TIMER_SLICE  # noqa: F401 - re-exported (tests, docstrings)
from feed.gateway.fanout import Item, Kind
from feed.gateway.framing import text_frame
from feed.gateway.instrument import InstrumentMachine
from feed.gateway.liveness import PING_FRAME, Liveness, PeerLiveness
from feed.gateway.protocol import CloseCode, ErrorCode, ResyncReason, shown
from feed.gateway.session import (Authorization, Close, Link, Session, SessionState, Unlink, count_heartbeats,
                                  count_written)
from feed.gateway.timers import TimerWheel, slice_gap_ns
from feed.model import split_instrument
from feed.otlp import TRACEPARENT, Otlp
from feed.subjects import ANNOUNCE_REQUEST, DIRECTORY_WILDCARD, delta_subject, snapshot_subject, trade_subject
from feed.wire import Status

log = logging.getLogger("bookcast.gateway")

Authenticator = Callable[[web.Request], "Authorization | None | Awaitable[Authorization | None]"]
"""``(request) -> authorization`` (or an awaitable of it); raise ``web.HTTPException`` (e.g.
``web.HTTPUnauthorized``) to refuse the request. ``None`` as the authenticator: auth off."""


class GatewayMetrics:
    """Label children resolved once; nothing on the hot path looks a label up. With ``instrumented=False``
    the per-message metrics (hop histogram, frames and bytes sent, NATS messages in) do nothing."""

    def __init__(self, registry: CollectorRegistry | None, instrumented: bool = True, region: str | None = None,
                 worker: str = "gateway") -> None:
        b = lambda name: prom.build(name, registry)  # noqa: E731
        per_msg = b if instrumented else (lambda name: prom.NULL)  # noqa: E731
        self.clients = b("bookcast_gateway_clients")
        self.region_clients = b("bookcast_gateway_region_clients").labels(region) if region else prom.NULL
        self.instruments = b("bookcast_gateway_instruments")
        self.queue_bytes = b("bookcast_gateway_queue_bytes")
        self.queue_items = b("bookcast_gateway_queue_items")
        self.worker_cpu = b("bookcast_gateway_worker_cpu_seconds_total").labels(worker)
        nats_in = per_msg("bookcast_gateway_nats_messages_total")
        self.nats_in = {k: nats_in.labels(k) for k in ("delta", "trade", "instrument_status", "unknown")}
        self.nats_deltas, self.nats_trades = self.nats_in["delta"], self.nats_in["trade"]
        sent = per_msg("bookcast_gateway_messages_sent_total")
        self.sent = {k: sent.labels(k) for k in ("delta", "snapshot", "trade", "control")}
        self.bytes_sent = per_msg("bookcast_gateway_bytes_sent_total")
        self.socket_writes = per_msg("bookcast_gateway_socket_writes_total")
        self.instrumented = instrumented
        requests = b("bookcast_gateway_requests_total")
        self.requests = {op: requests.labels(op) for op in ("subscribe", "unsubscribe", "resync", "ping", "invalid")}
        errors = b("bookcast_gateway_errors_total")
        self.errors = {c.value: errors.labels(c.value) for c in ErrorCode}
        resyncs = b("bookcast_gateway_resyncs_total")
        self.resyncs = {r.value: resyncs.labels(r.value) for r in ResyncReason}
        self.slow_closes = b("bookcast_gateway_slow_consumer_closes_total")
        self.ping_timeouts = b("bookcast_gateway_ping_timeouts_total")
        closes = b("bookcast_gateway_closes_total")
        self.closes = {int(c): closes.labels(str(int(c))) for c in CloseCode}
        self.conflated = b("bookcast_gateway_conflated_total")
        self.gaps = b("bookcast_gateway_gaps_total")
        self.checksum_mismatches = b("bookcast_gateway_checksum_mismatches_total")
        self.conflicting_deltas = b("bookcast_gateway_conflicting_deltas_total")
        self.snapshot_failures = b("bookcast_gateway_snapshot_fetch_failures_total")
        self.bad_upstream = b("bookcast_gateway_bad_upstream_total")
        self._hop_nats_gateway = per_msg("bookcast_hop_nats_gateway_seconds")

    def hop_nats_gateway(self, venue: str) -> Any:
        """The venue's child of the NATS + gateway hop histogram (resolved once per instrument)."""
        return self._hop_nats_gateway.labels(venue)

    def fold(self, tally: dict) -> None:
        """Add a session's tally (``feed.gateway.session.Session.tally``) to the counters and clear it."""
        if not tally:
            return
        for key, n in tally.items():
            if not n:
                continue
            if type(key) is tuple:
                group, label = key
                if group == "sent":
                    self.sent[label].inc(n)
                elif group == "request":
                    self.requests[label].inc(n)
                elif group == "error":
                    self.errors[label].inc(n)
                elif group == "resync":
                    self.resyncs[label].inc(n)
                elif group == "close":
                    child = self.closes.get(label)
                    if child is not None:
                        child.inc(n)
            elif key == "bytes_sent":
                self.bytes_sent.inc(n)
            elif key == "socket_writes":
                self.socket_writes.inc(n)
            elif key == "conflated":
                self.conflated.inc(n)
            elif key == "slow_closes":
                self.slow_closes.inc(n)
            elif key == "writer_gaps":
                log.error("deltas not applicable for a client were replaced by a resync: %d", n)
        tally.clear()


INGEST_SILENT = "ingest_silent"  # instrument_status reason: the gateway stopped hearing the venue's ingest
REGION_CUT_OFF = "region_cut_off"  # instrument_status reason: the publishing lease's bucket does not answer here
SNAPSHOT_RESEND_S = 0.25  # --region: a snapshot request unanswered this long is sent again (same inbox)
WRITE_STAMP_TYPE = "write_stamp"
INSTRUMENT_METADATA = ("min_order_size", "market", "question", "outcome")


def write_stamp_frame(ts_write_ns: int, frames: int) -> bytes:
    """The additive ``write_stamp`` notice (docs/protocol-notes.md): the ``frames`` frames after it went to
    the socket in one write at ``ts_write_ns``."""
    return text_frame(b'{"type":"write_stamp","ts_write_ns":%d,"frames":%d}' % (ts_write_ns, frames))


def snapshot_at_depth(encoded: bytes, depth: int) -> bytes:
    """A snapshot message cut to the best ``depth`` levels per side, with ``"depth": depth`` (its checksum
    stays the whole book's, PROTOCOL.md section 6: verifiable when ``depth`` >= 10 or the book is shallower)."""
    msg = wire.loads(encoded)
    msg["bids"], msg["asks"], msg["depth"] = msg["bids"][:depth], msg["asks"][:depth], depth
    return wire.dumps(msg)


class Connection:
    """The socket side of one client: its ``Session``, the WebSocket, the writer task."""

    def __init__(self, gw: Gateway, ws: web.WebSocketResponse, session: Session,
                 transport: asyncio.Transport | None, http_writer: Any) -> None:
        loop = asyncio.get_running_loop()
        self.gw = gw
        self.ws = ws
        self.http_writer = http_writer  # aiohttp's AbstractStreamWriter of the request: its public drain()
        self.session = session
        self.transport = transport
        self._waiter: asyncio.Future[None] | None = None
        # created at the first wakeup (a reply, a snapshot, a close, backpressure): a connection that never
        # asks for anything (heartbeats are written by the ticker) holds no task (``loadtest.bench.idlemem``)
        self.writer: asyncio.Task | None = None
        self.handler: asyncio.Task | None = None  # the ws_handler task, which reads the client's requests
        self.reading = False  # the handler waits in receive(): a close request cancels that wait
        self._cancelled_read = False
        self._gone = False  # the handler finished: no writer is started any more
        self.close_request: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        self.dropped: asyncio.Future[None] = loop.create_future()  # handler finished
        self.write_stamps = False  # ?write_stamps=1: a write_stamp notice before every socket write
        # nothing queued and nobody writing (the writer waits for work, or there is none yet; not in drain):
        # write-through and inline heartbeats allowed
        self.idle = True
        self.corked: list[bytes] = []  # write-through frames of this loop pass, written by Gateway._flush_corked
        self.corked_bytes = 0
        self.must_drain = False  # the last write-through left the socket over the limit: the writer drains it
        self._inline = False  # tick() is running the session's timers and writes what they queue itself
        # our WebSocket pings (PROTOCOL.md section 4), run by the timer pass instead of aiohttp's heartbeat=
        self.liveness = PeerLiveness(gw.config.ws_ping_interval_s, time.time_ns())
        session.wakeup = self._wake
        session.sink = self

    def _wake(self) -> None:
        if self._inline:
            return  # tick() writes what its timers queued itself
        waiter = self._waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
        elif self.writer is None and not self._gone:
            self.writer = asyncio.get_running_loop().create_task(self.run_writer())

    async def run_writer(self) -> None:
        """Drain the session into the socket: whatever is queued when the writer wakes goes out as one
        socket write. An idle writer waits on a bare future that ``Session.wakeup`` resolves (no task or
        timer per wait)."""
        session = self.session
        loop = asyncio.get_running_loop()
        limit_bytes = self.gw.config.ws_writer_limit_bytes
        self.idle = False
        try:
            while True:
                if not session.queue.items:
                    if self.must_drain:  # write-through filled the socket: wait for it like _write does
                        self.must_drain = False
                        await self.http_writer.drain()
                        continue
                    self._waiter = loop.create_future()
                    self.idle = True
                    try:
                        await self._waiter
                    finally:
                        self.idle = False
                    self._waiter = None
                    continue
                frames, close = session.pull(time.time_ns(), limit_bytes)
                if frames:
                    await self._write(frames, limit_bytes)
                    session.sent(time.time_ns())
                if close is not None:
                    self._request_close(close)
                    return
        except (ConnectionResetError, RuntimeError, asyncio.CancelledError):
            return
        except Exception:  # noqa: BLE001 - a writer must never take the gateway down
            log.exception("writer failed peer=%s", session.peer)
            self._request_close(Close(1011, b"internal error"))

    async def _write(self, frames: list[bytes], limit_bytes: int) -> None:
        """One socket write of whole frames (aiohttp writes its own control frames to the same transport,
        always whole, so nothing interleaves). Then, like aiohttp's own WebSocket writer, while the
        transport holds more than the limit wait for it to drain, through the request's public stream
        writer (``drain`` returns once the transport resumes writing, below its low-water mark: so pings,
        written behind our data, stay timely)."""
        transport = self.transport
        if not self._socket_open(transport):
            raise ConnectionResetError("connection closing")
        if self._send(transport, frames, limit_bytes):
            await self.http_writer.drain()

    def send_ping(self) -> None:
        """Write a WebSocket ping (``feed.gateway.liveness``) now, between whole frames (every write path
        writes whole frames): a control frame may come between data frames (RFC 6455 section 5.4)."""
        transport = self.transport
        if self._socket_open(transport):
            transport.write(PING_FRAME)

    def drop_unanswered(self) -> None:
        """The peer answered no ping in time (``feed.gateway.liveness``): drop the TCP connection at once,
        with what is still buffered for it (nothing reads it; a close handshake would wait on a dead peer).
        The handler's ``receive()`` then ends and ``Gateway._drop`` cleans up; counted in
        ``bookcast_gateway_ping_timeouts_total``."""
        self.gw.metrics.ping_timeouts.inc()
        log.debug("no answer to a WebSocket ping from %s within %.1f s: connection dropped", self.session.peer,
                  self.liveness.timeout_ns / 1e9)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.abort()

    def _socket_open(self, transport: asyncio.Transport | None) -> bool:
        """The socket takes our writes: there is a transport, it is not closing, and the WebSocket is not
        closed (every write path checks this first)."""
        return transport is not None and not transport.is_closing() and not self.ws.closed

    def _send(self, transport: asyncio.Transport, frames: list[bytes], limit_bytes: int) -> bool:
        """The one socket write of every path (writer, ticker, write-through flush): ``frames`` (whole
        frames, at least one) as one write, after a ``write_stamp`` notice when the client asked for them
        (the gateway's queueing ends here: the client gets the socket-write time of the frames). Returns
        True when the transport now holds more than ``limit_bytes`` (the caller waits for it to drain)."""
        if self.write_stamps:
            frames.insert(0, write_stamp_frame(time.time_ns(), len(frames)))
        if len(frames) == 1:
            transport.write(frames[0])
        else:
            transport.writelines(frames)  # one vectored write on uvloop
        return transport.get_write_buffer_size() > limit_bytes

    def _wait_for_drain(self) -> None:
        """A write left the socket over the limit: no more write-through or inline writes; the writer waits
        for the socket to drain (PROTOCOL.md section 7 applies to what is queued meanwhile)."""
        self.idle = False
        self.must_drain = True

    def tick(self, now_ns: int, limit_bytes: int) -> None:
        """The session's timers; what they queue on a connection whose writer is idle (a heartbeat, a
        close) is pulled and written here, in the ticker's pass, instead of waking the writer task: with
        10,000 idle connections that is 10,000 task switches a second less."""
        session = self.session
        transport = self.transport
        if not self.idle or self.corked or not self._socket_open(transport):
            session.tick(now_ns)
            return
        self._inline = True
        try:
            heartbeat = session.tick_through(now_ns)  # a due heartbeat, not queued: written here
        finally:
            self._inline = False
        if heartbeat is not None:
            if self._send(transport, [heartbeat], limit_bytes):
                self._wait_for_drain()
                self._wake()
            return
        if not session.queue.items:
            return
        frames, close = session.pull(now_ns, limit_bytes)
        if frames:
            over = self._send(transport, frames, limit_bytes)
            session.sent(now_ns)
            if over:
                self._wait_for_drain()
        if close is not None:
            self.idle = False
            self._request_close(close)
        if self.must_drain or session.queue.items:
            self._wake()

    def flush_corked(self, limit_bytes: int) -> int:
        """Write this pass's write-through frames as one socket write (``writelines``: one vectored
        write on uvloop); if that leaves the socket over ``limit_bytes``, stop write-through and have the
        writer wait for the socket to drain, queueing in the meantime (PROTOCOL.md section 7). Returns the
        frames written (0: the socket is closing), for the caller to tally (``session.count_written``)."""
        frames = self.corked
        count = len(frames)
        transport = self.transport
        if not self._socket_open(transport):
            count = 0
        elif count and self._send(transport, frames, limit_bytes):
            self._wait_for_drain()
            self._wake()
        frames.clear()
        self.corked_bytes = 0
        return count

    def _request_close(self, close: Close) -> None:
        """Ask the connection's handler task to close the WebSocket (see ``Gateway.ws_handler``): a handler
        waiting in ``receive()`` has that wait cancelled; a busy one sees the request after its message."""
        if not self.close_request.done():
            self.close_request.set_result((close.code, close.reason))
            if self.reading and self.handler is not None and not self._cancelled_read:
                self._cancelled_read = True
                self.handler.cancel()

    def read_cancelled_by_close(self) -> bool:
        """In the handler, on ``CancelledError``: True (and the cancel withdrawn) when it was only
        ``_request_close`` stopping the read; False when someone else cancels the handler too."""
        task = self.handler
        if not self._cancelled_read or task is None or task.cancelling() != 1:
            return False
        task.uncancel()
        return True


class Gateway:
    """One gateway worker: NATS connection, instrument machines, sessions and the links between them.

    Implements ``feed.gateway.session.Books`` (``known``, ``get``) for its sessions.
    """

    def __init__(self, config: GatewayConfig, registry: CollectorRegistry | None = None, *,
                 authenticator: Authenticator | None = None) -> None:
        self.config = config
        self.limits = config.limits
        self.snapshot_timeout_s = config.snapshot_timeout_s
        self.registry = registry
        self.metrics = GatewayMetrics(registry, config.instrumented, config.region, config.name)
        self.authenticator = authenticator
        self.otlp: Otlp | None = None
        self._tasks: list[asyncio.Task] = []
        self.nc: nats.NATS | None = None
        self.machines: dict[str, InstrumentMachine] = {}
        self.links: dict[str, dict[Session, int]] = {}  # instrument -> book subscribers -> conflate_ms
        self.trade_links: dict[str, set[Session]] = {}
        self._nats_subs: dict[str, list[Any]] = {}  # instrument -> [delta sub, trade sub?]
        self._delta_subs: dict[str, Any] = {}
        self._snapshot_tasks: dict[str, asyncio.Task] = {}
        self._snapshot_answered_s = float("-inf")  # loop time of the last snapshot answer (``_ask_ingest``)
        self._snapshot_answered_sent_s = float("-inf")  # and the latest send time among the answered requests
        self._release_timers: dict[str, asyncio.TimerHandle] = {}
        self._hops: dict[str, Any] = {}
        self._held: dict[str, deque[tuple[float, bytes, str | None]]] = {}  # the slow-gateway hook's deltas
        self.directory: dict[str, dict[str, Any]] = {}
        self._last_directory_s: float | None = None  # monotonic time of the last directory announcement
        self._subscribed_s: float | None = None      # when the directory subscription was made
        self._venue_announced_s: dict[str, float] = {}  # venue -> monotonic time of its last announcement
        self._venue_heard_s: dict[str, float] = {}  # venue -> monotonic time of its last delta from NATS
        self.silent_venues: set[str] = set()  # venues whose instruments this gateway marked ingest_silent
        self.cut_off = False  # the lease bucket has not answered for lease_unreachable_s: instruments stale
        self._lease_answered_s: float | None = None  # monotonic time of the lease bucket's last answer
        self._lease_probe: asyncio.Task | None = None
        self.connections: set[Connection] = set()
        self.draining = False
        self._corked: list[Connection] = []  # connections with write-through frames to flush this pass
        # the tally every session of this worker counts into (``Session.tally``), folded every
        # ``queue_sample_interval_s``: per-connection folds were 6-9% of an idle worker's CPU with 5,000
        # connections and one uninterrupted pass over all of them (py-spy, ``loadtest.bench.idlemem``)
        self.tally: Counter = Counter()
        # every connection's next timer (heartbeat or token expiry), by slot: ``_ticks`` fires each slot's
        self._heartbeat_ns = int(self.limits.heartbeat_interval_s * 1e9)
        self.timers: TimerWheel[Connection] = TimerWheel(max(self._heartbeat_ns // max(config.heartbeat_slots, 1), 1), time.time_ns())

    # -- Books (what sessions read) -------------------------------------------------------------------
    def known(self, instrument: str) -> bool:
        return instrument in self.directory or instrument in self.machines

    def get(self, instrument: str) -> InstrumentMachine | None:
        return self.machines.get(instrument)

    @property
    def hubs(self) -> dict[str, InstrumentMachine]:
        """The instrument machines by instrument (the name the gateway's hubs had)."""
        return self.machines

    # -- NATS -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.nc = await natsauth.connect(
            self.config.nats_url,
            self.config.nats_credentials,
            name=self.config.name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=self.config.nats_reconnect_wait_s,
            allow_reconnect=True,
            pending_size=256 * 1024 * 1024,
            error_cb=self._nats_error,
            disconnected_cb=self._nats_disconnected,
            reconnected_cb=self._nats_reconnected,
        )
        await self.nc.subscribe(DIRECTORY_WILDCARD, cb=self._on_directory)
        self._subscribed_s = time.monotonic()
        await self.nc.publish(ANNOUNCE_REQUEST, b"")
        await self.nc.flush()
        if self.config.otlp_endpoint and self.config.instrumented:
            self.otlp = Otlp(self.config.otlp_endpoint, f"bookcast-{self.config.name}")
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._sample_queues()), loop.create_task(self._ticks())]
        if self.config.region:
            self._tasks.append(loop.create_task(self._seed_directory_from_kv()))
        if self.config.lease_unreachable_s:
            self._lease_answered_s = time.monotonic()
            self._tasks.append(loop.create_task(self._watch_lease()))

    async def _watch_lease(self) -> None:
        """Every ``lease_unreachable_s / 4``: a JetStream direct get of the lease entry (answered by the lease
        cluster through this region's gateway links; "no entry" is an answer too). No answer for
        ``lease_unreachable_s``: this region is cut off from whoever may publish, so its books are stale
        (``REGION_CUT_OFF``) and /readyz is 503 (the SDK moves on either); the next answer restores them. A
        takeover in progress does not trip it: the bucket answers while no ingest holds the lease."""
        from feed.lease import LEASE_BUCKET, LEASE_KEY

        limit_s = self.config.lease_unreachable_s
        subject = f"$JS.API.DIRECT.GET.KV_{LEASE_BUCKET}"
        body = wire.dumps({"last_by_subj": f"$KV.{LEASE_BUCKET}.{LEASE_KEY}"})

        async def probe() -> None:
            try:
                await self.nc.request(subject, body, timeout=limit_s)
            except Exception:  # noqa: BLE001 - no responders, timeout, NATS down: no answer
                return
            self._lease_answered_s = time.monotonic()

        while True:
            await asyncio.sleep(limit_s / 4)
            if self._lease_probe is None or self._lease_probe.done():
                self._lease_probe = asyncio.get_running_loop().create_task(probe())
            self._check_cut_off(time.monotonic(), time.time_ns())

    def _check_cut_off(self, now_s: float, now_ns: int) -> None:
        limit_s = self.config.lease_unreachable_s
        if not limit_s or self._lease_answered_s is None:
            return
        cut = now_s - self._lease_answered_s > limit_s
        if cut == self.cut_off:
            return
        self.cut_off = cut
        if cut:
            for machine in list(self.machines.values()):
                if machine.status is not Status.STALE:
                    self._execute(machine, machine.on_status(Status.STALE, REGION_CUT_OFF, None, now_ns))
            log.warning("the lease bucket has not answered for %.1f s: region cut off, %d instruments stale (%s)",
                        now_s - self._lease_answered_s, len(self.machines), REGION_CUT_OFF)
            return
        for machine in list(self.machines.values()):
            if machine.status_reason == REGION_CUT_OFF:
                self._execute(machine, machine.on_status(Status.OK, "", None, now_ns))
        log.info("the lease bucket answers again: region reachable")

    async def _sample_queues(self) -> None:
        """Every ``queue_sample_interval_s``: queue bytes and items summed over this worker's sessions,
        each session's tally folded into the counters, and this process's CPU time since the last sample
        added to ``bookcast_gateway_worker_cpu_seconds_total``. (Sampled, not set at scrape, so every
        worker's value is current whichever worker is scraped; prometheus-client's process collector does
        not run in multiprocess mode.)"""
        cpu_s = 0.0  # from the process's start, as process_cpu_seconds_total counts
        while True:
            now_cpu_s = time.process_time()
            self.metrics.worker_cpu.inc(now_cpu_s - cpu_s)
            cpu_s = now_cpu_s
            self.metrics.fold(self.tally)  # every session's (they share it: one fold, not one per connection)
            queued_bytes = queued_items = 0
            for conn in self.connections:  # one pass; most queues are empty (4% of a worker with 5,000 idle in py-spy)
                queue = conn.session.queue
                if queue.items:
                    queued_bytes += queue.queued_bytes
                    queued_items += len(queue.items)
            self.metrics.queue_bytes.set(queued_bytes)
            self.metrics.queue_items.set(queued_items)
            await asyncio.sleep(self.config.queue_sample_interval_s)

    async def _ticks(self) -> None:
        """Session timers (heartbeats, token expiry) through one timer wheel for the worker (``timers``):
        it wakes at every slot boundary (``--heartbeat-slots``, ``HEARTBEAT_SLOTS`` per heartbeat interval,
        on the loop's clock, not a slot after the last pass ended) and fires the timers of the slots that
        began (``tick_due``, its slices spread over the slot), so a heartbeat goes out 1 to 1.1 intervals
        after the last frame, at each connection's own phase. It used to pass over every connection at a
        quarter of the interval: each pass sent every heartbeat that fell due in that quarter at once (2,500
        of 10,000 idle connections), a burst that the healthy clients' deltas waited behind, and visited
        every connection four times a second to find them. Every quarter interval it also checks for
        silent ingests."""
        loop = asyncio.get_running_loop()
        slot_s = self.timers.slot_ns / 1e9
        silence_every_s = self.limits.heartbeat_interval_s / 4
        next_silence_s = time.monotonic() + silence_every_s
        wake_s = loop.time()
        while True:
            wake_s = max(wake_s + slot_s, loop.time())  # behind after a stall: start again from now, no catch-up burst
            await asyncio.sleep(wake_s - loop.time())
            await self.tick_due(paced=True)
            now_s = time.monotonic()
            if now_s >= next_silence_s:
                next_silence_s = now_s + silence_every_s
                self._check_ingest_silence(now_s, time.time_ns())

    def arm(self, conn: Connection, now_ns: int) -> None:
        """File ``conn``'s next timer: its heartbeat (due ``heartbeat_interval_s`` after its last frame; a
        quarter interval from now when one is due already but waits behind its writer), or its token's
        expiry when that is sooner. A connection that is closing has no more timers."""
        session = conn.session
        if session.state is not SessionState.OPEN:
            return
        due_ns = session.last_send_ns + self._heartbeat_ns
        if due_ns <= now_ns:
            due_ns = now_ns + self._heartbeat_ns // 4
        auth = session.authorization
        if auth is not None and auth.expires_at_ns is not None and auth.expires_at_ns < due_ns:
            due_ns = auth.expires_at_ns
        self.timers.add(conn, due_ns)

    async def tick_due(self, slice_size: int | None = None, *, paced: bool = False) -> None:
        """Fire the timers that are due (``Connection.tick``: a heartbeat, a token expiry) and file each
        connection's next one, ``slice_size`` (``--timer-slice``, ``TIMER_SLICE``) connections at a time,
        handing the loop back between slices (after a stall many slots are due at once); each slice reads
        the clock once (its heartbeats' ``ts_send_ns``). ``paced``: the slices are spread over one slot
        (``timers.slice_gap_ns``; what ``_ticks`` asks for), otherwise the loop runs one iteration between
        them. A timer is a hint: ``tick`` sends only what is due at that moment."""
        step = max(slice_size or self.config.timer_slice, 1)
        limit_bytes = self.config.ws_writer_limit_bytes
        conns = self.timers.due(time.time_ns())
        gap_s = slice_gap_ns(len(conns), step, self.timers.slot_ns) / 1e9 if paced else 0.0
        for start in range(0, len(conns), step):
            if start or self._corked:  # between slices (paced: a gap); a fan-out pass's frames wait for their flush
                await asyncio.sleep(gap_s if start else 0)
            self._tick_slice(conns[start:start + step] if len(conns) > step else conns, time.time_ns(), limit_bytes)

    def _tick_slice(self, conns: list[Connection], now_ns: int, limit_bytes: int) -> None:
        """One slice of a timer pass at ``now_ns``. The common case, a connection whose writer is idle with a
        heartbeat due, costs one ``Session.heartbeat_through`` and one ``transport.write`` (uvloop writes
        at once when its buffer is empty): every connection holding no book is written the same heartbeat
        frame (``empty_heartbeat_frame``: same bytes, framed once per ``now_ns``), and the shared tally is
        counted once for the slice. Anything else (a writer busy or draining, frames corked, write
        stamps) goes through ``Connection.tick``."""
        shared = self.tally
        beats = size_bytes = 0
        arm = self.arm
        next_due: list[Connection] = []  # heartbeat written, no token expiry: all due one interval from now_ns
        for conn in conns:
            if conn._gone:
                continue
            transport = conn.transport
            ping = False
            if now_ns >= conn.liveness.due_ns:  # the one comparison most connections cost for pings
                step = conn.liveness.on_timer(now_ns)
                if step is Liveness.DEAD:
                    conn.drop_unanswered()
                    continue
                ping = step is Liveness.PINGED
            if conn.idle and not conn.corked and not conn.write_stamps and conn._socket_open(transport):
                session = conn.session
                frame = session.heartbeat_through(now_ns)
                if frame is None:
                    if ping:
                        transport.write(PING_FRAME)
                else:
                    transport.write(frame + PING_FRAME if ping else frame)  # a ping rides in the heartbeat's write
                    if session.tally is shared:
                        beats += 1
                        size_bytes += len(frame)
                    else:
                        count_heartbeats(session.tally, 1, len(frame))
                    if transport.get_write_buffer_size() > limit_bytes:
                        conn._wait_for_drain()
                        conn._wake()
                    elif session.authorization is None:
                        next_due.append(conn)  # what ``arm`` would file: last_send_ns (now_ns) + one interval
                        continue
            else:
                conn.tick(now_ns, limit_bytes)
                if ping:
                    conn.send_ping()
            arm(conn, now_ns)
        if beats:
            count_heartbeats(shared, beats, size_bytes)
        self.timers.add_all(next_due, now_ns + self._heartbeat_ns)

    def _check_ingest_silence(self, now_s: float, now_ns: int) -> None:
        """Mark every instrument of a venue whose directory announcements stopped for ``ingest_silent_s``
        ``stale`` (reason ``ingest_silent``; PROTOCOL.md section 11): a dead ingest cannot say so itself.
        The venue's next announcement carries the ingest's own status and replaces it."""
        limit_s = self.config.ingest_silent_s
        if not limit_s:
            return
        for venue, last_s in self._venue_announced_s.items():
            if venue in self.silent_venues or now_s - last_s <= limit_s:
                continue
            self.silent_venues.add(venue)
            marked = 0
            for inst, machine in list(self.machines.items()):
                if split_instrument(inst)[0] == venue and machine.status is not Status.STALE:
                    self._execute(machine, machine.on_status(Status.STALE, INGEST_SILENT, None, now_ns))
                    marked += 1
            log.warning("no directory announcement from the ingest of venue %s for %.1f s: %d instruments "
                        "marked stale (%s)", venue, now_s - last_s, marked, INGEST_SILENT)

    # -- the region's own KV books (issue 9): snapshots and directory when no ingest answers -----------------
    def _leader_heard(self, instrument: str) -> bool:
        """True when the instrument's venue was announced or sent a delta in the last 2 s (a publishing ingest
        is reachable; it announces every second): ask it. Otherwise go to the region's KV books first."""
        venue = split_instrument(instrument)[0]
        last_s = max(self._venue_announced_s.get(venue, -1e9), self._venue_heard_s.get(venue, -1e9))
        return not self.config.region or time.monotonic() - last_s < 2.0

    async def _kv_get(self, key: str) -> bytes | None:
        """The value of ``key`` in this region's KV books (``md_books_<region>``, JetStream direct get, answered
        inside the region), or None (no region, no entry, no answer)."""
        from feed.ha import books_bucket

        if not self.config.region or self.nc is None:
            return None
        bucket = books_bucket(self.config.region)
        try:
            msg = await self.nc.request(f"$JS.API.DIRECT.GET.KV_{bucket}",
                                        wire.dumps({"last_by_subj": f"$KV.{bucket}.{key}"}),
                                        timeout=self.snapshot_timeout_s)
        except Exception:  # noqa: BLE001 - no bucket, no answer: nothing kept
            return None
        if (msg.headers or {}).get("Status") or not msg.data:
            return None  # 404: no such entry (or deleted)
        return msg.data

    async def _kv_snapshot(self, instrument: str) -> bytes | None:
        """The snapshot the leading ingest last wrote to this region's KV books (every snapshot interval, by
        ``feed.ha``), unjudged; ``_upstream_snapshot`` decides whether it may be served."""
        from feed.ha import kv_key

        return await self._kv_get(kv_key("snap", instrument))

    def _judge_kv(self, instrument: str, machine: InstrumentMachine | None, data: bytes | None) -> im.Fallback:
        """``InstrumentMachine.judge_fallback`` of a KV book (``STALE`` when there is none or it does not
        decode), against the epoch the directory announces."""
        if data is None:
            return im.Fallback.STALE
        try:
            head = wire.loads(data)
            epoch, seq = head["epoch"], head["seq"]
            if not isinstance(epoch, str) or not isinstance(seq, int):
                raise TypeError("epoch/seq")
        except (ValueError, KeyError, TypeError):
            return im.Fallback.STALE  # a broken entry: never served
        announced = self.directory.get(instrument, {}).get("epoch") or None
        if machine is None:
            machine = InstrumentMachine(instrument, 1)  # nothing held: only the announced epoch judges
        return machine.judge_fallback(epoch, seq, announced if isinstance(announced, str) else None)

    async def _ask_ingest(self, instrument: str, deadline_s: float) -> bytes:
        """The leading ingest's snapshot of ``instrument`` (request/reply), waiting until ``deadline_s``
        (event-loop time). Raises ``TimeoutError`` (nothing answered) or a ``nats`` error.

        With ``--region`` the request is sent again to the same inbox while it stays unanswered, and any
        answer wins: a standby ingest subscribes to the snapshot subjects but stays silent (``feed.ingest``:
        the leader answers), so NATS never says "no responders", and a request that reached only the standby,
        or the leader of a region that then died, would otherwise wait out the whole timeout; a later send
        reaches the ingest that took over. A send is repeated after ``SNAPSHOT_RESEND_S`` when no snapshot
        answer reached this gateway for that long, or when a request sent after it was answered already (one
        ingest answers in order: this one was lost). While older requests are still being answered, it is
        not: a leader that is alive but slow (thousands of instruments resyncing at once) is not asked again
        for the same books."""
        loop = asyncio.get_running_loop()
        subject = snapshot_subject(instrument)
        if not self.config.region:
            return (await self.nc.request(subject, b"", timeout=max(deadline_s - loop.time(), 0.001))).data
        answer: asyncio.Future = loop.create_future()
        sent_s = float("-inf")

        async def on_reply(msg) -> None:
            if (msg.headers or {}).get("Status"):
                return  # 503 "no responders" to one of the sends: nobody subscribed then; a later send asks again
            self._snapshot_answered_s = loop.time()
            self._snapshot_answered_sent_s = max(self._snapshot_answered_sent_s, sent_s)
            if not answer.done():
                answer.set_result(msg.data)

        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=on_reply)
        try:
            while True:
                now_s = loop.time()
                if sent_s == float("-inf") or (now_s - sent_s >= SNAPSHOT_RESEND_S and (
                        self._snapshot_answered_sent_s > sent_s or now_s - self._snapshot_answered_s >= SNAPSHOT_RESEND_S)):
                    sent_s = now_s
                    await self.nc.publish(subject, b"", reply=inbox)
                remaining_s = deadline_s - now_s
                if remaining_s <= 0:
                    raise TimeoutError(f"no ingest answered within {self.snapshot_timeout_s:g} s")
                done, _ = await asyncio.wait([answer], timeout=min(SNAPSHOT_RESEND_S, remaining_s))
                if done:
                    return answer.result()
        finally:
            await _unsubscribe(sub)

    async def _upstream_snapshot(self, instrument: str,
                                 machine: InstrumentMachine | None) -> tuple[bytes | None, str]:
        """A snapshot of ``instrument`` from upstream for a machine that is not serving (or REST without one):
        ``(payload, "")``, or ``(None, why)``.

        Without ``--region``: the ingest's answer within ``snapshot_timeout_s``. With it, the ingest is asked
        (``_ask_ingest``) while this region's KV book is read at the same time; the ingest's answer wins when
        it comes. The KV book is served instead only when the machine judges it (``judge_fallback``)
        ``CURRENT`` (the held live deltas chain onto it: served at once), or ``PLAUSIBLE`` once no ingest of
        the venue has been heard for 2 s (``_leader_heard``: the region with the leader is gone), checked
        every ``SNAPSHOT_RESEND_S`` and at the deadline (with the KV book read again). A ``STALE`` KV book (another
        epoch, say the old one after a lossy takeover, or behind the live deltas) is never served: the machine
        retries with backoff until an ingest answers."""
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + self.snapshot_timeout_s
        if not self.config.region:
            try:
                return await self._ask_ingest(instrument, deadline_s), ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: the machine retries with backoff
                return None, str(exc) or type(exc).__name__
        ask = loop.create_task(self._ask_ingest(instrument, deadline_s))
        kv_read = loop.create_task(self._kv_snapshot(instrument))
        kv: bytes | None = None
        failure = "no ingest answered and no KV book"

        def servable(data: bytes | None) -> bool:
            verdict = self._judge_kv(instrument, machine, data)
            return verdict is im.Fallback.CURRENT or (verdict is im.Fallback.PLAUSIBLE
                                                     and not self._leader_heard(instrument))

        try:
            while not ask.done():
                await asyncio.wait([ask, kv_read] if not kv_read.done() else [ask], timeout=SNAPSHOT_RESEND_S,
                                   return_when=asyncio.FIRST_COMPLETED)
                if ask.done():
                    break
                if kv_read.done() and kv is None and not kv_read.cancelled() and kv_read.exception() is None:
                    kv = kv_read.result()  # (``_kv_get`` answers None on any failure; this only guards it)
                if kv is not None and servable(kv):
                    return self._served_from_kv(instrument, kv), ""
            try:
                return ask.result(), ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - no ingest answered: the KV book, if it may be served
                failure = str(exc) or type(exc).__name__
            kv = await self._kv_snapshot(instrument)  # again: a new leader may have rewritten it meanwhile
            if kv is not None and servable(kv):
                return self._served_from_kv(instrument, kv), ""
            if kv is not None:
                failure += (f"; region {self.config.region}'s KV book is {self._judge_kv(instrument, machine, kv).value}"
                            " against the live stream: not served")
            return None, failure
        finally:
            for task in (ask, kv_read):
                if not task.done():
                    task.cancel()

    def _served_from_kv(self, instrument: str, data: bytes) -> bytes:
        log.info("snapshot of %s from region %s's KV books (no ingest answering)", instrument, self.config.region)
        return data

    async def _seed_directory_from_kv(self) -> None:
        """At start: the instrument directory kept in this region's KV books (``dir.<venue>`` entries), so a
        gateway started while no ingest is reachable knows the instruments (live announcements win)."""
        from feed.ha import books_bucket

        try:
            kv = await self.nc.jetstream().key_value(books_bucket(self.config.region))
            keys = [k for k in await asyncio.wait_for(kv.keys(), 5.0) if k.startswith("dir.")]
        except Exception as exc:  # noqa: BLE001 - no bucket yet, or empty: the announcements will come
            log.debug("no KV directory in region %s: %s", self.config.region, exc)
            return
        seeded = 0
        for key in keys:
            data = await self._kv_get(key)
            try:
                entries = wire.loads(data)["instruments"] if data else []
            except (ValueError, KeyError, TypeError):
                continue
            for entry in entries if isinstance(entries, list) else []:
                inst = entry.get("instrument") if isinstance(entry, dict) else None
                if isinstance(inst, str) and inst not in self.directory:
                    self.directory[inst] = entry
                    seeded += 1
                    # no announcement of this venue within ingest_silent_s of the subscription: silent
                    self._venue_announced_s.setdefault(split_instrument(inst)[0], self._subscribed_s)
                    if self.config.carry_directory and inst not in self.machines:
                        self._machine(inst)
        if seeded:
            log.info("instrument directory: %d instruments from region %s's KV books", seeded, self.config.region)

    async def _nats_error(self, exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    async def _nats_disconnected(self) -> None:
        if self.nc is not None and self.nc.is_closed:
            return  # our own stop() closed it
        log.warning("nats disconnected; reconnecting")

    async def _nats_reconnected(self) -> None:
        log.info("nats reconnected to %s", self.nc.connected_url.netloc if self.nc and self.nc.connected_url else "?")
        await self.nc.publish(ANNOUNCE_REQUEST, b"")

    async def _on_directory(self, msg) -> None:
        self._last_directory_s = time.monotonic()
        try:
            announced = wire.loads(msg.data)
            entries = announced["instruments"]
            if not isinstance(entries, list):
                raise TypeError("instruments is not a list")
        except (ValueError, KeyError, TypeError):
            self.metrics.bad_upstream.inc()
            return
        now_ns = time.time_ns()
        venue = announced.get("venue") if isinstance(announced, dict) else None
        resumed = False
        if isinstance(venue, str):
            self._venue_announced_s[venue] = self._last_directory_s
            if venue in self.silent_venues:
                self.silent_venues.discard(venue)
                resumed = True
                log.info("directory announcements from the ingest of venue %s resumed", venue)
        for entry in entries:
            inst = entry.get("instrument") if isinstance(entry, dict) else None
            if not isinstance(inst, str):
                continue
            self.directory[inst] = entry
            machine = self.machines.get(inst)
            if machine is None:
                if self.config.carry_directory and not self.draining:
                    self._machine(inst)  # carried for clients arriving from another region (resume ring)
                continue
            epoch, seq = entry.get("epoch", ""), entry.get("seq", 0)
            if not isinstance(epoch, str) or not isinstance(seq, int):
                self.metrics.bad_upstream.inc()
                continue
            try:
                status = Status(entry["status"]) if "status" in entry else None
            except ValueError:
                status = None
            if status is None and (resumed or machine.status_reason == INGEST_SILENT):
                status = Status.OK  # an ingest that announces no status: it is alive again
            sub = self._delta_subs.get(inst)
            backlog = len(self._held.get(inst, ())) + (sub.pending_msgs if sub is not None else 0)
            self._execute(machine, machine.on_directory(epoch, seq, now_ns, backlog=backlog, status=status))

    # -- instruments ----------------------------------------------------------------------------------
    def _machine(self, instrument: str) -> InstrumentMachine:
        """The machine of ``instrument``, created on first use (its NATS subscription and first snapshot
        request follow in a task)."""
        machine = self.machines.get(instrument)
        if machine is not None:
            return machine
        machine = InstrumentMachine(instrument, self.config.ring_size)
        self.machines[instrument] = machine
        self.links[instrument] = {}
        self.trade_links[instrument] = set()
        self._hops[instrument] = self.metrics.hop_nats_gateway(split_instrument(instrument)[0])
        self.metrics.instruments.set(len(self.machines))
        asyncio.get_running_loop().create_task(self._start_machine(machine))
        return machine

    async def hub(self, instrument: str) -> InstrumentMachine:
        """The machine of ``instrument``, created if needed (kept for callers of the old hub API)."""
        return self._machine(instrument)

    async def _start_machine(self, machine: InstrumentMachine) -> None:
        inst = machine.instrument
        venue = split_instrument(inst)[0]
        heard = self._venue_heard_s

        async def on_delta(msg) -> None:
            heard[venue] = time.monotonic()  # a publishing ingest is reachable (``_leader_heard``)
            if self.machines.get(inst) is not machine:
                return
            traceparent = msg.headers.get(TRACEPARENT) if msg.headers else None
            if self.config.fanout_delay_s:
                self._hold(machine, msg.data, traceparent)
            else:
                self._execute(machine, machine.on_message(msg.data, time.time_ns(), traceparent))

        sub = await self.nc.subscribe(delta_subject(inst), cb=on_delta)
        if self.machines.get(inst) is not machine:  # released while subscribing
            await _unsubscribe(sub)
            return
        self._delta_subs[inst] = sub
        self._nats_subs[inst] = [sub]
        if self.trade_links.get(inst):
            await self._ensure_trades(inst)
        self._execute(machine, machine.start())

    async def _ensure_trades(self, instrument: str) -> None:
        subs = self._nats_subs.get(instrument)
        if subs is None or len(subs) > 1:
            return  # not subscribed yet (``_start_machine`` comes back here) or already has trades
        subs.append(None)  # reserve the slot while subscribing

        async def on_trade(msg) -> None:
            self.metrics.nats_trades.inc()
            sessions = self.trade_links.get(instrument)
            if not sessions:
                return
            now_ns = time.time_ns()
            item = Item(Kind.TRADE, instrument, text_frame(wire.with_send_ts(msg.data, now_ns)))
            for session in sessions:
                session.push(item, now_ns)

        subs[1] = await self.nc.subscribe(trade_subject(instrument), cb=on_trade)

    def _hold(self, machine: InstrumentMachine, payload: bytes, traceparent: str | None) -> None:
        """Test hook (a slow gateway): handle the delta ``fanout_delay_s`` later, keeping arrival order."""
        loop = asyncio.get_running_loop()
        held = self._held.setdefault(machine.instrument, deque())
        held.append((loop.time() + self.config.fanout_delay_s, payload, traceparent))
        if len(held) == 1:
            loop.call_at(held[0][0], self._release_held, machine)

    def _release_held(self, machine: InstrumentMachine) -> None:
        loop = asyncio.get_running_loop()
        held = self._held.get(machine.instrument)
        while held and held[0][0] <= loop.time():
            _, payload, traceparent = held.popleft()
            if self.machines.get(machine.instrument) is machine:
                self._execute(machine, machine.on_message(payload, time.time_ns(), traceparent))
        if held:
            loop.call_at(held[0][0], self._release_held, machine)

    def _execute(self, machine: InstrumentMachine, actions: list[im.Action]) -> None:
        """Carry out an instrument machine's actions."""
        inst = machine.instrument
        for action in actions:
            kind = type(action)
            if kind is im.FanOut:
                self.metrics.nats_deltas.inc()
                self._fan_out(inst, action)
            elif kind is im.Resync:
                self.metrics.gaps.inc()
                if action.cause is im.BreakCause.CHECKSUM_MISMATCH:
                    self.metrics.checksum_mismatches.inc()
                elif action.cause is im.BreakCause.CONFLICTING_DUPLICATE:
                    self.metrics.conflicting_deltas.inc()
                log.warning("%s: fetching snapshot", action.detail)
                now_ns = time.time_ns()
                for session in list(self.links.get(inst, ())):
                    session.resync(inst, action.reason, now_ns)
            elif kind is im.RequestSnapshot:
                self._request_snapshot(machine, action.delay_s)
            elif kind is im.ReleaseParked:
                now_ns = time.time_ns()
                for session in list(self.links.get(inst, ())):
                    session.on_instrument_ready(inst, now_ns)
            elif kind is im.StatusChanged:
                self.metrics.nats_in["instrument_status"].inc()
                log.info("instrument status instrument=%s status=%s", inst, action.status)
                now_ns = time.time_ns()
                for session in list(self.links.get(inst, ())):
                    session.push(action.item, now_ns)
            elif kind is im.Rejected:
                self.metrics.bad_upstream.inc()
                log.warning("rejected message from NATS instrument=%s: %s", inst, action.error)
            elif kind is im.Ignored:
                self.metrics.nats_in["unknown"].inc()

    def _fan_out(self, inst: str, action: im.FanOut) -> None:
        """Send one delta to every subscriber: shared frame bytes (framed and stamped once, by the
        instrument machine), no awaits, nothing allocated per connection.

        Write-through: a connection with nothing queued whose writer is idle (not waiting for the socket to
        drain) takes the frame at once, with the same admission check its writer would make
        (``Session.deliver_now``), without waking its writer task (as websockets' ``broadcast()`` writes
        without a task switch). The frames a connection takes in one loop pass (NATS hands over every
        message it has read in one pass) go out as one socket write, at the end of the pass
        (``_flush_corked``), at most ``ws_writer_limit_bytes`` of them; after that, or while its socket
        holds more than that, a connection's frames are queued and its writer drains the queue: the queue's
        bound and the slow-consumer rules (PROTOCOL.md section 7) apply to it exactly as before.
        Conflating subscribers merge it into their window."""
        subs = self.links.get(inst)
        if not subs:
            return
        item = action.item
        delta = action.delta
        now_ns = action.ts_send_ns
        ts_publish_ns = delta.ts_publish_ns
        if ts_publish_ns:
            self._hops[inst].observe(max(now_ns - ts_publish_ns, 0) / 1e9)
            if action.traceparent is not None and self.otlp is not None:
                self.otlp.hop_span("nats_gateway", action.traceparent, ts_publish_ns, now_ns,
                                   {"instrument": inst, "seq": delta.seq, "gateway": self.config.name})
        limit_bytes = self.config.ws_writer_limit_bytes
        write_through = self.config.write_through
        open_state = SessionState.OPEN
        corked = self._corked
        size_bytes = len(item.payload)
        for session, conflate_ms in subs.items():
            if conflate_ms:
                delay_s = session.conflate(inst, delta, conflate_ms, now_ns)
                if delay_s is not None:
                    asyncio.get_running_loop().call_later(delay_s, self._flush_window, session, inst)
                continue
            conn = session.sink
            if (write_through and conn is not None and conn.idle and not session.queue.items
                    and session.state is open_state and conn.corked_bytes + size_bytes <= limit_bytes):
                frame = session.deliver_now(item, now_ns)
                if frame is not None:
                    if not conn.corked:
                        if not corked:
                            asyncio.get_running_loop().call_soon(self._flush_corked)
                        corked.append(conn)
                    conn.corked.append(frame)
                    conn.corked_bytes += size_bytes
                continue
            session.push(item, now_ns)

    def _flush_corked(self) -> None:
        """End of a fan-out pass: each connection's write-through frames as one socket write."""
        conns = self._corked
        if not conns:
            return
        self._corked = []
        limit_bytes = self.config.ws_writer_limit_bytes
        shared = self.tally
        frames = size_bytes = writes = 0
        for conn in conns:
            corked_bytes = conn.corked_bytes
            count = conn.flush_corked(limit_bytes)
            if count:
                if conn.session.tally is shared:  # counted once for the pass, not once per connection
                    frames += count
                    size_bytes += corked_bytes
                    writes += 1
                else:
                    conn.session.wrote_through(count, corked_bytes)
        if writes:
            count_written(shared, frames, size_bytes, writes)

    @staticmethod
    def _flush_window(session: Session, inst: str) -> None:
        session.flush_window(inst, time.time_ns())

    def _request_snapshot(self, machine: InstrumentMachine, delay_s: float) -> None:
        task = self._snapshot_tasks.get(machine.instrument)
        if task is not None and not task.done():
            task.cancel()
        self._snapshot_tasks[machine.instrument] = asyncio.get_running_loop().create_task(
            self._fetch_snapshot(machine, delay_s))

    async def _fetch_snapshot(self, machine: InstrumentMachine, delay_s: float) -> None:
        inst = machine.instrument
        if delay_s:
            await asyncio.sleep(delay_s)
        data, failure = await self._upstream_snapshot(inst, machine)
        if data is None:
            if self.machines.get(inst) is not machine:
                return
            self.metrics.snapshot_failures.inc()
            actions = machine.on_snapshot_failed(time.time_ns())
            log.warning("snapshot fetch failed instrument=%s: %s (retry in %.2f s)", inst,
                        failure, actions[0].delay_s if actions else 0)
            self._snapshot_tasks.pop(inst, None)
            self._execute(machine, actions)
            return
        if self.machines.get(inst) is not machine:
            return
        self._snapshot_tasks.pop(inst, None)
        actions = machine.on_snapshot_reply(data, time.time_ns())
        if any(type(a) is im.Rejected for a in actions):
            self.metrics.snapshot_failures.inc()
        self._execute(machine, actions)

    # -- links ----------------------------------------------------------------------------------------
    def _apply_links(self, session: Session, actions: list) -> None:
        for action in actions:
            inst = action.instrument
            if type(action) is Link:
                self._machine(inst)
                timer = self._release_timers.pop(inst, None)
                if timer is not None:
                    timer.cancel()
                if action.book:
                    self.links[inst][session] = action.conflate_ms
                else:
                    self.links[inst].pop(session, None)
                if action.trades:
                    self.trade_links[inst].add(session)
                    asyncio.get_running_loop().create_task(self._ensure_trades(inst))
                else:
                    self.trade_links[inst].discard(session)
            elif type(action) is Unlink:
                links = self.links.get(inst)
                if links is not None:
                    links.pop(session, None)
                trade_links = self.trade_links.get(inst)
                if trade_links is not None:
                    trade_links.discard(session)
                if not links and not trade_links and inst in self.machines and inst not in self._release_timers:
                    self._release_timers[inst] = asyncio.get_running_loop().call_later(
                        self.config.instrument_linger_s, self._release, inst)

    def _release(self, inst: str) -> None:
        """Drop an instrument nobody subscribed to for ``instrument_linger_s``."""
        self._release_timers.pop(inst, None)
        if self.links.get(inst) or self.trade_links.get(inst) or inst not in self.machines:
            return
        if self.config.carry_directory and inst in self.directory:
            return  # carried: kept for clients arriving from another region
        self.machines.pop(inst)
        self.links.pop(inst, None)
        self.trade_links.pop(inst, None)
        self._hops.pop(inst, None)
        self._held.pop(inst, None)
        self._delta_subs.pop(inst, None)
        task = self._snapshot_tasks.pop(inst, None)
        if task is not None:
            task.cancel()
        for sub in self._nats_subs.pop(inst, []):
            if sub is not None:
                asyncio.get_running_loop().create_task(_unsubscribe(sub))
        self.metrics.instruments.set(len(self.machines))
        log.info("instrument released instrument=%s (no subscribers for %.0f s)", inst, self.config.instrument_linger_s)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for timer in self._release_timers.values():
            timer.cancel()
        for task in self._snapshot_tasks.values():
            task.cancel()
        for subs in self._nats_subs.values():
            for sub in subs:
                if sub is not None:
                    await _unsubscribe(sub)
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()
        if self.otlp is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.otlp.shutdown)

    @property
    def ready(self) -> bool:
        return (self.nc is not None and self.nc.is_connected and not self.draining and not self.directory_silent()
                and not self.silent_venues and not self.cut_off)

    def directory_silent(self) -> bool:
        """A region's gateway (``--region``) that has heard no venue at all, neither announced nor in its
        region's KV directory, for ``ingest_silent_s`` since its NATS subscription (the one "ingest went
        quiet" bound; a venue once known is judged by ``_check_ingest_silence``)."""
        limit_s = self.config.ingest_silent_s
        return (bool(self.config.region) and bool(limit_s) and not self._venue_announced_s
                and self._subscribed_s is not None and time.monotonic() - self._subscribed_s > limit_s)

    # -- auth hook ------------------------------------------------------------------------------------
    async def authorize(self, request: web.Request) -> Authorization | None:
        """The authenticator's verdict on ``request`` (``None`` when auth is off). Raises the
        authenticator's ``web.HTTPException`` to refuse."""
        if self.authenticator is None:
            return None
        result = self.authenticator(request)
        if inspect.isawaitable(result):
            result = await result
        return result

    # -- WebSocket ------------------------------------------------------------------------------------
    async def ws_handler(self, request: web.Request) -> web.StreamResponse:
        authorization = await self.authorize(request)
        ws = web.WebSocketResponse(
            autoping=False,  # pings are ours (``feed.gateway.liveness``, in the timer pass); pongs are read below
            max_msg_size=self.limits.max_frame_bytes,
            compress=False,
            decode_text=False,
            writer_limit=self.config.ws_writer_limit_bytes,
        )
        if self.config.socket_sndbuf_bytes:
            sock = request.transport.get_extra_info("socket") if request.transport else None
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.socket_sndbuf_bytes)
        await ws.prepare(request)
        session = Session(self, self.limits, time.time_ns(), authorization=authorization, peer=request.remote or "?",
                          tally=self.tally)
        conn = Connection(self, ws, session, request.transport, request.writer)
        conn.write_stamps = request.query.get("write_stamps") in ("1", "true")
        self.connections.add(conn)
        self.arm(conn, time.time_ns())
        self.metrics.clients.inc()
        self.metrics.region_clients.inc()
        conn.handler = asyncio.current_task()
        try:
            # This task reads the client's requests itself (no reader task, no writer task until one is
            # needed: an idle connection holds only this one).
            try:
                await self._read_requests(conn, ws)
            except asyncio.CancelledError:
                if not conn.read_cancelled_by_close():
                    raise
            if conn.close_request.done():
                # The writer has sent everything queued before the close. Close from this task, with no
                # receive() pending: aiohttp then waits for the client's close frame (reading what the
                # client still sends) before closing the socket. Closing while a receive() is pending
                # drops the socket at once, and unread input makes the kernel reset the connection,
                # discarding our close frame on the way.
                code, reason = conn.close_request.result()
                await ws.close(code=code, message=reason)
        finally:
            conn.reading = False
            conn._gone = True
            if conn.writer is not None:
                conn.writer.cancel()
            self._drop(conn)
        return ws

    async def _read_requests(self, conn: Connection, ws: web.WebSocketResponse) -> None:
        """Handle the client's frames until it goes away or a close is requested (``conn.close_request``;
        ``Connection._request_close`` cancels a pending ``receive()`` for it)."""
        session = conn.session
        liveness = conn.liveness
        closing = _WS_END
        while not conn.close_request.done():
            conn.reading = True
            try:
                msg = await ws.receive()
            finally:
                conn.reading = False
            if msg.type in closing:
                return
            now_ns = time.time_ns()
            liveness.heard(now_ns)  # any frame from the peer answers a ping (RFC 6455 section 5.5.3)
            if msg.type is WSMsgType.PONG:
                continue
            if msg.type is WSMsgType.PING:
                await ws.pong(msg.data)  # what aiohttp's autoping did: the client's ping answered at once
                continue
            if msg.type is WSMsgType.TEXT:
                if not _valid_utf8(msg.data):  # RFC 6455 section 8.1; bad_request stays for text that is not JSON
                    self.metrics.closes[int(CloseCode.INVALID_PAYLOAD)].inc()
                    self._apply_links(session, session.closed())
                    await ws.close(code=CloseCode.INVALID_PAYLOAD, message=b"text frame is not valid UTF-8")
                    return
                try:
                    actions = session.on_text(msg.data, now_ns)
                    self._apply_links(session, actions)
                except Exception:  # noqa: BLE001 - never let one request take the connection down
                    log.exception("internal error handling a request from %s", session.peer)
                    session.internal_error()
                self.metrics.fold(session.tally)
            elif msg.type is WSMsgType.ERROR:
                # aiohttp closed with the error's code itself (1002 bad framing, 1009 oversize, 1007); count
                # it here: ws.close_code ends as the client's answer (or 1006 when it just drops)
                code = getattr(msg.data, "code", None)
                if code in _PEER_LEVEL_CLOSES:
                    self.metrics.closes[int(code)].inc()
            elif msg.type is WSMsgType.BINARY:
                self.metrics.closes[int(CloseCode.POLICY_VIOLATION)].inc()
                self._apply_links(session, session.closed())
                await ws.close(code=CloseCode.POLICY_VIOLATION, message=b"binary frames are not accepted")
                return

    def _drop(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self.metrics.clients.dec()
        self.metrics.region_clients.dec()
        self._apply_links(conn.session, conn.session.closed())
        self.metrics.fold(conn.session.tally)
        conn.dropped.set_result(None)

    # -- REST -----------------------------------------------------------------------------------------
    async def book_handler(self, request: web.Request) -> web.Response:
        authorization = await self.authorize(request)
        instrument = request.match_info["instrument"]
        try:
            split_instrument(instrument)
        except ValueError:
            return _json_error(400, ErrorCode.BAD_REQUEST, f"bad instrument id {shown(instrument)}")
        if authorization is not None and not authorization.allows(instrument):
            return _json_error(403, ErrorCode.FORBIDDEN, f"token does not allow {shown(instrument)}")
        depth = request.query.get("depth")
        if depth is not None and not (depth.isdigit() and int(depth) >= 1):
            return _json_error(400, ErrorCode.BAD_REQUEST, f"depth must be a positive integer, got {depth!r}")
        machine = self.machines.get(instrument)
        if machine is not None and machine.serving:
            body = machine.snapshot_bytes()
        elif self.known(instrument):
            body, failure = await self._upstream_snapshot(instrument, machine)
            if body is None:
                return _json_error(503, ErrorCode.INTERNAL, f"snapshot of {shown(instrument)} unavailable: {failure}")
        else:
            return _json_error(404, ErrorCode.UNKNOWN_INSTRUMENT, f"no instrument {shown(instrument)}")
        if depth is not None:
            body = snapshot_at_depth(body, int(depth))
        return web.Response(body=wire.with_send_ts(body, time.time_ns()), content_type="application/json")

    async def instruments_handler(self, request: web.Request) -> web.Response:
        authorization = await self.authorize(request)
        out = []
        for inst in sorted(self.directory.keys() | self.machines.keys()):
            if authorization is not None and not authorization.allows(inst):
                continue  # REST under the token's patterns too (section 8)
            entry = self.directory.get(inst, {})
            epoch, seq, status = entry.get("epoch", ""), entry.get("seq", 0), entry.get("status", Status.OK.value)
            machine = self.machines.get(inst)
            if machine is not None and machine.serving:
                epoch, seq, status = machine.epoch, machine.seq, machine.status.value
            venue = split_instrument(inst)[0]
            if venue in self.silent_venues or self.cut_off:
                status = Status.STALE.value  # its ingest went silent, or the region is cut off from the lease
            item = {"instrument": inst, "venue": venue, "epoch": epoch, "seq": seq}
            if entry.get("tick_size") is not None:
                item["tick_size"] = entry["tick_size"]
            for key in INSTRUMENT_METADATA:  # what the venue gives, as the ingest announced it
                if entry.get(key) is not None:
                    item[key] = entry[key]
            item["status"] = status
            out.append(item)
        return web.Response(body=wire.dumps({"instruments": out}), content_type="application/json")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        if self.ready:
            return web.Response(text="ready\n")
        if self.draining:
            why = "draining"
        elif self.cut_off:
            why = f"region cut off: the publishing lease's bucket has not answered for {self.config.lease_unreachable_s:g} s"
        elif self.directory_silent():
            why = f"no ingest directory for {self.config.ingest_silent_s:g} s since the subscription"
        elif self.silent_venues:
            stale = sum(1 for inst, m in self.machines.items()
                        if split_instrument(inst)[0] in self.silent_venues and m.status is Status.STALE)
            why = (f"ingest silent for venue {', '.join(sorted(self.silent_venues))} (no directory for "
                   f"{self.config.ingest_silent_s:g} s; {stale} instruments stale)")
        else:
            why = "not connected to NATS"
        return web.Response(status=503, text=f"not ready: {why}\n")

    async def metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=prom.exposition(self.registry), content_type="text/plain", charset="utf-8")

    # -- shutdown -------------------------------------------------------------------------------------
    async def drain(self) -> None:
        """Send ``shutdown`` to every client, give writers a moment to flush, then close with 1001."""
        from feed.gateway import protocol as proto

        self.draining = True
        notice = proto.shutdown(self.config.shutdown_reconnect_after_ms)
        conns = list(self.connections)
        for conn in conns:
            conn.session.push_ctrl(notice)
            conn.session.close(CloseCode.GOING_AWAY, "gateway going away")
        for conn in conns:
            self.metrics.fold(conn.session.tally)
        if conns:
            await asyncio.wait([c.dropped for c in conns], timeout=self.config.drain_timeout_s)


_WS_END = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED})  # what ends ``async for msg in ws``
_PEER_LEVEL_CLOSES = frozenset({int(CloseCode.PROTOCOL_ERROR), int(CloseCode.INVALID_PAYLOAD),
                                int(CloseCode.MESSAGE_TOO_BIG)})


def _valid_utf8(data: bytes | str) -> bool:
    if isinstance(data, str):
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def _unsubscribe(sub) -> None:
    try:
        await sub.unsubscribe()
    except Exception:  # noqa: BLE001 - connection may already be closed
        pass


def _json_error(status: int, code: ErrorCode, message: str) -> web.Response:
    return web.Response(status=status, body=wire.dumps({"type": "error", "code": code.value, "message": message}),
                        content_type="application/json")


def add_routes(app: web.Application, gw: Gateway) -> None:
    """Every route of a gateway worker (PROTOCOL.md section 2), registered in one place."""
    app.router.add_get("/v1/ws", gw.ws_handler)
    app.router.add_get("/v1/book/{instrument}", gw.book_handler)
    app.router.add_get("/v1/instruments", gw.instruments_handler)
    app.router.add_get("/healthz", gw.healthz)
    app.router.add_get("/readyz", gw.readyz)
    app.router.add_get("/metrics", gw.metrics_handler)
    viewer.add_routes(app)  # the book viewer at / and /static/


GATEWAY_KEY = web.AppKey("gateway", Gateway)  # the worker's Gateway on its aiohttp application (typed key)


def create_app(config: GatewayConfig, registry: CollectorRegistry | None = None, *,
               authenticator: Authenticator | None = None) -> web.Application:
    """An aiohttp application serving one gateway worker (NATS connects on startup); its ``Gateway`` is
    ``app[GATEWAY_KEY]``.

    ``authenticator``: see ``Authenticator`` (default ``None``: auth off)."""
    gw = Gateway(config, registry, authenticator=authenticator)
    app = web.Application()
    app[GATEWAY_KEY] = gw
    add_routes(app, gw)

    async def on_startup(app: web.Application) -> None:
        await gw.start()

    async def on_shutdown(app: web.Application) -> None:
        await gw.drain()

    async def on_cleanup(app: web.Application) -> None:
        await gw.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app
