"""Per-hop latency of one message, and HDR histograms over sliding windows (the probe's pure core).

Hops, from the stamps every data message carries (PROTOCOL.md section 4; all ns since the Unix epoch):

============  ==================================  =============================================
hop           value                               who is slow when it grows
============  ==================================  =============================================
upstream      ts_ingest_ns - ts_event_ns          the venue or the provider link (or its clock)
ingest        ts_publish_ns - ts_ingest_ns        the ingest (parse, book, encode)
nats_gateway  ts_send_ns - ts_publish_ns          NATS transit and the gateway's fan-out
client        recv - ts_send_ns                   gateway queue, socket, network, the reader
e2e           recv - ts_event_ns                  everything (from ts_ingest_ns without a venue time)
============  ==================================  =============================================

Coordinated omission: every value is a difference of stamps taken by the producers as the message moved
(the producer's schedule), plus the client's receive time. Nothing is measured from when the probe asked
or got around to looking, so a stall anywhere cannot hide: every message that waited behind it carries
the wait in its own stamps and is measured, one sample per message. Messages lost outright show as gaps.

Clocks of different hosts can disagree, so a hop can come out negative; ``hops_ns`` returns it signed and
the caller counts it as clock skew and records 0.

Pure: no I/O, no clock. Windows take ``now_s`` (any monotonic seconds) from the caller.
"""
from __future__ import annotations

from collections.abc import Iterable

from hdrh.histogram import HdrHistogram

# The hop vocabulary is feed's (one enum, one function computing every hop from a message's stamps).
from feed.hops import PATH_HOPS, Hop, hops_ns  # noqa: F401 - re-exported

# Lowest discernible value 1 µs, highest 1 h, 3 significant digits: quantiles within 0.1 % of the value.
HDR_LOWEST_NS = 1_000
HDR_HIGHEST_NS = 3_600 * 10**9
HDR_DIGITS = 3
QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999, 0.9999)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(HDR_LOWEST_NS, HDR_HIGHEST_NS, HDR_DIGITS)


class SlidingWindow:
    """An HDR histogram of the values recorded in the last ``window_s`` seconds.

    Made of ``slices`` sub-histograms, each covering ``window_s / slices`` seconds, reused in a ring: the
    window's edge moves in steps of one slice, so a quantile covers between ``window_s - slice`` and
    ``window_s`` seconds of data. Values are ns, clamped to [0, 1 h]; their exact sum is kept beside the
    histogram (HDR's own mean walks every bucket, tens of ms).
    """

    def __init__(self, window_s: float, slices: int = 6) -> None:
        if window_s <= 0 or slices < 1:
            raise ValueError(f"need window_s > 0 and slices >= 1, got {window_s}, {slices}")
        self.window_s = window_s
        self.slice_s = window_s / slices
        self._ring: list[tuple[int, HdrHistogram]] = [(-1, new_histogram()) for _ in range(slices)]
        self._sums_ns = [0] * slices

    def record(self, value_ns: int, now_s: float) -> None:
        index = int(now_s // self.slice_s)
        pos = index % len(self._ring)
        held, hist = self._ring[pos]
        if held != index:
            hist.reset()
            self._ring[pos] = (index, hist)
            self._sums_ns[pos] = 0
        value_ns = min(max(value_ns, 0), HDR_HIGHEST_NS)
        hist.record_value(value_ns)
        self._sums_ns[pos] += value_ns

    def _live(self, now_s: float) -> list[int]:
        current = int(now_s // self.slice_s)
        return [pos for pos, (index, _) in enumerate(self._ring) if current - len(self._ring) < index <= current]

    def merged(self, now_s: float) -> HdrHistogram:
        """A new histogram holding every value of the window ending at ``now_s``."""
        out = new_histogram()
        for pos in self._live(now_s):
            if self._ring[pos][1].get_total_count():
                out.add(self._ring[pos][1])
        return out

    def sum_ns(self, now_s: float) -> int:
        """The exact sum of the (clamped) values of the window ending at ``now_s``."""
        return sum(self._sums_ns[pos] for pos in self._live(now_s))


def summarize(hist: HdrHistogram, quantiles: Iterable[float] = QUANTILES) -> tuple[int, dict[float, int], int]:
    """``(count, {quantile: value_ns}, max_ns)`` of a histogram (zeros when empty)."""
    count = hist.get_total_count()
    if not count:
        return 0, {q: 0 for q in quantiles}, 0
    quantiles = tuple(quantiles)
    by_percentile = hist.get_percentile_to_value_dict([q * 100 for q in quantiles])  # one pass over the buckets
    values = {q: by_percentile[q * 100] for q in quantiles}
    return count, values, hist.get_max_value()


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
