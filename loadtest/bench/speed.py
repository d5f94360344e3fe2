"""How fast this machine's CPU ran while a cell was measured: a small, fixed pure-Python loop timed in thread
CPU time, a few milliseconds every half second, on a thread of the benchmark process.

Why: on a shared VM the same work costs a different number of CPU seconds from one minute to the next. A
bookcast cell's server CPU moved from 6.6 to 12.2 s at the same point (1,000 x 40/s) within ten minutes,
and the load generator's with it, while "others" stayed at 0-1% (the host's other tenants are not in
``/proc/stat``). The loop's time per iteration moves with it: it is a
thermometer, not a correction. Two cells of one pair measured at different speeds make that pair's ratio
partly the machine's; the report names such pairs (``loadtest.bench.report``).

The loop is timed with ``time.thread_time`` (this thread's CPU only: the benchmark's event loop and a
descheduled thread do not count), so the figure is ns of CPU per iteration, lower is faster. It is noisy
sample to sample (a bimodal 26 / 45 ns on the development VM); a cell's figure is the median of its
samples (about 40 in a 20 s cell). Its cost: ~4 ms of CPU per 0.5 s, under 1% of one CPU.

    with SpeedProbe() as probe:
        ...  # the measured window
    probe.median_ns()  # None when it took no sample
"""
from __future__ import annotations

import statistics
import threading
import time

LOOP_ITERATIONS = 100_000
INTERVAL_S = 0.5


def loop_ns_per_iteration(iterations: int = LOOP_ITERATIONS) -> float:
    """CPU ns per iteration of a fixed pure-Python loop (an add per iteration), in this thread's CPU time."""
    t0 = time.thread_time_ns()
    total = 0
    for i in range(iterations):
        total += i
    return (time.thread_time_ns() - t0) / iterations


def median_ns(samples: list[float]) -> float | None:
    """The median of a window's samples (``None`` for none)."""
    return statistics.median(samples) if samples else None


class SpeedProbe:
    """Samples ``loop_ns_per_iteration`` every ``interval_s`` on a daemon thread between ``start`` and
    ``stop`` (or as a context manager); ``samples`` holds ns per iteration, in order."""

    def __init__(self, interval_s: float = INTERVAL_S, iterations: int = LOOP_ITERATIONS) -> None:
        self.interval_s, self.iterations = interval_s, iterations
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SpeedProbe:
        self._thread = threading.Thread(target=self._run, name="bench-speed-probe", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            self.samples.append(loop_ns_per_iteration(self.iterations))
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> list[float]:
        """Stop sampling (waits for the thread) and return the samples."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.samples

    def median_ns(self) -> float | None:
        return median_ns(self.samples)

    def __enter__(self) -> SpeedProbe:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
