"""Exact L2 order book: one instrument, price levels keyed by ``Decimal``.

Pure: no I/O, no clock. Used by the ingest (the book of record), the gateway (its copy, to serve
snapshots at the exact seq it has delivered) and the client SDK (the verified local book), each through
``SequencedBook``: the book at ``(epoch, seq)`` with the stamps of its last update, whose ``apply``
decides seq/epoch continuity once for all three (PROTOCOL.md sections 1 and 4).

Vocabulary follows nautilus_trader's order book: a *level* is a price and the total size resting at it;
a *snapshot* replaces the whole book; a *delta* gives levels' new absolute sizes (0 removes the level).
"""
from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from itertools import islice
from typing import Protocol

from sortedcontainers import SortedDict

from feed.checksum import CHECKSUM_DEPTH, checksum
from feed.errors import CrossedBook, InvalidDecimal
from feed.model import ZERO, LevelChange, Side, canonical, parse_decimal

# A level as stored: (size, canonical price string, canonical size string).
_Stored = tuple[Decimal, str, str]
WireLevel = list[str]  # [price, size], canonical strings
WireChange = list[str]  # [side, price, new_size]


class L2Book:
    """Price-level book of one instrument.

    ``bids`` iterate best (highest) first and ``asks`` best (lowest) first. Every mutator takes exact
    ``Decimal`` prices and sizes; sizes must be >= 0. Nothing here raises on a crossed book: call
    ``is_crossed()`` where crossing is a fault (the ingest treats it as a remote fault of the venue).
    """

    __slots__ = ("instrument", "_bids", "_asks")

    def __init__(self, instrument: str = "") -> None:
        self.instrument = instrument
        # Bids are keyed by negated price so both sides iterate best-first.
        self._bids: SortedDict = SortedDict()
        self._asks: SortedDict = SortedDict()

    # -- mutation ------------------------------------------------------------------------------
    def clear(self) -> None:
        self._bids.clear()
        self._asks.clear()

    def apply_snapshot(
        self, bids: Iterable[tuple[Decimal, Decimal]], asks: Iterable[tuple[Decimal, Decimal]]
    ) -> None:
        """Replace the whole book. Levels of size 0 are skipped; a repeated price keeps the last size."""
        # built whole (one sort) rather than level by level: a deep book's snapshot is 10^4 levels
        self._bids = SortedDict([(price.copy_negate(), (size, canonical(price), canonical(size)))
                                 for price, size in bids if size])
        self._asks = SortedDict([(price, (size, canonical(price), canonical(size))) for price, size in asks if size])

    def set_level(self, side: Side, price: Decimal, size: Decimal) -> bool:
        """Set one level's absolute size (0 removes it). Returns True if the book changed.

        Raises:
            InvalidDecimal: negative size.
        """
        if size < 0:
            raise InvalidDecimal(f"negative size {size} at {side} {price}")
        levels, key = (self._bids, price.copy_negate()) if side is Side.BID else (self._asks, price)
        old = levels.get(key)
        if not size:
            if old is None:
                return False
            del levels[key]
            return True
        if old is not None and old[0] == size:
            return False
        levels[key] = (size, canonical(price), canonical(size))
        return True

    def size_at(self, side: Side, price: Decimal) -> Decimal:
        """The size resting at ``price`` on ``side`` (``0`` when there is no such level)."""
        level = self._bids.get(price.copy_negate()) if side is Side.BID else self._asks.get(price)
        return level[0] if level is not None else Decimal(0)

    def apply_changes(self, changes: Iterable[LevelChange]) -> list[LevelChange]:
        """Apply level changes in order; return the ones that changed the book (no-ops dropped).

        When one delta touches a level twice, both effective changes are returned in order, so replaying
        the returned list on an equal book gives an equal result.
        """
        effective = []
        for change in changes:
            if self.set_level(change.side, change.price, change.size):
                effective.append(change)
        return effective

    def apply_wire_changes(self, changes: Sequence[Sequence[str]]) -> list[LevelChange]:
        """Apply ``[side, price, new_size]`` string triples as sent on the wire (PROTOCOL.md section 4).

        All or nothing: every triple is parsed (``parse_wire_changes``) before the book is touched.
        Returns the effective changes (as ``apply_changes``).

        Raises:
            InvalidDecimal: a bad side, price or size, or a triple that is not one (the book is unchanged).
        """
        return self.apply_changes(parse_wire_changes(changes))

    def diff(
        self, bids: Iterable[tuple[Decimal, Decimal]], asks: Iterable[tuple[Decimal, Decimal]]
    ) -> list[LevelChange]:
        """Changes that turn this book into the given full book (not applied).

        Used to derive deltas from snapshot-only upstreams (Polymarket re-sends ``book``). Removals come
        first, then additions/updates, each side in best-first order, so a client applying them never
        sees a transiently crossed book that the target does not have.
        """
        target_bids = {p: s for p, s in bids if s}
        target_asks = {p: s for p, s in asks if s}
        removals: list[LevelChange] = []
        updates: list[LevelChange] = []
        for side, current, target in (
            (Side.BID, {k.copy_negate(): v[0] for k, v in self._bids.items()}, target_bids),
            (Side.ASK, {k: v[0] for k, v in self._asks.items()}, target_asks),
        ):
            reverse = side is Side.BID
            for price in sorted(current.keys() - target.keys(), reverse=reverse):
                removals.append(LevelChange(side, price, ZERO))
            for price in sorted(target, reverse=reverse):
                if current.get(price) != target[price]:
                    updates.append(LevelChange(side, price, target[price]))
        return removals + updates

    # -- queries -------------------------------------------------------------------------------
    def best_bid(self) -> tuple[Decimal, Decimal] | None:
        """(price, size) of the highest bid, or None if there are no bids."""
        if not self._bids:
            return None
        key, (size, _, _) = self._bids.peekitem(0)
        return key.copy_negate(), size

    def best_ask(self) -> tuple[Decimal, Decimal] | None:
        """(price, size) of the lowest ask, or None if there are no asks."""
        if not self._asks:
            return None
        key, (size, _, _) = self._asks.peekitem(0)
        return key, size

    def spread(self) -> Decimal | None:
        """Best ask minus best bid, or None when either side is empty."""
        bid, ask = self.best_bid(), self.best_ask()
        if bid is None or ask is None:
            return None
        return ask[0] - bid[0]

    def mid(self) -> Decimal | None:
        """(best bid + best ask) / 2, or None when either side is empty."""
        bid, ask = self.best_bid(), self.best_ask()
        if bid is None or ask is None:
            return None
        return (ask[0] + bid[0]) / 2

    def check_uncrossed(self, context: str = "") -> None:
        """Raise ``CrossedBook`` (a ``LocalError``) when the book is crossed or locked. Call it where a
        crossing can only be our own bug (e.g. after diffing towards an uncrossed venue book)."""
        bid, ask = self.best_bid(), self.best_ask()
        if bid is not None and ask is not None and bid[0] >= ask[0]:
            raise CrossedBook(self.instrument, bid[0], ask[0], context)

    def is_crossed(self) -> bool:
        """True when both sides exist and best bid >= best ask."""
        bid, ask = self.best_bid(), self.best_ask()
        return bid is not None and ask is not None and bid[0] >= ask[0]

    def depth(self, side: Side, n: int | None = None) -> list[tuple[Decimal, Decimal]]:
        """Up to ``n`` levels (all if None) of one side as (price, size), best first."""
        if side is Side.BID:
            return [(k.copy_negate(), v[0]) for k, v in islice(self._bids.items(), n)]
        return [(k, v[0]) for k, v in islice(self._asks.items(), n)]

    def level_count(self, side: Side) -> int:
        return len(self._bids if side is Side.BID else self._asks)

    def wire_levels(self, side: Side, n: int | None = None) -> list[WireLevel]:
        """Up to ``n`` levels of one side as canonical ``[price, size]`` strings, best first."""
        levels = self._bids if side is Side.BID else self._asks
        return [[v[1], v[2]] for v in islice(levels.values(), n)]

    def _top(self, side: Side) -> Iterator[tuple[str, str]]:
        levels = self._bids if side is Side.BID else self._asks
        return ((v[1], v[2]) for v in islice(levels.values(), CHECKSUM_DEPTH))

    def checksum(self) -> int:
        """PROTOCOL.md section 6 checksum of the current book."""
        return checksum(self._top(Side.BID), self._top(Side.ASK))

    def __len__(self) -> int:
        return len(self._bids) + len(self._asks)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, L2Book):
            return NotImplemented
        return self.depth(Side.BID) == other.depth(Side.BID) and self.depth(Side.ASK) == other.depth(Side.ASK)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"L2Book({self.instrument!r}, bids={len(self._bids)}, asks={len(self._asks)}, "
            f"best_bid={self.best_bid()}, best_ask={self.best_ask()})"
        )

    def copy(self) -> L2Book:
        other = L2Book(self.instrument)
        other._bids = self._bids.copy()
        other._asks = self._asks.copy()
        return other


