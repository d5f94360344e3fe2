"""``loadtest.bench.procstat`` read from real processes: CPU, run-queue wait, preemptions, and what a gone process
reads as."""
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
def test_two_spinners_on_one_cpu_wait_for_it_and_each_waits_about_as_long_as_it_runs_and_is_preempted():
    cpu = sorted(os.sched_getaffinity(0))[0]
    procs = [_spinner(cpu), _spinner(cpu)]
    try:
        pids = [p.pid for p in procs]
        _until(lambda: procstat.cpu_s(pids) >= 1.0)
        (wait_s, runs), cpu_s = procstat.runqueue_wait(pids), procstat.cpu_s(pids)
        # two runnable threads, one CPU: each waits while the other runs (others on that CPU add to the wait),
        # a timeslice at a time (a few ms under CFS, never a whole second)
        assert wait_s > 0.3 * cpu_s, (wait_s, cpu_s)
        assert runs > 2 and 1e-5 < wait_s / runs < 0.5, (wait_s, runs)
        # a spinner never blocks, so nearly every run ends with the other taking its CPU: preempted
        preempted = procstat.preemptions(pids)
        assert preempted > 2 and preempted >= 0.5 * runs, (preempted, runs)
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    assert procstat.runqueue_wait(pids) == (0.0, 0) and procstat.cpu_s(pids) == 0.0   # gone: read as zero
    assert procstat.preemptions(pids) == 0


def test_busiest_others_names_who_else_used_the_cpu_between_two_readings():
    before = {1: (10.0, "init"), 2: (5.0, "ours"), 3: (1.0, "noisy"), 4: (0.0, "quiet")}
    after = {1: (10.02, "init"), 2: (9.0, "ours"), 3: (4.5, "noisy"), 4: (0.01, "quiet"), 9: (0.8, "newborn")}
    assert procstat.busiest_others(before, after, ours=[2]) == [
        {"pid": 3, "comm": "noisy", "cpu_s": 3.5}, {"pid": 9, "comm": "newborn", "cpu_s": 0.8}]
    assert procstat.busiest_others(before, after, ours=[2], top=1) == [{"pid": 3, "comm": "noisy", "cpu_s": 3.5}]


def test_every_process_cpu_s_sees_this_process():
    everyone = procstat.every_process_cpu_s()
    assert os.getpid() in everyone and everyone[os.getpid()][0] >= 0 and len(everyone) > 3
