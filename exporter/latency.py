"""Per-hop latency of one message, and HDR histograms over sliding windows (the probe's pure core).

Hops (``feed.hops``: upstream, ingest, nats_gateway, gateway_queue, network, reader, and the combined client
and e2e) are differences of the stamps every data message carries (PROTOCOL.md section 4; ns since the Unix
epoch) and the receiver's own receive and read times.

Coordinated omission: every value is a difference of stamps taken by the producers as the message moved
(the producer's schedule), plus the client's receive time. Nothing is measured from when the probe asked
or got around to looking, so a stall anywhere cannot hide: every message that waited behind it carries
the wait in its own stamps and is measured, one sample per message. Messages lost outright show as gaps.

Clocks of different hosts can disagree, so a hop can come out negative (or absurdly large); ``hops_ns``
returns it signed, ``skewed`` says whether a value is one a clock produced rather than a latency, and the
callers count such samples apart (never as a latency, never as 0).

Pure: no I/O, no clock. Windows take ``now_s`` (any monotonic seconds) from the caller.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from hdrh.histogram import HdrHistogram

# Lowest discernible value 1 µs, highest 1 h, 3 significant digits: quantiles within 0.1 % of the value.
HDR_LOWEST_NS = 1_000
HDR_HIGHEST_NS = 3_600 * 10**9
HDR_DIGITS = 3
QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999, 0.9999)


# The hop vocabulary is feed's (one enum, one table computing every hop from a message's stamps).
from feed.hops import PATH_HOPS, WRITE_STAMP, Hop, hops_ns  # noqa: E402,F401 - re-exported

# A hop above this is a clock's doing, not a latency (an hour: the HDR histograms' ceiling).
IMPLAUSIBLE_NS = HDR_HIGHEST_NS


def skewed(value_ns: int | float) -> bool:
    """True when a hop value cannot be a latency: negative (the later stamp's clock is behind) or above
    ``IMPLAUSIBLE_NS`` (ahead by more than any stall we measure)."""
    return value_ns < 0 or value_ns > IMPLAUSIBLE_NS


def new_histogram() -> HdrHistogram:
    return HdrHistogram(HDR_LOWEST_NS, HDR_HIGHEST_NS, HDR_DIGITS)


class SlidingWindow:
    """An HDR histogram of the values recorded in the last ``window_s`` seconds.

    Made of ``slices`` sub-histograms, each covering ``window_s / slices`` seconds, reused in a ring: the
    window's edge moves in steps of one slice, so a quantile covers between ``window_s - slice`` and
    ``window_s`` seconds of data. Values are ns, clamped to [0, 1 h]; their exact sum is kept beside the
    histogram (HDR's own mean walks every bucket, tens of ms).

    The probe reads every window of every hop on its event loop, so reading is vectorised (``summary``:
    numpy over the slices' counts, well under a millisecond) and a slice is replaced, not reset: the
    library's pure-Python walks of its ~25,000 buckets (``add``, ``reset``, percentiles) cost 1-2 ms each,
    and a probe with 2 regions x 8 hops x 2 windows stalled its own reading for 100-240 ms every update,
    which its samples then showed as network latency.
    """

    def __init__(self, window_s: float, slices: int = 6) -> None:
        if window_s <= 0 or slices < 1:
            raise ValueError(f"need window_s > 0 and slices >= 1, got {window_s}, {slices}")
        self.window_s = window_s
        self.slice_s = window_s / slices
        self._ring: list[tuple[int, HdrHistogram]] = [(-1, new_histogram()) for _ in range(slices)]
        self._sums_ns = [0] * slices
        _value_table(self._ring[0][1])  # built once per shape (~30 ms), here rather than on the first read

    def record(self, value_ns: int, now_s: float) -> None:
        index = int(now_s // self.slice_s)
        pos = index % len(self._ring)
        held, hist = self._ring[pos]
        if held != index:
            hist = new_histogram()  # a fresh one costs ~2 us; the library's reset() walks every bucket
            self._ring[pos] = (index, hist)
            self._sums_ns[pos] = 0
        value_ns = min(max(value_ns, 0), HDR_HIGHEST_NS)
        hist.record_value(value_ns)
        self._sums_ns[pos] += value_ns

    def _live(self, now_s: float) -> list[int]:
        current = int(now_s // self.slice_s)
        return [pos for pos, (index, _) in enumerate(self._ring) if current - len(self._ring) < index <= current]

    def merged(self, now_s: float) -> HdrHistogram:
        """A new histogram holding every value of the window ending at ``now_s`` (the library's own add:
        ~1 ms a slice; ``summary`` gives the same figures without building it)."""
        out = new_histogram()
        for pos in self._live(now_s):
            if self._ring[pos][1].get_total_count():
                out.add(self._ring[pos][1])
        return out

    def summary(self, now_s: float, quantiles: Iterable[float] = QUANTILES) -> tuple[int, dict[float, int], int]:
        """``summarize(self.merged(now_s), quantiles)``, computed over the live slices' counts at once."""
        live = [self._ring[pos][1] for pos in self._live(now_s)]
        live = [h for h in live if h.get_total_count()]
        quantiles = tuple(quantiles)
        if not live:
            return 0, {q: 0 for q in quantiles}, 0
        counts = _counts(live[0]).copy()
        for h in live[1:]:
            counts += _counts(h)
        return _summary(live[0], counts, quantiles, max(h.get_max_value() for h in live))

    def sum_ns(self, now_s: float) -> int:
        """The exact sum of the (clamped) values of the window ending at ``now_s``."""
        return sum(self._sums_ns[pos] for pos in self._live(now_s))


_VALUE_TABLES: dict[tuple[int, int, int], np.ndarray] = {}
_DTYPES: dict[type, np.dtype] = {}


def _counts(hist: HdrHistogram) -> np.ndarray:
    """The histogram's bucket counts as a numpy view (no copy) of its ``counts`` array."""
    dtype = _DTYPES.get(hist.counts._type_)
    if dtype is None:
        dtype = _DTYPES[hist.counts._type_] = np.dtype(hist.counts._type_)
    return np.frombuffer(hist.counts, dtype=dtype, count=hist.counts_len)


def _value_table(hist: HdrHistogram) -> np.ndarray:
    """Per bucket index, the value a percentile landing there reports: the highest value equivalent to
    the bucket's (``get_highest_equivalent_value(get_value_from_index(i))``, as the library's percentiles
    do). Built once per histogram shape through the library's own functions."""
    key = (hist.lowest_trackable_value, hist.highest_trackable_value, hist.significant_figures)
    table = _VALUE_TABLES.get(key)
    if table is None:
        table = np.fromiter((hist.get_highest_equivalent_value(hist.get_value_from_index(i))
                             for i in range(hist.counts_len)), dtype=np.int64, count=hist.counts_len)
        _VALUE_TABLES[key] = table
    return table


def _summary(shape: HdrHistogram, counts: np.ndarray, quantiles: Sequence[float],
             max_ns: int) -> tuple[int, dict[float, int], int]:
    cumulative = np.cumsum(counts, dtype=np.uint64)
    total = int(cumulative[-1])
    if not total:
        return 0, {q: 0 for q in quantiles}, 0
    # the library's rank: max(int(percentile * total / 100 + 0.5), 1), and the first bucket reaching it
    targets = np.array([max(int(min(q * 100, 100.0) * total / 100 + 0.5), 1) for q in quantiles], dtype=cumulative.dtype)
    found = _value_table(shape)[np.searchsorted(cumulative, targets, side="left")]
    return total, dict(zip(quantiles, found.tolist())), max_ns


def summarize(hist: HdrHistogram, quantiles: Iterable[float] = QUANTILES) -> tuple[int, dict[float, int], int]:
    """``(count, {quantile: value_ns}, max_ns)`` of a histogram (zeros when empty); the values are the
    library's ``get_percentile_to_value_dict`` (quantiles > 0), computed over its counts with numpy."""
    return _summary(hist, _counts(hist), tuple(quantiles), hist.get_max_value())


class StaleTracker:
    """Instruments with no message and no heartbeat for ``stale_after_s`` seconds.

    A heartbeat (PROTOCOL.md section 4) is connection-wide: the SDK checks its seqs against every held
    book, so one seen at ``now_s`` vouches for every instrument of the connection. Note a gateway sends
    heartbeats only on a connection quiet for 1 s, so on a busy connection an instrument that does not
    trade for ``stale_after_s`` counts as stale.
    """

    def __init__(self, instruments: Iterable[str], stale_after_s: float, now_s: float) -> None:
        self.stale_after_s = stale_after_s
        self.last_s = dict.fromkeys(instruments, now_s)
        self.heartbeat_s = now_s

    def message(self, instrument: str, now_s: float) -> None:
        if instrument in self.last_s:
            self.last_s[instrument] = now_s

    def heartbeat(self, now_s: float) -> None:
        self.heartbeat_s = now_s

    def stale(self, now_s: float) -> list[str]:
        limit = now_s - self.stale_after_s
        return sorted(i for i, t in self.last_s.items() if max(t, self.heartbeat_s) < limit)
