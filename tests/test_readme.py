"""Every ```python block of the README runs as printed against a real stack, from a new terminal.

The stack is the README's: nats-server, a gateway and an ingest looping the bundled recording, with the
state file ``bookcast up`` writes (``feed.runstate``) in a home given by ``BOOKCAST_HOME``. Each block runs
in its own interpreter, from a scratch directory, and must exit 0 within a minute having printed something.
``BOOKCAST_README`` names another file to check (to try a README text before it lands).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from feed import runstate
from tests.e2e.harness import Stack

REPO = Path(__file__).resolve().parents[1]
README = Path(os.environ.get("BOOKCAST_README") or REPO / "README.md")
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.M | re.S)

pytestmark = pytest.mark.e2e


def test_the_readme_has_python_blocks():
    assert BLOCKS, f"{README} has no ```python block"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readme")
    stack = Stack(tmp)
    try:
        stack.start_looping_replay()
        state = runstate.RunState(run_id=runstate.new_run_id(), pid=os.getpid(), started_ns=time.time_ns(),
                                  ws_url=stack.ws_url, http_url=stack.base, nats_url=stack.nats.url,
                                  store=str(tmp / "home" / "chdb"), instruments=stack.wait_instruments(10))
        runstate.write_state(state, tmp / "home")
        yield tmp / "home"
    finally:
        stack.stop()


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_each_python_block_runs_as_printed(index, home, tmp_path):
    out = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "BOOKCAST_HOME": str(home), "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, f"README python block {index + 1}:\n{BLOCKS[index]}\n{out.stderr[-2000:]}"
    assert out.stdout.strip(), f"README python block {index + 1} printed nothing"