def wire_change(change: LevelChange) -> WireChange:
    """``[side, price, new_size]`` canonical strings for one change."""
    return [change.side.value, canonical(change.price), canonical(change.size)]


def parse_wire_changes(changes: object) -> list[LevelChange]:
    """Parse ``[[side, price, new_size], ...]`` (PROTOCOL.md section 4) into ``LevelChange`` s.

    Raises:
        InvalidDecimal: not a list of 3-item lists, a side other than ``bid``/``ask``, or a price or size
            that is not a finite non-negative decimal string; the message names the item.
    """
    if not isinstance(changes, (list, tuple)):
        raise InvalidDecimal(f"changes must be a list of [side, price, new_size], got {type(changes).__name__}")
    out = []
    for i, change in enumerate(changes):
        if not isinstance(change, (list, tuple)) or len(change) != 3:
            raise InvalidDecimal(f"change {i} must be [side, price, new_size], got {change!r}")
        side, price, size = change
        if side == "bid":
            s = Side.BID
        elif side == "ask":
            s = Side.ASK
        else:
            raise InvalidDecimal(f"change {i} side must be 'bid' or 'ask', got {side!r}")
        out.append(LevelChange(s, parse_decimal(price, what=f"change {i} price"),
                               parse_decimal(size, what=f"change {i} size")))
    return out


