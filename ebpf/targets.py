"""Which processes the eBPF probes trace, under which role, and their listening TCP ports.

A target is a process (tgid) with a role: ``--pid``/``--role`` pairs, every process in a ``--cgroup``, or a
``/proc`` scan for bookcast's own commands (``feed.cli replay`` = ingest, ``feed.cli gateway`` = gateway,
``feed.cli probe`` = probe, ``nats-server`` = nats), optionally limited to the descendants of one PID.
``role_of`` is pure; the rest reads ``/proc`` and cgroupfs.
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# role ids are positions here; roles given with --role are appended (bounded by the command line)
KNOWN_ROLES: tuple[str, ...] = ("other", "ingest", "gateway", "nats", "probe", "host")   # host: not ours
SUBCOMMAND_ROLES = {"replay": "ingest", "gateway": "gateway", "probe": "probe"}
_GLOBAL_OPTIONS_WITH_VALUE = {"--log-level"}
_TCP_LISTEN = "0A"


def role_of(argv: list[str]) -> str | None:
    """The role of a process from its command line, or None if it is not one of bookcast's.

    >>> role_of(["/x/.venv/bin/python", "-m", "feed.cli", "--log-level", "INFO", "gateway", "--worker"])
    'gateway'
    >>> role_of(["/x/.venv/bin/nats-server", "-c", "nats.conf"])
    'nats'
    """
    if not argv:
        return None
    if os.path.basename(argv[0]) == "nats-server":
        return "nats"
    start = None
    for i, arg in enumerate(argv[:4]):
        if (arg == "feed.cli" and i > 0 and argv[i - 1] == "-m") or os.path.basename(arg) == "bookcast":
            start = i + 1
            break
    if start is None:
        return None
    rest = iter(argv[start:])
    for arg in rest:
        if arg in _GLOBAL_OPTIONS_WITH_VALUE:
            next(rest, None)
        elif not arg.startswith("-"):
            return SUBCOMMAND_ROLES.get(arg)
    return None


def cmdline(pid: int, proc: Path = Path("/proc")) -> list[str]:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def all_pids(proc: Path = Path("/proc")) -> list[int]:
    return [int(p.name) for p in proc.iterdir() if p.name.isdigit()]


def descendants(root: int, proc: Path = Path("/proc")) -> set[int]:
    """``root`` and every process below it (from each thread's ``children`` list)."""
    found, todo = {root}, [root]
    while todo:
        pid = todo.pop()
        try:
            tasks = list((proc / str(pid) / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                kids = {int(k) for k in (task / "children").read_text().split()}
            except OSError:
                continue
            todo.extend(kids - found)
            found |= kids
    return found


def cgroup_pids(path: Path) -> set[int]:
    """Every process in the cgroup at ``path`` and its sub-cgroups (``cgroup.procs``, v1 or v2)."""
    pids: set[int] = set()
    for procs in [path / "cgroup.procs", *path.rglob("*/cgroup.procs")]:
        try:
            pids |= {int(p) for p in procs.read_text().split()}
        except OSError:
            continue
    return pids


@dataclass(frozen=True, slots=True)
class ListenSocket:
    """One listening TCP socket of a process (from /proc/<pid>/fd and /proc/<pid>/net/tcp{,6})."""

    fd: int
    port: int
    queued: int      # rx_queue of a LISTEN socket: connections in its accept queue now (sk_ack_backlog)
    backlog: int     # its listen() backlog (full at backlog + 1), from ``ss``; 0 when ss is unavailable
    inode: int       # the same socket shared across fork() shows in each process: count it once


def listening_sockets(pid: int, proc: Path = Path("/proc"), backlogs: dict[int, int] | None = None) -> list[ListenSocket]:
    """TCP sockets ``pid`` listens on: its socket inodes matched against its netns's tcp/tcp6 tables;
    ``backlogs`` from ``listen_backlogs`` (omitted: 0)."""
    inodes: dict[str, int] = {}
    try:
        for fd in (proc / str(pid) / "fd").iterdir():
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes[link[8:-1]] = int(fd.name)
    except OSError:
        return []
    found = []
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / str(pid) / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == _TCP_LISTEN and cols[9] in inodes:
                rx = int(cols[4].split(":")[1], 16)
                found.append(ListenSocket(inodes[cols[9]], int(cols[1].rsplit(":", 1)[1], 16), rx,
                                          backlogs.get(int(cols[9]), 0) if backlogs else 0, int(cols[9])))
    return found


def listen_backlogs(pid: int | None = None) -> dict[int, int]:
    """{socket inode: listen() backlog} of the TCP listeners in ``pid``'s network namespace (ours when None).

    /proc/net/tcp does not show a listener's backlog; sock_diag does, so this asks iproute2's ``ss``
    (its Send-Q column for LISTEN sockets is sk_max_ack_backlog). Empty when ss is missing or fails.
    """
    cmd = ["ss", "-Hltne"]
    if pid is not None and Path(f"/proc/{pid}/ns/net").resolve() != Path("/proc/self/ns/net").resolve():
        cmd = ["nsenter", f"--net=/proc/{pid}/ns/net", *cmd]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found = {}
    for line in out.splitlines():
        cols = line.split()
        ino = next((c[4:] for c in cols if c.startswith("ino:")), None)
        if len(cols) > 2 and ino and ino.isdigit() and cols[2].isdigit():
            found[int(ino)] = int(cols[2])
    return found


def listening_ports(pid: int, proc: Path = Path("/proc")) -> set[int]:
    """TCP ports ``pid`` listens on."""
    return {s.port for s in listening_sockets(pid, proc)}


@dataclass
class TargetSpec:
    """How to find the targets; ``resolve`` turns it into {pid: role} at one instant."""

    pids: list[tuple[int, str | None]] = field(default_factory=list)   # --pid [--role]
    cgroups: list[Path] = field(default_factory=list)
    scan: bool = False
    under: int | None = None          # limit scans and cgroups to this PID's descendants
    exclude: set[int] = field(default_factory=lambda: {os.getpid()})

    def resolve(self, proc: Path = Path("/proc")) -> dict[int, str]:
        scope = descendants(self.under, proc) if self.under is not None else None

        def scoped(pids: set[int]) -> set[int]:
            return (pids if scope is None else pids & scope) - self.exclude

        found: dict[int, str] = {}
        if self.scan:
            for pid in scoped(set(all_pids(proc))):
                if role := role_of(cmdline(pid, proc)):
                    found[pid] = role
        for cg in self.cgroups:   # a cgroup's processes that are not bookcast commands are "other"
            for pid in scoped(cgroup_pids(cg)):
                found.setdefault(pid, role_of(cmdline(pid, proc)) or "other")
        for pid, role in self.pids:
            if (proc / str(pid)).is_dir():
                found[pid] = role or role_of(cmdline(pid, proc)) or "other"
        return found


class RoleIds:
    """Role name <-> the small integer the kernel stores; ids never change while the exporter runs."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        self.names: list[str] = list(KNOWN_ROLES)
        for name in extra:
            self.id(name)

    def id(self, name: str) -> int:
        if name not in self.names:
            self.names.append(name)
        return self.names.index(name)

    def name(self, role_id: int) -> str:
        return self.names[role_id] if role_id < len(self.names) else "other"
