"""Upstream integrity: venue bursts, crossed/locked books after a burst, and instrument status (pure).

No I/O, no clock, no environment: the caller passes every time (ns) and the book's top of book.

**Bursts.** A burst is every message of one instrument stamped with one venue timestamp. Polymarket sends the
level of a crossing order *before* the removals of the levels it matched, all with one ``timestamp``, so a
book crossed in the middle of a burst is normal and is never a fault. A burst ends when a message with another
venue timestamp arrives for that instrument (``BurstChecker.begin``), or when it has been idle for
``burst_idle_s`` (``BurstChecker.flush``). At its end the book is checked:

* ``crossed``: best bid > best ask; ``locked``: best bid == best ask (both count as integrity kind
  ``crossed``, status ``crossed``);
* ``top_mismatch``: the venue said what its top of book is after the burst (Polymarket's ``best_bid`` /
  ``best_ask`` on each ``price_change`` entry, or its ``best_bid_ask``; ``venue_top``) and ours differs. A venue bid of 0 or an ask of 1 or more
  (Polymarket's prices live in (0, 1)) means that side is empty.

**Status** (PROTOCOL.md section 11). An instrument's status is the first condition that holds, in the order of
``PRECEDENCE``; none holds: ``ok``::

    resolved > halted > resyncing > crossed > stale > ok

``StatusTracker.set(instrument, condition, on, reason, now_ns)`` turns one condition on or off and returns a
``StatusChange`` when the resulting status (or its reason) changed, with ``since_ns`` the time it did.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from feed.model import BestBidAsk, VenueSeqKind
from feed.wire import Status  # the instrument statuses of PROTOCOL.md section 11, declared once

Top = tuple[Decimal | None, Decimal | None]  # (best bid price, best ask price); None = empty side

# The ``bookcast_ingest_integrity_faults_total`` kind of each venue seq fault (``feed.venues.seqcheck``).
SEQ_FAULT_KINDS: dict[VenueSeqKind, str] = {VenueSeqKind.GAP: "seq_gap", VenueSeqKind.DUPLICATE: "duplicate",
                                            VenueSeqKind.RESET: "reset"}


PRECEDENCE: tuple[Status, ...] = (Status.RESOLVED, Status.HALTED, Status.RESYNCING, Status.CROSSED, Status.STALE)


class Verdict(enum.StrEnum):
    OK = "ok"
    CROSSED = "crossed"
    LOCKED = "locked"
    TOP_MISMATCH = "top_mismatch"


@dataclass(frozen=True, slots=True)
class BurstEnd:
    """The check of one ended burst. ``top`` is our book's, ``venue_top`` what the venue said (or None)."""

    instrument: str
    ts_event_ns: int | None
    verdict: Verdict
    top: Top
    venue_top: Top | None

    @property
    def fault_kind(self) -> str | None:
        """The ``bookcast_ingest_integrity_faults_total`` kind, None when the burst ended fine."""
        if self.verdict is Verdict.OK:
            return None
        return "top_mismatch" if self.verdict is Verdict.TOP_MISMATCH else "crossed"

    def describe(self) -> str:
        bid, ask = self.top
        text = f"instrument={self.instrument} best_bid={_s(bid)} best_ask={_s(ask)}"
        if self.venue_top is not None:
            text += f" venue_best_bid={_s(self.venue_top[0])} venue_best_ask={_s(self.venue_top[1])}"
        return f"{self.verdict.value} after burst {text}"


def _s(d: Decimal | None) -> str:
    return "none" if d is None else format(d.normalize(), "f")


def book_top(book: Any) -> Top:
    """(best bid price, best ask price) of a ``feed.book.L2Book`` (anything with ``best_bid()`` and
    ``best_ask()`` returning ``(price, size)`` or None)."""
    bid, ask = book.best_bid(), book.best_ask()
    return (bid[0] if bid else None, ask[0] if ask else None)


def judge(top: Top, venue_top: Top | None) -> Verdict:
    """The verdict on a book whose burst is complete."""
    bid, ask = top
    if bid is not None and ask is not None:
        if bid > ask:
            return Verdict.CROSSED
        if bid == ask:
            return Verdict.LOCKED
    if venue_top is not None:
        vbid, vask = venue_top
        if vbid is not None and vbid <= 0:
            vbid = None
        if vask is not None and vask >= 1:
            vask = None
        if (vbid, vask) != (bid, ask):
            return Verdict.TOP_MISMATCH
    return Verdict.OK


@dataclass(slots=True)
class _Burst:
    ts_event_ns: int | None
    last_recv_ns: int
    venue_top: Top | None = None


