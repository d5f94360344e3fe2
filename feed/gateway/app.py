"""The aiohttp gateway: PROTOCOL.md v1 over WebSocket and REST, fed from NATS.

Adapter around the pure pieces (``protocol`` parses requests and builds replies, ``fanout`` is the queue
and slow-consumer policy, ``ratelimit`` the request limiter). Shape:

* one ``Hub`` per instrument (one NATS subscription, however many clients);
* one ``Connection`` per client: a reader (this handler) and a writer task draining the connection's own
  bounded queue. The fan-out loop never awaits a client: it only appends to queues.

Run several worker processes on one port with ``reuse_port`` (see ``feed.gateway.server``).

Instrumentation (names in ``feed.catalog``): per delta, ``bookcast_hop_nats_gateway_seconds`` observes
``ts_send_ns - ts_publish_ns`` (the fan-out stamp minus the ingest's publish stamp: NATS transit plus the
gateway's own work); frames and bytes sent are tallied per connection and folded into their counters
every second, when queue depth and bytes are sampled.
``instrumented=False`` turns the per-message part off, only to measure its cost (``exporter.bench``).
With OTLP on, a delta whose NATS headers carry a ``traceparent`` gets a ``nats_gateway`` span.

Test hook, off by default: ``fanout_delay_s`` holds every delta from NATS for a fixed time before the hub
handles it, in arrival order ("a slow gateway").
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import nats
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry

from feed.otlp import Otlp
from feed import metrics as prom
from feed import wire
from feed.gateway import protocol as proto
from feed.gateway.fanout import Admit, Conflated, Item, Kind, OutQueue, OverflowPolicy, SentState, admit
from feed.gateway.hub import Hub
from feed.gateway.protocol import CloseCode, ErrorCode, GatewayLimits, ProtocolError, ResyncReason
from feed.gateway.ratelimit import RequestLimiter, Verdict
from feed.model import split_instrument
from feed.subjects import ANNOUNCE_REQUEST, DIRECTORY_WILDCARD, snapshot_subject

log = logging.getLogger("bookcast.gateway")


class GatewayMetrics:
    """Label children resolved once; nothing on the hot path looks a label up. With ``instrumented=False``
    the per-message metrics (hop histogram, frames and bytes sent, NATS messages in) do nothing."""

    def __init__(self, registry: CollectorRegistry | None, instrumented: bool = True) -> None:
        b = lambda name: prom.build(name, registry)  # noqa: E731
        per_msg = b if instrumented else (lambda name: prom.NULL)  # noqa: E731
        self.clients = b("bookcast_gateway_clients")
        self.instruments = b("bookcast_gateway_instruments")
        self.queue_bytes = b("bookcast_gateway_queue_bytes")
        self.queue_items = b("bookcast_gateway_queue_items")
        nats_in = per_msg("bookcast_gateway_nats_messages_total")
        self.nats_deltas, self.nats_trades = nats_in.labels("delta"), nats_in.labels("trade")
        sent = per_msg("bookcast_gateway_messages_sent_total")
        self.sent = {k: sent.labels(k) for k in ("delta", "snapshot", "trade", "control")}
        self.bytes_sent = per_msg("bookcast_gateway_bytes_sent_total")
        self.socket_writes = per_msg("bookcast_gateway_socket_writes_total")
        self.instrumented = instrumented
        requests = b("bookcast_gateway_requests_total")
        self.requests = {op: requests.labels(op) for op in ("subscribe", "unsubscribe", "resync", "ping", "invalid")}
        errors = b("bookcast_gateway_errors_total")
        self.errors = {c: errors.labels(c.value) for c in ErrorCode}
        resyncs = b("bookcast_gateway_resyncs_total")
        self.resyncs = {r: resyncs.labels(r.value) for r in ResyncReason}
        self.slow_closes = b("bookcast_gateway_slow_consumer_closes_total")
        closes = b("bookcast_gateway_closes_total")
        self.closes = {c: closes.labels(str(int(c))) for c in CloseCode}
        self.conflated = b("bookcast_gateway_conflated_total")
        self.gaps = b("bookcast_gateway_gaps_total")
        self.snapshot_failures = b("bookcast_gateway_snapshot_fetch_failures_total")
        self.bad_upstream = b("bookcast_gateway_bad_upstream_total")
        self._hop_nats_gateway = per_msg("bookcast_hop_nats_gateway_seconds")

    def hop_nats_gateway(self, venue: str) -> Any:
        """The venue's child of the NATS + gateway hop histogram (a hub resolves it once)."""
        return self._hop_nats_gateway.labels(venue)


