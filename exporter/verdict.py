"""Us or the upstream? The latency verdict over a window of per-message samples (pure: no I/O, no clock).

Input: one row per measured message, the signed value (ns) of every path hop (``exporter.latency.PATH_HOPS``;
NaN where the message has no such hop), the second each was received in (the bootstrap's blocks), and the
host's CPU saturation over the window (``HostContext``). Output: a ``Verdict`` naming one cause, with its
sample count, a confidence interval and the agreement of bootstrap resamples, and one sentence for people.

Rules, in order (constants below; the order is the point, so a fault is named the same way every time):

1. **Honest hops.** A hop value that is negative or above ``IMPLAUSIBLE_NS`` is clock skew, not latency
   (``exporter.latency.skewed``). Per hop the skewed samples are counted apart with their share, and the
   clock offset is estimated (``clock_offset_ns``: minus the median when most values are negative, else
   minus the p0.1, the least the offset can be since a true latency is >= 0). A hop with more than
   ``MAX_SKEW_SHARE`` skewed samples, or with too few samples, is **not measured**: the verdict does not use
   it and says so. Messages with a skewed value in a measured hop are left out of the verdict (counted).
2. **Not enough data**: fewer than ``min_samples`` usable messages.
3. **A steady fault**: a measured hop whose median is at least ``steady_ns`` and whose floor (p5) is at
   least ``STEADY_FLOOR_SHARE`` of its median is the cause: a fixed delay in one hop (a lagging upstream, a
   slow ingest or fan-out, a slow reader) makes every message wait, shifting the hop's whole distribution,
   whereas a starved process's backlog comes and goes (a floor far below the median), and noise moves
   neither.
   Hops stamped by the producers (upstream, ingest, nats_gateway, gateway_queue) come first, the largest
   median winning: a consumer that falls behind cannot shift stamps taken before it got the message, so
   their shift is a fault even when the consumer's own hops are worse; then the reader; the network last.
   A steady shift in the reader's own hops (network, reader) while the host is starved (rule 5's test) and
   the reader's event loop itself waited for a CPU at least ``READER_STARVED_SHARE`` of the time (its
   schedstat) is host CPU starvation: its frames wait because it gets no CPU, not because it is slow.
4. **Healthy**: the p99 of the measured delivery path (the sum of the measured hops but the reader's own:
   the reader's delay is the consumer's, here the probe's, and counts only as a steady fault, rule 3) is
   within ``budget_ns``.
5. **Host CPU starvation**: over budget, and the host was starved of CPU over the window
   (``HostContext.starved``: the eBPF run-queue delay of bookcast's threads when the eBPF exporter runs,
   else the share of time /proc/pressure/cpu says some task waited for a CPU).
6. **The tail's owner**: over budget and not starved: the hop holding at least ``DOMINANT_SHARE`` of the
   mean of the slowest messages (those at or above the delivery path's p99); else **mixed** (the two
   largest named).

Stability: the decision is re-run on ``bootstrap`` resamples of one-second blocks of the window (messages in
one second are not independent), drawn from a fixed seed, so the same data always gives the same verdict.
``agreement`` is the share of resamples that reach the same cause, and the interval (2.5 %, 97.5 %) is of the
figure that decided it (the hop's median for rule 3, the total's p99 for 4 and 5, the hop's tail share for
6). Below ``MIN_AGREEMENT`` the verdict is "not enough data" and says what it leaned to.

Bootstrap method: Efron and Tibshirani, An Introduction to the Bootstrap (1993), ch. 13 (percentile
intervals); blocks as in Kunsch (1989), "The jackknife and the bootstrap for general stationary observations".
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from exporter.latency import IMPLAUSIBLE_NS, PATH_HOPS, Hop

MAX_SKEW_SHARE = 0.05
DOMINANT_SHARE = 0.5
MIN_AGREEMENT = 0.8
MIN_SAMPLES = 200
BUDGET_NS = 100_000_000      # p99 of the measured total a healthy stack stays within
STEADY_NS = 50_000_000       # a hop whose median is this high holds a steady fault ...
STEADY_FLOOR_Q = 0.05        # ... when its p5 (its floor) ...
STEADY_FLOOR_SHARE = 0.5     # ... is at least this share of its median: every message waits (a shift, not a backlog)
BOOTSTRAP = 100
PSI_STARVED_SHARE = 0.5      # /proc/pressure/cpu "some": share of wall time some task waited for a CPU
RUNQUEUE_STARVED_S = 0.002   # eBPF: mean run-queue delay of bookcast's threads
READER_STARVED_SHARE = 0.5   # the reader's event loop waited for a CPU this share of wall time
BOOTSTRAP_MAX_ROWS = 5_000   # a fixed-seed subsample beyond this keeps `bookcast why` under 5 s


class Cause(enum.StrEnum):
    NOT_ENOUGH_DATA = "not_enough_data"
    HEALTHY = "healthy"
    HOST_CPU = "host_cpu"
    MIXED = "mixed"
    UPSTREAM = "upstream"
    INGEST = "ingest"
    NATS_GATEWAY = "nats_gateway"
    GATEWAY_QUEUE = "gateway_queue"
    NETWORK = "network"
    READER = "reader"


HOP_NAMES: dict[Hop, str] = {
    Hop.UPSTREAM: "the upstream (venue to ingest)",
    Hop.INGEST: "the ingest",
    Hop.NATS_GATEWAY: "NATS and the gateway's fan-out",
    Hop.GATEWAY_QUEUE: "the gateway's per-client queue",
    Hop.NETWORK: "the socket and network",
    Hop.READER: "the reader itself",
    Hop.CLIENT: "gateway queue + network",
    Hop.E2E: "end to end",
}
# Whose it is: the venue's, bookcast's, the host or network's, or the consumer's own code.
OWNER: dict[Cause, str] = {
    Cause.UPSTREAM: "theirs (the venue or its link), not ours",
    Cause.INGEST: "ours (bookcast's ingest)",
    Cause.NATS_GATEWAY: "ours (NATS and the gateway)",
    Cause.GATEWAY_QUEUE: "ours (the gateway's queue for this client)",
    Cause.NETWORK: "the host's kernel or the network, not bookcast's code",
    Cause.READER: "the reader's own (the consumer is slow), not bookcast's",
    Cause.HOST_CPU: "the host's: every process waits for a CPU",
}
NEXT_STEPS: dict[Cause, tuple[str, ...]] = {
    Cause.UPSTREAM: ("the provider and its link: bookcast_ingest_provider_score, bookcast_ingest_provider_lag_seconds",
                     "the venue's own status page; compare another provider of the venue"),
    Cause.INGEST: ("the ingest's CPU and event loop: bookcast ebpf (syscall and run-queue latency, role ingest)",
                   "bookcast_hop_ingest_seconds on the ingest's /metrics"),
    Cause.NATS_GATEWAY: ("nats-server's /varz (slow consumers, pending bytes) and the gateway's fan-out workers",
                         "bookcast_hop_nats_gateway_seconds on the gateway's /metrics"),
    Cause.GATEWAY_QUEUE: ("slow consumers: bookcast_gateway_queue_bytes, resyncs with reason slow_consumer",
                          "the gateway workers' CPU (bookcast ebpf, role gateway)"),
    Cause.NETWORK: ("socket queues and retransmits: bookcast ebpf (bookcast_ebpf_socket_queue_seconds, TCP RTT)",
                    "the path between gateway and client (ss -ti on the gateway host)"),
    Cause.READER: ("the consumer's own loop: what it does per message (py-spy dump --pid PID)",
                   "conflate_ms on the subscription if it cannot keep up"),
    Cause.HOST_CPU: ("what else runs on the host: top -o %CPU, /proc/pressure/cpu",
                     "bookcast ebpf's bookcast_ebpf_runqueue_latency_seconds per role; fewer gateway workers than cores"),
    Cause.MIXED: ("the slowest messages below: which hop grows in each",),
    Cause.NOT_ENOUGH_DATA: ("a longer window (--since), or wait for traffic: is the upstream replaying?",),
    Cause.HEALTHY: ("nothing to do; `bookcast latency report --since 1h` for the longer view",),
}


@dataclass(frozen=True, slots=True)
class Params:
    budget_ns: float = BUDGET_NS
    steady_ns: float = STEADY_NS
    min_samples: int = MIN_SAMPLES
    bootstrap: int = BOOTSTRAP
    seed: int = 0


@dataclass(frozen=True, slots=True)
class HostContext:
    """CPU saturation over the window. ``source``: "ebpf" (``runqueue_mean_s``, the mean run-queue delay of
    bookcast's threads), "psi" (``stall_share``: share of wall time some task waited for a CPU, from
    /proc/pressure/cpu), or None (unknown)."""

    source: str | None = None
    stall_share: float | None = None
    runqueue_mean_s: float | None = None
    reader_wait_share: float | None = None  # the reader's (probe's) own share of wall time waiting for a CPU

    @property
    def reader_starved(self) -> bool:
        """The reader itself waited for a CPU so much that its own hops (network, reader) are the host's."""
        return self.reader_wait_share is not None and self.reader_wait_share >= READER_STARVED_SHARE

    @property
    def starved(self) -> bool:
        if self.source == "ebpf" and self.runqueue_mean_s is not None:
            return self.runqueue_mean_s >= RUNQUEUE_STARVED_S
        return self.stall_share is not None and self.stall_share >= PSI_STARVED_SHARE

    def describe(self) -> str:
        parts = []
        if self.runqueue_mean_s is not None:
            parts.append(f"bookcast threads waited {self.runqueue_mean_s * 1e3:.2f} ms per run-queue wait (eBPF)")
        if self.stall_share is not None:
            parts.append(f"some task waited for a CPU {self.stall_share:.0%} of the time (/proc/pressure/cpu)")
        if self.reader_wait_share is not None:
            parts.append(f"the reader waited for a CPU {self.reader_wait_share:.0%} of the time (its schedstat)")
        return "host CPU: " + ("; ".join(parts) if parts else "unknown (no PSI, no eBPF)")


