"""The drill state file's own rules, fed entries directly (no stack): the ``workdir`` kind removes a drill
stack's work directory and nothing else, and ``undo_all(keep=...)`` leaves the kept kinds listed."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from chaos.state import STACK_KINDS, WORKDIR_PREFIX, StateFile


def _workdir(parent: Path) -> Path:
    d = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=parent))
    (d / "nats").mkdir()
    (d / "nats" / "store.dat").write_bytes(b"x" * 100)
    (d / "gateway-a.log").write_text("log\n")
    return d


def test_a_recorded_workdir_is_removed_by_undo_all(tmp_path):
    state = StateFile(tmp_path / "state.json")
    d = _workdir(tmp_path)
    state.add("workdir", path=str(d))
    done = state.undo_all()
    assert done == [f"workdir path={d}"]
    assert not d.exists() and state.entries() == []
    assert "workdir" in STACK_KINDS     # a shared stack's rollback leaves it to the stack


@pytest.mark.parametrize("name", ["not-a-drill-dir", "tmp", ""])
def test_a_workdir_entry_outside_a_drill_directory_is_refused_and_nothing_removed(tmp_path, name):
    state = StateFile(tmp_path / "state.json")
    victim = tmp_path / name if name else tmp_path
    victim.mkdir(exist_ok=True)
    (victim / "keep.txt").write_text("keep")
    state.add("workdir", path=str(victim))
    [line] = state.undo_all()
    assert "FAILED" in line and "refusing to remove" in line
    assert (victim / "keep.txt").read_text() == "keep"
    assert state.entries() == []         # listed once, reported, not retried forever


def test_a_relative_or_symlinked_workdir_is_refused(tmp_path, monkeypatch):
    state = StateFile(tmp_path / "state.json")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    link = tmp_path / f"{WORKDIR_PREFIX}link"
    link.symlink_to(target)
    monkeypatch.chdir(tmp_path)
    _workdir(tmp_path)
    relative = next(p.name for p in tmp_path.iterdir() if p.name.startswith(WORKDIR_PREFIX) and not p.is_symlink())
    state.add("workdir", path=relative)
    state.add("workdir", path=str(link))
    done = state.undo_all()
    assert len(done) == 2 and all("refusing to remove" in line for line in done)
    assert (target / "keep.txt").exists() and (tmp_path / relative).is_dir()


def test_undo_all_keeps_the_kinds_it_is_told_to_keep(tmp_path):
    state = StateFile(tmp_path / "state.json")
    d = _workdir(tmp_path)
    kept = state.add("workdir", path=str(d))
    state.add("http_post", url="http://127.0.0.1:1/unreachable", body=None, what="knob")
    done = state.undo_all(keep=("workdir",))
    assert len(done) == 1 and done[0].startswith("http_post")
    assert [e["id"] for e in state.entries()] == [kept] and d.is_dir()
    assert state.undo_all() == [f"workdir path={d}"] and not d.exists()


def test_drill_cleanup_says_what_it_removed_and_exits_1_when_one_could_not_be_undone(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    state_path = tmp_path / "state.json"

    def cleanup() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "feed.cli", "drill", "cleanup", "--state", str(state_path)],
                              cwd=repo, capture_output=True, text=True, timeout=60)

    d = _workdir(tmp_path)
    StateFile(state_path).add("workdir", path=str(d))
    ok = cleanup()
    assert ok.returncode == 0 and f"workdir path={d}" in ok.stdout and not d.exists()
    StateFile(state_path).add("workdir", path=str(tmp_path))
    bad = cleanup()
    assert bad.returncode == 1 and "refusing to remove" in bad.stdout and tmp_path.is_dir()
    again = cleanup()
    assert again.returncode == 0 and "nothing to clean up" in again.stdout
