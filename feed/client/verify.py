"""Verified local books from a bookcast stream: the pure core of the client SDK.

``VerifiedBooks.on_message(msg, recv_ns)`` takes one decoded server message (PROTOCOL.md section 4) and
the time it was received, updates the local books, and returns what happened: *events* for the user
(``BookUpdated``, ``GapDetected``, ...) and *actions* the connection must carry out (``SendResync``).
No I/O, no clock: the adapter (``feed.client.sdk``) passes ``recv_ns`` and sends the actions. Messages are
decoded by the one wire model (``feed.wire.decode``), continuity is ``feed.book.SequencedBook.apply``
(strict: a duplicate is a gap too, the gateway never sends one) and latencies are ``feed.hops.hops_of``.

Rules, per instrument (a "fault" drops the book, counts it, emits ``GapDetected`` and ``SendResync``;
until the next snapshot the instrument has no book and its deltas are ignored):

=========  ==================================================================================
message    rule
=========  ==================================================================================
snapshot   replaces the book at (epoch, seq); checksum differs from the book's: fault (sec 6).
delta      no book (awaiting a snapshot): ignored, counted in ``deltas_ignored``.
           epoch differs from the book's: fault ``epoch_change`` (sec 4).
           ``prev_seq`` differs from the held seq: fault ``seq_gap``; a conflated delta whose
           ``prev_seq`` is the held seq applies normally, however far ``seq`` skips (sec 4).
           else the changes are applied, seq = ``seq``, checksum differs: fault (sec 6).
resync     drops the book (a snapshot follows), counted by reason (sec 4).
heartbeat  for each held book, "behind" means the heartbeat's ``[epoch, seq]`` has another epoch or a
           higher seq. Behind at two heartbeats in a row while the book did not move in between (no
           delta arrived to reveal the loss): fault ``stale_heartbeat``. One heartbeat behind is allowed
           (a delta may be in flight or held back by conflation); equal or ahead is fine.
other      trade, subscribed, unsubscribed (drops those books), pong, error, shutdown: events.
           Unknown types and unknown fields are ignored (sec 10).
=========  ==================================================================================

A data message with a missing or malformed field for an instrument whose book is held is a fault
(``bad_message``): the book cannot be trusted past it. Messages the client cannot attribute to an
instrument are counted in ``bad_messages`` and otherwise ignored.
"""
from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from feed import wire
from feed.book import APPLIED, EPOCH_CHANGE, L2Book, SequencedBook
from feed.errors import ChecksumMismatch, RemoteError, SeqGap, WireError
from feed.hops import Hop, hops_of
from feed.model import AggressorSide


class UpdateKind(enum.StrEnum):
    SNAPSHOT = "snapshot"
    DELTA = "delta"


class GapReason(enum.StrEnum):
    """Why the client dropped a book and asked for ``resync``."""

    SEQ_GAP = "seq_gap"
    EPOCH_CHANGE = "epoch_change"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    STALE_HEARTBEAT = "stale_heartbeat"
    BAD_MESSAGE = "bad_message"


# -- actions: what the connection must send --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendResync:
    """Send ``{"op": "resync", "instrument": ...}`` (PROTOCOL.md section 3)."""

    instrument: str
    reason: GapReason


Action = SendResync


# -- events: what the user sees --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BookUpdated:
    """A snapshot or delta was applied and verified.

    ``book`` is the live local book: later messages keep mutating it (``book.copy()`` to keep this
    state). ``hops`` is every hop of ``feed.hops`` the message's stamps give (signed ns); the three
    latency fields are views of it, ``None`` when a stamp is missing: ``latency_ns`` is ``Hop.CLIENT``
    (``recv_ns - ts_send_ns``), ``publish_latency_ns`` is ``Hop.NATS_GATEWAY + Hop.CLIENT``
    (``recv_ns - ts_publish_ns``), ``e2e_ns`` is ``Hop.E2E`` (from ``ts_event_ns``, or ``ts_ingest_ns``
    when the venue gives no event time). Clocks of different hosts may disagree, so these can be negative.
    """

    instrument: str
    kind: UpdateKind
    book: L2Book
    epoch: str
    seq: int
    recv_ns: int
    latency_ns: int | None
    publish_latency_ns: int | None
    e2e_ns: int | None
    msg: dict[str, Any] = field(repr=False)
    hops: dict[Hop, int] = field(default_factory=dict, repr=False)
    """Every hop (``feed.hops``) the message's stamps give, signed ns."""


@dataclass(frozen=True, slots=True)
class BookCrossed:
    """After a verified update the book's best bid >= best ask (the server's book is crossed too)."""

    instrument: str
    seq: int
    best_bid: Decimal
    best_ask: Decimal


