"""The kernel floor of a delivery (``loadtest.bench.floor``): a real loopback TCP pair, timed in CPU."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from feed.procs import wait_until
from loadtest.bench import floor


def test_a_loopback_send_and_recv_costs_more_than_the_cheapest_system_call():
    measured = floor.measure(payload_bytes=300, messages=2_000, trials=2)
    assert measured.send_recv_us > measured.syscall_us > 0
    assert (measured.payload_bytes, measured.messages, measured.trials) == (300, 2_000, 2)
    assert measured.cores(100_000) == pytest.approx(100_000 * measured.send_recv_us / 1e6)
    assert floor.LoopbackFloor(**measured.to_dict()) == measured  # what results.json keeps rebuilds it


def test_a_message_larger_than_one_read_is_still_read_whole():
    measured = floor.measure(payload_bytes=200_000, messages=20, trials=1)
    assert measured.send_recv_us > 0


@pytest.mark.parametrize("bad", [{"payload_bytes": 0}, {"messages": 0}, {"trials": -1}])
def test_non_positive_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="must be >= 1"):
        floor.measure(**bad)


def test_the_command_prints_json_with_the_cores_a_rate_takes_and_exits_2_on_bad_usage():
    run = lambda *a: subprocess.run([sys.executable, "-m", "loadtest.bench.floor", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    ok = run("--messages", "1000", "--trials", "1", "--rate", "100000")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["cores"] == pytest.approx(100_000 * out["send_recv_us"] / 1e6, abs=0.001) and out["machine_pct"] > 0
    bad = run("--messages", "0")
    assert bad.returncode == 2 and "must be >= 1" in bad.stderr


def test_the_probe_samples_the_floor_on_its_own_thread_until_stopped():
    probe = floor.FloorProbe(interval_s=0.01, pairs=50).start()
    wait_until(lambda: len(probe.samples) >= 5, 20, what="5 floor samples", interval_s=0.01)
    samples = probe.stop()
    # stop() joined the thread: nothing is left to add a sample, and a second stop is harmless
    assert not any(t.name == "bench-floor-probe" and t.is_alive() for t in threading.enumerate())
    assert probe.stop() is samples and len(samples) >= 5
    # a loopback send + recv costs microseconds of CPU: not nothing, not milliseconds
    assert all(0.5 < s < 5_000 for s in samples), samples
    assert min(samples) <= floor.median_us(samples) <= max(samples)


def test_the_probe_counts_only_its_own_threads_cpu():
    """A thread burning CPU beside it does not count: the pairs are timed in the probe thread's CPU time."""
    stop = threading.Event()

    def burn() -> None:
        while not stop.is_set():
            sum(range(10_000))

    burner = threading.Thread(target=burn, daemon=True)
    probe = floor.FloorProbe(interval_s=0.001, pairs=200)  # hardly a pause: the process is busy throughout
    burner.start()
    try:
        t0 = time.process_time()
        probe.start()
        wait_until(lambda: len(probe.samples) >= 5, 20, what="5 floor samples", interval_s=0.01)
        probe.stop()
        process_us_per_pair = (time.process_time() - t0) * 1e6 / (len(probe.samples) * probe.pairs)
    finally:
        stop.set()
        burner.join()
    # the process's CPU per pair counts the burner too (it runs while the probe waits in a system call or for
    # the GIL); the probe's own figure leaves it out, so it is well below (timed in process CPU it would match)
    own_us = floor.median_us(probe.samples)
    assert own_us < 0.75 * process_us_per_pair, (own_us, process_us_per_pair)


def test_probe_arguments_are_checked_and_no_sample_is_no_figure():
    with pytest.raises(ValueError, match="must be > 0"):
        floor.FloorProbe(pairs=0)
    assert floor.median_us(floor.FloorProbe().samples) is None
