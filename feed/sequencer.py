"""Sequencer and book engine: venue events in, sequenced deltas out (the pure core of the ingest).

Rules (PROTOCOL.md section 1):

* ``seq`` is per instrument, starts at 1 for the first delta of an epoch and grows by exactly 1 per delta.
  A snapshot carries the seq of the last delta it contains (0 if none).
* ``epoch`` names one unbroken history of seq. It changes whenever that history is lost or restarted:
  a new ingest process (a new ``epoch_base``), or ``reset()`` of one instrument.

Snapshots from upstream never break the history: the first one creates the book at seq 0, every later
one is *diffed* against the book of record and published as an ordinary delta (the way a
snapshot-only upstream such as Polymarket's re-sent ``book`` becomes a delta stream). A snapshot equal
to the book publishes nothing.

Pure: no I/O, no clock, no environment. The caller passes the epoch base and every timestamp.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from feed.book import L2Book, SequencedBook
from feed.errors import RemoteError
from feed.model import (BookDelta, BookSnapshot, LevelChange, Side, TickSizeChange, Trade, VenueEvent,
                        split_instrument)
from feed.model import VENUE_INFO_EVENTS, BookIncrement  # issue 16


class DeltaBeforeSnapshot(RemoteError):
    """A venue delta arrived for an instrument whose book we have not seen a snapshot of."""

    def __init__(self, instrument: str) -> None:
        self.instrument = instrument
        super().__init__(f"delta before snapshot instrument={instrument}: dropped until a snapshot arrives")


class NegativeLevel(RemoteError):
    """A venue's signed delta would take a level below zero: the venue's book and ours disagree (resync)."""

    def __init__(self, instrument: str, side, price: Decimal, held: Decimal, delta: Decimal) -> None:
        self.instrument = instrument
        super().__init__(f"negative level instrument={instrument} side={side} price={price} held={held} delta={delta}")


def absolute_changes(event: BookIncrement, size_at: Callable[[Side, Decimal], Decimal]) -> list[LevelChange]:
    """A venue's signed size changes (Kalshi ``orderbook_delta``) as absolute ones, summed exactly in
    ``Decimal`` against ``size_at(side, price)`` (the book's size now; 0 for no level); several changes of
    one level accumulate.

    Raises:
        NegativeLevel: a level would go below zero (the venue and our book disagree; nothing to apply).
    """
    sizes: dict[tuple, Decimal] = {}
    changes = []
    for inc in event.changes:
        key = (inc.side, inc.price)
        held = sizes[key] if key in sizes else size_at(inc.side, inc.price)
        size = held + inc.delta
        if size < 0:
            raise NegativeLevel(event.instrument, inc.side, inc.price, held, inc.delta)
        sizes[key] = size
        changes.append(LevelChange(inc.side, inc.price, size))
    return changes


class SeqState:
    """seq/epoch of one instrument."""

    __slots__ = ("epoch", "seq")

    def __init__(self, epoch: str, seq: int = 0) -> None:
        self.epoch = epoch
        self.seq = seq


class Sequencer:
    """Assigns ``(epoch, prev_seq, seq)`` per instrument.

    Epochs are ``<epoch_base>`` for the first history of an instrument and ``<epoch_base>.<n>`` after
    the n-th ``reset()`` of it within this process.
    """

    def __init__(self, epoch_base: str) -> None:
        if not epoch_base:
            raise ValueError("epoch_base must be a non-empty string")
        self.epoch_base = epoch_base
        self._states: dict[str, SeqState] = {}
        self._resets = 0

    def state(self, instrument: str) -> SeqState:
        st = self._states.get(instrument)
        if st is None:
            st = self._states[instrument] = SeqState(self.epoch_base)
        return st

    def next(self, instrument: str) -> tuple[str, int, int]:
        """Allocate the next seq: returns ``(epoch, prev_seq, seq)`` with ``seq == prev_seq + 1``."""
        st = self.state(instrument)
        st.seq += 1
        return st.epoch, st.seq - 1, st.seq

    def reset(self, instrument: str) -> str:
        """Start a new history for ``instrument``: new epoch, seq back to 0. Returns the new epoch."""
        self._resets += 1
        st = self.state(instrument)
        st.epoch = f"{self.epoch_base}.{self._resets}"
        st.seq = 0
        return st.epoch


@dataclass(slots=True)
class SequencedDelta:
    """One delta ready to publish: changes are effective (every one changes the book), in order."""

    instrument: str
    epoch: str
    prev_seq: int
    seq: int
    changes: list[LevelChange]
    checksum: int
    ts_event_ns: int | None


@dataclass(slots=True)
class InstrumentAdded:
    """The engine saw a first snapshot of a new instrument (book at seq 0)."""

    instrument: str
    venue: str
    epoch: str


class InstrumentState(SequencedBook):
    """The engine's book of record of one instrument: a ``SequencedBook`` (book, epoch, seq, event time of
    the last change) plus the venue's tick size."""

    __slots__ = ("tick_size",)

    def __init__(self, instrument: str, epoch: str, book: L2Book, *, ts_event_ns: int | None = None) -> None:
        super().__init__(instrument, epoch, 0, book, ts_event_ns=ts_event_ns)
        self.tick_size: Decimal | None = None


