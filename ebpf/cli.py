"""``bookcast ebpf``: syscall, scheduler, TCP, socket-queue and network-stack probes on bookcast's processes.

Attaches the programs in ``ebpf/programs`` (tracepoints and raw tracepoints only) to the processes found
by role (a /proc scan for ``feed.cli replay|gateway|probe`` and ``nats-server``), by ``--pid``/``--role``
pairs or by ``--cgroup``; re-resolves them every ``--refresh-s`` so new gateway workers are picked up.
Serves ``/metrics`` (``--port``) and/or prints per-interval log2 histograms (``--interval``/``--count``),
like bcc's tools. ``--print-c`` shows each program's C and its -D flags without loading anything;
``--explain`` says per program what it measures, its tracepoints, what it cost in the last benchmark
(``python -m ebpf.bench`` writes run/bench/ebpf-costs.json) and the series it exports (no root needed).

Exit codes: 0 ok; 1 a runtime failure (no program would load); 2 bad usage, or the probes cannot run here (no bcc, no root, no
kernel headers, no tracefs) -- with ``--port`` it then still serves ``bookcast_ebpf_up{reason=...} 0``
until stopped, so a stack that started it keeps a scrape target that says why.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from ebpf import loader
from ebpf.targets import TargetSpec

log = logging.getLogger("bookcast.ebpf")

EXAMPLES = """examples:
  sudo bookcast ebpf --interval 1 --count 5            # every bookcast process on the host, print 5 x 1 s
  sudo bookcast ebpf --role-scan --port 9435            # serve /metrics on :9435
  sudo bookcast ebpf --pid 4242 --role gateway --syscalls sendto,write,epoll_wait --interval 2
  sudo bookcast ebpf --cgroup /sys/fs/cgroup/unified/bookcast --port 9435
  bookcast ebpf --print-c                               # the C and its -D flags; no root needed
  bookcast ebpf --explain                               # what each program measures and costs; no root needed
  sudo bookcast ebpf --programs netstack,listenq,softirq --port 9435    # only the network-stack probes