@dataclass(frozen=True, slots=True)
class HopSkew:
    """Per hop: samples present, how many are clock skew and their share, the estimated clock offset (ns,
    > 0: the later stamp's clock is behind by about that much), and whether the verdict may use the hop."""

    count: int
    skewed: int
    share: float
    offset_ns: float
    measured: bool
    why_not: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    """``cause``: what the verdict names; ``culprit``: the hop when the cause is a hop, else None;
    ``samples``: messages the verdict used; ``interval``: (low, high) of ``figure`` (a name, e.g.
    ``"e2e p99 ns"``) over the resamples; ``agreement``: share of resamples reaching this cause;
    ``shares``: each measured hop's share of the tail's mean; ``text``: one sentence for people."""

    cause: Cause
    culprit: Hop | None
    samples: int
    figure: str
    value: float
    interval: tuple[float, float]
    agreement: float
    shares: dict[Hop, float]
    skew: dict[Hop, HopSkew]
    host: HostContext
    excluded: int
    text: str
    next_steps: tuple[str, ...] = field(default=())

    @property
    def ours(self) -> bool | None:
        """True when the cause is bookcast's own, False when it is not (upstream, network, reader, host),
        None when healthy, mixed or unknown."""
        if self.cause in (Cause.INGEST, Cause.NATS_GATEWAY, Cause.GATEWAY_QUEUE):
            return True
        if self.cause in (Cause.UPSTREAM, Cause.NETWORK, Cause.READER, Cause.HOST_CPU):
            return False
        return None

    def to_json(self) -> dict:
        return {"cause": self.cause.value, "culprit": self.culprit.value if self.culprit else None,
                "ours": self.ours, "samples": self.samples, "figure": self.figure, "value": self.value,
                "interval": list(self.interval), "agreement": self.agreement,
                "shares": {h.value: s for h, s in self.shares.items()},
                "skew": {h.value: {"count": s.count, "skewed": s.skewed, "share": s.share, "offset_ns": s.offset_ns,
                                   "measured": s.measured, "why_not": s.why_not} for h, s in self.skew.items()},
                "host": {"source": self.host.source, "stall_share": self.host.stall_share,
                         "runqueue_mean_s": self.host.runqueue_mean_s, "starved": self.host.starved,
                         "reader_wait_share": self.host.reader_wait_share, "reader_starved": self.host.reader_starved},
                "excluded": self.excluded, "text": self.text, "next_steps": list(self.next_steps)}


