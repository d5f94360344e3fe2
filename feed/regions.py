"""N regions on one machine: a NATS supercluster, one HA ingest and one gateway per region, stopped by PID.

Used by ``bookcast up --regions N``, the region e2e tests, ``bookcast regions-bench`` and the chaos drills.
Region ``i`` is named ``r<i>`` unless names are given. Every ingest reads the same upstream (the same captures
replayed from one shared start time, or the same provider config: ``bookcast up --regions 2 --simulate 2``)
and joins the publishing lease (``feed.ha``), whose bucket lives in the supercluster's lease cluster
(``feed.natsserver.Supercluster``); the first region's ingest contends at once, the others once the replay runs, so
region 0 leads.

Stable API (the chaos drills build on it):

    stack = RegionsStack(tmp_dir, regions=["a", "b"], lease_ttl_s=1.5).start()
    a, b = stack.procs                  # RegionProcs, in region order; stack.region("a") by name
    a.ws_url, a.base, a.ingest_url      # ws://127.0.0.1:<port>/v1/ws, gateway http://..., ingest http://...
    a.nats                              # feed.natsserver.Region: .url, .servers, .pids, .gateway_ports, .kill()
    a.ingest, a.gateway                 # subprocess.Popen, each in its own session (signal its group)
    a.ha()                              # the ingest's /v1/status "ha": role, lease_revision, in_step, last_takeover
    stack.leader()                      # the RegionProcs whose ingest leads, or None
    stack.kill_nats(a)                  # SIGKILL every server of a's NATS cluster
    stack.pause_gateway(a); stack.resume_gateway(a)   # SIGSTOP / SIGCONT the gateway's process group
    stack.pause_ingest(a); stack.resume_ingest(a)     # the same for the ingest (a held standby never takes over)
    stack.start_ingest(a, [extra args]) # (re)start a region's ingest (after a kill); waits for /healthz
    stack.supercluster.lease            # the lease cluster (a Region); .lease_region is its name
    stack.log("ingest-a")               # a process's log (ingest-<r>, gateway-<r>; NATS logs under tmp/nats)
    stack.stop()                        # everything, by PID; safe after any fault, safe twice

Raises from ``start``: TimeoutError (a process did not come up; its log is under ``tmp``), RuntimeError (one
exited); what started is stopped first. Partitions between regions: ``feed.partition`` (needs
``netns=True``, root: every region's NATS cluster in a network namespace of its own, on a private address).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from feed.natsserver import Region, Supercluster
from feed.procs import die_with_parent, free_port, http_ok, stop_process, wait_until


def _http_json(url: str, timeout_s: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.loads(r.read())


def spawn_cli(args: list[str], log_path: Path) -> subprocess.Popen:
    """``python -m feed.cli ARGS`` in its own session, output to ``log_path``; it dies with its parent."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "feed.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, cwd=Path(__file__).resolve().parents[1],
                                preexec_fn=die_with_parent)


@dataclass
class RegionProcs:
    """One region's processes: its NATS cluster (``nats``), ingest and gateway."""

    name: str
    nats: Region
    ingest: subprocess.Popen | None = None
    gateway: subprocess.Popen | None = None
    ingest_port: int = 0
    gateway_port: int = 0
    host: str = "127.0.0.1"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.gateway_port}/v1/ws"

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.gateway_port}"

    @property
    def ingest_url(self) -> str:
        return f"http://127.0.0.1:{self.ingest_port}"

    def ingest_status(self) -> dict:
        return _http_json(self.ingest_url + "/v1/status")

    def ha(self, retry_s: float = 10.0) -> dict:
        """The ingest's HA status (``/v1/status`` "ha"); {} when it does not answer within ``retry_s`` (a
        loaded host can keep one status request waiting for seconds; a dead ingest answers nothing)."""
        deadline = time.monotonic() + retry_s
        while True:
            try:
                return _http_json(self.ingest_url + "/v1/status", timeout_s=5.0).get("ha") or {}
            except (OSError, ValueError):
                if time.monotonic() >= deadline or self.ingest is None or self.ingest.poll() is not None:
                    return {}
                time.sleep(0.2)

    def instruments(self) -> list[dict]:
        return _http_json(self.base + "/v1/instruments")["instruments"]


