"""Real services for end-to-end tests: nats-server, ingest (replay) and gateway processes, stopped by PID."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import nats

from feed import wire
from feed.natsserver import NatsServer
from feed.procs import free_port, stop_process, wait_until
from feed.subjects import snapshot_subject

REPO = Path(__file__).resolve().parents[2]


def spawn_cli(args: list[str], log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = open(log_path, "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "feed.cli", *args], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
    finally:
        log.close()


def http_json(url: str, timeout_s: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.loads(r.read())


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


@dataclass
class Stack:
    """nats-server + gateway (+ ingest replaying captures) on free loopback ports."""

    tmp: Path
    workers: int = 1
    gateway_args: list[str] = field(default_factory=list)
    nats: NatsServer | None = None
    gateway: subprocess.Popen | None = None
    ingest: subprocess.Popen | None = None
    gateway_port: int = 0
    ingest_http_port: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.gateway_port}/v1/ws"

    def start_nats(self, port: int = 0, *, websocket: bool = False) -> None:
        """nats-server on ``port`` (0: a free one); ``websocket`` also opens its own WebSocket listener."""
        self.nats = NatsServer(port=port, name="e2e-nats", workdir=str(self.tmp),
                               websocket_port=0 if websocket else None)
        self.nats.start()

    def start_looping_replay(self, *, websocket: bool = False) -> Stack:
        """nats-server, the gateway and an ingest looping the bundled Coinbase recording at real speed,
        ready when the gateway lists its 10 instruments."""
        from feed.stack import bundled_capture

        self.start_nats(websocket=websocket)
        self.start_gateway()
        self.start_ingest([bundled_capture()], speed=1.0, loop=True)
        self.wait_instruments(10)
        return self

    def start_gateway(self) -> None:
        self.gateway_port = free_port()
        self.gateway = spawn_cli(["gateway", "--nats", self.nats.url, "--port", str(self.gateway_port),
                                  "--workers", str(self.workers), *self.gateway_args], self.tmp / "gateway.log")
        wait_until(lambda: http_ok(self.base + "/readyz"), 90, what="gateway /readyz", proc=self.gateway)

    def start_ingest(self, captures: list[Path], *, speed: float, loop: bool = False) -> None:
        self.ingest_http_port = free_port()
        args = ["replay", "--nats", self.nats.url, "--speed", str(speed), "--http-port", str(self.ingest_http_port)]
        if loop:
            args.append("--loop")
        self.ingest = spawn_cli(args + [str(c) for c in captures], self.tmp / "ingest.log")
        wait_until(lambda: http_ok(f"http://127.0.0.1:{self.ingest_http_port}/healthz"), 90,
                   what="ingest /healthz", proc=self.ingest)

    def instruments(self) -> list[dict]:
        return http_json(self.base + "/v1/instruments")["instruments"]

    def wait_instruments(self, n: int, timeout_s: float = 20) -> list[str]:
        wait_until(lambda: len(self.instruments()) >= n, timeout_s, what=f"{n} instruments listed", proc=self.gateway)
        return [i["instrument"] for i in self.instruments()]

    def ingest_status(self) -> dict:
        return http_json(f"http://127.0.0.1:{self.ingest_http_port}/v1/status")

    def wait_ingest_done(self, timeout_s: float = 120) -> dict[str, tuple[str, int]]:
        """Wait until the replay ended; return {instrument: (epoch, final seq)} from the ingest."""
        wait_until(lambda: self.ingest_status()["done"], timeout_s, what="ingest replay done", proc=self.ingest,
                   interval_s=0.1)
        status = self.ingest_status()
        return {e["instrument"]: (e["epoch"], e["seq"]) for entries in status["venues"].values() for e in entries}

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for proc in (self.ingest, self.gateway):
            if proc is not None:
                stop_process(proc, grace_s=10)
        if self.nats is not None:
            self.nats.stop()


async def ingest_snapshot(nats_url: str, instrument: str) -> dict:
    """The ingest's book of record for ``instrument`` (NATS request/reply, as the gateway asks)."""
    nc = await nats.connect(nats_url)
    try:
        reply = await nc.request(snapshot_subject(instrument), b"", timeout=20)  # generous: a loaded host
        return wire.loads(reply.data)
    finally:
        await nc.close()


async def wait_async(predicate, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not true after {timeout_s} s")
        await asyncio.sleep(interval_s)