def clock_offset_ns(present: np.ndarray) -> float:
    """How far the later stamp's clock is behind (ns, 0 when no sign of it): when most values are negative,
    minus their median (the hop's own latency is small beside it); when few are, minus the p0.1 (the least
    the offset can be, since a latency is never negative)."""
    if not present.size:
        return 0.0
    median = float(np.median(present))
    if median < 0:
        return -median
    low = float(np.quantile(present, 0.001))
    return -low if low < 0 else 0.0


def skew_of(values: np.ndarray, min_samples: int) -> HopSkew:
    """Skew statistics of one hop's signed values (NaN = absent)."""
    present = values[~np.isnan(values)]
    count = int(present.size)
    if not count:
        return HopSkew(0, 0, 0.0, 0.0, False, "no samples carry it")
    bad = (present < 0) | (present > IMPLAUSIBLE_NS)
    skewed = int(bad.sum())
    share = skewed / count
    offset = clock_offset_ns(present)
    if share > MAX_SKEW_SHARE:
        why = f"{share:.0%} of its samples are clock skew, clock offset about {offset / 1e6:.1f} ms"
        return HopSkew(count, skewed, share, offset, False, why)
    if count - skewed < min_samples:
        return HopSkew(count, skewed, share, offset, False, f"only {count - skewed} samples")
    return HopSkew(count, skewed, share, offset, True)


