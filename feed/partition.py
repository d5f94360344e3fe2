"""Regions in network namespaces, and partitions between them with nftables (root only).

Adapter (root, ``ip``, ``nft``). A ``RegionNetwork`` gives every cluster of a supercluster (each data region
and the lease cluster) a **network namespace of its own**, joined to one bridge in the root namespace by a
veth pair with a private address (``10.<x>.<y>.<10+i>/24``; the bridge holds ``.1``). A cluster's
nats-servers run inside its namespace (``ip netns exec``) and listen on its address; every client of ours
(ingests, gateways, tests) stays in the root namespace and reaches them through the bridge. Cross-region
traffic (gateway links, the lease cluster's replies) goes namespace to namespace over the bridge.

A ``Partition`` of region ``r`` is an nftables table ``inet bcpart_<hex>`` **inside r's namespace** that
drops every packet from or to the other clusters' addresses (input and output hooks, with counters). The
region's own clients (from the bridge address) keep their connections; its gateway links and its route to
the lease cluster go silent to both sides, as in a real partition (drop, not reject). ``heal()`` deletes the
table; ``with Partition(...)`` always does; a namespace removed takes its tables with it.

Names are unique per run: namespaces ``bookcast-<tag>-<pid>-<cluster>``, bridge ``bcbr<tag>``, veths
``bcv<tag><i>`` (``tag``: 6 random hex digits; ``pid``: the creating process). ``RegionNetwork.remove()`` and
``Supercluster.stop()`` delete them; ``cleanup_stale()`` (run by every ``RegionNetwork.create()``) deletes
those whose creating process is gone (a crashed or SIGKILLed run), and kills what still runs inside them.

    sc = Supercluster(["a", "b"], netns=True).start()   # feed.natsserver: servers in their namespaces
    with Partition(sc, "a") as cut:
        ...   # region a's cluster reaches neither region b nor the lease cluster
        cut.dropped()   # packets the table dropped so far

Raises ``PartitionUnavailable`` (from ``check()``, ``RegionNetwork.create()``, ``Partition.apply()``) when not
root, ``ip``/``nft`` is missing, the kernel refuses, or the supercluster was not built with ``netns=True``.
"""
from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
from typing import Any, Protocol

from feed.errors import FeedError



class Supercluster(Protocol):
    """What a partition needs of ``feed.natsserver.Supercluster`` (typed here: natsserver imports this module)."""

    network: RegionNetwork | None

    def region(self, name: str) -> Any: ...  # a cluster with .name

TABLE_PREFIX = "bcpart_"
NETNS_PREFIX = "bookcast-"
BRIDGE_PREFIX = "bcbr"
_NETNS_RE = re.compile(rf"^{NETNS_PREFIX}([0-9a-f]{{6}})-(\d+)-([a-z0-9_]+)$")
_BRIDGE_RE = re.compile(rf"^{BRIDGE_PREFIX}([0-9a-f]{{6}})$")


class PartitionUnavailable(FeedError, RuntimeError):
    """Namespaces or nftables cannot be used here (not root, no ``ip``/``nft``, or the kernel refused)."""


