"""The newcomer's first hour, each step as a new user meets it: one clear line, a meaningful exit code."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporter.clickhouse import LATENCY_SAMPLES, open_backend
from feed import runstate
from feed.procs import free_port, stop_process

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "feed.cli", *args], capture_output=True, text=True, timeout=timeout_s,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_a_busy_port_is_one_line_suggesting_port_0(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = cli("up", "--port", str(port), env={"BOOKCAST_HOME": str(tmp_path)})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(port) in lines[0] and "--port 0" in lines[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "run.json").exists()  # nothing started


def test_replay_with_nats_down_gives_up_in_bounded_time(tmp_path):
    started = time.monotonic()
    out = cli("replay", "--nats", f"nats://127.0.0.1:{free_port()}", "--connect-timeout-s", "2",
              str(REPO / "feed" / "data" / "coinbase-level2-20210417.jsonl.gz"), timeout_s=30)
    assert out.returncode == 1 and time.monotonic() - started < 25
    assert "cannot connect to NATS" in out.stderr and "Traceback" not in out.stderr


def test_replay_with_nats_down_obeys_ctrl_c(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "feed.cli", "replay", "--nats", f"nats://127.0.0.1:{free_port()}",
                             "--connect-timeout-s", "300", str(REPO / "feed" / "data" / "coinbase-level2-20210417.jsonl.gz")],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # the first failed connection attempt: it is trying
        assert "nats error" in line or "Connect" in line, line
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 1
        rest = proc.stderr.read()
        assert "interrupted while connecting" in rest and "Traceback" not in rest
    finally:
        stop_process(proc)


def test_replay_check_names_the_file_and_line_of_a_malformed_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = ('{"recv_ts_ns": 1, "venue": "coinbase", "msg": {"type": "snapshot", "product_id": "A-B",'
            ' "bids": [["1", "2"]], "asks": []}}')
    bad.write_text(good + "\n" + good + "\n{truncated\n")
    out = cli("replay", "--check", str(bad))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and f"{bad}:3" in out.stderr


def _stopped_run(home: Path, run_id: str) -> None:
    """A state file of a run that has stopped, and its store holding 300 samples of coinbase:SKL-USD."""
    store = home / "chdb"
    backend = open_backend(store)
    now = time.time_ns()
    try:
        rows = [(now - i * 10**6, "local", "coinbase:SKL-USD", "e1", i + 1, 0, now - i * 10**6 - 3 * 10**6,
                 now - i * 10**6 - 2 * 10**6, now - i * 10**6 - 10**6, run_id, 0, now - i * 10**6 + 10**5)
                for i in range(300)]
        backend.insert(LATENCY_SAMPLES, rows)
    finally:
        backend.close()
    state = runstate.RunState(run_id=run_id, pid=os.getpid(), started_ns=now, ws_url="ws://127.0.0.1:1/v1/ws",
                              http_url="http://127.0.0.1:1", nats_url="nats://127.0.0.1:2", store=str(store),
                              stopped_ns=now, instruments=["coinbase:SKL-USD"])
    runstate.write_state(state, home)


def test_a_report_from_another_directory_finds_the_run(tmp_path):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _stopped_run(home, "20261201T090000Z-abcd")
    out = cli("latency", "report", "--format", "json", cwd=elsewhere, env={"BOOKCAST_HOME": str(home)})
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["run_id"] == "20261201T090000Z-abcd" and body["samples"] == 300
    assert body["verdict"]["cause"] == "healthy" and body["hops"]["upstream"]["count"] == 0
    assert not (elsewhere / ".bookcast").exists()
    why = cli("why", cwd=elsewhere, env={"BOOKCAST_HOME": str(home)})
    assert why.returncode == 0 and why.stdout.startswith("verdict: healthy"), why.stdout + why.stderr


def test_an_unknown_instrument_is_exit_2(tmp_path):
    _stopped_run(tmp_path, "20261201T090000Z-abcd")
    out = cli("latency", "report", "--instrument", "coinbase:NOPE", env={"BOOKCAST_HOME": str(tmp_path)})
    assert out.returncode == 2 and "unknown instrument coinbase:NOPE" in out.stderr and "Traceback" not in out.stderr


def test_a_held_store_is_one_line_naming_its_holder(tmp_path):
    backend = open_backend(tmp_path / "chdb")  # this process holds it, as a running probe would
    try:
        out = cli("latency", "report", "--clickhouse", str(tmp_path / "chdb"))
    finally:
        backend.close()
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert f"pid {os.getpid()}" in out.stderr and "--probe" in out.stderr and "Cannot lock" not in out.stderr


def test_the_help_examples_name_instruments_the_bundled_recording_has():
    from exporter import probe, report, why
    from feed.replaycheck import check_captures

    class Lines(list):
        def write(self, text):
            self.append(text)
    out = Lines()
    check_captures([REPO / "feed" / "data" / "coinbase-level2-20210417.jsonl.gz"], out=out)
    bundled = {w for w in "".join(out).split() if w.startswith("coinbase:")}
    for module in (probe, report, why):
        named = {w for w in module.EXAMPLES.split() if w.startswith("coinbase:")}
        assert named and named <= bundled, (module.__name__, named - bundled)


@pytest.mark.skipif(os.geteuid() != 0, reason="setting up bcc (apt, tracefs, header links) needs root")
def test_ebpf_setup_puts_in_place_what_bcc_needs():
    out = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), "--ebpf-only"], capture_output=True, text=True,
                         cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ebpf: ready" in out.stdout
    check = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", "import bcc"], capture_output=True)
    assert check.returncode == 0 and os.path.ismount("/sys/kernel/tracing")
    dev_help = subprocess.run([str(REPO / "dev"), "--help"], capture_output=True, text=True)
    assert "--ebpf-only" in dev_help.stdout and "up --ebpf" in dev_help.stdout