@dataclass(frozen=True, slots=True)
class _Decision:
    cause: Cause
    value: float
    shares: np.ndarray | None
    via: Hop | None = None  # host CPU named through a starved reader's steady hop (value: that hop's median)


def _delivery(matrix: np.ndarray, hops: list[Hop]) -> np.ndarray:
    """The measured delivery path per message: every measured hop but the reader's own."""
    cols = [i for i, h in enumerate(hops) if h is not Hop.READER]
    return matrix[:, cols].sum(axis=1) if cols else np.zeros(matrix.shape[0])


def _decide(matrix: np.ndarray, hops: list[Hop], host: HostContext, params: Params) -> _Decision:
    floor, medians = np.quantile(matrix, [STEADY_FLOOR_Q, 0.5], axis=0)
    steady = [i for i, m in enumerate(medians) if m >= params.steady_ns and floor[i] >= STEADY_FLOOR_SHARE * m]
    if steady:
        # producer-stamped hops first: a consumer's backlog cannot shift stamps taken before it got the
        # message; then the reader's own delay; the network last
        rank = {Hop.READER: 1, Hop.NETWORK: 2}
        i = min(steady, key=lambda j: (rank.get(hops[j], 0), -medians[j]))
        if hops[i] in (Hop.NETWORK, Hop.READER) and host.starved and host.reader_starved:
            # frames wait in the reader's socket because the host gives it no CPU, not on the wire
            return _Decision(Cause.HOST_CPU, float(medians[i]), None, hops[i])
        return _Decision(Cause(hops[i].value), float(medians[i]), None)
    total = _delivery(matrix, hops)
    p99 = float(np.quantile(total, 0.99))
    if p99 <= params.budget_ns:
        return _Decision(Cause.HEALTHY, p99, None)
    if host.starved:
        return _Decision(Cause.HOST_CPU, p99, None)
    tail = matrix[total >= p99]
    means = np.maximum(tail.mean(axis=0), 0.0)
    shares = means / means.sum() if means.sum() > 0 else np.zeros(len(hops))
    top = int(np.argmax(shares))
    if shares[top] >= DOMINANT_SHARE:
        return _Decision(Cause(hops[top].value), float(shares[top]), shares)
    return _Decision(Cause.MIXED, float(shares[top]), shares)


