"""`bookcast up --capture` with a capture that has no snapshot names that cause instead of timing out."""
from __future__ import annotations

import subprocess
import sys

from feed.procs import stop_process
from tests.feed.test_snapshotless import REPO, without_snapshots


def test_up_names_the_missing_snapshots(tmp_path):
    capture = without_snapshots(tmp_path, None)
    proc = subprocess.Popen([sys.executable, "-m", "feed.cli", "up", "--port", "0", "--workers", "1", "--no-probe",
                             "--capture", str(capture), "--speed", "50"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        stop_process(proc)
    assert proc.returncode == 1, err
    assert "no snapshot for 10 instruments" in err and "bookcast replay --check" in err
    assert "gateway listing instruments: not ready" not in err