# ---------------------------------------------------------------------------------------------------
# A book at (epoch, seq): continuity decided once.


class Continuity(enum.Enum):
    """How a sequenced update ``(epoch, prev_seq -> seq)`` relates to what a receiver holds.

    =============  =====================================================================
    APPLIED        same epoch and ``prev_seq`` equals the held seq (or, for a conflated
                   delta when spanning is allowed, ``prev_seq < held < seq``): applicable
    DUPLICATE      same epoch and ``seq <= held seq``: already covered, skip it
    GAP            same epoch and ``prev_seq`` ahead of the held seq: deltas were lost
    EPOCH_CHANGE   another epoch: the history the receiver holds ended
    =============  =====================================================================
    """

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    GAP = "gap"
    EPOCH_CHANGE = "epoch_change"


APPLIED, DUPLICATE, GAP, EPOCH_CHANGE = Continuity.APPLIED, Continuity.DUPLICATE, Continuity.GAP, Continuity.EPOCH_CHANGE


def continuity(held_epoch: str, held_seq: int, epoch: str, seq: int, prev_seq: int, *,
               spanning: bool = False, strict: bool = False) -> Continuity:
    """Classify an update against a held ``(held_epoch, held_seq)`` (table in ``Continuity``).

    ``spanning``: a delta with ``prev_seq < held_seq < seq`` is ``APPLIED`` (its changes are absolute final
    sizes, so it is correct on any book inside its span: the gateway's conflated deltas). ``strict``: a
    duplicate is a ``GAP`` (a client that must never receive one, e.g. the SDK).
    """
    if epoch != held_epoch:
        return EPOCH_CHANGE
    if prev_seq == held_seq:
        return APPLIED
    if seq <= held_seq:
        return GAP if strict else DUPLICATE
    if spanning and prev_seq < held_seq:
        return APPLIED
    return GAP