output of --interval (a gateway worker under `bookcast up --speed 5` with one client; counts per interval):
  bookcast_ebpf_syscall_latency_seconds role=gateway syscall=write  count=3763 mean=8.0us
          usecs        : count    distribution
         1 -> 1        : 575      |*************                           |
         2 -> 3        : 15       |                                        |
         4 -> 7        : 1730     |****************************************|   <- one write per frame
         8 -> 15       : 1133     |**************************              |
        16 -> 31       : 261      |******                                  |
        32 -> 63       : 48       |*                                       |   <- the tail: look at runqueue
        64 -> 127      : 1        |                                        |      and off-CPU for the same role"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("targets (default: --role-scan)")
    t.add_argument("--role-scan", action="store_true",
                   help="trace bookcast's processes found in /proc: feed.cli replay=ingest, gateway, probe; nats-server")
    t.add_argument("--under", type=int, metavar="PID", help="limit the scan and cgroups to PID and its descendants")
    t.add_argument("--pid", type=int, action="append", default=[], help="trace this process (repeatable)")
    t.add_argument("--role", action="append", default=[],
                   help="role of the matching --pid, in order (default: from its command line, else 'other')")
    t.add_argument("--cgroup", type=Path, action="append", default=[], help="trace every process of this cgroup")
    p.add_argument("--syscalls", default=",".join(loader.DEFAULT_SYSCALLS),
                   help="comma-separated syscalls to time (default %(default)s)")
    p.add_argument("--tcp-port", type=int, action="append", default=[],
                   help="also count TCP retransmits/RTT on this local port (listening ports of targets are automatic)")
    p.add_argument("--programs", help="comma-separated programs to load (default: all; see --print-c)")
    p.add_argument("--refresh-s", type=float, default=2.0, help="re-resolve targets this often (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="/metrics listen address (default %(default)s)")
    p.add_argument("--port", type=int, help="serve /metrics on this port")
    p.add_argument("--interval", type=float, help="print histograms every INTERVAL seconds")
    p.add_argument("--count", type=int, help="with --interval: stop after COUNT prints")
    p.add_argument("--print-c", action="store_true", help="print each program's C with its -D flags and exit")
    p.add_argument("--explain", action="store_true",
                   help="per program: what it measures, tracepoints, last benchmark's per-event cost, series; exit")
    p.add_argument("--costs", type=Path, help="with --explain: the benchmark's cost file (default run/bench/ebpf-costs.json)")


def main(args: argparse.Namespace) -> int:
    programs = args.programs.split(",") if args.programs else None
    if args.print_c:
        return _print_c(programs)
    if args.explain:
        return _explain(programs, args.costs)
    if len(args.role) > len(args.pid):
        print("bookcast ebpf: more --role than --pid options", file=sys.stderr)
        return 2
    if args.count is not None and args.interval is None:
        print("bookcast ebpf: --count needs --interval", file=sys.stderr)
        return 2
    roles = args.role + [None] * (len(args.pid) - len(args.role))
    targets = TargetSpec(pids=list(zip(args.pid, roles)), cgroups=args.cgroup,
                         scan=args.role_scan or not (args.pid or args.cgroup), under=args.under)
    probes = loader.Probes(targets, syscalls=tuple(s for s in args.syscalls.split(",") if s),
                           tcp_ports=tuple(args.tcp_port), programs=programs)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        probes.open()
        reason = "ok"
    except loader.UsageError as exc:
        print(f"bookcast ebpf: {exc}", file=sys.stderr)
        return 2
    except loader.Unavailable as exc:
        reasons = [exc] if exc.reason == "load_failed" else loader.missing_prerequisites() or [exc]
        for missing in reasons:
            print(f"bookcast ebpf: cannot load eBPF probes ({missing.reason}): {missing}", file=sys.stderr)
        probes, reason = None, exc.reason
    server = _serve(args, probes, reason) if args.port is not None else None
    try:
        if probes is None:
            if server is not None:
                print(f"bookcast ebpf: serving bookcast_ebpf_up 0 (reason={reason}) until stopped", file=sys.stderr)
                stop.wait()
            return 1 if reason == "load_failed" else 2
        _run(args, probes, stop)
        return 0
    finally:
        if server is not None:
            server.shutdown()
        if probes is not None:
            probes.close()


def _serve(args: argparse.Namespace, probes, reason: str):
    from prometheus_client import CollectorRegistry, start_http_server

    from ebpf.collector import EbpfCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(EbpfCollector(probes, reason))
    server, _ = start_http_server(args.port, addr=args.host, registry=registry)
    log.info("serving http://%s:%d/metrics", args.host, server.server_address[1])
    return server


def _run(args: argparse.Namespace, probes: loader.Probes, stop: threading.Event) -> None:
    """Refresh targets every --refresh-s; print every --interval; until stopped or --count prints."""
    printed, previous = 0, {}
    now = time.monotonic()
    next_refresh = now + args.refresh_s
    next_print = now + args.interval if args.interval else float("inf")
    while not stop.wait(max(0.0, min(next_refresh, next_print) - time.monotonic())):
        now = time.monotonic()
        if now >= next_refresh:
            probes.refresh()
            next_refresh = now + args.refresh_s
        if now >= next_print:
            current = {(s.metric, s.labels): s for s in probes.series()}
            print(time.strftime("%H:%M:%S"), format_interval(current, previous), sep="\n", flush=True)
            previous, printed, next_print = current, printed + 1, now + args.interval
            if args.count is not None and printed >= args.count:
                return


def format_interval(current: dict, previous: dict, width: int = 40) -> str:
    """Text log2 histograms of what each series counted since ``previous`` (bcc's print_log2_hist shape)."""
    lines = []
    for key in sorted(current):
        s, p = current[key], previous.get(key)
        slots = [a - (p.slots[i] if p else 0) for i, a in enumerate(s.slots)]
        total = s.total - (p.total if p else 0)
        labels = " ".join(f"{k}={v}" for k, v in s.labels)
        if not s.slots:
            if s.kernel_unit in ("queue_length", "gauge"):     # a level, not a count: print it as it is
                lines.append(f"{s.metric} {labels}  {s.total}")
            elif total:
                lines.append(f"{s.metric} {labels}  +{total}")
            continue
        count = sum(slots)
        if not count:
            continue
        unit = {"log2_us": "usecs", "log2_bytes": "bytes"}.get(s.kernel_unit, "value")
        mean = {"usecs": f"{total / count / 1000:.1f}us", "bytes": f"{total / count:.0f}B"}.get(unit, f"{total / count:.1f}")
        lines.append(f"{s.metric} {labels}  count={count} mean={mean}")
        used = [k for k, n in enumerate(slots) if n]
        top = max(slots)
        lines.append(f"{unit:>13}{'':7} : count    distribution")
        for k in range(used[0], used[-1] + 1):
            lo, hi = (0, 0) if k == 0 else (1 << (k - 1), (1 << k) - 1)
            span = f"{lo:>8} -> {hi:<8}" if k < len(slots) - 1 else f"{lo:>8} -> ...     "
            bar = "*" * round(slots[k] * width / top)
            lines.append(f"{span} : {slots[k]:<8} |{bar:<{width}}|")
    return "\n".join(lines) if lines else "(nothing counted)"


def _explain(programs: list[str] | None, costs_path: Path | None) -> int:
    from ebpf import explain

    try:
        _, plans = loader.plans(programs)
    except loader.UsageError as exc:
        print(f"bookcast ebpf: {exc}", file=sys.stderr)
        return 2
    path = costs_path or explain.COSTS_FILE
    if costs_path is not None and not costs_path.is_file():
        print(f"bookcast ebpf: --costs {costs_path}: no such file", file=sys.stderr)
        return 2
    print(explain.render([p.program for p in plans], explain.read_costs(path), path), end="")
    return 0


def _print_c(programs: list[str] | None) -> int:
    try:
        root = loader.tracefs() if loader.missing_prerequisites() == [] else None
        _, plans = loader.plans(programs, events_root=root)
    except loader.UsageError as exc:
        print(f"bookcast ebpf: {exc}", file=sys.stderr)
        return 2
    if root is None:
        print("// tracefs not readable: assuming every declared tracepoint exists\n")
    header = plans[0].program.source.parent / "bookcast.h" if plans else None
    if header is not None:
        print(f"// ==== {header.name} (included by every program)\n{header.read_text()}")
    for p in plans:
        print(f"// ==== {p.program.source.name}: {p.program.summary}")
        print(f"// cflags: {' '.join(p.cflags)}")
        for metric, why in p.skipped.items():
            print(f"// skipped {metric}: {why}")
        print(p.program.source.read_text())
    return 0
