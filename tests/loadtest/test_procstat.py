"""``loadtest.bench.procstat`` read from real processes: CPU, run-queue wait, and what a gone process reads as."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from loadtest.bench import procstat

SPIN = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); print('spinning', flush=True)\nwhile True: pass"


def _spinner(cpu: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SPIN, str(cpu)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "spinning"
    return proc


def _until(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.05)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_two_spinners_on_one_cpu_wait_for_it_and_each_waits_about_as_long_as_it_runs():
    cpu = sorted(os.sched_getaffinity(0))[0]
    procs = [_spinner(cpu), _spinner(cpu)]
    try:
        pids = [p.pid for p in procs]
        _until(lambda: procstat.cpu_s(pids) >= 1.0)
        wait_s, cpu_s = procstat.runqueue_wait_s(pids), procstat.cpu_s(pids)
        # two runnable threads, one CPU: each waits while the other runs (others on that CPU add to the wait)
        assert wait_s > 0.3 * cpu_s, (wait_s, cpu_s)
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    assert procstat.runqueue_wait_s(pids) == 0.0 and procstat.cpu_s(pids) == 0.0   # gone: read as zero

