"""What the eBPF probes cost: a benchmark, not a test (needs root and bcc). Every figure is a difference or
ratio against the detached peer measured in the same run, in interleaved windows, with a 95% bootstrap
interval; a window in which the machine took the CPU from the workload is discarded and counted.

    sudo python -m ebpf.bench                 # everything (~5 min): per-program cost, syscall variants, gateway
    sudo python -m ebpf.bench --smoke         # ~1 min, fewer and shorter windows
    sudo python -m ebpf.bench --parts cost --programs syscalls,sched --rounds 12

Parts (``--parts``, comma-separated; default all three):

cost      Per program (each alone, then all together), three workloads in a long-lived child process:
          ``syscall`` write(2) of 0 bytes to /dev/null (ns per syscall); ``ctxswitch`` a pipe ping-pong
          between two processes pinned to one CPU (ns per context switch = round trip / 2, its 4 syscalls
          included); ``tcp`` a 64-byte ping-pong over loopback TCP (ns per round trip: 2 segments through the
          stack, softirq, 2 sends, 2 reads). Modes: ``detached``; ``untraced`` (attached, the workload not a
          target: what every other process on the host pays); ``traced`` (the workload registered as a
          target). Modes rotate within each round; a window is ~0.15 s of batches (1000 syscalls, 20
          round trips, 20 round trips); a batch during which the workload's tasks were on a CPU for less than
          90% of its wall time (another process ran) is dropped, the window's figure is the median of its
          clean batches, and a window with fewer than half its batches clean is discarded.
variants  The syscall program's exit filter (SYSCALL_EXIT_FILTER 0: task storage for every syscall; 1: a
          per-thread bit first) and per-syscall tracepoints (the default list, and a short one) on a listed
          syscall (write) and an unlisted one (lseek): the figures in syscalls.bpf.c's docstring.
gateway   nats-server, an ingest replaying the bundled recording as fast as it can, one gateway worker and K
          WebSocket clients; frames/s and gateway CPU per frame in alternating windows (probes detached /
          attached without recompiling), a window discarded when other processes used more than
          --foreign-cpus CPUs in it; ratios attached/detached with 95% intervals.

Writes results.json and report.txt to --out (default run/bench/ebpf-<time>) and the per-program costs to
run/bench/ebpf-costs.json, which ``bookcast ebpf --explain`` reads (no root needed).
Exit codes: 0 ok; 1 a part failed to run; 2 bad usage or the probes cannot load here.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ebpf.explain import COSTS_FILE
from ebpf.stats import DETACHED, Window, disturbed_batches, estimate, foreign_busy

REPO = Path(__file__).resolve().parents[1]
PROGRAM_ORDER = ("syscalls", "sched", "tcp", "sockq", "netstack", "listenq", "softirq")
WORKLOADS = ("syscall", "ctxswitch", "tcp")
MODES = (DETACHED, "untraced", "traced")

# The workload child: ``ready <partner pid>``; then per line ``<workload> <seconds>`` it runs batches of that
# workload for that long and prints ``<median ns/op of its clean batches> <batches> <disturbed batches>``.
# A batch is disturbed when its tasks (the child, and the partner for ctxswitch) were on a CPU for less than
# 90% of its wall time: someone else ran. CPU time from the exact per-process CPU clocks (clock_gettime of
# CLOCK_PROCESS_CPUTIME_ID, and the partner's clock id ((~pid) << 3) | 2, Linux's CPUCLOCK_SCHED).
CHILD = r"""
import os, socket, statistics, sys, time
clock = time.perf_counter_ns
cpu = max(os.sched_getaffinity(0))
fd = os.open("/dev/null", os.O_WRONLY)
p1r, p1w = os.pipe(); p2r, p2w = os.pipe()
partner = os.fork()
if partner == 0:
    os.sched_setaffinity(0, {cpu})
    while os.read(p1r, 1):
        os.write(p2w, b"p")
    os._exit(0)
