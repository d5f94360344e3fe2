"""Without the privilege or without bcc: a clear message, exit code 2, and /metrics saying bookcast_ebpf_up 0."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from feed.procs import free_port, stop_process, wait_until

REPO = Path(__file__).resolve().parents[2]
# As root, drop every capability (uid 0 stays, so the checkout stays readable wherever it lives);
# otherwise we are unprivileged already.
NO_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"] if os.geteuid() == 0 else []
HIDE_BCC = "import sys; sys.modules['bcc'] = None; from feed.cli import main; sys.exit(main(sys.argv[1:]))"


def _start(prefix: list[str], args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([*prefix, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            return r.read().decode()
    except OSError:
        return None


def _serves_up_zero(prefix: list[str], reason: str) -> str:
    port = free_port()
    proc = _start(prefix, ["ebpf", "--port", str(port)])
    try:
        wait_until(lambda: _scrape(port) is not None, 30, what="ebpf /metrics", proc=proc)
        body = _scrape(port)
        assert f'bookcast_ebpf_up{{reason="{reason}"}} 0.0' in body
        assert "bookcast_ebpf_syscall_latency_seconds" not in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 2
        return proc.stderr.read()
    finally:
        stop_process(proc)


def test_unprivileged_exits_2_saying_what_is_missing():
    out = subprocess.run([*NO_CAPS, sys.executable, "-m", "feed.cli", "ebpf", "--interval", "1", "--count", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert out.returncode == 2
    assert "no_privilege" in out.stderr and "root" in out.stderr and "sudo" in out.stderr


def test_unprivileged_with_port_serves_up_zero_with_the_reason():
    stderr = _serves_up_zero([*NO_CAPS, sys.executable, "-m", "feed.cli"], "no_privilege")
    assert "needs root" in stderr


def test_without_bcc_serves_up_zero_and_says_how_to_install():
    stderr = _serves_up_zero([sys.executable, "-c", HIDE_BCC], "no_bcc")
    assert "python3-bpfcc" in stderr and "sudo ./dev setup" in stderr