def _figure(cause: Cause) -> str:
    return "total p99 ns" if cause in (Cause.HEALTHY, Cause.HOST_CPU) else "median ns"


def judge(hop_values: Mapping[Hop, np.ndarray], block_s: np.ndarray, host: HostContext,
          params: Params = Params()) -> Verdict:
    """The verdict over a window.

    Args:
        hop_values: per path hop, one signed value (ns) per message, NaN where the message lacks the hop;
            every array has the same length (one entry per message). Hops not given are absent.
        block_s: per message, the second it was received in (any integer clock): the bootstrap's blocks.
        host: the host's CPU saturation over the window.
    """
    n = len(block_s)
    skew = {hop: skew_of(np.asarray(hop_values[hop], dtype=float), params.min_samples)
            for hop in PATH_HOPS if hop in hop_values}
    hops = [hop for hop in PATH_HOPS if hop in skew and skew[hop].measured]
    if hops:
        matrix = np.column_stack([np.asarray(hop_values[h], dtype=float) for h in hops])
        ok = ~np.isnan(matrix).any(axis=1) & ~((matrix < 0) | (matrix > IMPLAUSIBLE_NS)).any(axis=1)
        matrix, blocks = matrix[ok], np.asarray(block_s)[ok]
    else:
        matrix, blocks = np.zeros((0, 0)), np.zeros(0)
    used = int(matrix.shape[0])
    excluded = n - used
    unmeasured = _unmeasured_text(skew)
    if used < params.min_samples or not hops:
        text = (f"not enough data: {used} usable messages in the window (need {params.min_samples})"
                + (f"; {unmeasured}" if unmeasured else ""))
        return Verdict(Cause.NOT_ENOUGH_DATA, None, used, "", 0.0, (0.0, 0.0), 0.0, {}, skew, host, excluded, text,
                       NEXT_STEPS[Cause.NOT_ENOUGH_DATA])
    point = _decide(matrix, hops, host, params)
    agreement, interval = _bootstrap(matrix, blocks, hops, host, params, point)
    shares_point = point.shares
    if shares_point is None:
        total = _delivery(matrix, hops)
        tail = matrix[total >= np.quantile(total, 0.99)]
        means = np.maximum(tail.mean(axis=0), 0.0)
        shares_point = means / means.sum() if means.sum() > 0 else np.zeros(len(hops))
    shares = {h: float(s) for h, s in zip(hops, shares_point)}
    culprit = Hop(point.cause.value) if point.cause.value in {h.value for h in PATH_HOPS} else None
    if point.shares is not None:
        figure = "top tail share" if point.cause is Cause.MIXED else "tail share"
    else:
        figure = "median ns" if point.via is not None else _figure(point.cause)
    text = _sentence(point, culprit, used, figure, interval, agreement, shares, host, params, unmeasured)
    cause = point.cause
    if agreement < MIN_AGREEMENT:
        text = (f"not enough data to decide: {used} messages lean to '{cause.value}' but only {agreement:.0%} of "
                f"{params.bootstrap} resamples agree (need {MIN_AGREEMENT:.0%}); a longer window will settle it")
        cause, culprit = Cause.NOT_ENOUGH_DATA, None
    return Verdict(cause, culprit, used, figure, point.value, interval, agreement, shares, skew, host, excluded, text,
                   NEXT_STEPS.get(cause, ()))


