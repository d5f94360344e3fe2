"""The stack a drill runs on: real nats-server, ingest, gateways and the fault proxy on loopback.

Adapter module. Layout (every process recorded in the state file before anything else happens)::

    ingest (replays a capture, looping) -> nats-server -> gateway-a --+-- proxy "gateway-a" -- faulted group
                                                      \\-> gateway-b -+--------------------- (failover target)
                                                       \\-> gateway-c ---------------------- control group

The faulted group's clients hold ``[proxy -> gateway-a, gateway-b]`` (``failover=True``) or only the first
(``failover=False``, the switch the tests use to prove the checks can fail). With ``faulted_via_proxy=False``
they connect to gateway-a directly, so a proxy toxic is *not on the data path* (the "not injected" test).
The control group holds only gateway-c, which no drill faults.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from chaos.state import StateFile
from feed.natsserver import NatsServer
from feed.procs import free_port, port_open, stop_process, wait_until
from feed.stack import bundled_capture

log = logging.getLogger("bookcast.chaos.stack")

GATEWAYS = ("gateway-a", "gateway-b", "gateway-c")


def http_json(url: str, body: object | None = None, method: str | None = None, timeout_s: float = 5.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def record_workdir(state: StateFile, workdir: Path) -> str:
    """Record ``workdir`` in ``state`` (kind ``workdir``) before the stack writes into it; returns the entry's
    id for ``remove_workdir``."""
    return state.add("workdir", path=str(workdir))


def remove_workdir(state: StateFile, workdir: Path, state_id: str | None, keep_logs_in: Path | None = None) -> None:
    """Copy ``workdir``'s process logs (``*.log``) to ``keep_logs_in`` when given, remove the directory, then
    its ``workdir`` entry ``state_id`` from ``state`` (recorded at the stack's start, so a drill killed before
    this point leaves it to the next run's ``undo_all``)."""
    if keep_logs_in is not None:
        keep_logs_in.mkdir(parents=True, exist_ok=True)
        for log_file in workdir.glob("*.log"):
            shutil.copy(log_file, keep_logs_in / log_file.name)
    shutil.rmtree(workdir, ignore_errors=True)
    if state_id:
        state.remove(state_id)


@dataclass
class Proc:
    role: str
    argv: list[str]
    port: int | None
    popen: subprocess.Popen | None = None
    state_id: str | None = None
    log_path: Path | None = None


@dataclass
class DrillStack:
    state: StateFile
    failover: bool = True
    faulted_via_proxy: bool = True
    capture: Path = field(default_factory=bundled_capture)
    speed: float = 1.0
    instruments_wanted: int = 3
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bookcast-drill-")))
    nats: NatsServer | None = None
    procs: dict[str, Proc] = field(default_factory=dict)
    proxy_api: str = ""
    proxy_listen: tuple[str, int] = ("127.0.0.1", 0)
    instruments: list[str] = field(default_factory=list)
    nats_state_id: str | None = None
    workdir_state_id: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> DrillStack:
        self.workdir_state_id = record_workdir(self.state, self.workdir)
        self.nats = NatsServer(name="bookcast-drill").start()
        self.nats_state_id = self.state.add_process(self.nats.pid, "nats-server")
        ingest_port = free_port()
        self._spawn(Proc("ingest", ["replay", "--nats", self.nats.url, "--speed", str(self.speed), "--loop",
                                    "--http-port", str(ingest_port), "--name", "drill-ingest", str(self.capture)],
                         ingest_port))
        for role in GATEWAYS:
            port = free_port()
            self._spawn(Proc(role, ["gateway", "--nats", self.nats.url, "--port", str(port), "--workers", "1",
                                    "--name", role], port))
        api_port_file = self.workdir / "proxy-api"
        proxy = Proc("proxy", ["-m", "chaos.proxy", "--port-file", str(api_port_file)], None)
        self._spawn(proxy, python_module=True)
        wait_until(lambda: api_port_file.exists() and api_port_file.read_text().strip(), 60, what="fault proxy API",
                   proc=proxy.popen)
        self.proxy_api = api_port_file.read_text().strip()
        created = http_json(f"{self.proxy_api}/proxies", {"name": "gateway-a", "listen": "127.0.0.1:0",
                                                          "upstream": f"127.0.0.1:{self.procs['gateway-a'].port}"})
        host, _, port = created["listen"].rpartition(":")
        self.proxy_listen = (host, int(port))
        for role in GATEWAYS:
            self.wait_gateway(role)
        self.instruments = self._pick_instruments()
        return self

    def _spawn(self, proc: Proc, *, python_module: bool = False) -> None:
        proc.log_path = self.workdir / f"{proc.role}.log"
        logf = open(proc.log_path, "ab")
        if python_module:
            proc.popen = subprocess.Popen([sys.executable, *proc.argv], start_new_session=True,
                                          stdout=logf, stderr=subprocess.STDOUT)
        else:
            proc.popen = subprocess.Popen([sys.executable, "-m", "feed.cli", *proc.argv], start_new_session=True,
                                          stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        proc.state_id = self.state.add_process(proc.popen.pid, proc.role)
        self.procs[proc.role] = proc

    def wait_gateway(self, role: str, timeout_s: float = 60.0) -> None:
        proc = self.procs[role]

        def listing() -> bool:
            try:
                return bool(http_json(f"http://127.0.0.1:{proc.port}/v1/instruments", timeout_s=1)["instruments"])
            except (OSError, ValueError, KeyError):
                return False
        wait_until(listing, timeout_s, what=f"{role} listing instruments", proc=proc.popen)

    def _pick_instruments(self) -> list[str]:
        listing = http_json(f"http://127.0.0.1:{self.procs['gateway-c'].port}/v1/instruments")["instruments"]
        busiest = sorted(listing, key=lambda i: -i["seq"])
        return [i["instrument"] for i in busiest[: self.instruments_wanted]]

    def stop(self) -> None:
        for role in reversed(list(self.procs)):
            self.stop_role(role)
        if self.nats is not None:
            self.nats.cleanup()
            if self.nats_state_id:
                self.state.remove(self.nats_state_id)

    def stop_role(self, role: str) -> None:
        proc = self.procs[role]
        if proc.popen is not None:
            try:
                proc.popen.send_signal(18)   # SIGCONT: a paused process cannot act on SIGTERM
            except ProcessLookupError:
                pass
            stop_process(proc.popen, grace_s=5.0)
        if proc.state_id:
            self.state.remove(proc.state_id)
            proc.state_id = None

    def restart_role(self, role: str, ready_timeout_s: float = 60.0) -> float:
        """Stop ``role`` (SIGTERM, a graceful drain) and start it again on the same port. Returns the
        seconds until it listed instruments again."""
        t0 = time.monotonic()
        self.stop_role(role)
        proc = self.procs[role]
        wait_until(lambda: not port_open("127.0.0.1", proc.port), 10, what=f"{role} port closed")
        self._spawn(Proc(role, proc.argv, proc.port))
        if role.startswith("gateway"):
            self.wait_gateway(role, ready_timeout_s)
        return time.monotonic() - t0

    # -- what the runner reads (the same on every drill stack) ------------------------------------
    kind = "gateways"
    layout = "nats-server, ingest, 3 gateways, fault proxy"
    # no drill's fault reaches the control path (gateway-c; the providers stack: provider-2 read directly):
    # the faulted group's outage is read against it (chaos.report.analyse)
    control_independent = True

    @property
    def checker_url(self) -> str:
        """NATS URL the independent checker builds its books from."""
        return self.nats.url

    def checker_urls(self) -> dict[str, str]:
        """{group: NATS URL} of the checker each client group's books are compared with."""
        return {"faulted": self.checker_url, "control": self.checker_url}

    def group_urls(self) -> dict[str, list]:
        """{"faulted": urls, "control": urls} for ``ClientGroups`` (a list of lists means regions)."""
        return {"faulted": self.faulted_urls(), "control": self.control_urls()}

    def faulted_first_url(self) -> str:
        """The faulted group's preferred URL: a delivery over any other is a failover."""
        return self.faulted_urls()[0]

    def quiesce_roles(self) -> list[str]:
        """Roles paused (SIGSTOP) while books are compared: every publisher of the checked NATS."""
        return ["ingest"]

    def system_view(self) -> dict | None:
        """What the system itself says about failover (polled during the drill): ``{"selected": name,
        "healthy": bool}`` or None when this stack has no such view (failover is read from the clients)."""
        return None

    def cleanup_workdir(self, keep_logs_in: Path | None = None) -> None:
        """Copy the processes' logs to ``keep_logs_in`` (when given), then remove the work directory."""
        remove_workdir(self.state, self.workdir, self.workdir_state_id, keep_logs_in)
        self.workdir_state_id = None

    # -- URLs --------------------------------------------------------------------------------------
    def ws_url(self, role: str) -> str:
        return f"ws://127.0.0.1:{self.procs[role].port}/v1/ws"

    def faulted_urls(self) -> list[str]:
        first = (f"ws://{self.proxy_listen[0]}:{self.proxy_listen[1]}/v1/ws" if self.faulted_via_proxy
                 else self.ws_url("gateway-a"))
        return [first, self.ws_url("gateway-b")] if self.failover else [first]

    def control_urls(self) -> list[str]:
        return [self.ws_url("gateway-c")]

    def pid(self, role: str) -> int:
        return self.procs[role].popen.pid

    def describe(self) -> dict:
        return {"nats": self.nats.url if self.nats else None, "proxy_api": self.proxy_api,
                "faulted_urls": self.faulted_urls(), "control_urls": self.control_urls(),
                "instruments": self.instruments, "failover": self.failover,
                "faulted_via_proxy": self.faulted_via_proxy, "capture": str(self.capture),
                "pids": {r: p.popen.pid for r, p in self.procs.items() if p.popen is not None}}
