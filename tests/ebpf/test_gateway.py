"""The gateway under a real replay: its send syscalls, seen by the probes, match the frames it wrote."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from feed.procs import stop_process, wait_until
from feed.stack import bundled_capture
from tests.e2e.harness import REPO, Stack
from tests.ebpf.conftest import series

SEND_SYSCALLS = ("write", "writev", "sendto", "sendmsg")


def frames_sent(stack: Stack) -> float:
    with urllib.request.urlopen(stack.base + "/metrics", timeout=5) as r:
        body = r.read().decode()
    return sum(float(v) for v in re.findall(r"^bookcast_gateway_messages_sent_total\{[^}]*\} (\S+)$", body, re.M))


def send_calls(probes) -> int:
    return sum(s.count for s in series(probes, "bookcast_ebpf_syscall_latency_seconds", role="gateway")
               if dict(s.labels)["syscall"] in SEND_SYSCALLS)


@pytest.mark.e2e
def test_gateway_send_syscalls_match_frames_written(probes, tmp_path):
    stack, clients = Stack(tmp_path, workers=2), []
    probes.targets.scan, probes.targets.under = True, os.getpid()     # this test's processes, found by role
    try:
        stack.start_nats()
        stack.start_gateway()
        pids = probes.refresh()
        assert sorted(pids.values()).count("gateway") == 3             # supervisor + 2 workers started after load
        stack.start_ingest([bundled_capture()], speed=5.0, loop=True)
        instruments = stack.wait_instruments(10)
        frames0, calls0 = frames_sent(stack), send_calls(probes)
        for _ in range(2):
            clients.append(subprocess.Popen([sys.executable, "-m", "tests.e2e.client_proc", stack.ws_url, *instruments],
                                            cwd=REPO, stdout=subprocess.PIPE, text=True))
        wait_until(lambda: frames_sent(stack) - frames0 >= 2000, 60, what="2000 frames written", interval_s=0.5)
        for c in clients:
            c.send_signal(signal.SIGTERM)
            c.wait(timeout=10)
        seen: list[float] = []

        def settled() -> bool:   # two scrapes 0.5 s apart agree: every frame is written
            seen.append(frames_sent(stack))
            return len(seen) >= 2 and seen[-1] == seen[-2]

        wait_until(settled, 20, what="gateway done writing", interval_s=0.5)
        frames, calls = frames_sent(stack) - frames0, send_calls(probes) - calls0
    finally:
        for c in clients:
            stop_process(c)
        stack.stop()
        probes.targets.scan, probes.targets.under = False, None
        probes.refresh()
    print(f"frames={frames} send_syscalls={calls} ratio={calls / frames:.3f}")
    assert frames >= 2000
    assert 0.8 * frames <= calls <= 1.25 * frames
