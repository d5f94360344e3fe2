"""The gateway under a real replay: its send syscalls, seen by the probes, match the socket writes it made.

The gateway writes one frame per write, or a client's whole backlog in one write when it has fallen behind,
so send syscalls track ``bookcast_gateway_socket_writes_total`` and never exceed the frames written."""
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


def gateway_counter(stack: Stack, name: str) -> float:
    with urllib.request.urlopen(stack.base + "/metrics", timeout=5) as r:
        body = r.read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", body, re.M))


def frames_sent(stack: Stack) -> float:
    return gateway_counter(stack, "bookcast_gateway_messages_sent_total")


def socket_writes(stack: Stack) -> float:
    return gateway_counter(stack, "bookcast_gateway_socket_writes_total")


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
        frames0, writes0, calls0 = frames_sent(stack), socket_writes(stack), send_calls(probes)
        for _ in range(2):
            clients.append(subprocess.Popen([sys.executable, "-m", "tests.e2e.client_proc", stack.ws_url, *instruments],
                                            cwd=REPO, stdout=subprocess.PIPE, text=True))
        wait_until(lambda: frames_sent(stack) - frames0 >= 2000, 60, what="2000 frames written", interval_s=0.5)
        for c in clients:
            c.send_signal(signal.SIGTERM)
            c.wait(timeout=10)
        seen: list[float] = []

        def settled() -> bool:   # four scrapes 0.5 s apart agree (1.5 s: the gateway folds its tallies every 1 s)
            seen.append(frames_sent(stack))
            return len(seen) >= 4 and len(set(seen[-4:])) == 1

        wait_until(settled, 20, what="gateway done writing", interval_s=0.5)
        frames, writes = frames_sent(stack) - frames0, socket_writes(stack) - writes0
        calls = send_calls(probes) - calls0
    finally:
        for c in clients:
            stop_process(c)
        stack.stop()
        probes.targets.scan, probes.targets.under = False, None
        probes.refresh()
    print(f"frames={frames} socket_writes={writes} send_syscalls={calls} ratio={calls / writes:.3f}")
    assert frames >= 2000 and 0 < writes <= frames
    # one send per socket write, plus the partial sends of a write larger than the free socket buffer: on a
    # loaded host the gateway batches hundreds of frames per write (seen: 6813 frames in 24 writes, 44 sends)
    assert 0.8 * writes <= calls <= max(1.25 * writes, writes + frames / 100)