@dataclass
class RegionsStack:
    tmp: Path
    regions: int | list[str] = 2
    nats_per_region: int = 1
    captures: list[Path] = field(default_factory=list)
    speed: float = 1.0
    loop: bool = True
    workers: int = 1
    lease_ttl_s: float = 1.5
    standby_hold_s: float | None = None  # the standbys' --lease-acquire-delay-s (None: until region 0 leads)
    lease_servers: int | None = None  # servers of the lease cluster (default: nats_per_region, the same shape)
    ingest_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    gateway_ports: list[int] = field(default_factory=list)
    provider_config: Path | None = None  # every ingest reads these providers (bookcast ingest --config) instead
    lease_unreachable_s: float = 1.0  # gateways: stale and not ready when the lease bucket is unreachable this long
    netns: bool = False  # root: each region's NATS cluster in its own network namespace (feed.partition)

    def __post_init__(self) -> None:
        names = [f"r{i}" for i in range(self.regions)] if isinstance(self.regions, int) else list(self.regions)
        self.names = names
        self.tmp = Path(self.tmp)
        if self.lease_servers is None:
            self.lease_servers = self.nats_per_region
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.supercluster = Supercluster(names, self.nats_per_region, workdir=str(self.tmp / "nats"),
                                         lease_servers=self.lease_servers, netns=self.netns)
        self.procs = [RegionProcs(n, self.supercluster.region(n), host=self.host) for n in names]
        if not self.captures:
            from feed.capture import bundled_capture
            self.captures = [bundled_capture()]

    def region(self, name: str) -> RegionProcs:
        return next(p for p in self.procs if p.name == name)

    def start(self, timeout_s: float = 60, replay_delay_s: float = 6.0) -> RegionsStack:
        """Start everything; every ingest starts replaying ``replay_delay_s`` after its spawn (same instant for
        all), the first region's at once contending for the lease, the others only after the replay started and
        two TTLs more (so region 0 leads)."""
        try:
            self.supercluster.start()
            start_at_ns = time.time_ns() + int(replay_delay_s * 1e9)
            # the others hold back until the replay starts and two TTLs more: on a loaded host region 0's
            # ingest may come up seconds after theirs, and it must still lead
            hold_s = f"{replay_delay_s + 2 * self.lease_ttl_s + 2:g}" if self.standby_hold_s is None \
                else f"{self.standby_hold_s:g}"
            for i, p in enumerate(self.procs):
                replay = [] if self.provider_config else ["--replay-start-at-ns", str(start_at_ns)]
                self.spawn_ingest(p, replay + (["--lease-acquire-delay-s", hold_s] if i else []))
            for p in self.procs:
                self.wait_ingest(p)
            first = self.procs[0]
            wait_until(lambda: first.ha().get("role") == "leader", timeout_s, what=f"{first.name} ingest leads",
                       proc=first.ingest)
            for i, p in enumerate(self.procs):
                self.start_gateway(p, self.gateway_ports[i] if i < len(self.gateway_ports) else 0)
            for p in self.procs:
                wait_until(lambda: len(p.instruments()) > 0, timeout_s, what=f"{p.name} gateway lists instruments",
                           proc=p.gateway)
        except BaseException:
            self.stop()
            raise
        return self

    def start_ingest(self, p: RegionProcs, extra: list[str] | None = None) -> None:
        self.spawn_ingest(p, extra)
        self.wait_ingest(p)

    def wait_ingest(self, p: RegionProcs) -> None:
        self._wait(lambda: http_ok(p.ingest_url + "/healthz"), 90, what=f"{p.name} ingest /healthz", proc=p.ingest,
                   log_name=f"ingest-{p.name}")

    def _wait(self, predicate: Callable[[], bool], timeout_s: float, *, what: str, proc: subprocess.Popen | None,
              log_name: str) -> None:
        """``wait_until``; a process that exits meanwhile raises RuntimeError with its log's last lines."""
        try:
            wait_until(predicate, timeout_s, what=what, proc=proc)
        except RuntimeError as exc:
            tail = "\n".join(self.log(log_name).splitlines()[-15:])
            raise RuntimeError(f"{exc}; the last lines of {self.tmp / (log_name + '.log')}:\n{tail}") from None

    def spawn_ingest(self, p: RegionProcs, extra: list[str] | None = None) -> None:
        p.ingest_port = free_port()
        ha = ["--name", f"ingest-{p.name}", "--region", p.name, "--regions", ",".join(self.names),
              "--lease-region", self.supercluster.lease_region, "--lease-ttl-s", str(self.lease_ttl_s),
              # R3 where the cluster has 3 servers (the documented production shape), else one per server
              "--lease-replicas", str(min(3, len(self.supercluster.region(self.supercluster.lease_region).servers))),
              "--books-replicas", str(min(3, self.nats_per_region))]
        if self.provider_config is not None:
            args = ["ingest", "--config", str(self.provider_config), "--nats", p.nats.url,
                    "--http-port", str(p.ingest_port), *ha, *self.ingest_args, *(extra or [])]
        else:
            args = ["replay", "--nats", p.nats.url, "--speed", str(self.speed), "--http-port", str(p.ingest_port),
                    *ha, *self.ingest_args, *(extra or [])]
            if self.loop:
                args.append("--loop")
            args += [str(c) for c in self.captures]
        p.ingest = spawn_cli(args, self.tmp / f"ingest-{p.name}.log")

    def start_gateway(self, p: RegionProcs, port: int = 0) -> None:
        p.gateway_port = port or free_port(self.host)
        # a venue whose directory announcements stop for longer than a takeover takes (TTL, the lease poll, one
        # announce interval, with room for a loaded host) has its instruments stale and the gateway not ready
        # (``--ingest-silent-s``; with --region also when no venue is heard at all since the subscription): a
        # takeover in progress is not a dead ingest. A region cut off from the lease cluster notices sooner
        # (``--lease-unreachable-s``).
        ready_s = 2 * self.lease_ttl_s + 3.0
        p.gateway = spawn_cli(["gateway", "--nats", p.nats.url, "--host", self.host, "--port", str(p.gateway_port),
                               "--workers", str(self.workers), "--ingest-silent-s", f"{ready_s:g}",
                               # cut off from the lease cluster for one second: stale, clients move
                               "--lease-unreachable-s", f"{self.lease_unreachable_s:g}",
                               # every instrument carried, so clients arriving from another region resume
                               "--carry-directory", "on",
                               "--region", p.name,
                               *self.gateway_args], self.tmp / f"gateway-{p.name}.log")
        self._wait(lambda: http_ok(p.base + "/readyz"), 90, what=f"{p.name} gateway /readyz", proc=p.gateway,
                   log_name=f"gateway-{p.name}")

    def leader(self) -> RegionProcs | None:
        for p in self.procs:
            if p.ingest is not None and p.ingest.poll() is None and p.ha().get("role") == "leader":
                return p
        return None

    def kill_nats(self, p: RegionProcs) -> None:
        """SIGKILL every nats-server of ``p``'s region (its clients see the connection drop at once)."""
        p.nats.kill()

    def pause_gateway(self, p: RegionProcs) -> None:
        os.killpg(p.gateway.pid, signal.SIGSTOP)

    def resume_gateway(self, p: RegionProcs) -> None:
        os.killpg(p.gateway.pid, signal.SIGCONT)

    def pause_ingest(self, p: RegionProcs) -> None:
        """SIGSTOP the region's ingest (a held standby cannot take over; ``resume_ingest`` lets it)."""
        os.killpg(p.ingest.pid, signal.SIGSTOP)

    def resume_ingest(self, p: RegionProcs) -> None:
        os.killpg(p.ingest.pid, signal.SIGCONT)

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for p in self.procs:
            for proc in (p.gateway, p.ingest):
                if proc is not None:
                    try:
                        os.killpg(proc.pid, signal.SIGCONT)  # a paused process must see SIGTERM
                    except OSError:
                        pass
                    stop_process(proc, grace_s=10)
        self.supercluster.stop()
