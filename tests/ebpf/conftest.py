"""Fixtures for the eBPF tests: real programs loaded with bcc (CI runs as root), workloads by PID."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ebpf.loader import Probes, Series, missing_prerequisites
from ebpf.targets import TargetSpec

WORKLOAD = Path(__file__).with_name("workload.py")


def needs_probes() -> None:
    """Skip (saying why) where the probes cannot load; in CI, which runs as root on a machine that
    ``./dev test`` set up, a missing prerequisite is a broken install and fails instead of skipping."""
    missing = missing_prerequisites()
    if missing:
        why = "eBPF probes cannot load here: " + "; ".join(str(m) for m in missing)
        if os.environ.get("CI") == "true" and os.geteuid() == 0:
            pytest.fail(why + " (CI runs as root after ./dev test's setup: the probes must load)")
        pytest.skip(why)


@pytest.fixture(scope="session")
def probes():
    """Every program loaded and attached once; tests add their own PIDs (with their own roles)."""
    needs_probes()
    with Probes(TargetSpec()) as p:
        yield p


def series(probes: Probes, metric: str, **labels: str) -> list[Series]:
    want = set(labels.items())
    return [s for s in probes.series() if s.metric == metric and want <= set(s.labels)]


def one(probes: Probes, metric: str, **labels: str) -> Series:
    found = series(probes, metric, **labels)
    assert len(found) == 1, f"{metric} {labels}: {len(found)} series"
    return found[0]


class Workload:
    """tests/ebpf/workload.py in its own process; ``trace(probes, role)`` registers its PID before it runs."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(WORKLOAD), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline().split()
        assert ready[:1] == ["ready"], ready
        self.port = int(ready[1]) if len(ready) > 1 else None

    def trace(self, probes: Probes, role: str) -> Workload:
        probes.targets.pids.append((self.proc.pid, role))
        probes.refresh()
        return self

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        line = self.proc.stdout.readline().strip()
        assert line == "done", line
        assert self.proc.wait(timeout=max(0.1, deadline - time.monotonic())) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
