"""Fan-out policy of the gateway (pure): per-connection bounded queue, slow consumers, conflation.

PROTOCOL.md section 7: each connection has its own bounded outbound queue; one client's slowness never
delays another. When a connection's queue would exceed its bound, its pending data is dropped and the
connection gets ``resync`` (reason ``slow_consumer``) plus a fresh snapshot for each affected
instrument; a connection that overflows ``max_overflows`` times within ``overflow_window_s`` is closed
with 4008. Deltas are never dropped silently.

The queue holds *items*, not frames: data items share the encoded bytes of one message among every
connection (one encode per message), and snapshot items are *markers* that the connection's writer turns
into a snapshot of the gateway's book when it reaches them, so a snapshot always reflects the newest
seq and costs nothing while queued. The writer keeps, per instrument, the ``(epoch, seq)`` the client
holds (``SentState``) and skips any delta the client could not apply (``admit``).

No I/O, no clock: callers pass ``now_s`` (monotonic seconds).
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from feed.book import APPLIED, DUPLICATE, continuity


class Kind(enum.IntEnum):
    DATA = 1  # a delta: instrument, epoch, seq, prev_seq, payload (already carries ts_send_ns)
    TRADE = 2  # a trade: instrument, payload
    CTRL = 3  # a reply or notice: payload; never dropped on overflow
    SNAP = 4  # build and send a snapshot of instrument (reason: None or a ResyncReason value)
    FLUSH = 5  # conflation window of instrument is over: send the merged delta
    RESYNC = 6  # a resync notice for instrument: payload; the client drops its book on receipt
    CLOSE = 7  # close the connection with code (in seq) and reason (in payload)
    HEARTBEAT = 8  # the connection has been quiet: send a heartbeat built when the writer reaches it
    STATUS = 9  # an instrument_status notice for instrument: payload; sent when subscribed to its book


@dataclass(slots=True)
class Item:
    kind: Kind
    instrument: str | None = None
    payload: bytes = b""
    epoch: str = ""
    seq: int = 0
    prev_seq: int = 0
    first: bool = False  # SNAP: the subscription's first snapshot (an instrument_status may follow)

    @property
    def size_bytes(self) -> int:
        return len(self.payload)

    @property
    def droppable(self) -> bool:
        return self.kind in (Kind.DATA, Kind.TRADE)


class OutQueue:
    """FIFO of items with a bound on the bytes of their payloads.

    ``push`` refuses (returns False) a data item that would take ``queued_bytes`` over ``max_bytes``,
    except into an empty queue: one message larger than the whole bound (a big diff after an upstream
    re-snapshot) must still be deliverable, or its instrument would resync forever. Control items are
    always accepted so replies and notices are never lost.
    """

    __slots__ = ("max_bytes", "items", "queued_bytes")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        # an empty tuple until the first item: a deque is ~760 bytes, and most idle connections never queue
        # anything (``python -m loadtest.bench.idlemem``); read ``items`` only for truth and iteration
        self.items: deque[Item] | tuple[()] = ()
        self.queued_bytes = 0

    def push(self, item: Item) -> bool:
        size = item.size_bytes
        if item.droppable and self.queued_bytes and self.queued_bytes + size > self.max_bytes:
            return False
        self.append(item)
        return True

    def append(self, item: Item) -> None:
        """Queue ``item`` whatever the bound (a close, after ``drop_data``)."""
        items = self.items
        if type(items) is tuple:
            items = self.items = deque()
        items.append(item)  # type: ignore[union-attr]
        self.queued_bytes += item.size_bytes

    def pop(self) -> Item:
        item = self.items.popleft()  # type: ignore[union-attr]
        self.queued_bytes -= item.size_bytes
        return item

    def drop_data(self) -> set[str]:
        """Drop every data and trade item; return the instruments that lost data."""
        lost: set[str] = set()
        if not self.items:
            return lost
        kept: deque[Item] = deque()
        kept_bytes = 0
        for item in self.items:
            if item.droppable:
                lost.add(item.instrument)  # type: ignore[arg-type]
            else:
                kept.append(item)
                kept_bytes += item.size_bytes
        self.items = kept
        self.queued_bytes = kept_bytes
        return lost

    def __len__(self) -> int:
        return len(self.items)


class OverflowPolicy:
    """Counts overflows in a sliding window; ``record`` says whether to close the connection (4008)."""

    __slots__ = ("max_overflows", "window_s", "_times")

    def __init__(self, max_overflows: int = 3, window_s: float = 60.0) -> None:
        self.max_overflows = max_overflows
        self.window_s = window_s
        # created at the first overflow: most connections never overflow, and an empty deque is ~600 bytes
        # of every idle connection (tracemalloc, ``python -m loadtest.bench.idlemem``)
        self._times: deque[float] | None = None

    def record(self, now_s: float) -> bool:
        """Note one overflow at ``now_s``; True when this makes ``max_overflows`` within the window."""
        times = self._times
        if times is None:
            times = self._times = deque()
        times.append(now_s)
        while times and now_s - times[0] > self.window_s:
            times.popleft()
        return len(times) >= self.max_overflows


class Admit(enum.Enum):
    SEND = 1  # the client can apply it
    SKIP = 2  # already covered (the client holds this seq or later) or awaiting a snapshot
    GAP = 3  # cannot be applied: a bug upstream of the writer; resync the instrument


@dataclass(slots=True)
class SentState:
    """What the client holds for one instrument: the epoch and seq of the last data sent."""

    epoch: str
    seq: int


def admit(state: SentState | None, epoch: str, seq: int, prev_seq: int) -> Admit:
    """Decide whether a delta ``(epoch, prev_seq -> seq)`` may go to a client holding ``state``.

    ``feed.book.continuity`` with spanning allowed: a conflated delta spanning the client's seq carries
    absolute final sizes, so applying it on any book inside its span yields the book at ``seq``.
    """
    if state is None:
        return Admit.SKIP
    verdict = continuity(state.epoch, state.seq, epoch, seq, prev_seq, spanning=True)
    if verdict is APPLIED:
        return Admit.SEND
    if verdict is DUPLICATE:
        return Admit.SKIP
    return Admit.GAP


@dataclass(slots=True)
class Conflated:
    """Deltas of one instrument merged over a conflation window (PROTOCOL.md ``conflate_ms``).

    ``changes`` maps (side, price) to the newest size, in first-touch order; the merged delta carries the
    first delta's ``prev_seq``, the last one's ``seq``, ``checksum`` and timestamps.
    """

    epoch: str
    first_prev_seq: int
    seq: int
    changes: dict[tuple[str, str], str] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)
    merged: int = 0

    @classmethod
    def start(cls, delta: dict[str, Any]) -> Conflated:
        c = cls(delta["epoch"], delta["prev_seq"], delta["seq"])
        c.add(delta)
        return c

    def add(self, delta: dict[str, Any]) -> bool:
        """Merge a following delta. False (nothing merged) if it does not chain on (epoch or seq gap)."""
        if self.merged and (delta["epoch"] != self.epoch or delta["prev_seq"] != self.seq):
            return False
        for side, price, size in delta["changes"]:
            self.changes[(side, price)] = size
        self.seq = delta["seq"]
        self.last = delta
        self.merged += 1
        return True

    def message(self, prev_seq: int) -> dict[str, Any]:
        """The merged delta as sent to a client holding ``prev_seq`` (ts_send_ns is added by the caller)."""
        msg = {k: v for k, v in self.last.items() if k != "ts_send_ns"}
        msg["prev_seq"] = prev_seq
        msg["changes"] = [[side, price, size] for (side, price), size in self.changes.items()]
        return msg
