"""The session state machine: one client connection minus its socket (pure: requests in, frames out).

PROTOCOL.md sections 3-5, 7, 8 and 11 for one connection: request parsing and replies, the request rate
limit, subscriptions (atomic, with ``resume``), the bounded outbound queue and the slow-consumer policy,
conflation, heartbeats, the token's instrument patterns and expiry, and what the client holds per
instrument so it is never sent a delta it cannot apply.

No I/O, no clock: every input takes ``now_ns`` (wall clock, ns since the Unix epoch; also the value of
every ``ts_send_ns`` stamped here). The adapter (``feed.gateway.app``) feeds inbound text frames to
``on_text``, fans deltas in with ``push``/``conflate``, calls ``tick`` a few times per heartbeat interval,
and drains ``pull`` into the socket whenever ``wakeup`` is called. Instrument state comes from a
``Books`` (the adapter's table of ``feed.gateway.instrument.InstrumentMachine``); links between sessions
and instruments are the adapter's, made from the ``Link``/``Unlink`` actions returned here.

Connection states:

========  =====================================  ========  ==========================================
state     input                                  next      actions / effect
========  =====================================  ========  ==========================================
OPEN      request (text frame)                   OPEN      reply queued; ``Link``/``Unlink``
OPEN      over the rate limit 100 times in a row CLOSING   close 4029 queued
OPEN      3rd queue overflow within 60 s         CLOSING   data dropped, close 4008 queued
OPEN      token expired (``tick``)               CLOSING   close 4001 queued
OPEN      ``close`` (drain, policy)              CLOSING   close queued after what is queued
CLOSING   ``pull`` reaches the close             CLOSED    ``pull`` returns the close code
\\*       ``closed`` (the peer went away)        CLOSED    nothing more is queued
========  =====================================  ========  ==========================================

Per subscribed instrument the client holds one of: nothing (a snapshot is queued), ``PARKED`` (the
snapshot is waiting for the instrument machine to be serving), or ``SentState(epoch, seq)``.
"""
from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from feed import wire
from feed.gateway import protocol as proto
from feed.gateway.fanout import Admit, Conflated, Item, Kind, OutQueue, OverflowPolicy, SentState, admit
from feed.gateway.framing import text_frame
from feed.gateway.protocol import CloseCode, ErrorCode, GatewayLimits, ProtocolError, ResyncReason
from feed.gateway.ratelimit import RequestLimiter, Verdict
from feed.wire import Channel, Status


class SessionState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class SessionInput(enum.Enum):
    REQUEST = "request"
    CLOSE = "close"  # any close the gateway decides (4029, 4008, 4001, 1001, ...)
    CLOSE_SENT = "close_sent"  # ``pull`` reached the queued close
    PEER_GONE = "peer_gone"


TRANSITIONS: dict[tuple[SessionState, SessionInput], SessionState] = {
    (SessionState.OPEN, SessionInput.REQUEST): SessionState.OPEN,
    (SessionState.OPEN, SessionInput.CLOSE): SessionState.CLOSING,
    (SessionState.OPEN, SessionInput.PEER_GONE): SessionState.CLOSED,
    (SessionState.CLOSING, SessionInput.CLOSE_SENT): SessionState.CLOSED,
    (SessionState.CLOSING, SessionInput.PEER_GONE): SessionState.CLOSED,
    (SessionState.CLOSED, SessionInput.PEER_GONE): SessionState.CLOSED,
}


class Authorization(Protocol):
    """What a token allows (PROTOCOL.md section 8), from the adapter's authenticator.

    ``allows(instrument)``: may the session subscribe to it. ``expires_at_ns``: when the session must be
    closed with 4001 (ns since the Unix epoch), ``None`` for never.
    """

    expires_at_ns: int | None

    def allows(self, instrument: str) -> bool: ...


class InstrumentView(Protocol):
    """What a session reads of an instrument (``feed.gateway.instrument.InstrumentMachine`` is one)."""

    serving: bool
    epoch: str
    seq: int
    status: Status

    def snapshot_bytes(self) -> bytes: ...
    def ring_since(self, epoch: str, seq: int) -> list[tuple[str, int, int, bytes]] | None: ...
    def status_item(self, now_ns: int) -> Item: ...


