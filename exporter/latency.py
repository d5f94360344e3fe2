"""Per-hop latency of one message, and HDR histograms over sliding windows (the probe's pure core).

Hops, from the stamps every data message carries (PROTOCOL.md section 4; all ns since the Unix epoch):

==============  ==================================  ===========================================
hop             value                               who is slow when it grows
==============  ==================================  ===========================================
upstream        ts_ingest_ns - ts_event_ns          the venue or the provider link (or its clock)
ingest          ts_publish_ns - ts_ingest_ns        the ingest (parse, book, encode)
nats_gateway    ts_send_ns - ts_publish_ns          NATS transit and the gateway's fan-out
gateway_queue   ts_write_ns - ts_send_ns            the client's queue in the gateway (enqueue to
                                                    socket write; only where the gateway stamps writes)
network         recv - ts_write_ns                  kernel socket buffers and the network (from
                (recv - ts_send_ns without a write  ts_send_ns, so including the gateway queue, when
                stamp)                              the gateway gives no write stamp)
reader          read - recv                         the reader itself: frame off the socket to its
                                                    own code handling it (the probe knows both)
client          recv - ts_send_ns                   gateway queue + network (the old combined hop,
                                                    kept for dashboards; not a path hop)
e2e             read (or recv) - ts_event_ns        everything (from ts_ingest_ns without a venue time)
==============  ==================================  ===========================================

The path hops (``PATH_HOPS``) add up to e2e. Upstream and the venue's clock are the venue's ("theirs");
ingest, nats_gateway and gateway_queue are bookcast's ("ours"); network is the host's kernel and the
network between; reader is the consumer's own code.

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

import enum
from collections.abc import Iterable, Mapping
from typing import Any

from hdrh.histogram import HdrHistogram

# Lowest discernible value 1 µs, highest 1 h, 3 significant digits: quantiles within 0.1 % of the value.
HDR_LOWEST_NS = 1_000
HDR_HIGHEST_NS = 3_600 * 10**9
HDR_DIGITS = 3
QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999, 0.9999)


# A hop above this is a clock's doing, not a latency (an hour: the HDR histograms' ceiling).
IMPLAUSIBLE_NS = HDR_HIGHEST_NS


class Hop(enum.StrEnum):
    UPSTREAM = "upstream"
    INGEST = "ingest"
    NATS_GATEWAY = "nats_gateway"
    GATEWAY_QUEUE = "gateway_queue"
    NETWORK = "network"
    READER = "reader"
    CLIENT = "client"
    E2E = "e2e"


# The hops that add up to e2e, in path order.
PATH_HOPS: tuple[Hop, ...] = (Hop.UPSTREAM, Hop.INGEST, Hop.NATS_GATEWAY, Hop.GATEWAY_QUEUE, Hop.NETWORK, Hop.READER)


def skewed(value_ns: int | float) -> bool:
    """True when a hop value cannot be a latency: negative (the later stamp's clock is behind) or above
    ``IMPLAUSIBLE_NS`` (ahead by more than any stall we measure)."""
    return value_ns < 0 or value_ns > IMPLAUSIBLE_NS


def _int(msg: Mapping[str, Any], key: str) -> int | None:
    value = msg.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


WRITE_STAMP = "ts_write_ns"  # the gateway's socket-write stamp (additive field, docs/protocol-notes.md)


def hops_ns(msg: Mapping[str, Any], recv_ns: int, read_ns: int | None = None) -> dict[Hop, int] | None:
    """Signed per-hop latencies (ns) of a data message the client took off its socket at ``recv_ns`` and
    its own code reached at ``read_ns`` (None: not known, no ``reader`` hop).

    Returns None when the message lacks ``ts_ingest_ns``, ``ts_publish_ns`` or ``ts_send_ns``. Without a
    ``ts_event_ns`` (a venue that gives none) there is no ``upstream`` hop and ``e2e`` starts at ingest;
    without ``ts_write_ns`` there is no ``gateway_queue`` hop and ``network`` starts at ``ts_send_ns``.
    """
    ingest, publish, send = _int(msg, "ts_ingest_ns"), _int(msg, "ts_publish_ns"), _int(msg, "ts_send_ns")
    if ingest is None or publish is None or send is None:
        return None
    event, write = _int(msg, "ts_event_ns"), _int(msg, WRITE_STAMP)
    last = recv_ns if read_ns is None else read_ns
    out = {Hop.INGEST: publish - ingest, Hop.NATS_GATEWAY: send - publish, Hop.CLIENT: recv_ns - send,
           Hop.NETWORK: recv_ns - (send if write is None else write),
           Hop.E2E: last - (ingest if event is None else event)}
    if event is not None:
        out[Hop.UPSTREAM] = ingest - event
    if write is not None:
        out[Hop.GATEWAY_QUEUE] = write - send
    if read_ns is not None:
        out[Hop.READER] = read_ns - recv_ns
    return out


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
