"""Partition one region of a supercluster from the others with nftables: its NATS gateway links are cut.

Adapter (root, ``nft``). Everything runs on loopback, so a region is cut by **ports**, in a table of our own
(``inet bcpart_<random hex>``) that ``heal()`` deletes, and ``with Partition(...)`` always deletes:

* every packet to or from the region's gateway listen ports (the links the other clusters dialled in),
* every packet to or from the local ports of the region's own outbound gateway links (found with ``ss``
  by the servers' PIDs and the other clusters' gateway ports),
* every new connection (a bare SYN) to the other clusters' gateway ports, so the region cannot redial.

Packets are dropped, not rejected: to both sides the link goes silent, as in a real partition. The region's
own clients (ingest, gateway) keep their connections to its servers. ``cleanup_stale()`` removes tables
left by a killed run (they are named with the prefix ``TABLE_PREFIX``).

    with Partition(stack.supercluster, "a"):
        ...   # region a's cluster reaches neither region b nor the lease cluster

Raises ``PartitionUnavailable`` (from ``check()`` and ``apply()``) when not root or nft is missing or fails.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from typing import TYPE_CHECKING

from feed.errors import FeedError

if TYPE_CHECKING:
    from feed.natsserver import Supercluster

TABLE_PREFIX = "bcpart_"


class PartitionUnavailable(FeedError, RuntimeError):
    """nftables cannot be used here (not root, no ``nft``, or the kernel refused the table)."""


def check() -> None:
    """Raise ``PartitionUnavailable`` naming why a partition cannot be made on this machine."""
    if os.geteuid() != 0:
        raise PartitionUnavailable("needs root (nftables)")
    if shutil.which("nft") is None:
        raise PartitionUnavailable("nft not found (apt-get install nftables)")


def _nft(script: str) -> None:
    r = subprocess.run(["nft", "-f", "-"], input=script, text=True, capture_output=True, timeout=10)
    if r.returncode != 0:
        raise PartitionUnavailable(f"nft failed: {r.stderr.strip()}")


def cleanup_stale() -> list[str]:
    """Delete every ``bcpart_*`` table (left by a run that was killed); returns their names."""
    r = subprocess.run(["nft", "list", "tables"], text=True, capture_output=True, timeout=10)
    names = re.findall(rf"table inet ({TABLE_PREFIX}[0-9a-f]+)", r.stdout)
    for name in names:
        subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True, timeout=10)
    return names


def outbound_link_ports(pids: list[int], remote_ports: set[int]) -> set[int]:
    """Local ports of the established TCP connections owned by ``pids`` whose peer port is in
    ``remote_ports`` (``ss -Htnp``)."""
    r = subprocess.run(["ss", "-Htnp", "state", "established"], text=True, capture_output=True, timeout=10)
    out: set[int] = set()
    for line in r.stdout.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        fields = line.split()
        if not owners & set(pids) or len(fields) < 4:
            continue
        local, peer = fields[2], fields[3]  # Recv-Q Send-Q Local:Port Peer:Port (state filtered: no column)
        try:
            lport, pport = int(local.rsplit(":", 1)[1]), int(peer.rsplit(":", 1)[1])
        except (IndexError, ValueError):
            continue
        if pport in remote_ports:
            out.add(lport)
    return out


class Partition:
    """Cut region ``region`` of ``supercluster`` off from every other cluster (data regions and the lease
    cluster). ``apply()`` then ``heal()``; or use as a context manager (healed on exit, always)."""

    def __init__(self, supercluster: Supercluster, region: str) -> None:
        self.supercluster = supercluster
        self.region = supercluster.region(region)
        self.table = f"{TABLE_PREFIX}{secrets.token_hex(4)}"
        self.applied = False

    def script(self) -> str:
        """The nft script of the partition (ports found now)."""
        own = set(self.region.gateway_ports)
        others = {p for c in self.supercluster.clusters if c is not self.region for p in c.gateway_ports}
        outbound = outbound_link_ports(self.region.pids, others)
        own_set = ", ".join(str(p) for p in sorted(own))
        others_set = ", ".join(str(p) for p in sorted(others))
        rules = [f"tcp dport {{ {own_set} }} drop", f"tcp sport {{ {own_set} }} drop",
                 f"tcp dport {{ {others_set} }} tcp flags & (syn | ack) == syn drop"]
        if outbound:
            out_set = ", ".join(str(p) for p in sorted(outbound))
            rules += [f"tcp sport {{ {out_set} }} drop", f"tcp dport {{ {out_set} }} drop"]
        body = "\n".join(f"    {r}" for r in rules)
        return (f"table inet {self.table} {{\n  chain output {{\n    type filter hook output priority 0; "
                f"policy accept;\n{body}\n  }}\n}}\n")

    def apply(self) -> Partition:
        check()
        _nft(self.script())
        self.applied = True
        return self

    def exists(self) -> bool:
        """True while our table is in the kernel."""
        r = subprocess.run(["nft", "list", "table", "inet", self.table], capture_output=True, timeout=10)
        return r.returncode == 0

    def heal(self) -> None:
        """Delete our table (safe to call twice, and when ``apply`` failed)."""
        if self.applied:
            subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True, timeout=10)
            self.applied = False

    def __enter__(self) -> Partition:
        try:
            return self.apply()
        except BaseException:
            self.heal()
            raise

    def __exit__(self, *exc: object) -> None:
        self.heal()