class Books(Protocol):
    """The adapter's table of instruments, as a session sees it."""

    def known(self, instrument: str) -> bool: ...
    def get(self, instrument: str) -> InstrumentView | None: ...


# -- actions ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Link:
    """Fan ``instrument`` out to this session: the book (with ``conflate_ms``) and/or trades. The adapter
    creates the instrument machine (and its NATS subscriptions) if it has none."""

    instrument: str
    book: bool
    trades: bool
    conflate_ms: int


@dataclass(slots=True)
class Unlink:
    """Stop fanning ``instrument`` out to this session."""

    instrument: str


Action = Link | Unlink


@dataclass(slots=True)
class Sub:
    conflate_ms: int
    book: bool
    trades: bool


PARKED = "parked"
"""Held state of an instrument whose snapshot waits for its machine to be serving."""


@dataclass(slots=True)
class Close:
    """``pull`` reached the close: close the WebSocket with ``code`` and ``reason`` (UTF-8)."""

    code: int
    reason: bytes


def _noop() -> None:
    return None


_SENT_DELTA = ("sent", "delta")
_EMPTY_HEARTBEAT: list = [None, b""]  # [now_ns, frame] of the last heartbeat with no seqs (a cache keyed by its input)
_SENT_CONTROL = ("sent", "control")


def empty_heartbeat_frame(now_ns: int) -> bytes:
    """The heartbeat frame (WebSocket header + JSON) of every connection holding no book at ``now_ns``:
    ``{"type":"heartbeat","ts_send_ns":now_ns,"seqs":{}}`` (PROTOCOL.md section 4), byte-identical for all of
    them, so framed once per ``now_ns`` (the timer pass reads the clock once per slice) and the same bytes
    written to each."""
    if _EMPTY_HEARTBEAT[0] != now_ns:
        _EMPTY_HEARTBEAT[:] = [now_ns, text_frame(proto.heartbeat(now_ns, {}))]
    return _EMPTY_HEARTBEAT[1]


def count_heartbeats(tally: Counter, frames: int, size_bytes: int) -> None:
    """Tally ``frames`` heartbeats of ``heartbeat_through``, one socket write each, ``size_bytes`` in all
    (``tick_through`` counts one; the timer pass sums a slice over the sessions sharing a tally)."""
    tally[_SENT_CONTROL] += frames
    tally["bytes_sent"] += size_bytes
    tally["socket_writes"] += frames


