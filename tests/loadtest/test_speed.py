"""``loadtest.bench.speed``: the CPU-speed thermometer samples on its own thread, in its own thread's CPU time,
and stops when told."""
from __future__ import annotations

import threading
import time

from loadtest.bench.speed import SpeedProbe, loop_ns_per_iteration, median_ns


def _until(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.01)


def test_the_probe_samples_until_stopped_and_then_takes_no_more():
    probe = SpeedProbe(interval_s=0.01, iterations=20_000).start()
    _until(lambda: len(probe.samples) >= 5)
    samples = probe.stop()
    # stop() joined the thread: nothing is left to add a sample
    assert not any(t.name == "bench-speed-probe" and t.is_alive() for t in threading.enumerate())
    assert probe.stop() is samples and len(samples) >= 5  # a second stop is harmless
    # a pure-Python add costs nanoseconds, not microseconds or nothing
    assert all(1 < s < 5_000 for s in samples), samples
    assert min(samples) <= probe.median_ns() <= max(samples)


def test_the_loop_counts_only_its_own_threads_cpu():
    """Another thread burning CPU beside it (holding the GIL about half the time) does not make the loop read
    slower with it: its own CPU time is what is divided, not the wall time it waited for the GIL."""
    stop = threading.Event()

    def burn() -> None:
        while not stop.is_set():
            sum(range(10_000))

    other = threading.Thread(target=burn, daemon=True)
    other.start()
    try:
        t0 = time.perf_counter()
        beside = median_ns([loop_ns_per_iteration(200_000) for _ in range(5)])
        wall_ns_per_iteration = (time.perf_counter() - t0) * 1e9 / 1_000_000
    finally:
        stop.set()
        other.join()
    # the wall time per iteration grew (the GIL was shared); the figure is of the loop's own CPU, not of that
    assert wall_ns_per_iteration > 1.5 * beside, (wall_ns_per_iteration, beside)


def test_median_of_nothing_is_no_figure():
    assert median_ns([]) is None and median_ns([3.0, 1.0, 2.0]) == 2.0
    assert SpeedProbe().median_ns() is None
