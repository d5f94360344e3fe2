"""Load the bookcast eBPF programs with bcc, keep their target maps current, read their histograms.

Adapter module. ``missing_prerequisites()`` says what stops loading (bcc, privilege, kernel headers,
tracefs) before anything is compiled; ``Probes`` compiles each ``ebpf/programs/<name>.bpf.c`` with the
``-D`` flags its spec plans, attaches its tracepoints (bcc's TRACEPOINT_PROBE / RAW_TRACEPOINT_PROBE
autoload), fills the tgid -> role, port -> role and traced-syscall maps, and reads the in-kernel log2
histograms as ``Series`` (raw kernel units: µs slots and ns sums, or bytes; converted at export).

Sources: kernel tracepoint formats under /sys/kernel/tracing/events/<group>/<name>/format;
Documentation/trace/events.rst; bcc's reference_guide.md (maps, TRACEPOINT_PROBE, RAW_TRACEPOINT_PROBE).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ebpf import EbpfError
from ebpf.spec import Plan, Program, load_programs, plan, print_symbols
from ebpf.targets import (KNOWN_ROLES, ListenSocket, RoleIds, TargetSpec, listen_backlogs, listening_ports,
                          listening_sockets)

log = logging.getLogger("bookcast.ebpf")

# the list plus epoll_pwait, which Go (nats-server) and libuv (the gateway's uvloop) call instead
DEFAULT_SYSCALLS: tuple[str, ...] = ("sendto", "sendmsg", "write", "writev", "recvfrom", "recvmsg", "read",
                                     "epoll_wait", "epoll_pwait")
# Up to this many syscalls are traced with their own syscalls:sys_enter_<name>/sys_exit_<name> pairs instead
# of the raw pair: unlisted syscalls then run no program (python -m ebpf.bench, variants, untraced process:
# +135 ns per syscall for sendto,recvfrom against +248 ns for the raw pair), but each listed one pays a perf
# record (+478 ns for a listed write), so a long list that names read/write/epoll_wait stays raw.
PER_SYSCALL_MAX = 2
# the syscalls syscalls.bpf.c can attach one by one (it has a TRACE_<NAME> block for each)
PER_SYSCALL_NAMES = frozenset(DEFAULT_SYSCALLS)
TRACEFS_DIRS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
SETUP_HINT = "install with: sudo ./dev setup"


class Unavailable(EbpfError):
    """The probes cannot run here. ``reason`` is a bounded label value (the ``bookcast_ebpf_up`` reason)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class UsageError(EbpfError):
    """A bad option value (an unknown syscall name, a syscall number beyond the map)."""


def tracefs() -> Path | None:
    return next((d for d in TRACEFS_DIRS if (d / "events").is_dir()), None)