me, other = time.CLOCK_PROCESS_CPUTIME_ID, ((~partner) << 3) | 2
server = socket.create_server(("127.0.0.1", 0)); a = socket.create_connection(server.getsockname())
b = server.accept()[0]
for s in (a, b):
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"m" * 64
def syscall(n):
    for _ in range(n): os.write(fd, b"")
def lseek(n):
    for _ in range(n): os.lseek(fd, 0, 0)
def ctxswitch(n):
    for _ in range(n):
        os.write(p1w, b"c"); os.read(p2r, 1)
def tcp(n):
    for _ in range(n):
        a.send(msg); b.recv(64); b.send(msg); a.recv(64)
work = {"syscall": (syscall, 1000, 1), "lseek": (lseek, 1000, 1), "ctxswitch": (ctxswitch, 20, 2), "tcp": (tcp, 20, 1)}
print("ready", partner, flush=True)
for line in sys.stdin:
    name, seconds = line.split()
    fn, batch, per_op = work[name]
    pair = name == "ctxswitch"
    def on_cpu():
        return time.clock_gettime_ns(me) + (time.clock_gettime_ns(other) if pair else 0)
    allowed = os.sched_getaffinity(0)
    if pair:
        os.sched_setaffinity(0, {cpu})
    fn(batch)   # warm
    clean, disturbed, end = [], 0, clock() + float(seconds) * 1e9
    while clock() < end:
        c0 = on_cpu(); t = clock(); fn(batch); dt = clock() - t; c1 = on_cpu()
        if c1 - c0 < 0.9 * dt:
            disturbed += 1
        else:
            clean.append(dt / batch / per_op)
    os.sched_setaffinity(0, allowed)
    print(statistics.median(clean) if clean else -1, len(clean) + disturbed, disturbed, flush=True)
"""


class Child:
    """The workload child process (and its ping-pong partner), measured window by window."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        ready = self.proc.stdout.readline().split()
        if ready[:1] != ["ready"]:
            raise RuntimeError(f"workload child did not start: {ready}")
        self.pids = [self.proc.pid, int(ready[1])]

    def run(self, workload: str, seconds: float) -> tuple[float, int, int]:
        """(median ns per operation of the clean batches, batches, disturbed batches) of one window."""
        self.proc.stdin.write(f"{workload} {seconds}\n")
        self.proc.stdin.flush()
        ns, batches, disturbed = self.proc.stdout.readline().split()
        return float(ns), int(batches), int(disturbed)

    def stop(self) -> None:
        from feed.procs import stop_process

        for pid in self.pids[1:]:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        stop_process(self.proc)


def _set_mode(probes, mode: str, child: Child) -> None:
    if mode == DETACHED:
        probes.detach()
        return
    probes.attach()
    probes.targets.pids[:] = [(pid, "bench") for pid in child.pids] if mode == "traced" else []
    probes.refresh()


