"""The state file `bookcast up` writes: where it lives, what it holds, and when a run counts as running."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from feed import runstate
from feed.runstate import RunState, RunStateError

REPO = Path(__file__).resolve().parents[2]


def state(run_id: str = "20261201T095200Z-3fa2", pid: int | None = None) -> RunState:
    return RunState(run_id=run_id, pid=os.getpid() if pid is None else pid, started_ns=1, ws_url="ws://127.0.0.1:1/v1/ws",
                    http_url="http://127.0.0.1:1", nats_url="nats://127.0.0.1:2", store="/tmp/x/chdb")


def test_home_comes_from_config_not_the_working_directory(tmp_path, monkeypatch):
    assert runstate.home_dir({"BOOKCAST_HOME": str(tmp_path)}) == tmp_path.resolve()
    assert runstate.home_dir({}) == REPO / ".bookcast"  # a checkout: beside pyproject.toml
    monkeypatch.chdir(tmp_path)
    assert runstate.home_dir({}) == REPO / ".bookcast"
    assert runstate.default_store(tmp_path) == tmp_path / "chdb"
    # the same answer from another process started elsewhere
    out = subprocess.run([sys.executable, "-c", "from feed.runstate import home_dir; print(home_dir())"],
                         cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO),
                                                                          "BOOKCAST_HOME": ""})
    assert out.stdout.strip() == str(REPO / ".bookcast"), out.stderr


def test_write_then_read_round_trips_and_is_atomic(tmp_path):
    path = runstate.write_state(state(), tmp_path)
    assert path == tmp_path / "run.json" and not list(tmp_path.glob(".run.json.*"))
    got = runstate.read_state(tmp_path)
    assert got == state() and got.running
    assert json.loads(path.read_text())["version"] == runstate.VERSION


def test_a_stopped_or_dead_run_is_not_current(tmp_path):
    with pytest.raises(RunStateError, match="bookcast up"):
        runstate.current_run(tmp_path)
    runstate.write_state(state(), tmp_path)
    runstate.mark_stopped("20261201T095200Z-3fa2", tmp_path, now_ns=5)
    assert runstate.read_state(tmp_path).stopped_ns == 5
    with pytest.raises(RunStateError, match="has stopped"):
        runstate.current_run(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    runstate.write_state(state(pid=dead.pid), tmp_path)
    assert not runstate.read_state(tmp_path).running


def test_an_older_run_does_not_mark_a_newer_one_stopped(tmp_path):
    runstate.write_state(state("20261201T100000Z-bbbb"), tmp_path)
    runstate.mark_stopped("20261201T090000Z-aaaa", tmp_path)
    assert runstate.current_run(tmp_path).run_id == "20261201T100000Z-bbbb"


def test_run_ids_sort_by_start_time_and_differ():
    a, b = runstate.new_run_id(1_800_000_000 * 10**9), runstate.new_run_id(1_800_000_001 * 10**9)
    assert a < b and a.startswith("20270115T") and len({runstate.new_run_id(0) for _ in range(20)}) > 1


def test_a_malformed_state_file_is_one_clear_error(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RunStateError, match="cannot read"):
        runstate.read_state(tmp_path)
