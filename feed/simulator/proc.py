"""Run a real ``bookcast simulate`` process on a free loopback port, talk to its control API, stop it by PID.

Adapter (processes, HTTP). Used by the tests, the benchmark and drills."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from feed.procs import free_port, stop_process, wait_until

REPO = Path(__file__).resolve().parents[2]


class Sim:
    def __init__(self, proc: subprocess.Popen, port: int, venue: str) -> None:
        self.proc = proc
        self.port = port
        self.venue = venue
        self.base = f"http://127.0.0.1:{port}"
        path = {"polymarket": "/ws/market", "coinbase": "/", "kalshi": "/trade-api/ws/v2"}[venue]
        self.ws_url = f"ws://127.0.0.1:{port}{path}"

    def status(self) -> dict:
        with urllib.request.urlopen(f"{self.base}/sim/status", timeout=5) as resp:
            return json.loads(resp.read())

    def start(self, start_at_ns: int | None = None) -> dict:
        body = {} if start_at_ns is None else {"start_at_ns": start_at_ns}
        req = urllib.request.Request(f"{self.base}/sim/start", data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    def faults(self, **knobs) -> dict:
        req = urllib.request.Request(f"{self.base}/sim/faults", data=json.dumps(knobs).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextmanager
def simulator(venue: str, *captures: Path, extra: list[str] = (), log_path: Path | None = None):
    port = free_port()
    cmd = [sys.executable, "-m", "feed.cli", "simulate", "--venue", venue, "--port", str(port), "--seed", "1"]
    for c in captures:
        cmd += ["--capture", str(c)]
    cmd += list(extra)
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT if log_path else log,
                            start_new_session=True)
    try:
        wait_until(lambda: _healthy(f"http://127.0.0.1:{port}"), 60, what=f"{venue} simulator", proc=proc)
        yield Sim(proc, port, venue)
    finally:
        stop_process(proc)
        if log_path:
            log.close()


def start_in_ns(seconds: float) -> str:
    return str(time.time_ns() + int(seconds * 1e9))