def _capable() -> bool:
    """Whether this process may load BPF programs: CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON, in its
    effective set. Read from /proc rather than assumed from uid 0: root with capabilities dropped (a
    restricted container, ``setpriv --bounding-set=-all``) cannot load them either."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    eff = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    cap_sys_admin, cap_perfmon, cap_bpf = 21, 38, 39
    return bool(eff >> cap_sys_admin & 1) or bool(eff >> cap_perfmon & 1 and eff >> cap_bpf & 1)


def missing_prerequisites() -> list[Unavailable]:
    """Everything that stops the probes from loading, most fundamental first (empty: ready to load)."""
    missing = []
    try:
        import bcc  # noqa: F401
    except ImportError as exc:
        missing.append(Unavailable("no_bcc", f"bcc's Python module is missing ({exc}): the Debian packages "
                                             f"python3-bpfcc and libbpfcc, linked into .venv; {SETUP_HINT}"))
    if not _capable():
        missing.append(Unavailable("no_privilege", f"loading eBPF needs root (or CAP_BPF + CAP_PERFMON); running "
                                                   f"as uid {os.geteuid()} without them: run it with sudo"))
        return missing   # tracefs and headers may only be readable by root: nothing more to learn
    release = os.uname().release
    if not (Path(f"/lib/modules/{release}/build/include").is_dir() or Path("/sys/kernel/kheaders.tar.xz").exists()):
        missing.append(Unavailable("no_kernel_headers", f"kernel headers for {release} are missing "
                                                        f"(/lib/modules/{release}/build); {SETUP_HINT}"))
    if tracefs() is None:
        missing.append(Unavailable("no_tracefs", "tracefs is not mounted (mount -t tracefs nodev "
                                                 f"/sys/kernel/tracing); {SETUP_HINT}"))
    return missing


def available_events(programs: list[Program], root: Path | None) -> set[str]:
    """The tracepoint events among those the programs declare that exist under tracefs ``root``.

    With ``root`` None (tracefs unreadable, e.g. without root) every declared event is assumed present.
    """
    declared = {tp.event for p in programs for tp in p.tracepoints}
    if root is None:
        return declared
    return {e for e in declared if (root / "events" / e.replace(":", "/")).is_dir()}


def symbol_values(program: Program, root: Path | None) -> dict[str, int]:
    """The program's ``symbols`` resolved from its tracepoints' print formats under tracefs ``root``."""
    found = {}
    for flag, (event, field_name, symbol) in program.symbols.items():
        if root is None:
            continue
        try:
            text = (root / "events" / event.replace(":", "/") / "format").read_text()
        except OSError:
            continue
        value = print_symbols(text, field_name).get(symbol)
        if value is None:
            log.warning("%s: %s not in %s's %s values on this kernel; compiled as -1", program.name, symbol,
                        event, field_name)
        else:
            found[flag] = value
    return found


def plans(names: list[str] | None = None, *, events_root: Path | None = None) -> tuple[dict[str, int], list[Plan]]:
    """(shared header parameters, the plan of each program (all, or those in ``names``) on this kernel)."""
    header, programs = load_programs()
    header = {**header, "ROLE_HOST": KNOWN_ROLES.index("host")}
    if names is not None:
        unknown = set(names) - {p.name for p in programs}
        if unknown:
            raise UsageError(f"unknown program(s) {sorted(unknown)}; known: {[p.name for p in programs]}")
        programs = [p for p in programs if p.name in names]
    events = available_events(programs, events_root)
    return header, [plan(p, header, events, symbols=symbol_values(p, events_root)) for p in programs]


def override(cflags: tuple[str, ...], defines: dict[str, int]) -> tuple[str, ...]:
    """``cflags`` with the -D flags named in ``defines`` replaced (or added): the benchmark's variants."""
    kept = [f for f in cflags if not (f.startswith("-D") and f[2:].split("=", 1)[0] in defines)]
    return (*kept, *(f"-D{k}={v}" for k, v in defines.items()))


def syscall_attach_defines(names: list[str] | tuple[str, ...]) -> dict[str, int]:
    """-D flags that pick how syscalls.bpf.c attaches for this syscall list (see PER_SYSCALL_MAX).

    >>> syscall_attach_defines(["sendto"])
    {'SYSCALL_ATTACH_PER_SYSCALL': 1, 'TRACE_SENDTO': 1}
    >>> syscall_attach_defines(list(DEFAULT_SYSCALLS))
    {}
    """
    if 0 < len(names) <= PER_SYSCALL_MAX and set(names) <= PER_SYSCALL_NAMES:
        return {"SYSCALL_ATTACH_PER_SYSCALL": 1, **{f"TRACE_{n.upper()}": 1 for n in names}}
    return {}


def syscall_numbers(names: list[str], limit: int) -> dict[int, str]:
    """{number: name} for this machine's syscall table (bcc.syscall). Raises UsageError on an unknown name."""
    from bcc.syscall import syscalls

    by_name = {v.decode(): k for k, v in syscalls.items()}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UsageError(f"unknown syscall(s): {', '.join(unknown)}")
    numbers = {by_name[n]: n for n in names}
    too_big = [f"{n}={nr}" for nr, n in numbers.items() if nr >= limit]
    if too_big:
        raise UsageError(f"syscall number(s) beyond NR_SYSCALLS={limit}: {', '.join(too_big)}")
    return numbers