EngineOutput = SequencedDelta | InstrumentAdded | Trade | TickSizeChange


class BookEngine:
    """Books of record for every instrument of one ingest, with their seq/epoch.

    ``apply(event)`` returns what to publish, in order. Raises ``DeltaBeforeSnapshot`` for a venue delta
    on an unknown book (the caller counts and drops it) and ``InvalidDecimal`` for a negative size.
    ``crossed`` counts books left crossed by venue input (a remote fault of the venue; the book still
    mirrors exactly what the venue said). Raises ``CrossedBook`` (a ``LocalError``: a bug) when diffing
    towards an uncrossed venue snapshot leaves the book crossed.
    """

    def __init__(self, epoch_base: str) -> None:
        self.sequencer = Sequencer(epoch_base)
        self.instruments: dict[str, InstrumentState] = {}
        self.crossed = 0

    def apply(self, event: VenueEvent) -> list[EngineOutput]:
        if isinstance(event, BookSnapshot):
            return self._snapshot(event)
        if isinstance(event, BookDelta):
            return self._delta(event)
        if isinstance(event, TickSizeChange):
            st = self.instruments.get(event.instrument)
            if st is not None:
                st.tick_size = event.tick_size
            return [event]
        if isinstance(event, Trade):
            return [event]
        if isinstance(event, BookIncrement):  # issue 16: Kalshi's signed deltas
            return self._increment(event)
        if isinstance(event, VENUE_INFO_EVENTS):  # issue 16: no book change; the ingest / pool acts on them
            return [event]
        raise TypeError(f"not a venue event: {event!r}")

    def _snapshot(self, event: BookSnapshot) -> list[EngineOutput]:
        st = self.instruments.get(event.instrument)
        if st is None:
            book = L2Book(event.instrument)
            book.apply_snapshot(event.bids, event.asks)
            epoch, seq = self.seq_of(event.instrument)
            st = self.instruments[event.instrument] = InstrumentState(event.instrument, epoch, book,
                                                                      ts_event_ns=event.ts_event_ns)
            st.seq = seq
            self._note_crossed(book)
            venue, _ = split_instrument(event.instrument)
            return [InstrumentAdded(event.instrument, venue, epoch)]
        changes = st.book.diff(event.bids, event.asks)
        out = self._publish(st, event.instrument, changes, event.ts_event_ns)
        if not self._snapshot_crossed(event):
            st.book.check_uncrossed("after diffing towards an uncrossed venue snapshot")
        return out

    @staticmethod
    def _snapshot_crossed(event: BookSnapshot) -> bool:
        bids = [p for p, s in event.bids if s]
        asks = [p for p, s in event.asks if s]
        return bool(bids and asks) and max(bids) >= min(asks)

    def _delta(self, event: BookDelta) -> list[EngineOutput]:
        st = self.instruments.get(event.instrument)
        if st is None:
            raise DeltaBeforeSnapshot(event.instrument)
        return self._publish(st, event.instrument, event.changes, event.ts_event_ns)

    def _increment(self, event: BookIncrement) -> list[EngineOutput]:
        """Signed size changes -> absolute ones, summed exactly in ``Decimal``; all or nothing.

        Raises:
            DeltaBeforeSnapshot: no book yet.
            NegativeLevel: a level would go below zero (the venue and our book disagree).
        """
        st = self.instruments.get(event.instrument)
        if st is None:
            raise DeltaBeforeSnapshot(event.instrument)
        return self._publish(st, event.instrument, absolute_changes(event, st.book.size_at), event.ts_event_ns)

    def _publish(self, st: InstrumentState, instrument: str, changes, ts_event_ns: int | None) -> list[EngineOutput]:
        epoch, seq = self.seq_of(instrument)
        effective = st.advance(changes, epoch, seq + 1, ts_event_ns)
        if not effective:
            return []
        _, prev_seq, seq = self.sequencer.next(instrument)
        self._note_crossed(st.book)
        return [SequencedDelta(instrument, epoch, prev_seq, seq, effective, st.book.checksum(), ts_event_ns)]

    def _note_crossed(self, book: L2Book) -> None:
        if book.is_crossed():
            self.crossed += 1

    def reset(self, instrument: str) -> str:
        """Forget an instrument's book and start a new epoch for it (history lost upstream)."""
        self.instruments.pop(instrument, None)
        return self.sequencer.reset(instrument)

    def seq_of(self, instrument: str) -> tuple[str, int]:
        st = self.sequencer.state(instrument)
        return st.epoch, st.seq

    def rebase(self, instrument: str, epoch: str, seq: int) -> None:
        """Continue ``instrument``'s book under another history: from now on it is at ``(epoch, seq)``.
        Used by a standby ingest taking over (``feed.takeover``): its book is provably the leader's at the
        leader's seq, so it adopts the leader's epoch and seq; or a fresh epoch at seq 0 when it is not."""
        st = self.sequencer.state(instrument)
        st.epoch, st.seq = epoch, seq
        book = self.instruments.get(instrument)
        if book is not None:
            book.epoch, book.seq = epoch, seq
