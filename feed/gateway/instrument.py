"""The instrument state machine: one instrument on one gateway (pure: bytes and events in, actions out).

The gateway keeps, per instrument it serves, a copy of the book at exactly the seq it has fanned out
(so every snapshot it serves is consistent with the deltas that follow it), a ring of recent deltas to
serve ``resume``, and the instrument's status (PROTOCOL.md section 11). Core NATS is at-most-once, so the
machine checks every delta's ``epoch``/``prev_seq`` (``feed.book.SequencedBook.apply``) and the ingest's
checksum on its own book; on a gap, an epoch change, a checksum mismatch or a tail loss revealed by the
ingest's directory announcements it tells subscribers ``resync`` and asks for a snapshot, buffering
deltas meanwhile.

No I/O, no clock: every input takes ``now_ns`` (wall clock, ns since the Unix epoch). The adapter
(``feed.gateway.app``) moves bytes between NATS, this machine and the sessions, and carries out the
actions it returns.

States and transitions (input -> next state [actions]); ``*`` is any state:

=====================  ============================  ===================  ==================================
state                  input                         next state           actions
=====================  ============================  ===================  ==================================
AWAITING_SNAPSHOT      delta                         AWAITING_SNAPSHOT    buffer it
AWAITING_SNAPSHOT      snapshot reply                LIVE                 replay buffer, ReleaseParked
AWAITING_SNAPSHOT      snapshot failed               AWAITING_SNAPSHOT    RequestSnapshot (backoff)
LIVE                   delta that applies            LIVE                 FanOut
LIVE                   duplicate delta               LIVE                 (dropped)
LIVE                   duplicate seq, other content  RECOVERING           Resync, RequestSnapshot (one of
                                                                          the two was forged or replayed)
LIVE                   gap / epoch / bad checksum    RECOVERING           Resync, RequestSnapshot
LIVE                   directory ahead               SUSPECT              (remember the announced seq)
LIVE, SUSPECT          snapshot reply or failure     same                 (a late answer: ignored)
SUSPECT                delta that applies            SUSPECT              FanOut
SUSPECT                directory caught up           LIVE
SUSPECT                directory ahead, and the      RECOVERING           Resync, RequestSnapshot
                       first announced seq not held
SUSPECT                directory ahead, first        SUSPECT              (remember the new seq)
                       announced seq held
SUSPECT                gap / epoch / bad checksum    RECOVERING           Resync, RequestSnapshot
RECOVERING             delta                         RECOVERING           buffer it
RECOVERING             snapshot reply                LIVE                 replay buffer, ReleaseParked
RECOVERING             snapshot failed               RECOVERING           RequestSnapshot (backoff)
\\*                    instrument_status             same                 StatusChanged if it changed
\\*                    malformed message             same                 Rejected (book unchanged)
\\*                    unknown message type          same                 Ignored
=====================  ============================  ===================  ==================================

Replaying the buffer after a snapshot skips what the snapshot already contains (same epoch, seq not
after it) and deltas of another epoch (NATS delivers the ingest's deltas and its snapshot reply in
publish order, so those are from an older history); it may find another gap: the machine then goes
straight back to RECOVERING. A directory announcement is only trusted when no delta of the instrument is still waiting to
be handled (``backlog``, from the adapter): an overloaded gateway lagging behind its own queue has lost
nothing.

``judge_fallback`` (a query, no transition) tells the adapter whether a book from a fallback source (a region's
KV books, issue 9) may stand in for the ingest's answer: only when the held live deltas chain onto it, or
nothing is held to compare; never another epoch than the live stream's.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from feed import wire
from feed.book import APPLIED, DUPLICATE, EPOCH_CHANGE, SequencedBook
from feed.errors import ChecksumMismatch, RemoteError, WireError
from feed.gateway.fanout import Item, Kind
from feed.gateway.framing import text_frame
from feed.wire import ResyncReason, Status


class State(enum.Enum):
    AWAITING_SNAPSHOT = "awaiting_snapshot"
    LIVE = "live"
    SUSPECT = "suspect"
    RECOVERING = "recovering"


class Input(enum.Enum):
    DELTA = "delta"
    DUPLICATE = "duplicate"
    BREAK = "break"  # gap, epoch change or checksum mismatch
    SNAPSHOT = "snapshot"
    SNAPSHOT_FAILED = "snapshot_failed"
    DIRECTORY_AHEAD = "directory_ahead"
    DIRECTORY_LOSS = "directory_loss"  # ahead twice, the first announced seq still not held: a lost tail
    DIRECTORY_CAUGHT_UP = "directory_caught_up"


_S, _I = State, Input
TRANSITIONS: dict[tuple[State, Input], State] = {
    (_S.AWAITING_SNAPSHOT, _I.DELTA): _S.AWAITING_SNAPSHOT,
    (_S.AWAITING_SNAPSHOT, _I.SNAPSHOT): _S.LIVE,
    (_S.AWAITING_SNAPSHOT, _I.SNAPSHOT_FAILED): _S.AWAITING_SNAPSHOT,
    (_S.LIVE, _I.DELTA): _S.LIVE,
    (_S.LIVE, _I.DUPLICATE): _S.LIVE,
    (_S.LIVE, _I.BREAK): _S.RECOVERING,
    (_S.LIVE, _I.DIRECTORY_AHEAD): _S.SUSPECT,
    (_S.LIVE, _I.DIRECTORY_CAUGHT_UP): _S.LIVE,
    (_S.SUSPECT, _I.DELTA): _S.SUSPECT,
    (_S.SUSPECT, _I.DUPLICATE): _S.SUSPECT,
    (_S.SUSPECT, _I.BREAK): _S.RECOVERING,
    (_S.SUSPECT, _I.DIRECTORY_AHEAD): _S.SUSPECT,
    (_S.SUSPECT, _I.DIRECTORY_LOSS): _S.RECOVERING,
    (_S.SUSPECT, _I.DIRECTORY_CAUGHT_UP): _S.LIVE,
    (_S.RECOVERING, _I.DELTA): _S.RECOVERING,
    (_S.RECOVERING, _I.SNAPSHOT): _S.LIVE,
    (_S.RECOVERING, _I.SNAPSHOT_FAILED): _S.RECOVERING,
}
"""Every allowed (state, input) pair. Inputs not listed for a state are not fed in that state (a delta
while awaiting a snapshot is buffered as ``DELTA``; a directory announcement is not considered until live)."""

SERVING = frozenset({State.LIVE, State.SUSPECT})
"""States in which the book is current and may be served (snapshots, resume)."""


class Fallback(enum.Enum):
    """How a book from a fallback source (a region's KV books, which the leading ingest rewrites every second,
    ``feed.ha``) compares with what the machine knows of the live stream (``InstrumentMachine.judge_fallback``)."""

    CURRENT = "current"      # the held live deltas chain onto it: as good as the ingest's own answer
    PLAUSIBLE = "plausible"  # no live delta held to compare: the last book the leader kept (served only
                             # when no ingest is heard at all)
    STALE = "stale"          # older than the live stream: another epoch, behind the machine's own book, or
                             # a seq the held deltas do not chain from (never served)


class BreakCause(enum.StrEnum):
    """Why the machine stopped trusting its book (the adapter logs it and counts it)."""

    SEQ_GAP = "seq_gap"
    EPOCH_CHANGE = "epoch_change"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    TAIL_LOSS = "tail_loss"
    CONFLICTING_DUPLICATE = "conflicting_duplicate"  # two different deltas for one (epoch, seq)


# -- actions ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class FanOut:
    """Queue ``item`` (framed once, stamped ``ts_send_ns = now_ns``) for every book subscriber; a
    conflating subscriber merges ``delta`` instead. ``traceparent`` as received (OTLP)."""

    item: Item
    delta: wire.Delta
    traceparent: str | None
    ts_send_ns: int  # the stamp spliced into ``item``


@dataclass(slots=True)
class Resync:
    """Tell every book subscriber ``resync`` with ``reason`` (a snapshot follows once the machine is
    live again). ``cause`` and ``detail`` are for logs and metrics."""

    reason: ResyncReason
    cause: BreakCause
    detail: str


@dataclass(slots=True)
class RequestSnapshot:
    """Ask the ingest for a snapshot (NATS request/reply) after ``delay_s`` (0 = now); report the result
    with ``on_snapshot_reply`` or ``on_snapshot_failed``."""

    delay_s: float


@dataclass(slots=True)
class ReleaseParked:
    """The book is servable: sessions waiting for this instrument's snapshot can have it now."""


