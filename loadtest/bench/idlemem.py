"""What an idle WebSocket connection costs a gateway worker, by allocation site (tracemalloc).

Runs one gateway worker in this process (``feed.gateway.app.create_app`` on a real nats-server, the same
aiohttp stack ``bookcast gateway`` uses, uvloop), takes a tracemalloc snapshot, connects ``--connections``
idle clients from a separate process (``loadtest.bench.clients --idle``: connected, subscribed to
nothing), waits for them to settle, takes a second snapshot and prints the growth per connection by
source line (or by traceback), beside RSS growth per connection.

    python -m loadtest.bench.idlemem --connections 1000 --top 25
    python -m loadtest.bench.idlemem --connections 5000 --no-trace   # RSS only (tracemalloc's own
                                                                     # bookkeeping would count in RSS)
    python -m loadtest.bench.idlemem --connections 5000 --no-trace --hold-s 10   # then loop stalls, GC
    python -m loadtest.bench.idlemem --connections 5000 --no-trace --hold-s 10 --gc-thresholds 700,10,1000

Exit codes: 0 printed, 1 the clients failed to connect, 2 usage.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
import tracemalloc
from pathlib import Path
from tempfile import TemporaryDirectory

from aiohttp import web

from feed.natsserver import NatsServer
from feed.procs import free_port
from loadtest.bench import procstat
from loadtest.bench.ipc import Child


async def probe_stalls(hold_s: float, period_s: float = 0.002) -> dict:
    """For ``hold_s``: how long the event loop is kept from a task that wakes every ``period_s`` (what a
    healthy client's delta waits behind), in CPU seconds of this thread between two wakes (the loop's
    own work in between, whatever the machine's load) and in wall seconds; and every garbage collection's
    CPU time by generation (``gc.callbacks``)."""
    gcs: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.thread_time()
        else:  # CPU time of this thread: what the collection cost, whatever the machine's load
            gcs[info["generation"]].append(time.thread_time() - started[0])

    cpu_gaps: list[float] = []
    wall_gaps: list[float] = []
    gc.callbacks.append(on_gc)
    try:
        end = time.monotonic() + hold_s
        last_cpu, last_wall = time.thread_time(), time.perf_counter()
        while time.monotonic() < end:
            await asyncio.sleep(period_s)
            cpu, wall = time.thread_time(), time.perf_counter()
            cpu_gaps.append(cpu - last_cpu)
            wall_gaps.append(wall - last_wall - period_s)
            last_cpu, last_wall = cpu, wall
    finally:
        gc.callbacks.remove(on_gc)
    return {"cpu_gaps": sorted(cpu_gaps), "wall_gaps": sorted(wall_gaps), "gc": gcs}


def stall_report(r: dict, connections: int, hold_s: float) -> str:
    def q(xs: list[float], f: float) -> float:
        return xs[min(len(xs) - 1, int(f * len(xs)))] * 1e3 if xs else 0.0

    cpu, wall = r["cpu_gaps"], r["wall_gaps"]
    gcs = "; ".join(f"gen{g} x{len(d)} max {max(d) * 1e3:.1f} ms" for g, d in r["gc"].items() if d) or "none"
    return (f"loop stalls over {hold_s:g} s with {connections} idle connections (a task waking every 2 ms): "
            f"CPU between wakes p99 {q(cpu, 0.99):.2f} ms, max {q(cpu, 1.0):.2f} ms; wall late p99 "
            f"{q(wall, 0.99):.2f} ms, max {q(wall, 1.0):.2f} ms; garbage collections: {gcs}")


async def measure(connections: int, top: int, group: str, frames: int, trace: bool = True,
                  hold_s: float = 0.0, gc_thresholds: tuple[int, int, int] | None = None) -> int:
    from feed.gateway.app import create_app
    from feed.gateway.config import GatewayConfig

    with TemporaryDirectory() as tmp:
        nats = NatsServer(name="idlemem", workdir=tmp)
        nats.start()
        runner = None
        try:
            config = GatewayConfig(nats_url=nats.url)
            app = create_app(config)
            try:  # configured as ``bookcast gateway`` configures a worker (ping timers, GC); absent before them
                from feed.gateway.server import runner_timer_kwargs, tune_gc
            except ImportError:
                runner_timer_kwargs, tune_gc = (lambda config: {}), None
            runner = web.AppRunner(app, access_log=None, handle_signals=False, **runner_timer_kwargs(config))
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
            url = f"ws://127.0.0.1:{port}/v1/ws"
            args = ["--target", "bookcast", "--url", url, "--idle"]
            warm = await Child.start("warm-up", "loadtest.bench.clients", [*args, "--clients", "20"], Path(tmp) / "w.log")
            await warm.expect("ready", 120)
            await asyncio.sleep(2.0)  # the warm-up's heartbeats: the ticker's first passes allocate too
            if tune_gc is not None and hold_s:
                tune_gc(config)
            if gc_thresholds is not None:  # an A/B of the worker's GC thresholds
                gc.set_threshold(*gc_thresholds)
            gc.collect()
            if trace:
                tracemalloc.start(frames)
            objects0 = len(gc.get_objects())
            rss0 = procstat.rss_bytes([_pid()])
            before = tracemalloc.take_snapshot() if trace else None
            idle = await Child.start("idle", "loadtest.bench.clients", [*args, "--clients", str(connections)],
                                     Path(tmp) / "idle.log")
            ready = await idle.expect("ready", 300)
            await asyncio.sleep(3.0)  # the last handshakes' allocations, two heartbeats on every connection
            if hold_s and not trace:  # the stalls right after the connections arrived, as a benchmark cell sees them
                stalls = await probe_stalls(hold_s)
            gc.collect()
            after = tracemalloc.take_snapshot() if trace else None
            rss1 = procstat.rss_bytes([_pid()])
            n = ready["connected"]
            if n != connections:
                print(f"idlemem: only {n}/{connections} clients connected: {ready['errors']}", file=sys.stderr)
                return 1
            if not trace:
                print(f"{n} idle connections: RSS +{(rss1 - rss0) / n / 1024:.2f} KiB per connection "
                      f"(one worker, no tracemalloc)", flush=True)
                if hold_s:
                    print(stall_report(stalls, n, hold_s))
                    cpu0 = time.thread_time()
                    gc.collect()
                    full_ms = (time.thread_time() - cpu0) * 1e3
                    print(f"a full garbage collection: {full_ms:.1f} ms CPU over {len(gc.get_objects()):,} tracked "
                          f"objects ({(len(gc.get_objects()) - objects0) / n:.0f} per idle connection; "
                          f"{gc.get_freeze_count():,} frozen)", flush=True)
                await idle.stop()
                await warm.stop()
                return 0
            stats = after.compare_to(before, group)
            total = sum(s.size_diff for s in stats)
            print(f"{n} idle connections: tracemalloc +{total / n / 1024:.2f} KiB per connection, "
                  f"RSS +{(rss1 - rss0) / n / 1024:.2f} KiB per connection")
            for s in stats[:top]:
                if s.size_diff <= 0:
                    continue
                where = s.traceback.format()[-1].strip() if group == "lineno" else "\n      ".join(s.traceback.format())
                print(f"  {s.size_diff / n:8.0f} B/conn  {s.count_diff / n:6.2f} blocks/conn  {where}")
            await idle.stop()
            await warm.stop()
            return 0
        finally:
            tracemalloc.stop()
            if runner is not None:
                await runner.cleanup()
            nats.stop()


def _pid() -> int:
    import os

    return os.getpid()


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.idlemem", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--top", type=int, default=25, help="allocation sites to print (default %(default)s)")
    p.add_argument("--group", choices=["lineno", "traceback"], default="lineno")
    p.add_argument("--frames", type=int, default=1, help="traceback depth tracemalloc keeps (default %(default)s)")
    p.add_argument("--no-trace", action="store_true", help="RSS growth only, tracemalloc off")
    p.add_argument("--hold-s", type=float, default=0.0,
                   help="with --no-trace: then hold the connections this long and report loop stalls and GC")
    p.add_argument("--gc-thresholds", help="GEN0,GEN1,GEN2: override the worker's gc.set_threshold (A/B runs)")
    args = p.parse_args()
    if args.connections < 1:
        p.error("--connections must be >= 1")
    thresholds = None
    if args.gc_thresholds:
        try:
            thresholds = tuple(int(x) for x in args.gc_thresholds.split(","))
        except ValueError:
            thresholds = ()
        if len(thresholds) != 3 or min(thresholds) < 1:
            p.error("--gc-thresholds takes three integers >= 1, e.g. 700,10,10")
    import uvloop

    return uvloop.run(measure(args.connections, args.top, args.group, args.frames, trace=not args.no_trace,
                                     hold_s=args.hold_s, gc_thresholds=thresholds))


if __name__ == "__main__":
    raise SystemExit(main())
