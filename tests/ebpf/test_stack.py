"""``bookcast up --ebpf``: the exporter starts after the feed, traces this stack's processes, stops with it."""
from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request

from ebpf.loader import missing_prerequisites
from feed.procs import stop_process, wait_until
from tests.test_cli import REPO, interrupt_and_check_nothing_left


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def test_up_with_ebpf_serves_probe_metrics_and_ctrl_c_leaves_nothing_behind():
    proc = subprocess.Popen([sys.executable, "-m", "feed.cli", "up", "--port", "0", "--workers", "2", "--ebpf"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines, url, deadline = [], None, time.monotonic() + 240  # compiling 7 programs on a loaded host
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"ebpf\s+(http://\S+/metrics)", line):
                url = m.group(1)
        assert url, "".join(lines)
        missing = missing_prerequisites()
        if missing:   # the feed still runs; the exporter says why it has no data
            assert f'bookcast_ebpf_up{{reason="{missing[0].reason}"}} 0.0' in _metrics(url)
        else:
            roles = {"gateway": 3, "ingest": 1, "nats": 1}   # supervisor + 2 workers
            counted = re.compile(r'bookcast_ebpf_syscall_latency_seconds_count\{role="ingest",syscall="\w+"\} [1-9]')

            def traced() -> bool:
                body = _metrics(url)
                return all(f'bookcast_ebpf_traced_processes{{role="{r}"}} {n}.0' in body for r, n in roles.items()) \
                    and counted.search(body) is not None
            wait_until(traced, 90, what="stack processes traced, ingest syscalls counted", interval_s=0.5)
            assert 'bookcast_ebpf_up{reason="ok"} 1.0' in _metrics(url)
        interrupt_and_check_nothing_left(proc, expect_children=6)  # nats, ingest, gateway + 2 workers, ebpf
    finally:
        stop_process(proc)