@dataclass(frozen=True, slots=True)
class Series:
    """One labelled series read from a map. Histograms: ``slots`` is the kernel's log2 slot counts
    (HIST_SLOTS finite slots then the overflow) and ``total`` its sum in kernel units (ns or bytes);
    counters: ``slots`` is empty and ``total`` the count."""

    metric: str
    kernel_unit: str
    labels: tuple[tuple[str, str], ...]
    slots: tuple[int, ...]
    total: int

    @property
    def count(self) -> int:
        return sum(self.slots) if self.slots else self.total


class Probes:
    """The loaded programs. ``open()`` compiles and attaches; ``close()`` detaches everything.

    Raises (from ``open``):
        Unavailable: a prerequisite is missing, or no program could be loaded (reason ``load_failed``).
        UsageError: an unknown syscall in ``syscalls``.
    """

    def __init__(self, targets: TargetSpec, *, syscalls: tuple[str, ...] = DEFAULT_SYSCALLS,
                 tcp_ports: tuple[int, ...] = (), programs: list[str] | None = None,
                 defines: dict[str, dict[str, int]] | None = None) -> None:
        self.targets = targets
        self.roles = RoleIds(role for _, role in targets.pids if role)
        self.syscall_names = list(syscalls)
        self.tcp_ports = tcp_ports
        self.program_names = programs
        self.defines = defines or {}          # program -> {-D flag: value}, overriding its spec (benchmark)
        self.loaded: list[tuple[Plan, object]] = []
        self.attachments: dict[str, list[tuple[str, str, str]]] = {}   # program -> (kind, event, fn)
        self.attached = False
        self.failed: dict[str, str] = {}     # program -> why it is not loaded
        self.skipped: dict[str, str] = {}    # metric -> why it is not exported
        self.pids: dict[int, str] = {}
        self.ports: dict[int, str] = {}
        self.listen: dict[int, tuple[str, int, int]] = {}    # port -> (role, queued now, capacity) from /proc
        self._syscalls: dict[int, str] = {}
        self.max_processes = 0

    def open(self) -> Probes:
        missing = missing_prerequisites()
        if missing:
            raise missing[0]
        header, all_plans = plans(self.program_names, events_root=tracefs())
        self.max_processes = header["MAX_PROCESSES"]
        for p in all_plans:
            if p.program.name == "syscalls":
                self._syscalls = syscall_numbers(self.syscall_names, p.program.parameters["NR_SYSCALLS"])
                if "syscalls" not in self.defines:
                    self.defines["syscalls"] = syscall_attach_defines(self.syscall_names)
        try:
            self._load(all_plans)
            self.refresh()
        except BaseException:
            self.close()
            raise
        return self

    def _load(self, all_plans: list[Plan]) -> None:
        from bcc import BPF

        for p in all_plans:
            self.skipped.update(p.skipped)
            for metric, why in p.skipped.items():
                log.warning("not exporting %s: %s", metric, why)
            if not p.loadable:
                self.failed[p.program.name] = "; ".join(sorted(set(p.skipped.values())))
                continue
            cflags = override(p.cflags, self.defines.get(p.program.name, {}))
            try:
                bpf = BPF(src_file=str(p.program.source).encode(), cflags=list(cflags))
            except Exception as exc:  # noqa: BLE001 - bcc raises bare Exception on compile/attach errors
                self.failed[p.program.name] = str(exc)
                log.error("program %s not loaded: %s", p.program.name, exc)
                continue
            self.loaded.append((p, bpf))
            self.attachments[p.program.name] = [
                *(("tracepoint", tp.decode(), "tracepoint__" + tp.decode().replace(":", "__"))
                  for tp in bpf.tracepoint_fds),
                *(("raw_tracepoint", tp.decode(), "raw_tracepoint__" + tp.decode()) for tp in bpf.raw_tracepoint_fds)]
            log.info("program %s loaded: %s", p.program.name, ", ".join(m.metric for m in p.metrics))
        self.attached = bool(self.loaded)
        if not self.loaded:
            raise Unavailable("load_failed", "no eBPF program could be loaded: " +
                              "; ".join(f"{k}: {v}" for k, v in self.failed.items()))
        for p, bpf in self.loaded:
            if p.program.name == "syscalls" and b"traced_syscalls" in _tables(bpf):
                table = bpf[b"traced_syscalls"]
                for nr in self._syscalls:
                    table[table.Key(nr)] = table.Leaf(1)

    def detach(self) -> None:
        """Detach every program from its tracepoints, keeping them compiled and their maps (benchmark windows)."""
        if not self.attached:
            return
        for p, bpf in self.loaded:
            for kind, event, _ in self.attachments[p.program.name]:
                if kind == "tracepoint":
                    bpf.detach_tracepoint(tp=event.encode())
                else:
                    bpf.detach_raw_tracepoint(tp=event.encode())
        self.attached = False

    def attach(self) -> None:
        """Attach again what ``detach`` took off (the same programs and maps)."""
        if self.attached:
            return
        for p, bpf in self.loaded:
            for kind, event, fn in self.attachments[p.program.name]:
                if kind == "tracepoint":
                    bpf.attach_tracepoint(tp=event.encode(), fn_name=fn.encode())
                else:
                    bpf.attach_raw_tracepoint(tp=event.encode(), fn_name=fn.encode())
        self.attached = True

    def close(self) -> None:
        for _, bpf in self.loaded:
            bpf.cleanup()
        self.loaded.clear()
        self.attached = False

    def __enter__(self) -> Probes:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def refresh(self) -> dict[int, str]:
        """Re-resolve the targets and bring every program's role and port maps up to date; re-anchor the
        accept-queue lengths on the exact ones in /proc. Returns {pid: role}."""
        pids = self.targets.resolve()
        limit = self.max_processes
        if len(pids) > limit:
            log.warning("%d target processes, map holds %d: tracing the first %d", len(pids), limit, limit)
            pids = dict(sorted(pids.items())[:limit])
        ports: dict[int, str] = {}
        sockets: dict[int, tuple[int, ListenSocket]] = {}     # inode -> (pid, socket): each socket once
        wants_backlogs = any(p.program.name == "listenq" for p, _ in self.loaded)
        backlogs: dict[int, int] = {}
        for pid, role in pids.items():
            if wants_backlogs and not backlogs and listening_ports(pid):
                backlogs = listen_backlogs(pid)     # one ss per refresh (the stack shares one netns)
            for sock in listening_sockets(pid, backlogs=backlogs):
                ports[sock.port] = role
                sockets.setdefault(sock.inode, (pid, sock))
        ports.update({port: ports.get(port, "other") for port in self.tcp_ports})
        listen: dict[int, tuple[str, int, int]] = {}
        for _, sock in sockets.values():
            role, queued, capacity = listen.get(sock.port, (ports[sock.port], 0, 0))
            listen[sock.port] = (role, queued + sock.queued, capacity + sock.backlog + 1)
        for p, bpf in self.loaded:
            tables = _tables(bpf)
            _sync(bpf[b"roles"], {pid: self.roles.id(role) for pid, role in pids.items()},
                  {pid: self.roles.id(role) for pid, role in self.pids.items()})
            _sync(bpf[b"our_tgids"], pid_words(pids), pid_words(self.pids), absent=0)
            if b"ports" in tables:
                _sync(bpf[b"ports"], {port: self.roles.id(role) for port, role in ports.items()},
                      {port: self.roles.id(role) for port, role in self.ports.items()})
            if b"accept_queue" in tables:
                self._anchor(bpf[b"accept_queue"], listen)
        if pids != self.pids:
            log.info("tracing %d processes: %s", len(pids), " ".join(f"{pid}={role}" for pid, role in sorted(pids.items())))
        self.pids, self.ports, self.listen = pids, ports, listen
        return pids

    def _anchor(self, table, listen: dict[int, tuple[str, int, int]]) -> None:
        """Per listening port: role, port and offset = exact length now - (enqueued - dequeued)."""
        for port, (role, queued, _) in listen.items():
            key = table.Key(port)
            try:
                leaf = table[key]
                enq, deq = leaf.enqueued, leaf.dequeued
            except KeyError:
                leaf, enq, deq = table.Leaf(), 0, 0
            leaf.enqueued, leaf.dequeued = enq, deq
            leaf.offset, leaf.role, leaf.port = queued - (enq - deq), self.roles.id(role), port
            table[key] = leaf
        for key in list(table.keys()):
            if key.value not in listen:
                try:
                    del table[key]
                except KeyError:
                    pass

    def series(self) -> list[Series]:
        """Every non-empty series of every exported metric, read from the maps now."""
        out = []
        for p, bpf in self.loaded:
            values = p.program.label_values
            for m in p.metrics:
                for key, leaf in bpf[m.map.encode()].items():
                    if m.kernel_unit == "queue_length":     # key: port; role and port in the leaf
                        labels = (("role", self.roles.name(leaf.role)), ("port", str(leaf.port)))
                        length = max(leaf.offset + leaf.enqueued - leaf.dequeued, 0)
                        out.append(Series(m.metric, m.kernel_unit, labels, (), length))
                        continue
                    labels = tuple((name, self._label(name, getattr(key, name), values)) for name in m.labels)
                    if m.kernel_unit == "count":
                        out.append(Series(m.metric, m.kernel_unit, labels, (), leaf.value))
                    else:
                        out.append(Series(m.metric, m.kernel_unit, labels, tuple(leaf.slot), leaf.sum))
            if p.program.name == "listenq":
                out.extend(Series("bookcast_ebpf_accept_queue_limit", "gauge", (("role", role), ("port", str(port))),
                                  (), capacity) for port, (role, _, capacity) in sorted(self.listen.items()))
        return out

    def _label(self, name: str, raw: int, values: dict[str, tuple[str, ...]]) -> str:
        if name == "role":
            return self.roles.name(raw)
        if name == "syscall":
            return self._syscalls.get(raw, str(raw))
        if name in values and raw < len(values[name]):
            return values[name][raw]
        return str(raw)


