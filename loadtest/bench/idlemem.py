"""What an idle WebSocket connection costs a gateway worker, by allocation site (tracemalloc).

Runs one gateway worker in this process (``feed.gateway.app.create_app`` on a real nats-server, the same
aiohttp stack ``bookcast gateway`` uses, uvloop), takes a tracemalloc snapshot, connects ``--connections``
idle clients from a separate process (``loadtest.bench.clients --idle``: connected, subscribed to
nothing), waits for them to settle, takes a second snapshot and prints the growth per connection by
source line (or by traceback), beside RSS growth per connection.

    python -m loadtest.bench.idlemem --connections 1000 --top 25

Exit codes: 0 printed, 1 the clients failed to connect, 2 usage.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tracemalloc
from pathlib import Path
from tempfile import TemporaryDirectory

from aiohttp import web

from feed.natsserver import NatsServer
from feed.procs import free_port
from loadtest.bench import procstat
from loadtest.bench.ipc import Child


async def measure(connections: int, top: int, group: str, frames: int) -> int:
    from feed.gateway.app import create_app
    from feed.gateway.config import GatewayConfig

    with TemporaryDirectory() as tmp:
        nats = NatsServer(name="idlemem", workdir=tmp)
        nats.start()
        runner = None
        try:
            app = create_app(GatewayConfig(nats_url=nats.url))
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
            url = f"ws://127.0.0.1:{port}/v1/ws"
            args = ["--target", "bookcast", "--url", url, "--idle"]
            warm = await Child.start("warm-up", "loadtest.bench.clients", [*args, "--clients", "20"], Path(tmp) / "w.log")
            await warm.expect("ready", 120)
            gc.collect()
            tracemalloc.start(frames)
            rss0 = procstat.rss_bytes([_pid()])
            before = tracemalloc.take_snapshot()
            idle = await Child.start("idle", "loadtest.bench.clients", [*args, "--clients", str(connections)],
                                     Path(tmp) / "idle.log")
            ready = await idle.expect("ready", 300)
            await asyncio.sleep(2.0)  # let the last handshakes finish their allocations
            gc.collect()
            after = tracemalloc.take_snapshot()
            rss1 = procstat.rss_bytes([_pid()])
            n = ready["connected"]
            if n != connections:
                print(f"idlemem: only {n}/{connections} clients connected: {ready['errors']}", file=sys.stderr)
                return 1
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
    args = p.parse_args()
    if args.connections < 1:
        p.error("--connections must be >= 1")
    import uvloop

    return uvloop.run(measure(args.connections, args.top, args.group, args.frames))


if __name__ == "__main__":
    raise SystemExit(main())