class SequencedUpdate(Protocol):
    """What ``SequencedBook.apply`` reads from a delta (``feed.wire.Delta`` is one)."""

    epoch: str
    seq: int
    prev_seq: int
    changes: Sequence[LevelChange]
    ts_event_ns: int | None
    ts_ingest_ns: int | None
    ts_publish_ns: int | None


class SequencedBook:
    """One instrument's ``L2Book`` at ``(epoch, seq)`` plus the stamps of its last update (ns since the
    Unix epoch; ``None`` when unknown). The one type for "a book at a seq": the ingest's book of record
    (``feed.sequencer.BookEngine``), the gateway's copy (``feed.gateway.instrument``) and the SDK's verified
    book (``feed.client.verify.LocalBook``).

    ``apply(delta)`` applies a delta when it continues the held history and returns the ``Continuity``;
    on anything else the book is unchanged. ``load`` replaces it from a snapshot. ``advance`` is the
    producer's side: apply changes and move to a new seq given by the sequencer.
    """

    __slots__ = ("instrument", "book", "epoch", "seq", "ts_event_ns", "ts_ingest_ns", "ts_publish_ns")

    def __init__(self, instrument: str, epoch: str = "", seq: int = 0, book: L2Book | None = None, *,
                 ts_event_ns: int | None = None, ts_ingest_ns: int | None = None,
                 ts_publish_ns: int | None = None) -> None:
        self.instrument = instrument
        self.book = book if book is not None else L2Book(instrument)
        self.epoch = epoch
        self.seq = seq
        self.ts_event_ns = ts_event_ns
        self.ts_ingest_ns = ts_ingest_ns
        self.ts_publish_ns = ts_publish_ns

    def continuity(self, epoch: str, seq: int, prev_seq: int, *, strict: bool = False) -> Continuity:
        return continuity(self.epoch, self.seq, epoch, seq, prev_seq, strict=strict)

    def apply(self, delta: SequencedUpdate, *, strict: bool = False) -> Continuity:
        """Apply ``delta`` if it is ``APPLIED``: changes, then ``seq`` and the stamps move to the delta's.
        Any other verdict leaves the book as it was. ``strict`` as in ``continuity``."""
        verdict = continuity(self.epoch, self.seq, delta.epoch, delta.seq, delta.prev_seq, strict=strict)
        if verdict is APPLIED:
            self.book.apply_changes(delta.changes)
            self.seq = delta.seq
            self.ts_event_ns, self.ts_ingest_ns, self.ts_publish_ns = (
                delta.ts_event_ns, delta.ts_ingest_ns, delta.ts_publish_ns)
        return verdict

    def load(self, epoch: str, seq: int, bids: Iterable[tuple[Decimal, Decimal]],
             asks: Iterable[tuple[Decimal, Decimal]], *, ts_event_ns: int | None = None,
             ts_ingest_ns: int | None = None, ts_publish_ns: int | None = None) -> None:
        """Replace the book from a snapshot at ``(epoch, seq)`` (levels as ``(price, size)``)."""
        self.book.apply_snapshot(bids, asks)
        self.epoch, self.seq = epoch, seq
        self.ts_event_ns, self.ts_ingest_ns, self.ts_publish_ns = ts_event_ns, ts_ingest_ns, ts_publish_ns

    def advance(self, changes: Iterable[LevelChange], epoch: str, seq: int,
                ts_event_ns: int | None = None) -> list[LevelChange]:
        """Producer side (the ingest): apply ``changes`` and, if any was effective, move to
        ``(epoch, seq)``. Returns the effective changes (empty: nothing changed, seq unchanged)."""
        effective = self.book.apply_changes(changes)
        if effective:
            self.epoch, self.seq, self.ts_event_ns = epoch, seq, ts_event_ns
        return effective

    def checksum(self) -> int:
        return self.book.checksum()

    def __repr__(self) -> str:
        return f"SequencedBook({self.instrument!r}, epoch={self.epoch!r}, seq={self.seq}, book={self.book!r})"
