"""``python -m loadtest.bench.heartbeatcpu`` at a tiny size: every mode runs on real loopback sockets and the
gateway pass writes exactly one heartbeat per connection per tick (the command exits 1 otherwise)."""
from __future__ import annotations

import re
import subprocess
import sys


def test_heartbeat_cpu_bench_runs_every_mode_and_counts_its_heartbeats():
    proc = subprocess.run([sys.executable, "-m", "loadtest.bench.heartbeatcpu", "--connections", "40", "--ticks", "2",
                           "--repeat", "1", "--gap-s", "0.01"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = dict(re.findall(r"^\s+(\S+)\s+([0-9.]+) \[", proc.stdout, re.M))
    assert set(rows) == {"gateway", "gateway-nosock", "write", "oswrite", "send"}, proc.stdout
    assert all(float(v) > 0 for v in rows.values()), proc.stdout


def test_heartbeat_cpu_bench_rejects_an_unknown_mode():
    proc = subprocess.run([sys.executable, "-m", "loadtest.bench.heartbeatcpu", "--modes", "nope"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "modes" in proc.stderr