def _tables(bpf) -> set[bytes]:
    """Names of the maps among those the loader fills that a compiled program declares (-D flags compile
    some out)."""
    from bcc import lib

    return {n for n in (b"traced_syscalls", b"ports", b"accept_queue")
            if lib.bpf_table_fd(bpf.module, n) >= 0}


def pid_words(pids) -> dict[int, int]:
    """{word: bits} of the kernel's one-bit-per-tgid array for ``pids`` (bit pid % 64 of word pid // 64).

    >>> pid_words([1, 3, 64])
    {0: 10, 1: 1}
    """
    words: dict[int, int] = {}
    for pid in pids:
        words[pid // 64] = words.get(pid // 64, 0) | 1 << (pid % 64)
    return words


def _sync(table, want: dict[int, int], have: dict[int, int], absent: int | None = None) -> None:
    """Make ``table`` hold ``want``, knowing it held ``have`` (writes only the difference). Keys that
    go away are deleted (a hash), or set to ``absent`` (an array, whose elements always exist)."""
    for k, v in want.items():
        if have.get(k) != v:
            table[table.Key(k)] = table.Leaf(v)
    for k in have.keys() - want.keys():
        if absent is not None:
            table[table.Key(k)] = table.Leaf(absent)
            continue
        try:
            del table[table.Key(k)]
        except KeyError:
            pass