def measure(probes, child: Child, rounds: int, window_s: float, workloads=WORKLOADS, modes=MODES,
            progress=None) -> list[Window]:
    """Interleaved windows: per round every mode (order rotating by round) x every workload."""
    windows: list[Window] = []
    for r in range(rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for mode in order:
            _set_mode(probes, mode, child)
            for workload in workloads:
                ns, batches, disturbed = child.run(workload, window_s)
                why = disturbed_batches(batches, disturbed)
                windows.append(Window(len(windows), workload, mode, ns, bool(why), why))
        if progress:
            progress(f"round {r + 1}/{rounds}")
    probes.detach()
    return windows


def _summary(windows: list[Window], workloads=WORKLOADS, modes=MODES[1:]) -> dict:
    out: dict = {}
    for workload in workloads:
        per = {}
        for mode in modes:
            est = estimate(windows, workload, mode)
            per[mode] = est.as_dict() if est else None
        per["discarded_windows"] = sum(1 for w in windows if w.workload == workload and w.disturbed)
        per["windows"] = sum(1 for w in windows if w.workload == workload)
        out[workload] = per
    return out


def cost_part(programs: list[str], rounds: int, window_s: float, say) -> dict:
    """Per program alone, then all of them together."""
    from ebpf.loader import Probes
    from ebpf.targets import TargetSpec

    child, results = Child(), {}
    try:
        for name in [*programs, "all"]:
            t0 = time.monotonic()
            probes = Probes(TargetSpec(), programs=None if name == "all" else [name]).open()
            try:
                say(f"cost: {name} loaded in {time.monotonic() - t0:.1f} s; {rounds} rounds")
                windows = measure(probes, child, rounds, window_s, progress=lambda m: say(f"cost: {name} {m}"))
            finally:
                probes.close()
            results[name] = {"summary": _summary(windows), "windows": [dataclasses.asdict(w) for w in windows]}
    finally:
        child.stop()
    return results


SHORT_LIST = ("sendto", "recvfrom")


def variants_part(rounds: int, window_s: float, say) -> dict:
    """The syscall program's exit filters and per-syscall tracepoints, on a listed and an unlisted syscall."""
    from ebpf.loader import DEFAULT_SYSCALLS, Probes
    from ebpf.targets import TargetSpec

    def per_syscall(names):
        return {"SYSCALL_ATTACH_PER_SYSCALL": 1, **{f"TRACE_{n.upper()}": 1 for n in names}}

    variants = {
        "raw, exit filter 0 (task storage)": ({"SYSCALL_EXIT_FILTER": 0}, DEFAULT_SYSCALLS),
        "raw, exit filter 1 (thread bit, default)": ({"SYSCALL_EXIT_FILTER": 1}, DEFAULT_SYSCALLS),
        "per-syscall tracepoints, default list": ({"SYSCALL_EXIT_FILTER": 0, **per_syscall(DEFAULT_SYSCALLS)},
                                                  DEFAULT_SYSCALLS),
        f"per-syscall tracepoints, {','.join(SHORT_LIST)}": ({"SYSCALL_EXIT_FILTER": 0, **per_syscall(SHORT_LIST)},
                                                            SHORT_LIST),
    }
    child, results = Child(), {}
    try:
        for label, (defines, names) in variants.items():
            probes = Probes(TargetSpec(), programs=["syscalls"], syscalls=tuple(names),
                            defines={"syscalls": defines}).open()
            try:
                say(f"variants: {label}")
                windows = measure(probes, child, rounds, window_s, workloads=("syscall", "lseek"))
            finally:
                probes.close()
            results[label] = {"defines": defines, "syscalls": list(names),
                              "summary": _summary(windows, workloads=("syscall", "lseek"))}
    finally:
        child.stop()
    return results


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def _frames(base: str) -> float:
    body = _get(base + "/metrics")
    return sum(float(v) for v in re.findall(r"^bookcast_gateway_messages_sent_total\{[^}]*\} (\S+)$", body, re.M))


def _task_cpu_ns(pid: int) -> int:
    """On-CPU ns of every thread of ``pid`` (schedstat; 0 once it is gone)."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0
    for t in tasks:
        try:
            total += int((t / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def _host_busy_s() -> float:
    """CPU-seconds the host spent busy (every CPU, /proc/stat: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def gateway_part(windows: int, window_s: float, clients: int, foreign_cpus: float, logs: Path, say) -> dict:
    from ebpf.loader import Probes
    from ebpf.targets import TargetSpec
    from feed.natsserver import NatsServer
    from feed.procs import free_port, stop_process, wait_until
    from feed.stack import bundled_capture

    def spawn(args: list[str], log: str) -> subprocess.Popen:
        with open(logs / log, "ab") as f:
            return subprocess.Popen([sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    nats, procs, result = NatsServer(name="ebpf-bench", workdir=str(logs)), [], []
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    probes = None
    try:
        nats.start()
        gateway = spawn(["feed.cli", "gateway", "--nats", nats.url, "--port", str(port), "--workers", "1"], "gateway.log")
        procs.append(gateway)
        wait_until(lambda: _ok(base + "/readyz"), 60, what="gateway /readyz", proc=gateway)
        procs.append(spawn(["feed.cli", "replay", "--nats", nats.url, "--speed", "0", "--loop",
                            str(bundled_capture())], "ingest.log"))
        wait_until(lambda: len(json.loads(_get(base + "/v1/instruments"))["instruments"]) >= 10, 60,
                   what="10 instruments", proc=gateway)
        instruments = [i["instrument"] for i in json.loads(_get(base + "/v1/instruments"))["instruments"]]
        for i in range(clients):
            procs.append(spawn(["ebpf.bench", "--client", f"ws://127.0.0.1:{port}/v1/ws", *instruments],
                               f"client{i}.log"))
        wait_until(lambda: _frames(base) > 1000, 60, what="clients receiving", interval_s=0.2)
        probes = Probes(TargetSpec(pids=[(gateway.pid, "gateway")])).open()
        probes.detach()
        time.sleep(window_s)             # warm-up, not measured
        ours = [p.pid for p in procs] + [os.getpid()]
        nats_pid = getattr(getattr(nats, "proc", None), "pid", None)
        if nats_pid:
            ours.append(nats_pid)
        for i in range(windows):
            mode = "attached" if i % 2 else DETACHED
            if mode == "attached":
                probes.attach()
                probes.refresh()
            else:
                probes.detach()
            f0, c0, o0, h0, t0 = (_frames(base), _task_cpu_ns(gateway.pid), sum(map(_task_cpu_ns, ours)),
                                  _host_busy_s(), time.monotonic())
            time.sleep(window_s)         # a measurement window, not a synchronisation
            f1, c1, o1, h1, t1 = (_frames(base), _task_cpu_ns(gateway.pid), sum(map(_task_cpu_ns, ours)),
                                  _host_busy_s(), time.monotonic())
            frames = max(f1 - f0, 1)
            why = foreign_busy(h1 - h0, (o1 - o0) / 1e9, t1 - t0, foreign_cpus)
            result.append({"mode": mode, "frames_per_s": (f1 - f0) / (t1 - t0),
                           "gateway_cpu_us_per_frame": (c1 - c0) / 1e3 / frames, "disturbed": why})
            say(f"gateway: window {i + 1}/{windows} {mode}: {result[-1]['frames_per_s']:.0f} frames/s"
                + (f" (discarded: {why})" if why else ""))
    finally:
        if probes is not None:
            probes.close()
        for p in reversed(procs):
            stop_process(p)
        nats.stop()
    out = {"window_s": window_s, "clients": clients, "foreign_cpus_limit": foreign_cpus, "windows": result,
           "discarded_windows": sum(1 for w in result if w["disturbed"])}
    for key in ("frames_per_s", "gateway_cpu_us_per_frame"):
        ws = [Window(i, key, "attached" if w["mode"] == "attached" else DETACHED, w[key], bool(w["disturbed"]),
                     w["disturbed"]) for i, w in enumerate(result)]
        est = estimate(ws, key, "attached")
        out[key] = est.as_dict() if est else None
        # when every window was disturbed, the same arithmetic over all of them, labelled as such
        loose = estimate([dataclasses.replace(w, disturbed=False) for w in ws], key, "attached")
        out[key + "_all_windows"] = loose.as_dict() if loose else None
    return out


def _ok(url: str) -> bool:
    try:
        _get(url)
        return True
    except OSError:
        return False


async def _client(url: str, instruments: list[str]) -> None:
    """Read every frame as fast as possible until killed."""
    import aiohttp
    import orjson

    async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0) as ws:
        await ws.send_str(orjson.dumps({"op": "subscribe", "instruments": instruments}).decode())
        async for _ in ws:
            pass


# ---- figures for --explain and the report ---------------------------------------------------------------

PER_EVENT = {"syscall": ("ns per syscall", 1.0), "ctxswitch": ("ns per context switch", 0.5),
             "tcp": ("ns per TCP round trip", 1.0)}


def program_costs(cost: dict) -> dict:
    """{program: {workload: {mode: {ns, ci95, windows, discarded}}}} per event, from the cost part."""
    out: dict = {}
    for name, res in cost.items():
        per: dict = {}
        for workload, (unit, scale) in PER_EVENT.items():
            s = res["summary"].get(workload, {})
            entry: dict = {"unit": unit, "detached_ns": None, "discarded_windows": s.get("discarded_windows", 0),
                           "windows": s.get("windows", 0)}
            for mode in ("untraced", "traced"):
                e = s.get(mode)
                if e:
                    entry["detached_ns"] = e["detached"] * scale
                    entry[mode] = {"ns": e["difference"] * scale,
                                   "ci95": [v * scale for v in e["difference_ci95"]], "windows": e["windows"]}
                else:
                    entry[mode] = None
            per[workload] = entry
        out[name] = per
    return out


def _fmt(e: dict | None) -> str:
    if not e:
        return "       n/a (every window disturbed)"
    lo, hi = e["ci95"]
    return f"{e['ns']:+7.1f} ns [{lo:+.1f}, {hi:+.1f}]"


def report(results: dict) -> str:
    lines = [f"eBPF probe cost ({results['mode']}, {results['started']}, {os.cpu_count()} CPUs); differences "
             "against the detached peer in the same run, mean [95% bootstrap interval]", ""]
    if "costs" in results:
        lines.append("per program: untraced = what every other process pays; traced = what a traced process pays")
        for name, per in results["costs"].items():
            lines.append(f"  {name}")
            for workload, e in per.items():
                base = f"{e['detached_ns']:.0f}" if e["detached_ns"] is not None else "?"
                lines.append(f"    {e['unit']:<24} detached {base:>6}  untraced {_fmt(e['untraced'])}  "
                             f"traced {_fmt(e['traced'])}  ({e['discarded_windows']}/{e['windows']} windows "
                             "discarded)")
        lines.append("")
    if "variants" in results:
        lines.append("syscall program variants (untraced process; write is listed, lseek is not):")
        for label, v in results["variants"].items():
            s = v["summary"]
            parts = []
            for workload in ("syscall", "lseek"):
                e = s[workload].get("untraced")
                t = s[workload].get("traced")
                parts.append(f"{'write' if workload == 'syscall' else 'lseek'} untraced "
                             + (f"{e['difference']:+.1f} ns [{e['difference_ci95'][0]:+.1f}, {e['difference_ci95'][1]:+.1f}]"
                                if e else "n/a")
                             + (f" traced {t['difference']:+.1f}" if t and workload == "syscall" else ""))
            lines.append(f"  {label:<44} " + "; ".join(parts))
        lines.append("")
    if "gateway" in results:
        g = results["gateway"]
        lines.append(f"gateway, 1 worker, {g['clients']} clients, replay as fast as possible, {g['window_s']} s "
                     f"windows ({g['discarded_windows']}/{len(g['windows'])} discarded: other processes above "
                     f"{g['foreign_cpus_limit']} CPUs):")
        for w in g["windows"]:
            lines.append(f"  {w['mode']:9} {w['frames_per_s']:10.0f} frames/s  {w['gateway_cpu_us_per_frame']:7.2f} "
                         "gateway CPU us/frame" + (f"  discarded: {w['disturbed']}" if w["disturbed"] else ""))
        for key, label in (("frames_per_s", "throughput"), ("gateway_cpu_us_per_frame", "gateway CPU per frame")):
            e = g[key]
            lines.append(f"  attached/detached {label}: " + (
                f"x{e['ratio']:.3f} [{e['ratio_ci95'][0]:.3f}, {e['ratio_ci95'][1]:.3f}] over {e['windows']} windows"
                if e else "n/a (no undisturbed pair)"))
            loose = g.get(key + "_all_windows")
            if e is None and loose:
                lines.append(f"    counting the disturbed windows too (not to be believed): x{loose['ratio']:.3f} "
                             f"[{loose['ratio_ci95'][0]:.3f}, {loose['ratio_ci95'][1]:.3f}]")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ebpf.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="about a minute instead of several")
    p.add_argument("--out", type=Path, help="output directory (default run/bench/ebpf-<time>)")
    p.add_argument("--parts", default="cost,variants,gateway", help="comma-separated: cost, variants, gateway")
    p.add_argument("--programs", help=f"comma-separated programs for the cost part (default: {','.join(PROGRAM_ORDER)})")
    p.add_argument("--rounds", type=int, help="cost/variants rounds (each: every mode x every workload)")
    p.add_argument("--window-s", type=float, help="seconds per cost window (default 0.15)")
    p.add_argument("--gateway-windows", type=int, help="gateway windows, alternating detached/attached")
    p.add_argument("--gateway-window-s", type=float, help="seconds per gateway window")
    p.add_argument("--foreign-cpus", type=float, default=0.5,
                   help="discard a gateway window when other processes used more CPUs than this (default %(default)s)")
    p.add_argument("--client", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        asyncio.run(_client(args.client[0], args.client[1:]))
        return 0
    parts = [s for s in args.parts.split(",") if s]
    if set(parts) - {"cost", "variants", "gateway"}:
        print(f"ebpf.bench: unknown part(s) {sorted(set(parts) - {'cost', 'variants', 'gateway'})}", file=sys.stderr)
        return 2
    programs = args.programs.split(",") if args.programs else list(PROGRAM_ORDER)
    if set(programs) - set(PROGRAM_ORDER):
        print(f"ebpf.bench: unknown program(s) {sorted(set(programs) - set(PROGRAM_ORDER))}", file=sys.stderr)
        return 2
    from ebpf.loader import missing_prerequisites

    missing = missing_prerequisites()
    if missing:
        print("ebpf.bench: " + "; ".join(str(m) for m in missing), file=sys.stderr)
        return 2
    started = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO / "run" / "bench" / f"ebpf-{started}"
    out.mkdir(parents=True, exist_ok=True)
    rounds = args.rounds or (3 if args.smoke else 8)
    window_s = args.window_s or (0.1 if args.smoke else 0.15)
    gw_windows = args.gateway_windows or (4 if args.smoke else 16)
    gw_window_s = args.gateway_window_s or (2.0 if args.smoke else 5.0)
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    results: dict = {"mode": "smoke" if args.smoke else "full", "started": started, "parts": parts,
                     "rounds": rounds, "window_s": window_s}
    status = 0
    try:
        if "cost" in parts:
            results["cost"] = cost_part(programs, rounds, window_s, say)
            results["costs"] = program_costs(results["cost"])
        if "variants" in parts:
            results["variants"] = variants_part(rounds, window_s, say)
        if "gateway" in parts:
            results["gateway"] = gateway_part(gw_windows, gw_window_s, 1 if args.smoke else 2, args.foreign_cpus,
                                              out, say)
    except Exception as exc:  # noqa: BLE001 - report what ran, say what failed
        say(f"failed: {exc!r}")
        results["error"] = repr(exc)
        status = 1
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report(results)
    (out / "report.txt").write_text(text)
    if "costs" in results:
        COSTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        COSTS_FILE.write_text(json.dumps({"started": started, "mode": results["mode"], "cpus": os.cpu_count(),
                                          "kernel": os.uname().release, "results": str(out / "results.json"),
                                          "programs": results["costs"]}, indent=2) + "\n")
    print(text + f"\nwritten to {out}/results.json and report.txt" +
          (f"; per-program costs to {COSTS_FILE}" if "costs" in results else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