def _bootstrap(matrix: np.ndarray, blocks: np.ndarray, hops: list[Hop], host: HostContext, params: Params,
               point: _Decision) -> tuple[float, tuple[float, float]]:
    rng = np.random.default_rng(params.seed)
    if matrix.shape[0] > BOOTSTRAP_MAX_ROWS:  # a fixed subsample: the same window, the same verdict
        keep = np.sort(rng.choice(matrix.shape[0], BOOTSTRAP_MAX_ROWS, replace=False))
        matrix, blocks = matrix[keep], blocks[keep]
    ids, inverse = np.unique(blocks, return_inverse=True)
    groups = [np.flatnonzero(inverse == k) for k in range(len(ids))] if len(ids) >= 10 else None
    same, values = 0, []
    for _ in range(params.bootstrap):
        if groups is not None:
            picked = rng.integers(0, len(groups), len(groups))
            rows = np.concatenate([groups[k] for k in picked])
        else:
            rows = rng.integers(0, matrix.shape[0], matrix.shape[0])
        d = _decide(matrix[rows], hops, host, params)
        if d.cause is point.cause:
            same += 1
        if point.shares is not None:
            # the tail share of the point's top hop in this resample
            sub = matrix[rows]
            total = _delivery(sub, hops)
            tail = sub[total >= np.quantile(total, 0.99)]
            means = np.maximum(tail.mean(axis=0), 0.0)
            top = int(np.argmax(point.shares))
            values.append(float(means[top] / means.sum()) if means.sum() > 0 else 0.0)
        elif point.cause in (Cause.HEALTHY, Cause.HOST_CPU) and point.via is None:
            values.append(float(np.quantile(_delivery(matrix[rows], hops), 0.99)))
        else:
            i = hops.index(point.via or Hop(point.cause.value))
            values.append(float(np.median(matrix[rows][:, i])))
    lo, hi = np.quantile(values, [0.025, 0.975]) if values else (point.value, point.value)
    return same / params.bootstrap, (float(lo), float(hi))


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.3g} ms"


def _unmeasured_text(skew: Mapping[Hop, HopSkew]) -> str:
    parts = [f"{h.value} ({s.why_not})" for h, s in skew.items() if not s.measured]
    return "not measured: " + ", ".join(parts) if parts else ""


def _sentence(point: _Decision, culprit: Hop | None, used: int, figure: str, interval: tuple[float, float],
              agreement: float, shares: Mapping[Hop, float], host: HostContext, params: Params,
              unmeasured: str) -> str:
    sure = f"{used} messages, {agreement:.0%} of resamples agree"
    if point.cause is Cause.HEALTHY:
        head = (f"healthy: the p99 of the measured path is {_ms(point.value)} "
                f"(95% CI {_ms(interval[0])}-{_ms(interval[1])}), within the {_ms(params.budget_ns)} budget")
    elif point.cause is Cause.HOST_CPU and point.via is not None:
        head = (f"host CPU starvation: {HOP_NAMES[point.via]}'s median is {_ms(point.value)} (95% CI "
                f"{_ms(interval[0])}-{_ms(interval[1])}) while {host.describe()[10:]}; the reader is starved, "
                f"not slow; {OWNER[Cause.HOST_CPU]}")
    elif point.cause is Cause.HOST_CPU:
        head = (f"host CPU starvation: the p99 is {_ms(point.value)} (95% CI {_ms(interval[0])}-"
                f"{_ms(interval[1])}), over the {_ms(params.budget_ns)} budget, while {host.describe()[10:]}; "
                f"{OWNER[Cause.HOST_CPU]}")
    elif point.cause is Cause.MIXED:
        ranked = sorted(shares, key=lambda h: shares[h], reverse=True)[:2]
        head = ("the tail is mixed: " + ", ".join(f"{HOP_NAMES[h]} {shares[h]:.0%}" for h in ranked)
                + f" of the slowest messages (over the {_ms(params.budget_ns)} budget)")
    elif point.shares is not None:
        head = (f"{HOP_NAMES[culprit]} holds the tail: {point.value:.0%} of the slowest messages' latency "
                f"(95% CI {interval[0]:.0%}-{interval[1]:.0%}); {OWNER[point.cause]}")
    else:
        head = (f"{HOP_NAMES[culprit]} is slow: its median is {_ms(point.value)} (95% CI {_ms(interval[0])}-"
                f"{_ms(interval[1])}); {OWNER[point.cause]}")
    tail = f" ({sure})"
    if unmeasured:
        tail += f"; {unmeasured}"
    if point.cause is not Cause.HOST_CPU and host.source is not None:
        tail += f"; {host.describe()}"
    return head + tail