def _text_frame_header(length: int) -> bytes:
    """RFC 6455 section 5.2 header of an unmasked, final text frame of ``length`` payload bytes."""
    if length < 126:
        return bytes((0x81, length))
    if length < 65536:
        return struct.pack("!BBH", 0x81, 126, length)
    return struct.pack("!BBQ", 0x81, 127, length)


@dataclass
class Sub:
    conflate_ms: int
    book: bool
    trades: bool


@dataclass
class GatewayConfig:
    nats_url: str = "nats://127.0.0.1:4222"
    limits: GatewayLimits = field(default_factory=GatewayLimits)
    ring_size: int = 4096
    ws_ping_interval_s: float = 10.0
    snapshot_timeout_s: float = 2.0
    shutdown_reconnect_after_ms: int = 500
    drain_timeout_s: float = 2.0
    nats_reconnect_wait_s: float = 0.25
    # Bytes a connection may hold below its queue: the WebSocket writer's buffer before it waits for the
    # socket to drain, and the kernel send buffer (None: kernel autotuning, up to net.ipv4.tcp_wmem max).
    ws_writer_limit_bytes: int = 256 * 1024
    socket_sndbuf_bytes: int | None = None
    name: str = "gateway"
    instrumented: bool = True  # per-message metrics and traces; off only to measure their cost
    otlp_endpoint: str | None = None  # OTLP/gRPC traces; None = off
    queue_sample_interval_s: float = 1.0
    fanout_delay_s: float = 0.0  # test hook: hold each delta this long before handling it (a slow gateway)