@dataclass(frozen=True, slots=True)
class GapDetected:
    """The client found the book untrustworthy, dropped it and asked for ``resync``.

    ``detail`` names the fields, e.g. ``seq gap instrument=coinbase:BAND-GBP expected=43 got=45``.
    """

    instrument: str
    reason: GapReason
    detail: str
    error: RemoteError


@dataclass(frozen=True, slots=True)
class ResyncReceived:
    """The server sent ``resync`` (reason ``slow_consumer``, ``upstream_gap``, ``epoch_change``, or a new
    one): the book was dropped and a snapshot follows."""

    instrument: str
    reason: str


@dataclass(frozen=True, slots=True)
class TradeEvent:
    """A ``trade`` message. ``side`` is the aggressor's; ``e2e_ns`` as in ``BookUpdated``."""

    instrument: str
    price: Decimal
    size: Decimal
    side: AggressorSide
    trade_id: str | None
    recv_ns: int
    e2e_ns: int | None
    msg: dict[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class Subscribed:
    id: int | str | None
    instruments: list[str]
    recovered: dict[str, bool]  # instrument -> its ``resume`` succeeded (missed deltas follow)


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    id: int | str | None
    instruments: list[str]


@dataclass(frozen=True, slots=True)
class Pong:
    id: int | str | None
    ts_send_ns: int | None
    recv_ns: int


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    """An ``error`` reply (PROTOCOL.md section 5). ``id`` echoes the request's, when there was one."""

    id: int | str | None
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class StatusReceived:
    """An ``instrument_status`` (PROTOCOL.md section 11): the gateway's view of ``instrument`` changed to
    ``status`` (``ok``, ``stale``, ``crossed``, ``resyncing``, ``halted``, ``resolved``, or a newer one)
    at ``since_ns`` (ns since the Unix epoch, None when not given). The book is not changed by it."""

    instrument: str
    status: str
    reason: str
    since_ns: int | None


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The gateway is draining: reconnect (elsewhere) after ``reconnect_after_ms`` and resume."""

    reconnect_after_ms: int


Event = (
    BookUpdated | BookCrossed | GapDetected | ResyncReceived | TradeEvent | Subscribed | Unsubscribed
    | Pong | ErrorReceived | Shutdown | StatusReceived
)


# -- state -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class ClientStats:
    """Counters since the client started. ``gaps`` counts every broken history the client detected
    (``seq_gap`` + ``epoch_change`` + ``stale_heartbeat``); checksum mismatches are counted apart.
    ``epoch_changes`` counts each time an instrument's epoch differed from the last one seen.
    ``reconnects``, ``connect_failures``, ``events_dropped`` and the region moves (``failovers`` by reason,
    their summed and longest ``duration_s`` in s) are kept by the adapter."""

    messages: int = 0
    snapshots: int = 0
    deltas: int = 0
    deltas_ignored: int = 0  # arrived while awaiting a snapshot
    trades: int = 0
    heartbeats_seen: int = 0
    gaps: int = 0
    epoch_changes: int = 0
    stale_heartbeat_gaps: int = 0
    checksum_mismatches: int = 0
    bad_messages: int = 0
    crossed_books: int = 0
    resyncs_requested: int = 0
    resyncs_received: Counter[str] = field(default_factory=Counter)  # by server reason
    reconnects: int = 0
    connect_failures: int = 0
    events_dropped: int = 0
    failovers: Counter[str] = field(default_factory=Counter)  # region moves by reason (feed.client.regions)
    failover_seconds_total: float = 0.0  # summed RegionMoved.duration_s
    failover_seconds_max: float = 0.0


class LocalBook(SequencedBook):
    """One instrument's verified book at ``(epoch, seq)`` (a ``feed.book.SequencedBook``) and the timing
    of its last update (ns)."""

    __slots__ = ("last_recv_ns", "latency_ns", "publish_latency_ns", "e2e_ns", "hops", "updates", "stale_at")

    def __init__(self, instrument: str, book: L2Book, epoch: str, seq: int, last_recv_ns: int) -> None:
        super().__init__(instrument, epoch, seq, book)
        self.last_recv_ns = last_recv_ns
        self.latency_ns: int | None = None
        self.publish_latency_ns: int | None = None
        self.e2e_ns: int | None = None
        self.hops: dict[Hop, int] = {}
        self.updates = 0
        self.stale_at: tuple[str, int] | None = None  # (epoch, seq) held at a heartbeat that found it behind


class VerifiedBooks:
    """Per-instrument verified books; see the module docstring for the rules.

    ``books`` maps instrument -> ``LocalBook`` for every book currently held (dropped books are absent,
    never stale). ``stats`` holds the counters.
    """

    def __init__(self) -> None:
        self.books: dict[str, LocalBook] = {}
        self.stats = ClientStats()
        self._last_epoch: dict[str, str] = {}
        self._handlers = {
            wire.Snapshot: self._on_snapshot,
            wire.Delta: self._on_delta,
            wire.Heartbeat: self._on_heartbeat,
            wire.ResyncMsg: self._on_resync,
            wire.TradeMsg: self._on_trade,
            wire.Subscribed: self._on_subscribed,
            wire.Unsubscribed: self._on_unsubscribed,
            wire.Pong: self._on_pong,
            wire.ErrorMsg: self._on_error,
            wire.ShutdownMsg: self._on_shutdown,
            wire.InstrumentStatus: self._on_status,
        }

    def book(self, instrument: str) -> L2Book | None:
        local = self.books.get(instrument)
        return None if local is None else local.book

    def resume_map(self) -> dict[str, dict[str, Any]]:
        """``{instrument: {"epoch": str, "seq": int}}`` for every held book: the ``resume`` of section 3."""
        return {i: {"epoch": b.epoch, "seq": b.seq} for i, b in self.books.items()}

    def on_disconnect(self) -> None:
        """The connection ended: heartbeat suspicions belong to it and are forgotten; books are kept for
        ``resume``."""
        for local in self.books.values():
            local.stale_at = None

    def on_message(self, msg: dict[str, Any] | bytes | str, recv_ns: int) -> list[Action | Event]:
        """Apply one server message (decoded JSON object, or its text) received at ``recv_ns`` (ns since
        the Unix epoch).

        Returns actions (``SendResync``) and events in the order they happened. Never raises on bad
        input: remote faults become ``GapDetected`` + ``SendResync`` or are counted in ``bad_messages``.
        """
        self.stats.messages += 1
        try:
            decoded = wire.decode(msg)
        except WireError as exc:
            self.stats.bad_messages += 1
            instrument = exc.instrument
            if instrument is None and isinstance(msg, dict) and isinstance(msg.get("instrument"), str):
                instrument = msg["instrument"]
            if instrument is not None and instrument in self.books:
                return self._fault(instrument, GapReason.BAD_MESSAGE, exc)
            if exc.msg_type == "delta" and instrument is not None:
                self.stats.deltas += 1  # a delta for a book we do not hold: it would have been ignored
                self.stats.deltas_ignored += 1
                self.stats.bad_messages -= 1
            return []
        handler = self._handlers.get(type(decoded))  # unknown types: ignored (section 10)
        if handler is None:
            return []
        return handler(decoded, recv_ns)

    # -- data ------------------------------------------------------------------------------------
    def _on_snapshot(self, msg: wire.Snapshot, recv_ns: int) -> list[Action | Event]:
        instrument = msg.instrument
        book = L2Book(instrument)
        book.apply_snapshot(msg.bids, msg.asks)
        self.stats.snapshots += 1
        self._note_epoch(instrument, msg.epoch)
        computed = book.checksum()
        if computed != msg.checksum:
            mismatch = ChecksumMismatch(instrument, msg.seq, computed, msg.checksum)
            return self._fault(instrument, GapReason.CHECKSUM_MISMATCH, mismatch)
        local = self.books[instrument] = LocalBook(instrument, book, msg.epoch, msg.seq, recv_ns)
        return self._updated(local, UpdateKind.SNAPSHOT, msg, recv_ns)

    def _on_delta(self, msg: wire.Delta, recv_ns: int) -> list[Action | Event]:
        instrument = msg.instrument
        self.stats.deltas += 1
        local = self.books.get(instrument)
        if local is None:
            self.stats.deltas_ignored += 1
            return []
        self._note_epoch(instrument, msg.epoch)
        held_epoch, held_seq = local.epoch, local.seq
        verdict = local.apply(msg, strict=True)
        if verdict is EPOCH_CHANGE:
            gap = SeqGap(instrument, held_seq, msg.prev_seq, epoch_changed=True, held_epoch=held_epoch,
                         got_epoch=msg.epoch)
            return self._fault(instrument, GapReason.EPOCH_CHANGE, gap)
        if verdict is not APPLIED:
            return self._fault(instrument, GapReason.SEQ_GAP, SeqGap(instrument, held_seq, msg.prev_seq))
        computed = local.book.checksum()
        if computed != msg.checksum:
            mismatch = ChecksumMismatch(instrument, msg.seq, computed, msg.checksum)
            return self._fault(instrument, GapReason.CHECKSUM_MISMATCH, mismatch)
        return self._updated(local, UpdateKind.DELTA, msg, recv_ns)

    def _updated(
        self, local: LocalBook, kind: UpdateKind, msg: wire.Snapshot | wire.Delta, recv_ns: int
    ) -> list[Action | Event]:
        hops = hops_of(msg.raw, recv_ns)
        local.last_recv_ns = recv_ns
        local.hops = hops
        # the three latency fields are views of ``hops`` (one vocabulary, feed.hops), kept for callers
        client, nats_gateway = hops.get(Hop.CLIENT), hops.get(Hop.NATS_GATEWAY)
        local.latency_ns = client
        local.publish_latency_ns = None if client is None or nats_gateway is None else nats_gateway + client
        local.e2e_ns = hops.get(Hop.E2E)
        local.updates += 1
        out: list[Action | Event] = [
            BookUpdated(
                local.instrument, kind, local.book, local.epoch, local.seq, recv_ns,
                local.latency_ns, local.publish_latency_ns, local.e2e_ns, msg.raw, hops,
            )
        ]
        if local.book.is_crossed():
            self.stats.crossed_books += 1
            bid, ask = local.book.best_bid(), local.book.best_ask()
            assert bid is not None and ask is not None
            out.append(BookCrossed(local.instrument, local.seq, bid[0], ask[0]))
        return out

    def _fault(
        self, instrument: str, reason: GapReason, error: RemoteError, detail: str | None = None
    ) -> list[Action | Event]:
        self.books.pop(instrument, None)
        if reason is GapReason.CHECKSUM_MISMATCH:
            self.stats.checksum_mismatches += 1
        elif reason is not GapReason.BAD_MESSAGE:
            self.stats.gaps += 1
            if reason is GapReason.STALE_HEARTBEAT:
                self.stats.stale_heartbeat_gaps += 1
        self.stats.resyncs_requested += 1
        return [GapDetected(instrument, reason, detail or str(error), error), SendResync(instrument, reason)]

    def _note_epoch(self, instrument: str, epoch: str) -> None:
        last = self._last_epoch.get(instrument)
        if last is not None and last != epoch:
            self.stats.epoch_changes += 1
        self._last_epoch[instrument] = epoch

    # -- control ---------------------------------------------------------------------------------
    def _on_heartbeat(self, msg: wire.Heartbeat, recv_ns: int) -> list[Action | Event]:
        self.stats.heartbeats_seen += 1
        out: list[Action | Event] = []
        for instrument, local in list(self.books.items()):
            position = msg.seqs.get(instrument)
            if position is None:
                continue
            hb_epoch, hb_seq = position
            if hb_epoch == local.epoch and hb_seq <= local.seq:
                local.stale_at = None
                continue
            held = (local.epoch, local.seq)
            if local.stale_at != held:
                local.stale_at = held  # first heartbeat to find it behind: a delta may be in flight
                continue
            error = SeqGap(instrument, local.seq, hb_seq, epoch_changed=hb_epoch != local.epoch)
            detail = (
                f"stale book instrument={instrument} held={local.epoch}:{local.seq} "
                f"heartbeat={hb_epoch}:{hb_seq} at two heartbeats"
            )
            out += self._fault(instrument, GapReason.STALE_HEARTBEAT, error, detail)
        return out

    def _on_resync(self, msg: wire.ResyncMsg, recv_ns: int) -> list[Action | Event]:
        self.stats.resyncs_received[msg.reason] += 1
        self.books.pop(msg.instrument, None)
        return [ResyncReceived(msg.instrument, msg.reason)]

    def _on_trade(self, msg: wire.TradeMsg, recv_ns: int) -> list[Action | Event]:
        event_ns = msg.ts_event_ns if msg.ts_event_ns is not None else msg.ts_ingest_ns
        self.stats.trades += 1
        return [
            TradeEvent(
                msg.instrument, msg.price, msg.size, AggressorSide(msg.side), msg.trade_id, recv_ns,
                None if event_ns is None else recv_ns - event_ns, msg.raw,
            )
        ]

    def _on_subscribed(self, msg: wire.Subscribed, recv_ns: int) -> list[Action | Event]:
        return [Subscribed(msg.raw.get("id"), msg.instruments, msg.recovered)]

    def _on_unsubscribed(self, msg: wire.Unsubscribed, recv_ns: int) -> list[Action | Event]:
        for instrument in msg.instruments:  # no more updates will come: a kept book would silently go stale
            self.books.pop(instrument, None)
        return [Unsubscribed(msg.raw.get("id"), msg.instruments)]

    def _on_pong(self, msg: wire.Pong, recv_ns: int) -> list[Action | Event]:
        return [Pong(msg.raw.get("id"), msg.ts_send_ns, recv_ns)]

    def _on_error(self, msg: wire.ErrorMsg, recv_ns: int) -> list[Action | Event]:
        return [ErrorReceived(msg.raw.get("id"), msg.code, msg.message)]

    def _on_shutdown(self, msg: wire.ShutdownMsg, recv_ns: int) -> list[Action | Event]:
        return [Shutdown(msg.reconnect_after_ms)]

    def _on_status(self, msg: wire.InstrumentStatus, recv_ns: int) -> list[Action | Event]:
        return [StatusReceived(msg.instrument, str(msg.status), msg.reason, msg.since_ns)]