class Session:
    """One client connection's protocol state; see the module docstring for the rules.

    Args:
        books: the adapter's instrument table.
        limits: PROTOCOL.md limits (``GatewayLimits``).
        now_ns: when the connection opened.
        authorization: the token's grants (section 8), ``None`` when auth is off.
        peer: a label for logs.

    ``wakeup`` is called (no arguments) whenever ``pull`` has something new; the adapter sets it.
    ``tally`` counts requests, errors, resyncs, closes and frames for the adapter's metrics:
    keys ``("request", op)``, ``("error", code)``, ``("resync", reason)``, ``("close", code)``,
    ``("sent", kind)``, ``"bytes_sent"``, ``"conflated"``, ``"slow_closes"``, ``"writer_gaps"``.
    """

    def __init__(self, books: Books, limits: GatewayLimits, now_ns: int, *,
                 authorization: Authorization | None = None, peer: str = "?", tally: Counter | None = None) -> None:
        self.books = books
        self.limits = limits
        self.authorization = authorization
        self.peer = peer
        self.state = SessionState.OPEN
        self.queue = OutQueue(limits.max_queue_bytes)
        self.overflows = OverflowPolicy(limits.max_overflows, limits.overflow_window_s)
        self.limiter = RequestLimiter(limits)
        self.subs: dict[str, Sub] = {}
        self.held: dict[str, SentState | str | None] = {}
        self.conflating: dict[str, Conflated] = {}  # open conflation windows
        self._flushing: dict[str, Conflated] = {}  # closed windows whose FLUSH item is queued
        # what was sent and asked for, folded into the metrics by the adapter; the adapter may hand every
        # session of a worker the same Counter (then one fold per sample covers them all)
        self.tally: Counter = Counter() if tally is None else tally
        self.last_send_ns = now_ns
        self.wakeup: Callable[[], None] = _noop
        self.sink: object | None = None  # the adapter's handle on the socket side; never read here

    # -- state ---------------------------------------------------------------------------------------
    def _go(self, event: SessionInput) -> None:
        self.state = TRANSITIONS.get((self.state, event), self.state)

    @property
    def closing(self) -> bool:
        """True once a close is queued or the peer is gone: nothing new is queued."""
        return self.state is not SessionState.OPEN

    def closed(self) -> list[Action]:
        """The peer went away (or the socket closed): unlink everything. Returns the ``Unlink`` s."""
        self._go(SessionInput.PEER_GONE)
        self.queue.drop_data()
        return [Unlink(inst) for inst in self.subs]

    def close(self, code: CloseCode | int, reason: str) -> None:
        """Queue a close after what is already queued (data is dropped): drain, policy, limits."""
        if self.closing:
            return
        self._go(SessionInput.CLOSE)
        self.tally[("close", int(code))] += 1
        self.queue.drop_data()
        self.queue.append(Item(Kind.CLOSE, None, reason.encode(), seq=int(code)))
        self.wakeup()

    # -- producer side (fan-out; never blocks) --------------------------------------------------------
    def push(self, item: Item, now_ns: int) -> None:
        """Queue one item; on overflow apply the slow-consumer policy (section 7)."""
        if self.state is not SessionState.OPEN:
            return
        if not self.queue.push(item):
            self._overflow(item.instrument, now_ns)
            return
        self.wakeup()

    def push_ctrl(self, payload: bytes) -> None:
        """Queue a reply or notice (JSON bytes); it is never dropped."""
        if self.state is SessionState.OPEN:
            self.queue.push(Item(Kind.CTRL, None, text_frame(payload)))
            self.wakeup()

    def resync(self, instrument: str, reason: ResyncReason, now_ns: int) -> None:
        """Queue ``resync`` then a snapshot marker for one instrument."""
        self.push(Item(Kind.RESYNC, instrument, text_frame(proto.resync(instrument, reason))), now_ns)
        self.push(Item(Kind.SNAP, instrument), now_ns)
        self.tally[("resync", reason.value)] += 1

    def conflate(self, instrument: str, delta: wire.Delta, conflate_ms: int, now_ns: int) -> float | None:
        """Merge a delta into the instrument's conflation window. Returns the delay (s) after which the
        adapter must call ``flush_window(instrument)`` when this opened a new window, else None."""
        if self.state is not SessionState.OPEN:
            return None
        pending = self.conflating.get(instrument)
        raw = delta.raw
        if pending is not None and pending.add(raw):
            self.tally["conflated"] += 1
            return None
        if pending is not None:  # does not chain on: flush what we have first
            self.flush_window(instrument, now_ns)
        self.conflating[instrument] = Conflated.start(raw)
        return conflate_ms / 1000

    def flush_window(self, instrument: str, now_ns: int) -> None:
        """The conflation window of ``instrument`` is over: queue the merged delta."""
        pending = self.conflating.pop(instrument, None)
        if pending is not None and self.state is SessionState.OPEN:
            self.push(Item(Kind.FLUSH, instrument, b"", pending.epoch, pending.seq, pending.first_prev_seq), now_ns)
            self._flushing[instrument] = pending

    def on_instrument_ready(self, instrument: str, now_ns: int) -> None:
        """The instrument's machine is serving: a parked snapshot can be built now."""
        if self.held.get(instrument) == PARKED and instrument in self.subs:
            self.held[instrument] = None
            self.push(Item(Kind.SNAP, instrument), now_ns)

    def _overflow(self, instrument: str | None, now_ns: int) -> None:
        lost = self.queue.drop_data()
        if instrument is not None:
            lost.add(instrument)
        if self.overflows.record(now_ns / 1e9):
            self.tally["slow_closes"] += 1
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer")
            return
        for inst in sorted(lost):
            if inst in self.subs:
                self.resync(inst, ResyncReason.SLOW_CONSUMER, now_ns)
        self.wakeup()

    def tick(self, now_ns: int) -> None:
        """Timers: a heartbeat when idle for ``heartbeat_interval_s`` (section 4); close 4001 once the
        token has expired (section 8)."""
        if self.state is not SessionState.OPEN:
            return
        auth = self.authorization
        if auth is not None and auth.expires_at_ns is not None and now_ns >= auth.expires_at_ns:
            self.close(CloseCode.UNAUTHORIZED, "token expired")
            return
        if not self.queue.items and now_ns - self.last_send_ns >= self.limits.heartbeat_interval_s * 1e9:
            self.push(Item(Kind.HEARTBEAT), now_ns)

    def tick_through(self, now_ns: int) -> bytes | None:
        """``tick`` for a connection whose socket takes a write now (nothing queued, nobody writing): a
        heartbeat that is due is returned as the frame to write, tallied as ``pull`` would tally it,
        instead of being queued (no item, no queue); a close it decides is queued as ``tick`` queues it."""
        frame = self.heartbeat_through(now_ns)
        if frame is not None:
            count_heartbeats(self.tally, 1, len(frame))
        return frame

    def heartbeat_through(self, now_ns: int) -> bytes | None:
        """``tick_through`` untallied, for the worker's timer pass (``feed.gateway.app.Gateway.tick_due``),
        which writes the frame at once and tallies a slice's heartbeats together (``count_heartbeats``):
        the heartbeat frame when one is due on a session with nothing queued (the shared
        ``empty_heartbeat_frame(now_ns)`` when it holds no book), else None. An expired token queues close
        4001 (``wakeup`` then runs the writer) and returns None."""
        if self.state is not SessionState.OPEN:
            return None
        auth = self.authorization
        if auth is not None and auth.expires_at_ns is not None and now_ns >= auth.expires_at_ns:
            self.close(CloseCode.UNAUTHORIZED, "token expired")
            return None
        if self.queue.items or now_ns - self.last_send_ns < self.limits.heartbeat_interval_s * 1e9:
            return None
        self.last_send_ns = now_ns
        return self._heartbeat_frame(now_ns)

    def _heartbeat_frame(self, now_ns: int) -> bytes:
        if not self.held:
            return empty_heartbeat_frame(now_ns)
        seqs = {i: (st.epoch, st.seq) for i, st in self.held.items() if type(st) is SentState and i in self.subs}
        if not seqs:  # the same bytes for every connection holding no book
            return empty_heartbeat_frame(now_ns)
        return text_frame(proto.heartbeat(now_ns, seqs))

    # -- requests ------------------------------------------------------------------------------------
    def on_text(self, data: bytes | str, now_ns: int) -> list[Action]:
        """One inbound text frame: rate limit, parse, handle (sections 3 and 5). Returns link changes."""
        if self.state is not SessionState.OPEN:
            return []
        verdict = self.limiter.check(now_ns / 1e9)
        if verdict is Verdict.CLOSE:
            self.tally[("error", ErrorCode.RATE_LIMITED.value)] += 1
            self.close(CloseCode.RATE_LIMITED, "too many rate-limited requests")
            return []
        try:
            req = proto.parse_request(data, self.limits)
        except ProtocolError as exc:
            self.tally[("request", "invalid")] += 1
            if verdict is Verdict.REJECT:
                exc = ProtocolError(ErrorCode.RATE_LIMITED, "request rate over limit", exc.request_id)
            self._error(exc)
            return []
        if verdict is Verdict.REJECT:
            self._error(ProtocolError(ErrorCode.RATE_LIMITED, "request rate over limit", req.id))
            return []
        self._go(SessionInput.REQUEST)
        try:
            if isinstance(req, proto.Subscribe):
                self.tally[("request", "subscribe")] += 1
                return self._subscribe(req, now_ns)
            if isinstance(req, proto.Unsubscribe):
                self.tally[("request", "unsubscribe")] += 1
                return self._unsubscribe(req)
            if isinstance(req, proto.ResyncRequest):
                self.tally[("request", "resync")] += 1
                self._resync(req, now_ns)
            elif isinstance(req, proto.Ping):
                self.tally[("request", "ping")] += 1
                self.push_ctrl(proto.pong(req.id, now_ns))
        except ProtocolError as exc:
            self._error(exc)
        return []

    def _error(self, exc: ProtocolError) -> None:
        self.tally[("error", exc.code.value)] += 1
        self.push_ctrl(proto.error(exc.code, exc.message, exc.request_id))

    def internal_error(self, request_id: wire.RequestId | None = None) -> None:
        """Reply ``internal`` (the adapter caught a bug while handling a request)."""
        self._error(ProtocolError(ErrorCode.INTERNAL, "internal error", request_id))

    @staticmethod
    def _named(instruments: list[str]) -> str:
        return ", ".join(proto.shown(i) for i in instruments[:5]) + (" ..." if len(instruments) > 5 else "")

    def _subscribe(self, req: proto.Subscribe, now_ns: int) -> list[Action]:
        unknown = [i for i in req.instruments if not self.books.known(i)]
        if unknown:
            raise ProtocolError(ErrorCode.UNKNOWN_INSTRUMENT, f"no instrument {self._named(unknown)}", req.id)
        auth = self.authorization
        if auth is not None:
            denied = [i for i in req.instruments if not auth.allows(i)]
            if denied:
                raise ProtocolError(ErrorCode.FORBIDDEN, f"token does not allow {self._named(denied)}", req.id)
        new = [i for i in req.instruments if i not in self.subs]
        limit = self.limits.max_instruments_per_connection
        if len(self.subs) + len(new) > limit:
            raise ProtocolError(ErrorCode.TOO_MANY_INSTRUMENTS,
                                f"{len(self.subs) + len(new)} instruments over the limit of {limit} per connection",
                                req.id)
        reserve = getattr(auth, "try_subscribe", None)  # per-token subscription cap (feed.gateway.hardening)
        if reserve is not None and new and not reserve(len(new)):
            raise ProtocolError(ErrorCode.TOO_MANY_INSTRUMENTS, "the token's subscription limit is reached", req.id)
        book = Channel.BOOK in req.channels
        trades = Channel.TRADES in req.channels
        actions: list[Action] = []
        recovered: dict[str, bool] = {}
        plans: list[tuple[str, list | None]] = []
        new_set = set(new)
        for inst in req.instruments:
            ring = None
            view = self.books.get(inst)
            if book and inst in req.resume and inst in new_set and view is not None and view.serving:
                epoch, seq = req.resume[inst]
                ring = view.ring_since(epoch, seq)
            recovered[inst] = ring is not None
            plans.append((inst, ring))
            self.subs[inst] = Sub(req.conflate_ms, book, trades)
            self.conflating.pop(inst, None)
            if not book:
                self.held.pop(inst, None)
            actions.append(Link(inst, book, trades, req.conflate_ms))
        self.push_ctrl(proto.subscribed(req.id, list(req.instruments), recovered))
        if book:
            for inst, ring in plans:
                if ring is None:
                    self.held[inst] = None
                    self.push(Item(Kind.SNAP, inst, first=True), now_ns)
                    continue
                epoch, seq = req.resume[inst]
                self.held[inst] = SentState(epoch, seq)
                for d_epoch, d_seq, d_prev, payload in ring:
                    frame = text_frame(wire.with_send_ts(payload, now_ns))
                    self.push(Item(Kind.DATA, inst, frame, d_epoch, d_seq, d_prev), now_ns)
        return actions

    def _unsubscribe(self, req: proto.Unsubscribe) -> list[Action]:
        actions: list[Action] = []
        for inst in req.instruments:
            if self.subs.pop(inst, None) is None:
                continue
            self.held.pop(inst, None)
            self.conflating.pop(inst, None)
            self._flushing.pop(inst, None)
            actions.append(Unlink(inst))
        released = getattr(self.authorization, "unsubscribed", None)
        if released is not None and actions:
            released(len(actions))
        self.push_ctrl(proto.unsubscribed(req.id, list(req.instruments)))
        return actions

    def _resync(self, req: proto.ResyncRequest, now_ns: int) -> None:
        sub = self.subs.get(req.instrument)
        if sub is None or not sub.book:
            code = ErrorCode.UNKNOWN_INSTRUMENT if not self.books.known(req.instrument) else ErrorCode.BAD_REQUEST
            raise ProtocolError(code, f"not subscribed to the book of {req.instrument!r}", req.id)
        self.push(Item(Kind.SNAP, req.instrument), now_ns)

    # -- write-through (the fan-out sends at once; see ``feed.gateway.app.Gateway._fan_out``) -----------
    def deliver_now(self, item: Item, now_ns: int) -> bytes | None:
        """Write-through of one data item: the frame to write to the socket now, or None when the client
        must not get it (it holds that seq already, awaits a snapshot, or the delta does not chain: then a
        resync is queued as ``pull`` would).

        Only valid when nothing is queued (``queue.items`` empty) and the state is OPEN: the frame then goes
        out exactly where ``push`` + ``pull`` would have put it, and what the client holds and the heartbeat
        clock move as they would; the adapter reports the socket write with ``wrote_through``. PROTOCOL.md section 7 is untouched: the bounded queue only
        ever holds what the socket did not take, and a caller writes through only while the socket takes it.
        """
        state = self.held.get(item.instrument)  # type: ignore[arg-type]
        if type(state) is not SentState:
            return None
        if item.prev_seq != state.seq or item.epoch != state.epoch:
            verdict = admit(state, item.epoch, item.seq, item.prev_seq)
            if verdict is Admit.GAP:
                self._writer_gap(item.instrument, now_ns)
            if verdict is not Admit.SEND:
                return None
        state.seq = item.seq
        self.last_send_ns = now_ns
        return item.payload

    def wrote_through(self, frames: int, size_bytes: int) -> None:
        """The adapter wrote ``frames`` frames of ``deliver_now`` (``size_bytes`` in all) in one socket write:
        tallied once per write, not per frame (``pull`` tallies once per pull likewise)."""
        count_written(self.tally, frames, size_bytes, 1)

    # -- consumer side (the writer) ----------------------------------------------------------------
    def pull(self, now_ns: int, max_bytes: int) -> tuple[list[bytes], Close | None]:
        """Take what is queued as WebSocket frames, up to about ``max_bytes`` (at least one item), in
        order. Returns ``(frames, close)``: ``close`` is set when the queued close was reached (send the
        frames, then close). Updates what the client holds; frames it must not get are skipped."""
        queue = self.queue
        frames: list[bytes] = []
        size = 0
        deltas = 0
        tally = self.tally
        held = self.held
        data = Kind.DATA
        while queue.items and size < max_bytes:
            item = queue.pop()
            kind = item.kind
            inst = item.instrument
            if kind is data:
                state = held.get(inst)
                if type(state) is SentState:
                    if item.prev_seq == state.seq and item.epoch == state.epoch:  # the common case, inline
                        verdict = Admit.SEND
                    else:
                        verdict = admit(state, item.epoch, item.seq, item.prev_seq)
                else:
                    verdict = Admit.SKIP
                if verdict is Admit.SEND:
                    state.seq = item.seq  # type: ignore[union-attr]
                    frames.append(item.payload)
                    size += len(item.payload)
                    deltas += 1
                elif verdict is Admit.GAP:
                    self._writer_gap(inst, now_ns)
                continue
            if kind is Kind.CLOSE:
                self._go(SessionInput.CLOSE_SENT)
                tally[("sent", "delta")] += deltas
                self._count(frames, size)
                return frames, Close(item.seq, item.payload)
            frame, label = self._frame_for(item, now_ns)
            if frame is not None:
                frames.append(frame)
                size += len(frame)
                tally[("sent", label)] += 1
                if kind is Kind.SNAP and item.first:
                    view = self.books.get(inst)
                    if view is not None and view.status is not Status.OK:
                        status = view.status_item(now_ns).payload
                        frames.append(status)
                        size += len(status)
                        tally[("sent", "control")] += 1
        if deltas:
            tally[("sent", "delta")] += deltas
        self._count(frames, size)
        return frames, None

    def _count(self, frames: list[bytes], size: int) -> None:
        if frames:
            self.tally["bytes_sent"] += size
            self.tally["socket_writes"] += 1

    def sent(self, now_ns: int) -> None:
        """The frames of the last ``pull`` were written (heartbeats count idleness from here)."""
        self.last_send_ns = now_ns

    def _frame_for(self, item: Item, now_ns: int) -> tuple[bytes | None, str]:
        kind = item.kind
        inst = item.instrument
        if kind is Kind.CTRL:
            return item.payload, "control"
        if kind is Kind.TRADE:
            return (item.payload if inst in self.subs else None), "trade"
        if kind is Kind.STATUS:
            sub = self.subs.get(inst)
            return (item.payload if sub is not None and sub.book else None), "control"
        if kind is Kind.RESYNC:
            if inst not in self.subs:
                return None, "control"
            self.held[inst] = None
            self._flushing.pop(inst, None)
            return item.payload, "control"
        if kind is Kind.SNAP:
            return self._snapshot_for(inst, now_ns), "snapshot"
        if kind is Kind.FLUSH:
            return self._conflated_for(item, now_ns), "delta"
        if kind is Kind.HEARTBEAT:
            return self._heartbeat_frame(now_ns), "control"
        raise ValueError(f"unexpected queue item {kind!r}")

    def _snapshot_for(self, instrument: str | None, now_ns: int) -> bytes | None:
        sub = self.subs.get(instrument)  # type: ignore[arg-type]
        if sub is None or not sub.book:
            return None
        view = self.books.get(instrument)  # type: ignore[arg-type]
        if view is None or not view.serving:
            self.held[instrument] = PARKED  # type: ignore[index]
            return None
        self.held[instrument] = SentState(view.epoch, view.seq)  # type: ignore[index]
        self._flushing.pop(instrument, None)  # type: ignore[arg-type]
        return text_frame(wire.with_send_ts(view.snapshot_bytes(), now_ns))

    def _conflated_for(self, item: Item, now_ns: int) -> bytes | None:
        pending = self._flushing.pop(item.instrument, None)  # type: ignore[arg-type]
        if pending is None or item.instrument not in self.subs:
            return None
        state = self.held.get(item.instrument)  # type: ignore[arg-type]
        if type(state) is not SentState:
            return None
        verdict = admit(state, pending.epoch, pending.seq, pending.first_prev_seq)
        if verdict is Admit.GAP:
            self._writer_gap(item.instrument, now_ns)
        if verdict is not Admit.SEND:
            return None
        msg = pending.message(state.seq)
        msg["ts_send_ns"] = now_ns
        self.held[item.instrument] = SentState(pending.epoch, pending.seq)  # type: ignore[index]
        return text_frame(wire.dumps(msg))

    def _writer_gap(self, instrument: str | None, now_ns: int) -> None:
        # The instrument machine only fans out deltas that chain on; reaching here means a bug. Never send
        # a delta the client cannot apply: resync it instead.
        self.tally["writer_gaps"] += 1
        if instrument is not None and instrument in self.subs:
            self.resync(instrument, ResyncReason.UPSTREAM_GAP, now_ns)


def count_written(tally: Counter, frames: int, size_bytes: int, writes: int) -> None:
    """Tally ``writes`` socket writes of ``frames`` write-through delta frames, ``size_bytes`` in all (what
    ``Session.wrote_through`` counts for one write; the adapter sums a loop pass's writes over the sessions
    sharing one tally and counts them with one call)."""
    tally[_SENT_DELTA] += frames
    tally["bytes_sent"] += size_bytes
    tally["socket_writes"] += writes
