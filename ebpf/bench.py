"""Overhead of the eBPF probes: a benchmark, not a test. Every figure is a ratio against the detached peer
measured in the same run, on the same machine, interleaved (detached, attached, detached, ...).

    sudo python -m ebpf.bench            # full: 3 rounds x 200k syscalls; 10 x 6 s gateway windows
    sudo python -m ebpf.bench --smoke    # a few seconds: 1 round x 20k syscalls; 2 x 2 s windows

1. Per-event cost: a child process times a tight loop of write(2) of 0 bytes to /dev/null (ns per call)
   with the probes detached, attached but the child not traced (what every other process on the host
   pays), and attached with the child traced (the full enter/exit path into a histogram).
2. Gateway: nats-server, an ingest replaying the bundled recording as fast as it can (looping) and one
   gateway worker with K WebSocket clients reading everything; per window, delivered frames/s (the
   gateway's bookcast_gateway_messages_sent_total) and gateway CPU per frame (/proc/<pid>/stat), in
   alternating windows after a warm-up; ratios are the median over (detached, attached) neighbours.
   Options --programs/--syscalls attribute the cost to one program or a shorter syscall list.

Writes results.json and report.txt to --out (default run/bench/ebpf-<time>). Needs root and bcc.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

LOOP = """
import os, statistics, sys, time
n = int(sys.argv[1]); fd = os.open("/dev/null", os.O_WRONLY); w = os.write; clock = time.perf_counter_ns
print("ready", flush=True); sys.stdin.readline()
batches = []
for _ in range(n // 1000):
    t = clock()
    for _ in range(1000):
        w(fd, b"")
    batches.append((clock() - t) / 1000)
print(min(batches), statistics.median(batches), flush=True)
"""


def _loop_ns(calls: int, probes=None) -> tuple[float, float]:
    """(fastest, median) ns per write(2) over batches of 1000 in a fresh child; traced by ``probes`` when given.

    The fastest batch is the figure least disturbed by other load on the machine; the median is reported too.
    """
    child = subprocess.Popen([sys.executable, "-c", LOOP, str(calls)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        if probes is not None:
            probes.targets.pids[:] = [(child.pid, "bench")]
            probes.refresh()
        child.stdin.write("go\n")
        child.stdin.flush()
        fastest, median = map(float, child.stdout.readline().split())
        return fastest, median
    finally:
        child.kill()
        child.wait()


def syscall_cost(rounds: int, calls: int, options: dict) -> dict:
    from ebpf.loader import Probes
    from ebpf.targets import TargetSpec

    runs: dict[str, list[tuple[float, float]]] = {"detached": [], "attached_untraced": [], "attached_traced": []}
    for _ in range(rounds):
        runs["detached"].append(_loop_ns(calls))
        with Probes(TargetSpec(), **options) as probes:
            runs["attached_untraced"].append(_loop_ns(calls))
            runs["attached_traced"].append(_loop_ns(calls, probes))
        runs["detached"].append(_loop_ns(calls))
    fastest = {k: min(f for f, _ in v) for k, v in runs.items()}
    median = {k: statistics.median(m for _, m in v) for k, v in runs.items()}
    return {"calls_per_run": calls, "runs_fastest_and_median_batch_ns": runs,
            "fastest_batch_ns_per_call": fastest, "median_batch_ns_per_call": median,
            "cost_ns_per_traced_syscall": fastest["attached_traced"] - fastest["detached"],
            "cost_ns_per_untraced_syscall": fastest["attached_untraced"] - fastest["detached"]}


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def _frames(base: str) -> float:
    body = _get(base + "/metrics")
    return sum(float(v) for v in re.findall(r"^bookcast_gateway_messages_sent_total\{[^}]*\} (\S+)$", body, re.M))


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gateway_overhead(windows: int, window_s: float, clients: int, logs: Path, options: dict) -> dict:
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
    try:
        nats.start()
        gateway = spawn(["feed.cli", "gateway", "--nats", nats.url, "--port", str(port), "--workers", "1"], "gateway.log")
        procs.append(gateway)
        wait_until(lambda: _ok(base + "/readyz"), 30, what="gateway /readyz", proc=gateway)
        procs.append(spawn(["feed.cli", "replay", "--nats", nats.url, "--speed", "0", "--loop",
                            str(bundled_capture())], "ingest.log"))
        wait_until(lambda: len(json.loads(_get(base + "/v1/instruments"))["instruments"]) >= 10, 30,
                   what="10 instruments", proc=gateway)
        instruments = [i["instrument"] for i in json.loads(_get(base + "/v1/instruments"))["instruments"]]
        for i in range(clients):
            procs.append(spawn(["ebpf.bench", "--client", f"ws://127.0.0.1:{port}/v1/ws", *instruments],
                               f"client{i}.log"))
        wait_until(lambda: _frames(base) > 1000, 30, what="clients receiving", interval_s=0.2)
        time.sleep(window_s)             # warm-up, not measured
        for i in range(windows):
            mode = "attached" if i % 2 else "detached"
            probes = Probes(TargetSpec(pids=[(gateway.pid, "gateway")]), **options).open() if mode == "attached" \
                else None
            try:
                s0 = _syscalls(probes)
                f0, c0, t0 = _frames(base), _cpu_s(gateway.pid), time.monotonic()
                time.sleep(window_s)     # a measurement window, not a synchronisation
                f1, c1, t1 = _frames(base), _cpu_s(gateway.pid), time.monotonic()
                s1 = _syscalls(probes)
            finally:
                if probes is not None:
                    probes.close()
            frames = max(f1 - f0, 1)
            result.append({"mode": mode, "frames_per_s": (f1 - f0) / (t1 - t0),
                           "gateway_cpu_us_per_frame": (c1 - c0) * 1e6 / frames,
                           "gateway_traced_syscalls_per_frame": (s1 - s0) / frames if probes else None})
    finally:
        for p in reversed(procs):
            stop_process(p)
        nats.stop()
    pairs = list(zip(result[0::2], result[1::2]))       # (detached, attached) neighbours

    def ratio(key: str) -> float:   # median over pairs: one disturbed window does not decide
        return statistics.median(a[key] / d[key] for d, a in pairs)

    return {"window_s": window_s, "clients": clients, "windows": result,
            "throughput_ratio_attached_vs_detached": ratio("frames_per_s"),
            "cpu_per_frame_ratio_attached_vs_detached": ratio("gateway_cpu_us_per_frame")}


def _syscalls(probes) -> int:
    if probes is None:
        return 0
    return sum(s.count for s in probes.series() if s.metric == "bookcast_ebpf_syscall_latency_seconds")


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


def report(results: dict) -> str:
    s, g = results["syscalls"], results["gateway"]
    fast, med = s["fastest_batch_ns_per_call"], s["median_batch_ns_per_call"]
    lines = [f"eBPF probe overhead ({results['mode']}, {results['started']}, {os.cpu_count()} CPUs, "
             f"options {results['options'] or 'default: all programs'})", "",
             f"write(2) of 0 bytes to /dev/null, {s['calls_per_run']} calls per run in batches of 1000, "
             "ns/call (fastest batch / median batch):",
             f"  detached            {fast['detached']:7.1f} / {med['detached']:7.1f}",
             f"  attached, untraced  {fast['attached_untraced']:7.1f} / {med['attached_untraced']:7.1f}"
             f"   (+{s['cost_ns_per_untraced_syscall']:.1f} ns: what any other process pays)",
             f"  attached, traced    {fast['attached_traced']:7.1f} / {med['attached_traced']:7.1f}"
             f"   (+{s['cost_ns_per_traced_syscall']:.1f} ns per traced syscall)", "",
             f"gateway, 1 worker, {g['clients']} clients, replay as fast as possible, {g['window_s']} s windows:"]
    for w in g["windows"]:
        per_frame = w["gateway_traced_syscalls_per_frame"]
        lines.append(f"  {w['mode']:9} {w['frames_per_s']:10.0f} frames/s  {w['gateway_cpu_us_per_frame']:7.2f} "
                     "gateway CPU us/frame" + (f"  {per_frame:5.2f} traced syscalls/frame" if per_frame else ""))
    lines += [f"  attached/detached, median over {len(g['windows']) // 2} neighbouring pairs: throughput "
              f"x{g['throughput_ratio_attached_vs_detached']:.3f}, gateway CPU per frame "
              f"x{g['cpu_per_frame_ratio_attached_vs_detached']:.3f} (target: within 3%)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ebpf.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few seconds instead of a minute or two")
    p.add_argument("--out", type=Path, help="output directory (default run/bench/ebpf-<time>)")
    p.add_argument("--programs", help="comma-separated programs to attach (default: all)")
    p.add_argument("--syscalls", help="comma-separated syscalls to time (default: the exporter's list)")
    p.add_argument("--windows", type=int, help="gateway windows, alternating detached/attached (even)")
    p.add_argument("--window-s", type=float, help="seconds per gateway window")
    p.add_argument("--client", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        asyncio.run(_client(args.client[0], args.client[1:]))
        return 0
    from ebpf.loader import missing_prerequisites

    missing = missing_prerequisites()
    if missing:
        print("ebpf.bench: " + "; ".join(str(m) for m in missing), file=sys.stderr)
        return 2
    started = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("run/bench") / f"ebpf-{started}"
    out.mkdir(parents=True, exist_ok=True)
    rounds, calls, windows, window_s, clients = (1, 20_000, 2, 2.0, 1) if args.smoke else (3, 200_000, 10, 6.0, 2)
    windows, window_s = args.windows or windows, args.window_s or window_s
    options: dict = {}
    if args.programs:
        options["programs"] = args.programs.split(",")
    if args.syscalls:
        options["syscalls"] = tuple(args.syscalls.split(","))
    results = {"mode": "smoke" if args.smoke else "full", "started": started, "options": options,
               "syscalls": syscall_cost(rounds, calls, options),
               "gateway": gateway_overhead(windows, window_s, clients, out, options)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report(results)
    (out / "report.txt").write_text(text)
    print(text + f"\nwritten to {out}/results.json and report.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
