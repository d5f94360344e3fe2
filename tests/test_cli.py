"""The CLI as a newcomer meets it: --help with examples, `bookcast up` starting and stopping cleanly."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from feed.procs import stop_process

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "feed.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=REPO)


@pytest.mark.parametrize("command", ["up", "tail", "replay", "record", "gateway"])
def test_help_shows_examples(command):
    out = run_cli(command, "--help")
    assert out.returncode == 0
    assert "examples:" in out.stdout and f"bookcast {command}" in out.stdout


def test_usage_errors_exit_2():
    assert run_cli().returncode == 2
    missing = run_cli("replay", "--check", "/nonexistent.jsonl")
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_replay_check_summarises_a_real_capture(shared_data):
    out = run_cli("replay", "--check", str(shared_data / "polymarket" / "sol-15m-20251211.jsonl"))
    assert out.returncode == 0, out.stderr
    summary = dict(kv.split("=") for kv in out.stdout.splitlines()[0].split())
    assert summary["parse_errors"] == "0" and summary["instruments"] == "2"
    assert int(summary["deltas"]) > 400 and summary["crossed_books"] == "0"


def test_replay_check_reports_malformed_capture(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"recv_ts_ns": 1, "venue": "coinbase", "msg": {"type": "snapshot", "product_id": "A-B",'
                   ' "bids": [["1", "x"]], "asks": []}}\n')
    out = run_cli("replay", "--check", str(bad))
    assert out.returncode == 1 and "bad.jsonl:1" in out.stdout


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                out.update(kids)
                todo.extend(kids)
        except FileNotFoundError:
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def interrupt_and_check_nothing_left(proc: subprocess.Popen, *, expect_children: int) -> None:
    """Ctrl-C ``bookcast up``: it exits 0 and none of its descendants (at least ``expect_children``) is left."""
    children = _descendants(proc.pid)
    assert len(children) >= expect_children, children
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in children if _alive(p)], "processes left behind after Ctrl-C"


def test_up_serves_the_bundled_recording_and_ctrl_c_leaves_nothing_behind(tmp_path):
    # Run from a scratch directory; the state file and the chDB store go to the configured home, and the
    # commands `up` prints work from another directory, as in a new terminal.
    home, elsewhere = tmp_path / "home", tmp_path / "new-terminal"
    elsewhere.mkdir()
    env = {**os.environ, "BOOKCAST_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "feed.cli", "up", "--port", "0", "--workers", "2"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines, deadline = [], time.monotonic() + 90
        while not any(re.match(r" {13}\S.* why$", ln) for ln in lines) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        text = "".join(lines)
        ws_url = re.search(r"WebSocket\s+(ws://\S+)", text)
        probe_url = re.search(r"latency\s+(http://\S+)/metrics", text)
        tail_cmd = re.search(r"try\s+(.+ tail \S+)\n", text)
        why_cmd = re.search(r"^ {13}(\S.* why)$", text, re.M)  # the second "try" line
        assert ws_url and probe_url and tail_cmd and why_cmd, text
        state = json.loads((home / "run.json").read_text())
        assert state["ws_url"] == ws_url.group(1) and state["probe_url"] == probe_url.group(1) and state["run_id"]
        base = ws_url.group(1).replace("ws://", "http://").removesuffix("/v1/ws")
        with urllib.request.urlopen(base + "/v1/instruments", timeout=5) as r:
            listing = json.loads(r.read())["instruments"]
        assert len(listing) == 10 and all(i["instrument"].startswith("coinbase:") for i in listing)
        viewer = re.search(r"viewer\s+(http://\S+/\?instrument=coinbase:\S+)", text)  # the book viewer (issue 12)
        with urllib.request.urlopen(viewer.group(1), timeout=5) as r:
            assert r.status == 200 and b"bookcast viewer" in r.read()
        # The latency report, asked of the running probe that holds the store, once samples are in.
        # The printed commands, as typed in a new terminal: `why` finds the run through the state file.
        def printed(command: str, *extra: str) -> subprocess.CompletedProcess:
            return subprocess.run(f"{command} {' '.join(extra)}", shell=True, cwd=elsewhere, capture_output=True,
                                  text=True, timeout=60, env={k: v for k, v in env.items() if k != "BOOKCAST_HOME"})
        deadline = time.monotonic() + 60
        while True:
            report = printed(why_cmd.group(1), "--format", "json")
            if report.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert report.returncode == 0, report.stdout + report.stderr
        body = json.loads(report.stdout)
        assert body["samples"] > 0 and body["verdict"]["text"] and body["run_id"] == state["run_id"]
        assert {"upstream", "ingest", "nats_gateway", "network", "reader", "client", "e2e"} <= set(body["hops"])
        assert body["hops"]["upstream"]["skewed"] > 0  # the recording's clock, counted apart
        assert all(h["p50_ns"] >= 0 for h in body["hops"].values())
        tail = printed(tail_cmd.group(1), "--once")
        assert tail.returncode == 0 and "bid" in tail.stdout, tail.stdout + tail.stderr
        interrupt_and_check_nothing_left(proc, expect_children=6)  # nats, ingest, gateway + 2 workers, probe
        assert (home / "chdb").is_dir() and not (tmp_path / ".bookcast").exists()
        assert json.loads((home / "run.json").read_text())["stopped_ns"]
    finally:
        stop_process(proc)
