"""Drills on their own stacks (the provider pool's, a runner killed mid-fault) and, with
``BOOKCAST_DRILLS=all``, every shipped drill passing and failing with failover disabled. See test_drills.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chaos.runner import experiment_files, run_drill
from chaos.state import StateFile, start_ticks

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e
ALL = os.environ.get("BOOKCAST_DRILLS") == "all"
# the e2e p99 bound of the steady state, times this: the suite runs on a shared 2-core machine whose load
# (15-19 seen) puts seconds on every hop, so here the steady state holds freshness (every book moving) and the
# verdict holds outage, failover, recovery and gaps, while p99 is reported; `bookcast drill run` keeps 1
P99 = 1000.0


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(900)
def test_provider_stall_drill_fails_over_in_the_pool_with_no_undetected_gap(tmp_path):
    r = run_drill("provider-stall", duration_s=4, state_path=tmp_path / "state.json", report_dir=tmp_path,
                  progress=lambda _: None, p99_scale=P99)
    assert r["verdict"] == "passed", (r["reasons"], r["timeline"])
    proof = r["proofs"][0]
    assert proof["took_effect"] and proof["evidence"]["stalled_total"] > 0     # the simulator dropped data
    assert r["detect_s"] is not None and r["failover_s"] is not None and r["recover_s"] is not None
    assert any(e["kind"] == "system_failover" and "provider-2" in e["detail"] for e in r["timeline"]), r["timeline"]
    assert r["gaps"]["faulted"]["undetected"] == 0 and r["check"]["equal"] == r["check"]["compared"] > 0
    assert r["left_behind"] == [] and StateFile(tmp_path / "state.json").entries() == []
    assert not [p for p in r["stack"]["pids"].values() if _alive(p)]


@pytest.mark.timeout(900)
def test_a_drill_killed_mid_fault_is_cleaned_up_by_the_next_run(tmp_path):
    state_path = tmp_path / "state.json"
    runner = subprocess.Popen([sys.executable, "-m", "feed.cli", "drill", "run", "gateway-path-stall", "--duration-s",
                               "60", "--p99-factor", str(P99), "--state", str(state_path)], cwd=REPO, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "drill.log", "wb"))
    try:
        state = StateFile(state_path)
        deadline = time.monotonic() + 240
        while not any(e["kind"] == "toxic" for e in state.entries()):
            assert runner.poll() is None, (tmp_path / "drill.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the drill never injected its toxic"
            time.sleep(0.2)
        entries = state.entries()
        pids = [(e["pid"], e["start_ticks"]) for e in entries if e["kind"] == "process"]
        assert len(pids) >= 5                       # nats, ingest, 3 gateways, proxy (recorded before use)
        runner.send_signal(signal.SIGKILL)          # the runner dies mid-fault: no rollback ran
        runner.wait(10)
        assert any(start_ticks(p) == t for p, t in pids)   # its stack is still there, toxic and all
        done = subprocess.run([sys.executable, "-m", "feed.cli", "drill", "cleanup", "--state", str(state_path)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "toxic" in done.stdout and "process" in done.stdout
        assert state.entries() == []
        assert not [p for p, t in pids if start_ticks(p) == t and _alive(p)], "a process outlived cleanup"
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait(10)
        StateFile(state_path).undo_all()


DRILLS = sorted(experiment_files())


@pytest.mark.timeout(1200)
@pytest.mark.skipif(not ALL, reason="every shipped drill takes ~1-2 min here: set BOOKCAST_DRILLS=all")
@pytest.mark.parametrize("name", DRILLS)
def test_every_shipped_drill_passes_and_fails_without_failover(name, tmp_path):
    config = json.loads((REPO / "chaos/experiments" / f"{name}.json").read_text())["configuration"]
    if config.get("requires_root") and os.geteuid() != 0:
        pytest.skip("needs root (nftables)")
    r = run_drill(name, duration_s=4, state_path=tmp_path / "s.json", report_dir=tmp_path, progress=lambda _: None,
                  p99_scale=P99)
    assert r["verdict"] == "passed", r["reasons"]
    assert r["left_behind"] == [] and r["gaps"]["faulted"]["undetected"] == 0
    if config.get("expect_failover", True):
        r = run_drill(name, duration_s=4, state_path=tmp_path / "s.json", failover=False, progress=lambda _: None,
                      p99_scale=P99)
        assert r["verdict"] == "failed", r
        assert r["left_behind"] == []