@dataclass(slots=True)
class StatusChanged:
    """The instrument's status changed: queue ``item`` (an ``instrument_status`` frame) for every book
    subscriber."""

    item: Item
    status: Status


@dataclass(slots=True)
class Rejected:
    """A malformed message from NATS was dropped; the book is unchanged."""

    error: RemoteError


@dataclass(slots=True)
class Ignored:
    """A message of an unknown type on the delta subject (section 10); counted, never fatal."""

    msg_type: object


Action = FanOut | Resync | RequestSnapshot | ReleaseParked | StatusChanged | Rejected | Ignored

SNAPSHOT_RETRY_S = (0.05, 2.0)
"""Backoff of snapshot requests after a failure: first delay and cap, in s (doubling)."""


class InstrumentMachine:
    """One instrument on one gateway; see the module docstring for the rules.

    Args:
        instrument: the instrument id.
        ring_size: recent deltas kept to serve ``resume`` (PROTOCOL notes: 4,096).
        verify_checksum: check each delta's ``checksum`` on the machine's own book (a mismatch resyncs).
        max_buffered: deltas kept while awaiting a snapshot (oldest dropped first).

    Attributes a reader may use: ``state``, ``book`` (a ``SequencedBook``), ``status``, ``status_reason``,
    ``status_since_ns``, ``gaps`` (breaks detected).
    """

    def __init__(self, instrument: str, ring_size: int = 4096, *, verify_checksum: bool = True,
                 max_buffered: int = 65536) -> None:
        self.instrument = instrument
        self.state = State.AWAITING_SNAPSHOT
        self.book = SequencedBook(instrument)
        self.ring: deque[tuple[str, int, int, bytes]] = deque(maxlen=ring_size)  # epoch, seq, prev_seq, payload
        # deltas waiting for a snapshot; the oldest go first past the bound (a replay then finds the gap
        # and asks again, never applies across it)
        self.buffer: deque[tuple[wire.Delta, bytes, str | None]] = deque(maxlen=max_buffered)
        self.status = Status.OK
        self.status_reason = ""
        self.status_since_ns: int | None = None
        self.gaps = 0
        self.verify_checksum = verify_checksum
        self._suspect: tuple[str, int] | None = None
        self._retry_s = 0.0
        self._snapshot_cache: tuple[str, int, Status, bytes] | None = None

    # -- inspection ---------------------------------------------------------------------------------
    @property
    def serving(self) -> bool:
        """True when the book is current: snapshots and ``resume`` may be served from it."""
        return self.state in SERVING

    @property
    def epoch(self) -> str:
        return self.book.epoch

    @property
    def seq(self) -> int:
        return self.book.seq

    def _go(self, event: Input) -> None:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise AssertionError(f"instrument machine: no transition from {self.state} on {event}") from None

    def start(self) -> list[Action]:
        """The NATS subscription is in place: ask for the first snapshot."""
        return [RequestSnapshot(0.0)]

    # -- NATS deltas ---------------------------------------------------------------------------------
    def on_message(self, payload: bytes, now_ns: int, traceparent: str | None = None) -> list[Action]:
        """One message from the instrument's delta subject: a delta or an ``instrument_status``."""
        try:
            msg = wire.decode(payload)
        except WireError as exc:
            return [Rejected(exc)]
        if type(msg) is wire.Delta:
            if msg.instrument != self.instrument:
                return [Rejected(WireError(f"delta for another instrument on {self.instrument}'s subject",
                                           msg_type="delta", instrument=msg.instrument, field="instrument"))]
            return self._delta(msg, payload, traceparent, now_ns)
        if type(msg) is wire.InstrumentStatus:
            return self.on_status(msg.status, msg.reason, msg.since_ns, now_ns)
        if type(msg) is wire.Unknown:
            return [Ignored(msg.msg_type)]
        return [Ignored(msg.type)]

    def _delta(self, delta: wire.Delta, payload: bytes, traceparent: str | None, now_ns: int) -> list[Action]:
        if self.state is State.AWAITING_SNAPSHOT or self.state is State.RECOVERING:
            self.buffer.append((delta, payload, traceparent))
            self._go(Input.DELTA)
            return []
        book = self.book
        verdict = book.apply(delta)
        if verdict is APPLIED:
            if self.verify_checksum:
                computed = book.checksum()
                if computed != delta.checksum:
                    error = ChecksumMismatch(self.instrument, delta.seq, computed, delta.checksum)
                    return self._break(ResyncReason.UPSTREAM_GAP, BreakCause.CHECKSUM_MISMATCH, str(error))
            self._go(Input.DELTA)
            self.ring.append((delta.epoch, delta.seq, delta.prev_seq, payload))
            stamped = wire.with_send_ts(payload, now_ns)
            item = Item(Kind.DATA, self.instrument, text_frame(stamped), delta.epoch, delta.seq, delta.prev_seq)
            return [FanOut(item, delta, traceparent, now_ns)]
        if verdict is DUPLICATE:
            held = self._held_payload(delta.epoch, delta.seq)
            if held is not None and held != payload:
                detail = (f"conflicting deltas instrument={self.instrument} epoch={delta.epoch} seq={delta.seq}: "
                          "one of them was forged or replayed")
                self.ring.clear()  # the ring may hold the forged one: resume falls back to a snapshot
                return self._break(ResyncReason.UPSTREAM_GAP, BreakCause.CONFLICTING_DUPLICATE, detail)
            self._go(Input.DUPLICATE)
            return []
        self.buffer.append((delta, payload, traceparent))
        if verdict is EPOCH_CHANGE:
            detail = f"epoch change instrument={self.instrument} held={book.epoch}/{book.seq} got={delta.epoch}/{delta.prev_seq}->{delta.seq}"
            return self._break(ResyncReason.EPOCH_CHANGE, BreakCause.EPOCH_CHANGE, detail)
        detail = f"seq gap instrument={self.instrument} expected={book.seq} got={delta.prev_seq} (seq {delta.seq})"
        return self._break(ResyncReason.UPSTREAM_GAP, BreakCause.SEQ_GAP, detail)

    def _held_payload(self, epoch: str, seq: int, look_back: int = 64) -> bytes | None:
        """The payload this machine applied for ``(epoch, seq)`` among its last ``look_back`` deltas."""
        for i in range(len(self.ring) - 1, max(-1, len(self.ring) - 1 - look_back), -1):
            r_epoch, r_seq, _, r_payload = self.ring[i]
            if r_seq == seq and r_epoch == epoch:
                return r_payload
            if r_seq < seq and r_epoch == epoch:
                return None
        return None

    def _break(self, reason: ResyncReason, cause: BreakCause, detail: str) -> list[Action]:
        self._go(Input.BREAK)
        self.gaps += 1
        self._suspect = None
        self._retry_s = 0.0
        return [Resync(reason, cause, detail), RequestSnapshot(0.0)]

    # -- snapshots -----------------------------------------------------------------------------------
    def on_snapshot_reply(self, payload: bytes, now_ns: int) -> list[Action]:
        """The ingest's reply to ``RequestSnapshot``. A malformed reply or one whose checksum does not
        match its levels counts as a failure (``RequestSnapshot`` with backoff). A reply that arrives while
        the machine is serving (a late answer to an abandoned request) is ignored."""
        if self.serving:
            return []
        try:
            snap = wire.decode(payload)
            if type(snap) is not wire.Snapshot:
                raise WireError(f"snapshot reply of type {getattr(snap, 'type', None)!r}", instrument=self.instrument)
            if snap.instrument != self.instrument:
                raise WireError("snapshot reply for another instrument", msg_type="snapshot",
                                instrument=snap.instrument, field="instrument")
        except WireError as exc:
            return [Rejected(exc), *self.on_snapshot_failed(now_ns)]
        candidate = SequencedBook(self.instrument)
        candidate.load(snap.epoch, snap.seq, snap.bids, snap.asks, ts_event_ns=snap.ts_event_ns,
                       ts_ingest_ns=snap.ts_ingest_ns, ts_publish_ns=snap.ts_publish_ns)
        computed = candidate.checksum()
        if computed != snap.checksum:
            error = ChecksumMismatch(self.instrument, snap.seq, computed, snap.checksum)
            return [Rejected(error), *self.on_snapshot_failed(now_ns)]
        epoch_changed = bool(self.book.epoch) and snap.epoch != self.book.epoch
        self.book = candidate
        self._snapshot_cache = None  # same (epoch, seq) need not mean the same book (a forged delta was in it)
        if epoch_changed:
            self.ring.clear()
        self._go(Input.SNAPSHOT)
        self._retry_s = 0.0
        self._suspect = None
        out: list[Action] = []
        if snap.status is not None:
            out += self.on_status(snap.status, self.status_reason if snap.status is self.status else "", None, now_ns)
        buffered = list(self.buffer)
        self.buffer.clear()
        for i, (delta, payload, traceparent) in enumerate(buffered):
            if delta.epoch != self.book.epoch or delta.seq <= self.book.seq:
                continue  # published before the snapshot was taken: already in it, or of an older history
            out += self._delta(delta, payload, traceparent, now_ns)
            if self.state is State.RECOVERING:  # the replay broke again: keep the rest for the next snapshot
                self.buffer.extend(buffered[i + 1:])
                return out
        out.append(ReleaseParked())
        return out

    def judge_fallback(self, epoch: str, seq: int, announced_epoch: str | None = None) -> Fallback:
        """Whether a fallback book at ``(epoch, seq)`` may be loaded instead of the ingest's answer, judged
        against the live deltas buffered while awaiting a snapshot, the machine's own book and the epoch the
        ingest's directory announces (``announced_epoch``; None: unknown).

        ``STALE`` when the book is of another epoch than the newest buffered delta or than the announced
        epoch (after a lossy takeover the KV books keep the old epoch until the new leader rewrites them),
        when it is behind the machine's own book of the same epoch, when the machine's book is of another
        epoch and no live delta says which is newer, or when replaying the buffer onto it would meet a gap.
        ``CURRENT`` when the replay reaches the newest buffered delta; ``PLAUSIBLE`` when nothing is buffered.
        Pure: nothing changes."""
        if announced_epoch and epoch != announced_epoch:
            return Fallback.STALE
        book = self.book
        if book.epoch and ((epoch == book.epoch and seq < book.seq) or (epoch != book.epoch and not self.buffer)):
            return Fallback.STALE
        if not self.buffer:
            return Fallback.PLAUSIBLE
        newest = self.buffer[-1][0]
        if newest.epoch != epoch:
            return Fallback.STALE
        at = seq
        for delta, _, _ in self.buffer:  # the replay ``on_snapshot_reply`` would make
            if delta.epoch != epoch or delta.seq <= at:
                continue
            if delta.prev_seq != at:
                return Fallback.STALE
            at = delta.seq
        return Fallback.CURRENT

    def on_snapshot_failed(self, now_ns: int) -> list[Action]:
        """The snapshot request timed out or failed: ask again after a backoff (doubling, capped)."""
        if self.serving:
            return []
        self._go(Input.SNAPSHOT_FAILED)
        first_s, max_s = SNAPSHOT_RETRY_S
        self._retry_s = first_s if not self._retry_s else min(self._retry_s * 2, max_s)
        return [RequestSnapshot(self._retry_s)]

    def snapshot_bytes(self) -> bytes:
        """The encoded snapshot at the machine's seq with its ``status`` (no ``ts_send_ns``; cached)."""
        book = self.book
        cache = self._snapshot_cache
        if cache is not None and cache[0] == book.epoch and cache[1] == book.seq and cache[2] is self.status:
            return cache[3]
        msg = wire.snapshot_message(self.instrument, book.epoch, book.seq, book.book, ts_event_ns=book.ts_event_ns,
                                    ts_ingest_ns=book.ts_ingest_ns, ts_publish_ns=book.ts_publish_ns,
                                    status=self.status)
        encoded = wire.dumps(msg)
        self._snapshot_cache = (book.epoch, book.seq, self.status, encoded)
        return encoded

    def ring_since(self, epoch: str, seq: int) -> list[tuple[str, int, int, bytes]] | None:
        """Deltas after ``seq`` of ``epoch`` if the ring still holds all of them (``[]``: nothing
        missed), else None. Only meaningful while ``serving``."""
        book = self.book
        if not self.serving or epoch != book.epoch or seq > book.seq:
            return None
        if seq == book.seq:
            return []
        if not self.ring or self.ring[0][2] > seq:
            return None
        return [entry for entry in self.ring if entry[1] > seq]

    # -- directory and status ------------------------------------------------------------------------
    def on_directory(self, epoch: str, seq: int, now_ns: int, *, backlog: int = 0,
                     status: Status | None = None) -> list[Action]:
        """The ingest announces the instrument at ``(epoch, seq)`` (and maybe its status). Detects a lost
        tail of deltas: two announcements in a row ahead of the book, the second while the first
        announced seq is still not held. ``backlog``: deltas of this instrument received but not yet
        fed to the machine (then nothing is concluded)."""
        out: list[Action] = []
        if status is not None:
            out += self.on_status(status, self.status_reason if status is self.status else "", None, now_ns)
        if not self.serving or backlog:
            return out
        book = self.book
        if epoch == book.epoch and seq <= book.seq:
            self._suspect = None
            self._go(Input.DIRECTORY_CAUGHT_UP)
            return out
        suspect = self._suspect
        if self.state is State.SUSPECT and suspect is not None and (suspect[0] != book.epoch or suspect[1] > book.seq):
            detail = f"tail loss instrument={self.instrument} held={book.epoch}/{book.seq} directory={epoch}/{seq}"
            self._go(Input.DIRECTORY_LOSS)
            self.gaps += 1
            self._suspect = None
            self._retry_s = 0.0
            reason = ResyncReason.UPSTREAM_GAP if epoch == book.epoch else ResyncReason.EPOCH_CHANGE
            return out + [Resync(reason, BreakCause.TAIL_LOSS, detail), RequestSnapshot(0.0)]
        self._suspect = (epoch, seq)
        self._go(Input.DIRECTORY_AHEAD)
        return out

    def on_status(self, status: Status, reason: str, since_ns: int | None, now_ns: int) -> list[Action]:
        """The ingest's ``instrument_status`` (or a snapshot's / announcement's ``status``). Returns
        ``StatusChanged`` (a framed ``instrument_status`` stamped ``ts_send_ns = now_ns``) when it changed."""
        if status is self.status:
            return []
        self.status, self.status_reason = status, reason
        self.status_since_ns = since_ns if since_ns is not None else now_ns
        return [StatusChanged(self.status_item(now_ns), status)]

    def status_item(self, now_ns: int) -> Item:
        """An ``instrument_status`` frame of the current status, stamped ``ts_send_ns = now_ns``."""
        msg = wire.instrument_status_message(self.instrument, self.status, self.status_reason, self.status_since_ns,
                                             ts_send_ns=now_ns)
        return Item(Kind.STATUS, self.instrument, text_frame(wire.dumps(msg)))