def check() -> None:
    """Raise ``PartitionUnavailable`` naming why namespaces and partitions cannot be made on this machine."""
    if os.geteuid() != 0:
        raise PartitionUnavailable("needs root (network namespaces and nftables)")
    for tool, pkg in (("nft", "nftables"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            raise PartitionUnavailable(f"{tool} not found (apt-get install {pkg})")


def available() -> bool:
    try:
        check()
    except PartitionUnavailable:
        return False
    return True


def _run(argv: list[str], stdin: str | None = None, check_rc: bool = True) -> str:
    r = subprocess.run(argv, input=stdin, text=True, capture_output=True, timeout=15)
    if check_rc and r.returncode != 0:
        raise PartitionUnavailable(f"{' '.join(argv)} failed: {r.stderr.strip()}")
    return r.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"], check_rc=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _bridges() -> list[str]:
    out = _run(["ip", "-o", "link", "show", "type", "bridge"], check_rc=False)
    return [m.group(1) for m in re.finditer(r"^\d+:\s+([^:@\s]+)", out, re.M)]


def cleanup_stale() -> list[str]:
    """Delete every namespace and bridge of ours whose creating process is gone (what a killed run left),
    SIGKILLing the processes still inside such a namespace; returns what was deleted. Namespaces and bridges
    of live runs are left alone."""
    if not available():
        return []
    bridges = _bridges()  # listed before the namespaces: a live run creates its namespaces before its bridge
    live_tags, removed = set(), []
    for ns in _namespaces():
        m = _NETNS_RE.match(ns)
        if not m:
            continue
        if _alive(int(m.group(2))):
            live_tags.add(m.group(1))
            continue
        for pid in _run(["ip", "netns", "pids", ns], check_rc=False).split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _run(["ip", "netns", "delete", ns], check_rc=False)
        removed.append(ns)
    for br in bridges:
        m = _BRIDGE_RE.match(br)
        if m and m.group(1) not in live_tags:
            _run(["ip", "link", "delete", br], check_rc=False)
            removed.append(br)
    return removed


def _free_subnet() -> str:
    """A ``10.x.y`` /24 no interface of this machine uses (x in 200..254)."""
    used = set(re.findall(r"inet (10\.\d+\.\d+)\.", _run(["ip", "-4", "-o", "addr"], check_rc=False)))
    for _ in range(200):
        subnet = f"10.{random.randint(200, 254)}.{random.randint(0, 255)}"
        if subnet not in used:
            return subnet
    raise PartitionUnavailable("no free 10.x.y.0/24 subnet for the region namespaces")


class RegionNetwork:
    """One network namespace per cluster (``clusters``: names, [a-z0-9_]), joined by veth pairs to a bridge in
    the root namespace. ``addresses[c]`` is where cluster ``c``'s servers listen; ``namespaces[c]`` its
    namespace; ``exec_prefix(c)`` the argv prefix that runs a command inside it. Addresses are chosen at
    construction, the links made by ``create()`` and deleted by ``remove()`` (safe twice)."""

    def __init__(self, clusters: list[str]) -> None:
        bad = [c for c in clusters if not re.fullmatch(r"[a-z0-9_]+", c)]
        if bad:
            raise ValueError(f"cluster names for namespaces must match [a-z0-9_]+, got {bad}")
        self.tag = secrets.token_hex(3)
        self.bridge = f"{BRIDGE_PREFIX}{self.tag}"
        self.clusters = list(clusters)
        self.subnet = _free_subnet() if available() else "10.254.0"
        self.bridge_address = f"{self.subnet}.1"
        self.addresses = {c: f"{self.subnet}.{10 + i}" for i, c in enumerate(self.clusters)}
        self.namespaces = {c: f"{NETNS_PREFIX}{self.tag}-{os.getpid()}-{c}" for c in self.clusters}
        self.veths = {c: f"bcv{self.tag}{i:02d}" for i, c in enumerate(self.clusters)}
        self.created = False

    def exec_prefix(self, cluster: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[cluster]]

    def create(self) -> RegionNetwork:
        """Make the namespaces, the bridge and the veth pairs (stale ones of killed runs are deleted first).
        Raises ``PartitionUnavailable``; what was made is deleted again."""
        if self.created:
            return self
        check()
        cleanup_stale()
        self.created = True
        try:
            for c in self.clusters:
                _run(["ip", "netns", "add", self.namespaces[c]])
                _run(["ip", "-n", self.namespaces[c], "link", "set", "lo", "up"])
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
            _run(["ip", "addr", "add", f"{self.bridge_address}/24", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
            for c in self.clusters:
                ns, veth = self.namespaces[c], self.veths[c]
                _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
                _run(["ip", "link", "set", veth, "master", self.bridge, "up"])
                _run(["ip", "-n", ns, "addr", "add", f"{self.addresses[c]}/24", "dev", "eth0"])
                _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Delete the namespaces (their veths and nft tables go with them) and the bridge. Safe twice."""
        if not self.created:
            return
        for ns in self.namespaces.values():
            _run(["ip", "netns", "delete", ns], check_rc=False)
        _run(["ip", "link", "delete", self.bridge], check_rc=False)
        self.created = False

    def exists(self) -> bool:
        """True while any of our namespaces or our bridge exists."""
        return bool(set(self.namespaces.values()) & set(_namespaces())) or self.bridge in _bridges()


class Partition:
    """Cut region ``region`` of ``supercluster`` (built with ``netns=True``) off from every other cluster (data
    regions and the lease cluster). ``apply()`` then ``heal()``; or use as a context manager (healed on exit,
    always)."""

    def __init__(self, supercluster: Supercluster, region: str) -> None:
        self.supercluster = supercluster
        self.region = supercluster.region(region)
        self.network: RegionNetwork | None = getattr(supercluster, "network", None)
        self.table = f"{TABLE_PREFIX}{secrets.token_hex(4)}"
        self.applied = False

    def _ns_argv(self) -> list[str]:
        if self.network is None:
            raise PartitionUnavailable("the supercluster is not in network namespaces (Supercluster(netns=True), "
                                       "RegionsStack(netns=True))")
        return ["ip", "netns", "exec", self.network.namespaces[self.region.name]]

    def script(self) -> str:
        """The nft script of the partition: drop the other clusters' addresses, both directions."""
        if self.network is None:
            self._ns_argv()
        others = ", ".join(a for c, a in sorted(self.network.addresses.items()) if c != self.region.name)
        return (f"table inet {self.table} {{\n"
                f"  chain input {{\n    type filter hook input priority 0; policy accept;\n"
                f"    ip saddr {{ {others} }} counter drop\n  }}\n"
                f"  chain output {{\n    type filter hook output priority 0; policy accept;\n"
                f"    ip daddr {{ {others} }} counter drop\n  }}\n}}\n")

    def apply(self) -> Partition:
        check()
        argv = self._ns_argv()
        _run([*argv, "nft", "-f", "-"], stdin=self.script())
        self.applied = True
        return self

    def exists(self) -> bool:
        """True while our table is in the region's namespace."""
        if self.network is None:
            return False
        r = subprocess.run([*self._ns_argv(), "nft", "list", "table", "inet", self.table], capture_output=True,
                           timeout=15)
        return r.returncode == 0

    def dropped(self) -> int:
        """Packets our table has dropped so far (0 once healed)."""
        if not self.applied:
            return 0
        out = _run([*self._ns_argv(), "nft", "-j", "list", "table", "inet", self.table], check_rc=False)
        try:
            items = json.loads(out).get("nftables", [])
        except ValueError:
            return 0
        return sum(int(e["counter"].get("packets", 0)) for it in items for e in (it.get("rule") or {}).get("expr", [])
                   if "counter" in e)

    def heal(self) -> None:
        """Delete our table (safe to call twice, and when ``apply`` failed)."""
        if self.applied:
            subprocess.run([*self._ns_argv(), "nft", "delete", "table", "inet", self.table], capture_output=True,
                           timeout=15)
            self.applied = False

    def __enter__(self) -> Partition:
        try:
            return self.apply()
        except BaseException:
            self.heal()
            raise

    def __exit__(self, *exc: object) -> None:
        self.heal()