class Connection:
    """One WebSocket client: its subscriptions, its queue, its writer task."""

    def __init__(self, gw: Gateway, ws: web.WebSocketResponse, peer: str,
                 transport: asyncio.Transport | None = None) -> None:
        self.gw = gw
        self.ws = ws
        self.transport = transport
        self.peer = peer
        limits = gw.limits
        self.queue = OutQueue(limits.max_queue_bytes)
        self.overflows = OverflowPolicy(limits.max_overflows, limits.overflow_window_s)
        self.limiter = RequestLimiter(limits)
        self.subs: dict[str, Sub] = {}
        self.sent: dict[str, SentState | None] = {}
        self.conflating: dict[str, Conflated] = {}  # open conflation windows
        self._flushing: dict[str, Conflated] = {}  # closed windows whose FLUSH item is queued
        self.frames_sent = dict.fromkeys(("delta", "snapshot", "trade", "control"), 0)
        self.bytes_sent = 0
        self.socket_writes = 0
        self._waiter: asyncio.Future[None] | None = None  # the idle writer waits on it
        self.last_send_s = time.monotonic()
        self.closing = False
        self.writer: asyncio.Task | None = None
        self.close_request: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.dropped: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # handler finished

    # -- producer side (called from the fan-out loop and the reader; never awaits) --------------
    def push(self, item: Item) -> None:
        if self.closing:
            return
        if not self.queue.push(item):
            self._overflow(item.instrument)
            return
        self._wake()

    def push_ctrl(self, payload: bytes) -> None:
        self.push(Item(Kind.CTRL, None, payload))

    def resync(self, instrument: str, reason: ResyncReason) -> None:
        """Queue ``resync`` then a snapshot marker for one instrument."""
        self.push(Item(Kind.RESYNC, instrument, proto.resync(instrument, reason)))
        self.push(Item(Kind.SNAP, instrument))
        self.gw.metrics.resyncs[reason].inc()

    def conflate(self, instrument: str, delta: dict[str, Any], conflate_ms: int) -> None:
        pending = self.conflating.get(instrument)
        if pending is not None and pending.add(delta):
            self.gw.metrics.conflated.inc()
            return
        if pending is not None:  # does not chain on: flush what we have first
            self._flush(instrument)
        self.conflating[instrument] = Conflated.start(delta)
        asyncio.get_running_loop().call_later(conflate_ms / 1000, self._flush, instrument)

    def _flush(self, instrument: str) -> None:
        pending = self.conflating.pop(instrument, None)
        if pending is not None and not self.closing:
            self.push(Item(Kind.FLUSH, instrument, b"", pending.epoch, pending.seq, pending.first_prev_seq))
            self._flushing[instrument] = pending

    def _overflow(self, instrument: str | None) -> None:
        lost = self.queue.drop_data()
        if instrument is not None:
            lost.add(instrument)
        if self.overflows.record(time.monotonic()):
            log.warning("slow consumer closed peer=%s overflows=%d", self.peer, self.overflows.max_overflows)
            self.gw.metrics.slow_closes.inc()
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer")
            return
        log.info("slow consumer overflow peer=%s instruments=%d queued_bytes=%d", self.peer, len(lost), self.queue.queued_bytes)
        for inst in sorted(lost):
            if inst in self.subs:
                self.resync(inst, ResyncReason.SLOW_CONSUMER)
        self._wake()

    def close(self, code: CloseCode, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self.gw.metrics.closes[code].inc()
        self.queue.drop_data()
        self.queue.items.append(Item(Kind.CLOSE, None, reason.encode(), seq=int(code)))
        self._wake()

    # -- writer task --------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run_writer(self) -> None:
        """Drain the queue into the socket.

        An idle writer waits on a bare future that ``push`` resolves (no task or timer per wait: with
        ``asyncio.wait_for`` that cost dominated delivery at low rates); heartbeats are queued by the
        gateway's ticker (``Gateway._heartbeats``). Whatever is queued when the writer wakes goes out as
        one socket write (``_write``), so a connection that falls behind catches up with fewer syscalls.
        """
        queue = self.queue
        loop = asyncio.get_running_loop()
        batch_limit_bytes = self.gw.config.ws_writer_limit_bytes
        try:
            while True:
                if not queue.items:
                    self._waiter = loop.create_future()
                    await self._waiter
                    self._waiter = None
                    continue
                batch: list[bytes] = []
                batch_bytes = 0
                while queue.items and batch_bytes < batch_limit_bytes:
                    item = queue.pop()
                    if item.kind is Kind.CLOSE:
                        await self._write(batch)
                        self._request_close(item.seq, item.payload)
                        return
                    payload = self._frame_for(item)
                    if payload is not None:
                        batch.append(payload)
                        batch_bytes += len(payload)
                if batch:
                    await self._write(batch)
                    self.last_send_s = time.monotonic()
        except (ConnectionResetError, RuntimeError, asyncio.CancelledError):
            return
        except Exception:  # noqa: BLE001 - a writer must never take the gateway down
            log.exception("writer failed peer=%s", self.peer)
            self._request_close(1011, b"internal error")

    def _frame_for(self, item: Item) -> bytes | None:
        """The payload to send for one queued item, or None when the client must not get it (not
        subscribed, already covered by a snapshot, awaiting one). Updates what the client holds and
        the frame tallies (folded into the Prometheus counters every second by ``fold_metrics``: a
        counter's lock per frame per client cost about 1 µs per delivery, 12% of the gateway's CPU)."""
        kind = item.kind
        inst = item.instrument
        if kind is Kind.DATA:
            state = self.sent.get(inst)
            verdict = admit(state, item.epoch, item.seq, item.prev_seq) if inst in self.sent else Admit.SKIP
            if verdict is Admit.GAP:
                self._writer_gap(item)
            if verdict is not Admit.SEND:
                return None
            state.seq = item.seq  # type: ignore[union-attr]  # SEND: the client holds this epoch
            payload, tally = item.payload, "delta"
        elif kind is Kind.CTRL:
            payload, tally = item.payload, "control"
        elif kind is Kind.TRADE:
            if inst not in self.subs:
                return None
            payload, tally = item.payload, "trade"
        elif kind is Kind.RESYNC:
            if inst not in self.subs:
                return None
            self.sent[inst] = None
            self._flushing.pop(inst, None)
            payload, tally = item.payload, "control"
        elif kind is Kind.SNAP:
            payload, tally = self._snapshot_for(inst), "snapshot"
        elif kind is Kind.FLUSH:
            payload, tally = self._conflated_for(item), "delta"
        elif kind is Kind.HEARTBEAT:
            payload, tally = self._heartbeat(), "control"
        else:
            raise ValueError(f"unexpected queue item {kind!r}")
        if payload is not None:
            self.frames_sent[tally] += 1
            self.bytes_sent += len(payload)
        return payload

    async def _write(self, frames: list[bytes]) -> None:
        """Send text frames in order. Several go out as one socket write: RFC 6455 server frames are
        unmasked and compression is off here, so a frame is a 2-10 byte header and the payload, written
        straight to the connection's transport (aiohttp writes its own control frames to the same
        transport, always whole frames, so nothing interleaves). Then, like aiohttp's writer, wait for
        the transport to drain while it holds more than the writer limit."""
        if not frames:
            return
        self.socket_writes += 1
        if len(frames) == 1:
            await self.ws.send_frame(frames[0], WSMsgType.TEXT)
            return
        transport = self.transport
        if transport is None or transport.is_closing() or self.ws.closed:
            raise ConnectionResetError("connection closing")
        transport.write(b"".join(_text_frame_header(len(f)) + f for f in frames))
        if transport.get_write_buffer_size() > self.gw.config.ws_writer_limit_bytes:
            protocol = self.ws._writer.protocol  # aiohttp's own flow control (pinned in uv.lock)
            if protocol.writing_paused:
                await protocol._drain_helper()

    def _request_close(self, code: int, reason: bytes) -> None:
        """Ask the connection's handler task to close the WebSocket (see ``Gateway.ws_handler``)."""
        if not self.close_request.done():
            self.close_request.set_result((code, reason))

    def fold_metrics(self) -> None:
        """Add the frames and bytes sent since the last call to the worker's counters."""
        m = self.gw.metrics
        if not m.instrumented:
            return
        for kind, n in self.frames_sent.items():
            if n:
                m.sent[kind].inc(n)
                self.frames_sent[kind] = 0
        if self.bytes_sent:
            m.bytes_sent.inc(self.bytes_sent)
            self.bytes_sent = 0
        if self.socket_writes:
            m.socket_writes.inc(self.socket_writes)
            self.socket_writes = 0

    def _heartbeat(self) -> bytes:
        seqs = {inst: (st.epoch, st.seq) for inst, st in self.sent.items() if st is not None and inst in self.subs}
        return proto.heartbeat(time.time_ns(), seqs)

    def _snapshot_for(self, instrument: str | None) -> bytes | None:
        sub = self.subs.get(instrument)
        if sub is None or not sub.book:
            return None
        hub = self.gw.hubs.get(instrument)
        if hub is None or not hub.ready.is_set():
            self.sent[instrument] = None
            if hub is not None:
                hub.parked.add(self)
            return None
        self.sent[instrument] = SentState(hub.epoch, hub.seq)
        self._flushing.pop(instrument, None)
        return wire.with_send_ts(hub.snapshot_bytes(), time.time_ns())

    def _conflated_for(self, item: Item) -> bytes | None:
        pending = self._flushing.pop(item.instrument, None)
        if pending is None or item.instrument not in self.subs:
            return None
        state = self.sent.get(item.instrument)
        verdict = admit(state, pending.epoch, pending.seq, pending.first_prev_seq)
        if verdict is Admit.GAP:
            self._writer_gap(item)
        if verdict is not Admit.SEND:
            return None
        msg = pending.message(state.seq)  # type: ignore[union-attr]
        msg["ts_send_ns"] = time.time_ns()
        self.sent[item.instrument] = SentState(pending.epoch, pending.seq)
        return wire.dumps(msg)

    def _writer_gap(self, item: Item) -> None:
        # The hub only fans out deltas that chain on; reaching here means a bug. Never send a delta the
        # client cannot apply: resync it instead.
        log.error("delta not applicable for client peer=%s instrument=%s held=%s got=%s/%d->%d",
                  self.peer, item.instrument, self.sent.get(item.instrument), item.epoch, item.prev_seq, item.seq)
        self.resync(item.instrument, ResyncReason.UPSTREAM_GAP)  # type: ignore[arg-type]


class Gateway:
    """Shared state of one gateway worker: NATS connection, hubs, directory, connections."""

    def __init__(self, config: GatewayConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.limits = config.limits
        self.snapshot_timeout_s = config.snapshot_timeout_s
        self.registry = registry
        self.metrics = GatewayMetrics(registry, config.instrumented)
        self.otlp: Otlp | None = None
        self._sampler: asyncio.Task | None = None
        self._heartbeater: asyncio.Task | None = None
        self.nc: nats.NATS | None = None
        self.hubs: dict[str, Hub] = {}
        self._hub_lock: dict[str, asyncio.Future] = {}
        self.directory: dict[str, dict[str, Any]] = {}
        self.connections: set[Connection] = set()
        self.draining = False

    # -- NATS ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self.nc = await nats.connect(
            self.config.nats_url,
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
        await self.nc.publish(ANNOUNCE_REQUEST, b"")
        await self.nc.flush()
        if self.config.otlp_endpoint and self.config.instrumented:
            self.otlp = Otlp(self.config.otlp_endpoint, f"bookcast-{self.config.name}")
        self._sampler = asyncio.get_running_loop().create_task(self._sample_queues())
        self._heartbeater = asyncio.get_running_loop().create_task(self._heartbeats())

    async def _sample_queues(self) -> None:
        """Every ``queue_sample_interval_s``: queue bytes and items summed over this worker's connections,
        and the frames and bytes each connection sent folded into the counters. (Sampled, not set at
        scrape, so every worker's value is current whichever worker is scraped.)"""
        while True:
            conns = list(self.connections)
            for c in conns:
                c.fold_metrics()
            self.metrics.queue_bytes.set(sum(c.queue.queued_bytes for c in conns))
            self.metrics.queue_items.set(sum(len(c.queue) for c in conns))
            await asyncio.sleep(self.config.queue_sample_interval_s)

    async def _heartbeats(self) -> None:
        """PROTOCOL.md section 4: a connection that has sent nothing for ``heartbeat_interval_s`` gets a
        heartbeat. One ticker for the worker, at a quarter of the interval, so a heartbeat goes out
        1 to 1.25 intervals after the last frame."""
        interval_s = self.limits.heartbeat_interval_s
        beat = Item(Kind.HEARTBEAT)
        while True:
            await asyncio.sleep(interval_s / 4)
            now_s = time.monotonic()
            for conn in self.connections:
                if not conn.queue.items and not conn.closing and now_s - conn.last_send_s >= interval_s:
                    conn.push(beat)

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
        try:
            announced = wire.loads(msg.data)
            entries = announced["instruments"]
        except (ValueError, KeyError, TypeError):
            self.metrics.bad_upstream.inc()
            return
        for entry in entries:
            inst = entry.get("instrument")
            if not isinstance(inst, str):
                continue
            self.directory[inst] = entry
            hub = self.hubs.get(inst)
            if hub is not None:
                hub.on_directory(entry.get("epoch", ""), int(entry.get("seq", 0)))

    async def hub(self, instrument: str) -> Hub:
        """The hub of ``instrument``, created (NATS subscription + snapshot fetch) on first use."""
        hub = self.hubs.get(instrument)
        if hub is not None:
            return hub
        hub = Hub(self, instrument, self.config.ring_size)
        self.hubs[instrument] = hub
        await hub.start()
        self.metrics.instruments.set(len(self.hubs))
        return hub

    async def stop(self) -> None:
        for task in (self._sampler, self._heartbeater):
            if task is not None:
                task.cancel()
        for hub in self.hubs.values():
            await hub.stop()
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()
        if self.otlp is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.otlp.shutdown)

    @property
    def ready(self) -> bool:
        return self.nc is not None and self.nc.is_connected and not self.draining

    # -- WebSocket ----------------------------------------------------------------------------
    async def ws_handler(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            heartbeat=self.config.ws_ping_interval_s,
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
        conn = Connection(self, ws, request.remote or "?", request.transport)
        self.connections.add(conn)
        self.metrics.clients.inc()
        loop = asyncio.get_running_loop()
        conn.writer = loop.create_task(conn.run_writer())
        reader = loop.create_task(self._read_requests(conn, ws))
        try:
            await asyncio.wait({reader, conn.close_request}, return_when=asyncio.FIRST_COMPLETED)
            if conn.close_request.done():
                # The writer has sent everything queued before the close. Close from this task, with no
                # receive() pending: aiohttp then waits for the client's close frame (reading what the
                # client still sends) before closing the socket. Closing while a receive() is pending
                # drops the socket at once, and unread input makes the kernel reset the connection,
                # discarding our close frame on the way.
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
                code, reason = conn.close_request.result()
                await ws.close(code=code, message=reason)
        finally:
            reader.cancel()
            conn.writer.cancel()
            self._drop(conn)
            if ws.close_code == CloseCode.MESSAGE_TOO_BIG:
                self.metrics.closes[CloseCode.MESSAGE_TOO_BIG].inc()
        return ws

    async def _read_requests(self, conn: Connection, ws: web.WebSocketResponse) -> None:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await self._on_request(conn, msg.data)
            elif msg.type is WSMsgType.BINARY:
                self.metrics.closes[CloseCode.POLICY_VIOLATION].inc()
                conn.closing = True
                await ws.close(code=CloseCode.POLICY_VIOLATION, message=b"binary frames are not accepted")
                return

    def _drop(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self.metrics.clients.dec()
        conn.closing = True
        conn.fold_metrics()
        conn.dropped.set_result(None)
        for inst in conn.subs:
            hub = self.hubs.get(inst)
            if hub is not None:
                hub.subscribers.pop(conn, None)
                hub.trade_subscribers.discard(conn)
                hub.parked.discard(conn)

    async def _on_request(self, conn: Connection, data: bytes) -> None:
        verdict = conn.limiter.check(time.monotonic())
        if verdict is Verdict.CLOSE:
            self.metrics.errors[ErrorCode.RATE_LIMITED].inc()
            conn.close(CloseCode.RATE_LIMITED, "too many rate-limited requests")
            return
        try:
            req = proto.parse_request(data, self.limits)
        except ProtocolError as exc:
            self.metrics.requests["invalid"].inc()
            if verdict is Verdict.REJECT:
                exc = ProtocolError(ErrorCode.RATE_LIMITED, "request rate over limit", exc.request_id)
            self._error(conn, exc)
            return
        if verdict is Verdict.REJECT:
            self._error(conn, ProtocolError(ErrorCode.RATE_LIMITED, "request rate over limit", req.id))
            return
        try:
            if isinstance(req, proto.Subscribe):
                self.metrics.requests["subscribe"].inc()
                await self._subscribe(conn, req)
            elif isinstance(req, proto.Unsubscribe):
                self.metrics.requests["unsubscribe"].inc()
                self._unsubscribe(conn, req)
            elif isinstance(req, proto.Resync):
                self.metrics.requests["resync"].inc()
                self._resync(conn, req)
            elif isinstance(req, proto.Ping):
                self.metrics.requests["ping"].inc()
                conn.push_ctrl(proto.pong(req.id, time.time_ns()))
        except ProtocolError as exc:
            self._error(conn, exc)
        except Exception:  # noqa: BLE001 - never let one request take the connection down
            log.exception("internal error handling %s from %s", type(req).__name__, conn.peer)
            self._error(conn, ProtocolError(ErrorCode.INTERNAL, "internal error", req.id))

    def _error(self, conn: Connection, exc: ProtocolError) -> None:
        self.metrics.errors[exc.code].inc()
        conn.push_ctrl(proto.error(exc.code, exc.message, exc.request_id))

    def _known(self, instrument: str) -> bool:
        return instrument in self.directory or instrument in self.hubs

    async def _subscribe(self, conn: Connection, req: proto.Subscribe) -> None:
        unknown = [i for i in req.instruments if not self._known(i)]
        if unknown:
            shown = ", ".join(repr(i) for i in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise ProtocolError(ErrorCode.UNKNOWN_INSTRUMENT, f"no instrument {shown}", req.id)
        new = [i for i in req.instruments if i not in conn.subs]
        if len(conn.subs) + len(new) > self.limits.max_instruments_per_connection:
            raise ProtocolError(
                ErrorCode.TOO_MANY_INSTRUMENTS,
                f"{len(conn.subs) + len(new)} instruments over the limit of "
                f"{self.limits.max_instruments_per_connection} per connection",
                req.id,
            )
        book = "book" in req.channels
        trades = "trades" in req.channels
        hubs = {i: await self.hub(i) for i in req.instruments}
        recovered: dict[str, bool] = {}
        plans: list[tuple[str, list | None]] = []
        for inst in req.instruments:
            hub = hubs[inst]
            ring = None
            if book and inst in req.resume and inst in new and hub.ready.is_set():
                epoch, seq = req.resume[inst]
                ring = hub.ring_since(epoch, seq)
            recovered[inst] = ring is not None
            plans.append((inst, ring))
            conn.subs[inst] = Sub(req.conflate_ms, book, trades)
            if book:
                hub.subscribers[conn] = req.conflate_ms
            else:
                hub.subscribers.pop(conn, None)
                conn.sent.pop(inst, None)
            if trades:
                hub.trade_subscribers.add(conn)
                await hub.ensure_trades()
            else:
                hub.trade_subscribers.discard(conn)
        conn.push_ctrl(proto.subscribed(req.id, list(req.instruments), recovered))
        now_ns = time.time_ns()
        for inst, ring in plans:
            if not book:
                continue
            if ring is None:
                conn.push(Item(Kind.SNAP, inst))
                continue
            epoch, seq = req.resume[inst]
            conn.sent[inst] = SentState(epoch, seq)
            for d_epoch, d_seq, d_prev, payload in ring:
                conn.push(Item(Kind.DATA, inst, wire.with_send_ts(payload, now_ns), d_epoch, d_seq, d_prev))

    def _unsubscribe(self, conn: Connection, req: proto.Unsubscribe) -> None:
        for inst in req.instruments:
            if conn.subs.pop(inst, None) is None:
                continue
            conn.sent.pop(inst, None)
            conn.conflating.pop(inst, None)
            hub = self.hubs.get(inst)
            if hub is not None:
                hub.subscribers.pop(conn, None)
                hub.trade_subscribers.discard(conn)
                hub.parked.discard(conn)
        conn.push_ctrl(proto.unsubscribed(req.id, list(req.instruments)))

    def _resync(self, conn: Connection, req: proto.Resync) -> None:
        sub = conn.subs.get(req.instrument)
        if sub is None or not sub.book:
            code = ErrorCode.UNKNOWN_INSTRUMENT if not self._known(req.instrument) else ErrorCode.BAD_REQUEST
            raise ProtocolError(code, f"not subscribed to the book of {req.instrument!r}", req.id)
        conn.push(Item(Kind.SNAP, req.instrument))

    # -- REST ---------------------------------------------------------------------------------
    async def book_handler(self, request: web.Request) -> web.Response:
        instrument = request.match_info["instrument"]
        try:
            split_instrument(instrument)
        except ValueError:
            return _json_error(400, ErrorCode.BAD_REQUEST, f"bad instrument id {instrument!r}")
        hub = self.hubs.get(instrument)
        if hub is not None and hub.ready.is_set():
            body = hub.snapshot_bytes()
        elif self._known(instrument):
            try:
                reply = await self.nc.request(snapshot_subject(instrument), b"", timeout=self.snapshot_timeout_s)
            except Exception as exc:  # noqa: BLE001 - upstream unavailable
                return _json_error(503, ErrorCode.INTERNAL, f"snapshot of {instrument!r} unavailable: {type(exc).__name__}")
            body = reply.data
        else:
            return _json_error(404, ErrorCode.UNKNOWN_INSTRUMENT, f"no instrument {instrument!r}")
        return web.Response(body=wire.with_send_ts(body, time.time_ns()), content_type="application/json")

    async def instruments_handler(self, request: web.Request) -> web.Response:
        out = []
        for inst in sorted(self.directory.keys() | self.hubs.keys()):
            entry = dict(self.directory.get(inst, {}))
            hub = self.hubs.get(inst)
            if hub is not None and hub.ready.is_set():
                entry["epoch"], entry["seq"] = hub.epoch, hub.seq
            item = {"instrument": inst, "venue": split_instrument(inst)[0], "epoch": entry.get("epoch", ""),
                    "seq": entry.get("seq", 0)}
            if entry.get("tick_size") is not None:
                item["tick_size"] = entry["tick_size"]
            out.append(item)
        return web.Response(body=wire.dumps({"instruments": out}), content_type="application/json")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        if self.ready:
            return web.Response(text="ready\n")
        why = "draining" if self.draining else "not connected to NATS"
        return web.Response(status=503, text=f"not ready: {why}\n")

    async def metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=prom.exposition(self.registry), content_type="text/plain", charset="utf-8")

    # -- shutdown -----------------------------------------------------------------------------
    async def drain(self) -> None:
        """Send ``shutdown`` to every client, give writers a moment to flush, then close with 1001."""
        self.draining = True
        notice = proto.shutdown(self.config.shutdown_reconnect_after_ms)
        conns = list(self.connections)
        for conn in conns:
            conn.push_ctrl(notice)
            conn.close(CloseCode.GOING_AWAY, "gateway going away")
        if conns:
            await asyncio.wait([c.dropped for c in conns], timeout=self.config.drain_timeout_s)


def _json_error(status: int, code: ErrorCode, message: str) -> web.Response:
    return web.Response(status=status, body=wire.dumps({"type": "error", "code": code.value, "message": message}),
                        content_type="application/json")


def create_app(config: GatewayConfig, registry: CollectorRegistry | None = None) -> web.Application:
    """An aiohttp application serving one gateway worker (NATS connects on startup)."""
    gw = Gateway(config, registry)
    app = web.Application()
    app["gateway"] = gw
    app.router.add_get("/v1/ws", gw.ws_handler)
    app.router.add_get("/v1/book/{instrument}", gw.book_handler)
    app.router.add_get("/v1/instruments", gw.instruments_handler)
    app.router.add_get("/healthz", gw.healthz)
    app.router.add_get("/readyz", gw.readyz)
    app.router.add_get("/metrics", gw.metrics_handler)
    from feed.gateway.viewer import add_routes as add_viewer_routes; add_viewer_routes(app)  # noqa: E702 - book viewer at / (issue 12)

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
