"""Benchmark arithmetic for ebpf.bench: interleaved windows, disturbed ones discarded, bootstrap intervals.

Pure: windows in, figures out (no clock, no I/O). A window is one measurement of one workload in one mode
(``detached`` = the peer, or an attached mode); each attached window is compared with the nearest
undisturbed detached windows of the same workload before and after it in the run, so slow drift of the
machine (other engineers' tests starting and stopping) cancels out of the difference. The interval is a
percentile bootstrap of the mean over those per-window differences (Efron & Tibshirani, "An Introduction
to the Bootstrap", ch. 13), with a fixed seed so a rerun on the same data gives the same interval.
"""
from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DETACHED = "detached"


@dataclass(frozen=True, slots=True)
class Window:
    """One measurement. ``value`` is the workload's figure (ns per operation, frames/s, ...);
    ``disturbed`` says the machine took CPU from the workload during it (the reason in ``why``)."""

    index: int            # position in the run, for neighbours
    workload: str
    mode: str
    value: float
    disturbed: bool = False
    why: str = ""


@dataclass(frozen=True, slots=True)
class Estimate:
    """``mode`` against the detached peer: mean difference and ratio with 95% bootstrap intervals."""

    workload: str
    mode: str
    detached: float              # median of the undisturbed detached windows
    difference: float            # mean of (window - its detached neighbours)
    difference_ci95: tuple[float, float]
    ratio: float                 # mean of (window / its detached neighbours)
    ratio_ci95: tuple[float, float]
    windows: int                 # undisturbed windows of this mode that had a detached neighbour
    discarded: int               # windows of this mode or its peers discarded as disturbed

    def as_dict(self) -> dict:
        return {"workload": self.workload, "mode": self.mode, "detached": self.detached,
                "difference": self.difference, "difference_ci95": list(self.difference_ci95),
                "ratio": self.ratio, "ratio_ci95": list(self.ratio_ci95), "windows": self.windows,
                "discarded": self.discarded}


def bootstrap_ci(values: Sequence[float], stat: Callable[[Sequence[float]], float] = statistics.fmean,
                 resamples: int = 2000, level: float = 0.95, seed: int = 17) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over ``values``; (v, v) for a single value.

    >>> bootstrap_ci([5.0])
    (5.0, 5.0)
    >>> lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0]); 1.0 <= lo <= 2.5 <= hi <= 4.0
    True
    """
    if not values:
        raise ValueError("no values")
    if len(values) == 1:
        return (float(values[0]), float(values[0]))
    rng = random.Random(seed)
    n = len(values)
    stats = sorted(stat([values[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    tail = (1 - level) / 2
    return (stats[int(tail * resamples)], stats[min(resamples - 1, int((1 - tail) * resamples))])


def neighbours(windows: Sequence[Window], at: Window) -> list[Window]:
    """The nearest undisturbed detached windows of ``at``'s workload before and after it."""
    peers = [w for w in windows if w.workload == at.workload and w.mode == DETACHED and not w.disturbed]
    before = [w for w in peers if w.index < at.index]
    after = [w for w in peers if w.index > at.index]
    return ([before[-1]] if before else []) + ([after[0]] if after else [])


def estimate(windows: Sequence[Window], workload: str, mode: str) -> Estimate | None:
    """``mode`` against the detached peer for ``workload``; None when no undisturbed pair exists."""
    mine = [w for w in windows if w.workload == workload and w.mode == mode]
    diffs, ratios = [], []
    for w in mine:
        if w.disturbed:
            continue
        peer = neighbours(windows, w)
        if not peer:
            continue
        base = statistics.fmean(p.value for p in peer)
        diffs.append(w.value - base)
        ratios.append(w.value / base if base else float("nan"))
    discarded = sum(1 for w in windows if w.workload == workload and w.mode in (mode, DETACHED) and w.disturbed)
    if not diffs:
        return None
    detached = statistics.median(w.value for w in windows
                                 if w.workload == workload and w.mode == DETACHED and not w.disturbed)
    return Estimate(workload, mode, detached, statistics.fmean(diffs), bootstrap_ci(diffs),
                    statistics.fmean(ratios), bootstrap_ci(ratios), len(diffs), discarded)


def disturbed_batches(batches: int, disturbed: int, max_share: float = 0.5) -> str:
    """Why a window was disturbed ('' if not): more than ``max_share`` of its batches ran while another
    process held the workload's CPU, or it had no batch at all.

    >>> disturbed_batches(100, 10), disturbed_batches(100, 60)
    ('', '60/100 batches disturbed')
    """
    if batches == 0 or disturbed > max_share * batches or disturbed == batches:
        return f"{disturbed}/{batches} batches disturbed"
    return ""


def foreign_busy(total_busy_s: float, ours_s: float, wall_s: float, limit_cpus: float) -> str:
    """Why a window was disturbed by other processes ('' if not): they used more than ``limit_cpus``
    CPUs on average (host busy time minus our processes' CPU time, over the wall time).

    >>> foreign_busy(3.0, 2.9, 1.0, 0.25), foreign_busy(3.0, 2.0, 1.0, 0.25)
    ('', 'other processes used 1.00 CPUs')
    """
    foreign = max(total_busy_s - ours_s, 0.0) / wall_s if wall_s else 0.0
    return "" if foreign <= limit_cpus else f"other processes used {foreign:.2f} CPUs"
