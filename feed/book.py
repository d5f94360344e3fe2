"""Exact L2 order book: one instrument, price levels keyed by ``Decimal``.

Pure: no I/O, no clock. Used by the ingest (the book of record), the gateway (its copy, to serve
snapshots at the exact seq it has delivered) and the client SDK (the verified local book).

Vocabulary follows nautilus_trader's order book: a *level* is a price and the total size resting at it;
a *snapshot* replaces the whole book; a *delta* gives levels' new absolute sizes (0 removes the level).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from itertools import islice

from sortedcontainers import SortedDict

from feed.checksum import CHECKSUM_DEPTH, checksum
from feed.errors import InvalidDecimal
from feed.model import ZERO, LevelChange, Side, canonical

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
        self.clear()
        for price, size in bids:
            if size:
                self._bids[price.copy_negate()] = (size, canonical(price), canonical(size))
        for price, size in asks:
            if size:
                self._asks[price] = (size, canonical(price), canonical(size))

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

    def apply_wire_changes(self, changes: Sequence[Sequence[str]]) -> None:
        """Apply ``[side, price, new_size]`` string triples as sent on the wire (PROTOCOL.md section 4).

        Raises:
            InvalidDecimal / ValueError: a bad side, price or size.
        """
        for side, price, size in changes:
            self.set_level(Side(side), Decimal(price), Decimal(size))

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
