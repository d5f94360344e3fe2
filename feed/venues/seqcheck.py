"""Venue sequence numbers, per stream: in order, forward gap, exact duplicate, or venue reset.

Kalshi numbers every message of a subscription (``sid``) with ``seq``, from 1; Coinbase Advanced Trade
numbers every message of a connection with ``sequence_num``, from 0 (all channels share it). Polymarket
has no sequence numbers. A *stream* is what one counter numbers: ``"sid=<n>"`` or ``"connection"``.

Rules (``SeqTracker.check``), for a stream whose last accepted seq is ``last``:

==================  ===========  ==========================================================
seq                 result       what the caller does
==================  ===========  ==========================================================
first on stream     ``None``     accept; ``last = seq``
``last + 1``        ``None``     accept; ``last = seq``
``> last + 1``      ``GAP``      accept, but the stream lost messages: its books need a resync
``<= last``, same   ``DUPLICATE``drop the message (same seq and the same message seen recently)
message as before
``<= last``, other  ``RESET``    accept; the venue restarted the stream (``last = seq``); resync
==================  ===========  ==========================================================

``VenueSession`` wraps a venue parser with one tracker per provider connection: it drops duplicates,
puts a ``VenueSeqFault`` event before the events of a message that gapped or reset, and remembers which
instruments each stream carried so the fault names them. Call ``reset()`` when the connection is new
(``LinkEvent.CONNECTED``): sids and counters start again on a new connection.

Pure: no I/O, no clock.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from feed.model import ParseResult, VenueSeqFault, VenueSeqKind

# How many recent messages per stream are kept to tell an exact duplicate from a venue reset.
RECENT_PER_STREAM = 64

SeqKey = Callable[[Any], tuple[str, int] | None]


class SeqTracker:
    """The last seq of each stream, and the recent messages by seq (see the module rules)."""

    def __init__(self, recent: int = RECENT_PER_STREAM) -> None:
        self._last: dict[str, int] = {}
        self._recent: dict[str, OrderedDict[int, Any]] = {}
        self._keep = recent

    def last(self, stream: str) -> int | None:
        return self._last.get(stream)

    def check(self, stream: str, seq: int, msg: Any = None) -> VenueSeqKind | None:
        """Classify ``seq`` on ``stream`` (``msg`` is compared for duplicates) and record it unless it
        is a duplicate. Returns None when in order (or first)."""
        last = self._last.get(stream)
        recent = self._recent.setdefault(stream, OrderedDict())
        if last is not None and seq <= last:
            if seq in recent and recent[seq] == msg:
                return VenueSeqKind.DUPLICATE
            recent.clear()
            kind: VenueSeqKind | None = VenueSeqKind.RESET
        elif last is not None and seq > last + 1:
            kind = VenueSeqKind.GAP
        else:
            kind = None
        self._last[stream] = seq
        recent[seq] = msg
        while len(recent) > self._keep:
            recent.popitem(last=False)
        return kind

    def forget(self, stream: str | None = None) -> None:
        """Forget one stream (a resubscribe), or all of them (a new connection)."""
        if stream is None:
            self._last.clear()
            self._recent.clear()
        else:
            self._last.pop(stream, None)
            self._recent.pop(stream, None)


class VenueSession:
    """A venue parser plus sequence checks, for the messages of ONE provider connection.

    ``parse(msg)`` returns what the venue parser returns, except: a duplicate returns only a
    ``VenueSeqFault(DUPLICATE)`` (its events are dropped); a gap or reset returns the fault first, then the
    message's events. Raises what the venue parser raises (``VenueMessageError``); a message that fails to
    parse still counts for its seq (it was received).
    """

    def __init__(self, venue: str, parse: Callable[[Any], ParseResult], seq_key: SeqKey | None) -> None:
        self.venue = venue
        self._parse = parse
        self._seq_key = seq_key
        self.tracker = SeqTracker()
        self._instruments: dict[str, dict[str, None]] = {}  # stream -> instruments seen (ordered set)
        self.faults = {kind: 0 for kind in VenueSeqKind}

    def reset(self) -> None:
        """A new connection: every stream starts again."""
        self.tracker.forget()
        self._instruments.clear()

    def instruments_of(self, stream: str) -> tuple[str, ...]:
        return tuple(self._instruments.get(stream, ()))

    def parse(self, msg: Any) -> ParseResult:
        key = self._seq_key(msg) if self._seq_key is not None else None
        fault = None
        if key is not None:
            stream, seq = key
            expected = (self.tracker.last(stream) or 0) + 1
            kind = self.tracker.check(stream, seq, msg)
            if kind is not None:
                self.faults[kind] += 1
                fault = VenueSeqFault(kind, self.venue, stream, expected, seq, self.instruments_of(stream))
                if kind is VenueSeqKind.DUPLICATE:
                    return ParseResult([fault])
        result = self._parse(msg)
        if key is not None and result.events:
            seen = self._instruments.setdefault(key[0], {})
            for event in result.events:
                instrument = getattr(event, "instrument", None)
                if instrument is not None:
                    seen[instrument] = None
        if fault is not None:
            result = ParseResult([fault, *result.events], result.ignored if not result.events else None)
        return result
