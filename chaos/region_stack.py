"""The region drills' stack: ``feed.regions.RegionsStack`` (a NATS supercluster of two regions, an HA ingest
and a gateway per region) with every process recorded in the drill's state file.

Adapter module. Layout::

    region a: nats a-0 <-gateway link-> nats b-0 :region b
              ingest-a (leads at start)           ingest-b (standby, in step)
              gateway-a                           gateway-b

The **faulted region** (``faulted_region``, default ``a``; ``b`` for the partition, where b is the side cut
off from the leader) is what the drill faults. The faulted group's clients hold both regions, the faulted
one preferred (``BookClient(regions=[[faulted], [other]])``: the SDK's region move is the failover under
test); with ``failover=False`` they hold the faulted region only and no standby ingest ever takes the lease
(the two failovers a region drill tests: the clients' region move and the standby's takeover). The control group holds the other region's
gateway, and the independent checker builds its books from the other region's NATS.

Roles for ``chaos.actions``: ``gateway-a``, ``gateway-b``, ``ingest-a``, ``ingest-b``, ``nats-a``, ``nats-b``
(one server per region). Built on ``RegionsStack`` as it is: the HA lease and takeover are its own; a
region drill reports what it does (``region-nats-killed`` fails while the standby never takes over after
the leader's region NATS dies: the known regions failure).
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from chaos.stack import Proc, http_json, record_workdir, remove_workdir
from chaos.state import StateFile
from feed.procs import port_open, wait_until

log = logging.getLogger("bookcast.chaos.region_stack")

REGIONS = ("a", "b")
STANDBY_NEVER_S = 86_400.0   # failover disabled: the standbys' lease-acquire hold outlasts any drill


@dataclass
class RegionDrillStack:
    state: StateFile
    failover: bool = True
    speed: float = 1.0
    faulted_region: str = "a"
    lease_ttl_s: float = 4.0         # RegionsStack uses 1.5 s; a drill machine under load loses such a lease
    # nats-server lame-duck mode (SIGUSR2): it stops accepting at once, tells its clients (INFO ``ldm``), waits
    # ``lame_duck_grace_period``, then closes its clients one by one, at most 1 s apart, over
    # ``lame_duck_duration`` (minimum 30 s), and exits. nats-server's defaults (10 s grace, 2 min) outlast a
    # drill's hold; the drill's region servers drain after 1 s, so the whole drain fits the hold.
    lame_duck_grace_s: float = 1.0
    lame_duck_duration_s: float = 30.0
    # root: every cluster's NATS servers in a network namespace of its own (feed.partition.RegionNetwork), so
    # a partition is nftables between namespaces; the namespaces and the bridge are in the state file first
    netns: bool = False
    instruments_wanted: int = 3
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bookcast-drill-regions-")))
    captures: list[Path] = field(default_factory=list)
    instruments: list[str] = field(default_factory=list)
    proxy_api: str = ""
    regions: object = None
    workdir_state_id: str | None = None
    _ids: dict = field(default_factory=dict)
    _net_ids: list = field(default_factory=list)

    kind = "regions"
    # region b (the control) is served by the one leading ingest, which region drills fault: the faulted
    # group's outage is its plain silence, not read against the control
    control_independent = False
    layout = "NATS supercluster a+b, HA ingest and gateway per region"

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> RegionDrillStack:
        from feed.regions import RegionsStack

        self.workdir_state_id = record_workdir(self.state, self.workdir)
        # failover disabled: no standby ever takes the lease (set at start: a started stack keeps its standbys)
        self.regions = RegionsStack(self.workdir, regions=list(REGIONS), speed=self.speed, lease_ttl_s=self.lease_ttl_s,
                                    captures=list(self.captures), netns=self.netns,
                                    standby_hold_s=None if self.failover else STANDBY_NEVER_S)
        network = self.network
        if network is not None:     # recorded before they exist: a killed run's are undone by the next
            for ns in network.namespaces.values():
                self._net_ids.append(self.state.add("netns", name=ns))
            self._net_ids.append(self.state.add("link", name=network.bridge))
        for region in self.regions.supercluster.regions:   # the data regions' servers (config written at start)
            for server in region.servers:
                server.extra_config = "\n".join(x for x in (server.extra_config, self.lame_duck_config()) if x)
        try:
            self.regions.start(timeout_s=90)
        finally:
            self._record()
        standby = [p for p in self.regions.procs if p.ha().get("role") != "leader"]
        try:
            # in step, and past its start-up hold (--lease-acquire-delay-s): a standby still holding back
            # cannot take over, and a leader killed then would measure the hold, not the failover
            wait_until(lambda: all(all((h.get("in_step") or {0: False}).values())
                                   and (h.get("acquire_hold_s", 0) == 0 or not self.failover)
                                   for h in (p.ha() for p in standby)),
                       60, what="standby ingest in step and armed" if self.failover else "standby ingest in step")
        except TimeoutError as exc:   # the drill's verdict says what a takeover from here does
            log.warning("%s; the drill runs anyway", exc)
        listing = self._region(self.faulted_region).instruments()
        self.instruments = [i["instrument"] for i in sorted(listing, key=lambda i: -i["seq"])[: self.instruments_wanted]]
        return self

    def lame_duck_config(self) -> str:
        """The nats-server config lines of the drill's lame-duck drain (``lame_duck_grace_s``,
        ``lame_duck_duration_s``; https://docs.nats.io/running-a-nats-service/nats_admin/lame_duck_mode)."""
        return (f'lame_duck_grace_period: "{self.lame_duck_grace_s * 1000:.0f}ms"\n'
                f'lame_duck_duration: "{max(30.0, self.lame_duck_duration_s):g}s"')

    def lame_duck_drain_s(self, role: str) -> float:
        """The longest a lame-duck drain of ``role``'s server takes: the grace period plus at most 1 s per
        client it held (nats-server spaces the closes at most 1 s apart), read from its monitoring."""
        _, _, name = role.partition("-")
        server = self._region(name).nats.servers[0]
        try:
            clients = int(http_json(f"http://{server.host}:{server.monitor_port}/varz", timeout_s=2.0)["connections"])
        except (OSError, ValueError, KeyError):
            clients = 10
        return self.lame_duck_grace_s + clients * 1.0

    @property
    def network(self):
        """The namespaces' ``feed.partition.RegionNetwork`` (``netns``), or None."""
        return getattr(self.regions.supercluster, "network", None) if self.regions is not None else None

    def _record(self) -> None:
        """Every live process of the stack in the state file (new PIDs after a restart too), the lease
        cluster's servers included."""
        roles = [(role, proc.popen) for role, proc in self.procs.items()]
        lease = self.regions.supercluster.lease if self.regions is not None else None
        roles += [(f"nats-{s.name}", s.proc) for s in (lease.servers if lease is not None else [])]
        for role, popen in roles:
            if popen is None or popen.poll() is not None:
                continue
            key = (role, popen.pid)
            if key not in self._ids:
                self._ids[key] = self.state.add_process(popen.pid, role)

    def leftovers(self) -> list[str]:
        """Namespaces, bridge or partition tables of this stack still in the kernel (after ``stop``: none)."""
        network = self.network
        if network is None:
            return []
        from feed.partition import _bridges, _namespaces

        out = [f"netns {n}" for n in network.namespaces.values() if n in _namespaces()]
        return out + ([f"bridge {network.bridge}"] if network.bridge in _bridges() else [])

    def stop(self) -> None:
        if self.regions is not None:
            self.regions.stop()       # the namespaces and bridge too (Supercluster.stop)
        for sid in self._ids.values():
            self.state.remove(sid)
        self._ids.clear()
        if not self.leftovers():      # otherwise the state file keeps them for undo_all
            for sid in self._net_ids:
                self.state.remove(sid)
            self._net_ids.clear()

    def cleanup_workdir(self, keep_logs_in: Path | None = None) -> None:
        """Copy the processes' logs to ``keep_logs_in`` (when given), then remove the work directory."""
        remove_workdir(self.state, self.workdir, self.workdir_state_id, keep_logs_in)
        self.workdir_state_id = None

    # -- roles -------------------------------------------------------------------------------------
    def _region(self, name: str):
        return self.regions.region(name)

    def _other(self):
        return self._region(next(r for r in REGIONS if r != self.faulted_region))

    @property
    def procs(self) -> dict[str, Proc]:
        out: dict[str, Proc] = {}
        if self.regions is None:
            return out
        for p in self.regions.procs:
            out[f"gateway-{p.name}"] = Proc(f"gateway-{p.name}", [], p.gateway_port, p.gateway)
            out[f"ingest-{p.name}"] = Proc(f"ingest-{p.name}", [], p.ingest_port, p.ingest)
            server = p.nats.servers[0]
            out[f"nats-{p.name}"] = Proc(f"nats-{p.name}", [], server.port, server.proc)
        return out

    def pid(self, role: str) -> int:
        return self.procs[role].popen.pid

    def restart_role(self, role: str, ready_timeout_s: float = 60.0) -> float:
        """Start ``role`` again (gateway on its port, ingest rejoining as standby, a region's NATS servers
        with their JetStream stores). Returns the seconds until it served."""
        t0 = time.monotonic()
        kind, _, name = role.partition("-")
        p = self._region(name)
        proc = self.procs[role]
        if proc.popen is not None and proc.popen.poll() is None:
            from feed.procs import stop_process

            proc.popen.send_signal(18)
            stop_process(proc.popen, grace_s=5.0)
        if kind == "gateway":
            wait_until(lambda: not port_open("127.0.0.1", p.gateway_port), 10, what=f"{role} port closed")
            self.regions.start_gateway(p, p.gateway_port)
        elif kind == "ingest":
            self.regions.start_ingest(p)
        elif kind == "nats":
            for s in p.nats.servers:
                s.start(ready_timeout_s)
        else:
            raise ValueError(f"unknown role {role!r}")
        self._record()
        return time.monotonic() - t0

    # -- what the runner reads ---------------------------------------------------------------------
    @property
    def checker_kv_region(self) -> str:
        """The checker's region: its KV books (``feed.ha``) stand in when a snapshot request goes unanswered."""
        return self._other().name

    @property
    def checker_url(self) -> str:
        return self._other().nats.url

    def checker_urls(self) -> dict[str, str]:
        return {"faulted": self.checker_url, "control": self.checker_url}

    def group_urls(self) -> dict[str, list]:
        f, o = self._region(self.faulted_region), self._other()
        faulted = [[f.ws_url], [o.ws_url]] if self.failover else [f.ws_url]
        return {"faulted": faulted, "control": [o.ws_url]}

    def faulted_first_url(self) -> str:
        return self._region(self.faulted_region).ws_url

    def quiesce_roles(self) -> list[str]:
        return [f"ingest-{r}" for r in REGIONS]

    def system_view(self) -> dict | None:
        leaders = []
        for p in self.regions.procs:
            if p.ingest is not None and p.ingest.poll() is None:
                try:
                    ha = http_json(p.ingest_url + "/v1/status", timeout_s=2.0).get("ha") or {}
                except (OSError, ValueError) as exc:   # a busy ingest: no news (not "nobody leads")
                    return {"error": f"{p.name}: {exc}"[:120]}
                if ha.get("role") == "leader":
                    leaders.append(p.name)
        return {"selected": ",".join(leaders) or None, "healthy": len(leaders) == 1}

    def region_namespace(self, name: str) -> str | None:
        network = self.network
        return network.namespaces[name] if network is not None else None

    def describe(self) -> dict:
        if self.regions is None:
            return {"pids": {}}
        return {"regions": {p.name: {"nats": p.nats.url, "gateway": p.ws_url, "ingest": p.ingest_url}
                            for p in self.regions.procs},
                "faulted_region": self.faulted_region, "instruments": self.instruments, "failover": self.failover,
                "group_urls": self.group_urls(), "checker": self.checker_url,
                "netns": dict(self.network.namespaces) if self.network is not None else None,
                "pids": {r: p.popen.pid for r, p in self.procs.items() if p.popen is not None}}