class BurstChecker:
    """Tracks the open burst of every instrument and judges each one when it ends.

    Per message: ``begin(instrument, ts_event_ns, top_now)`` *before* applying it (returns the judgement of
    the burst it closes, if it starts a new one), then ``end_message(instrument, ts_event_ns, recv_ns,
    venue_top)`` after. ``flush(now_ns, top_of)`` closes bursts idle for ``burst_idle_s``; ``close_all``
    at the end of a stream.
    """

    def __init__(self, burst_idle_s: float = 0.25) -> None:
        if not burst_idle_s > 0:
            raise ValueError(f"burst_idle_s must be > 0, got {burst_idle_s!r}")
        self.burst_idle_ns = int(burst_idle_s * 1e9)
        self._open: dict[str, _Burst] = {}

    def begin(self, instrument: str, ts_event_ns: int | None, top_now: Top) -> BurstEnd | None:
        burst = self._open.get(instrument)
        if burst is None or (burst.ts_event_ns == ts_event_ns and ts_event_ns is not None):
            return None
        del self._open[instrument]
        return BurstEnd(instrument, burst.ts_event_ns, judge(top_now, burst.venue_top), top_now, burst.venue_top)

    def end_message(self, instrument: str, ts_event_ns: int | None, recv_ns: int, venue_top: Top | None) -> None:
        burst = self._open.get(instrument)
        if burst is None:
            burst = self._open[instrument] = _Burst(ts_event_ns, recv_ns)
        burst.last_recv_ns = recv_ns
        if venue_top is not None:
            burst.venue_top = venue_top

    def flush(self, now_ns: int, top_of: Callable[[str], Top | None]) -> list[BurstEnd]:
        """Judge every burst idle for ``burst_idle_s`` at ``now_ns``; ``top_of`` gives a book's top (None:
        the book is gone, the burst is dropped)."""
        ended = [i for i, b in self._open.items() if now_ns - b.last_recv_ns >= self.burst_idle_ns]
        return self._close(ended, top_of)

    def close_all(self, top_of: Callable[[str], Top | None]) -> list[BurstEnd]:
        return self._close(list(self._open), top_of)

    def forget(self, instrument: str) -> None:
        self._open.pop(instrument, None)

    def _close(self, instruments: list[str], top_of: Callable[[str], Top | None]) -> list[BurstEnd]:
        out = []
        for inst in instruments:
            burst = self._open.pop(inst)
            top = top_of(inst)
            if top is not None:
                out.append(BurstEnd(inst, burst.ts_event_ns, judge(top, burst.venue_top), top, burst.venue_top))
        return out


def venue_top(event: Any) -> Top | None:
    """The venue's own top of book that a parsed event carries, or None: a Polymarket ``price_change``
    delta's ``venue_best_bid``/``venue_best_ask`` (its asset's last ``price_changes[]`` entry, parsed by
    ``feed.venues.polymarket``) or a ``best_bid_ask`` (``BestBidAsk``). One side None means the venue
    said that side is empty; a delta carrying neither (the legacy ``changes`` schema, other venues) has
    none. Source: docs.polymarket.com, market channel, ``price_change`` and ``best_bid_ask``."""
    if isinstance(event, BestBidAsk):
        return (event.best_bid, event.best_ask)
    bid, ask = getattr(event, "venue_best_bid", None), getattr(event, "venue_best_ask", None)
    return (bid, ask) if bid is not None or ask is not None else None


# -- instrument status ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StatusChange:
    instrument: str
    status: Status
    reason: str
    since_ns: int


@dataclass(slots=True)
class _InstrumentStatus:
    conditions: dict[Status, str] = field(default_factory=dict)  # condition -> reason
    status: Status = Status.OK
    reason: str = ""
    since_ns: int = 0


class StatusTracker:
    """Status of every instrument from its conditions (see ``PRECEDENCE``)."""

    def __init__(self) -> None:
        self._by_instrument: dict[str, _InstrumentStatus] = {}

    def set(self, instrument: str, condition: Status, on: bool, reason: str, now_ns: int) -> StatusChange | None:
        if condition is Status.OK:
            raise ValueError("ok is the absence of every condition, not a condition")
        st = self._by_instrument.get(instrument)
        if st is None:
            st = self._by_instrument[instrument] = _InstrumentStatus(since_ns=now_ns)
        if on:
            st.conditions[condition] = reason
        else:
            st.conditions.pop(condition, None)
        status, why = Status.OK, ""
        for cond in PRECEDENCE:
            if cond in st.conditions:
                status, why = cond, st.conditions[cond]
                break
        if (status, why) == (st.status, st.reason):
            return None
        if status is not st.status:
            st.since_ns = now_ns
        st.status, st.reason = status, why
        return StatusChange(instrument, status, why, st.since_ns)

    def status(self, instrument: str) -> Status:
        st = self._by_instrument.get(instrument)
        return st.status if st is not None else Status.OK

    def get(self, instrument: str) -> tuple[Status, str, int] | None:
        st = self._by_instrument.get(instrument)
        return (st.status, st.reason, st.since_ns) if st is not None else None

    def has(self, instrument: str, condition: Status) -> bool:
        st = self._by_instrument.get(instrument)
        return st is not None and condition in st.conditions

    def forget(self, instrument: str) -> None:
        self._by_instrument.pop(instrument, None)

    def counts(self, instruments: list[str]) -> dict[Status, int]:
        out = {s: 0 for s in Status}
        for inst in instruments:
            out[self.status(inst)] += 1
        return out
