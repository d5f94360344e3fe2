"""CPU per heartbeat of one gateway worker's timer slices, on real loopback TCP sockets: Python vs syscall.

PROTOCOL.md section 4 has the gateway send a ``heartbeat`` on every connection silent for 1 s, so 10,000
idle connections cost 10,000 frames a second. This runs exactly the gateway's timer pass
(``Gateway.tick_due``: the timer wheel, ``Connection.tick``, ``Session.tick_through``, the socket write,
the re-arm) over ``--connections`` idle connections (subscribed to nothing, as ``bookcast bench fanout
--idle`` holds them), each with a heartbeat due, ``--ticks`` times, and reports per heartbeat:

* ``gateway``: the pass on real uvloop TCP transports (server side of loopback connections whose client
  side a separate process reads, as the idle clients do): user and system CPU of this process
  (``getrusage``), so "system" is the send syscall and the loopback TCP work the kernel does in the
  sender's context, "user" is Python plus uvloop;
* ``gateway-nosock``: the same pass on transports that only count bytes: Python alone;
* ``write``: ``transport.write`` of the same frame to every transport in a bare loop (uvloop's own
  cost plus the syscall: the floor any Python pass pays);
* ``oswrite``: ``os.write`` on each transport's own fd when its buffer is empty (``get_write_buffer_size``
  first), the direct write that would bypass uvloop's ``transport.write``;
* ``send``: ``socket.send`` on the same sockets (duplicated fds) in a bare loop: the syscall floor.

``--loop asyncio`` runs it all on asyncio's own event loop instead of uvloop.

Modes alternate ``--repeat`` times (a busy spell of a shared machine hits all of them). CPU time, not
wall time, so a loaded machine changes the figures little; quote them as ratios of modes in one run.

    python -m loadtest.bench.heartbeatcpu --connections 5000 --ticks 20 --repeat 3

Runs as a script too (``python loadtest/bench/heartbeatcpu.py``), so ``PYTHONPATH=OTHER_TREE`` measures
another checkout's gateway with the same harness.

Exit codes: 0 printed, 1 a mode failed its count (heartbeats written != expected), 2 usage.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import time

from loadtest.bench.fanoutcpu import CountingTransport, NoDrain, OpenWebSocket  # the same stubs

MODES = ("gateway", "gateway-nosock", "write", "oswrite", "send")


class _Accepting(asyncio.Protocol):
    def __init__(self, into: list) -> None:
        self.into = into

    def connection_made(self, transport) -> None:
        self.into.append(transport)

    def data_received(self, data: bytes) -> None:
        return None


def receiver(port: int, connections: int) -> int:
    """The client side: ``connections`` sockets to ``port``, read until the parent closes them."""
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    print("ready", flush=True)
    open_count = len(socks)
    while open_count:
        for key, _ in sel.select(1.0):
            try:
                data = key.fileobj.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                sel.unregister(key.fileobj)
                key.fileobj.close()
                open_count -= 1
    return 0


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


async def measure(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from feed.gateway.app import Connection, Gateway
    from feed.gateway.config import GatewayConfig
    from feed.gateway.framing import text_frame
    from feed.gateway.session import Session
    from feed.gateway.timers import TimerWheel

    loop = asyncio.get_running_loop()
    transports: list = []
    socks: list[socket.socket] = []
    server = await loop.create_server(lambda: _Accepting(transports), "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--receiver", "--port", str(port),
                              "--connections", str(args.connections)], stdout=subprocess.PIPE, text=True)
    try:
        line = await loop.run_in_executor(None, child.stdout.readline)
        if line.strip() != "ready":
            raise RuntimeError(f"receiver did not start: {line!r}")
        deadline = time.monotonic() + 60
        while len(transports) < args.connections:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(transports)}/{args.connections} connections accepted")
            await asyncio.sleep(0.01)
        socks[:] = [socket.socket(fileno=os.dup(t.get_extra_info("socket").fileno())) for t in transports]
        for s in socks:
            s.setblocking(False)
        fds = [t.get_extra_info("socket").fileno() for t in transports]
        # pings off: the readers here never answer one, and this measures the heartbeat itself (a ping is one
        # more frame in every tenth heartbeat's write; its cost shows in ``bench fanout --idle``)
        gw = Gateway(GatewayConfig(ws_ping_interval_s=0), CollectorRegistry())
        now_ns = time.time_ns()
        real = [Connection(gw, OpenWebSocket(), Session(gw, gw.limits, now_ns, tally=gw.tally), t, NoDrain())
                for t in transports]
        fake = [Connection(gw, OpenWebSocket(), Session(gw, gw.limits, now_ns, tally=gw.tally), CountingTransport(),
                           NoDrain()) for _ in transports]
        frame = text_frame(b'{"type":"heartbeat","ts_send_ns":%d,"seqs":{}}' % time.time_ns())
        results: dict[str, list[tuple[float, float]]] = {m: [] for m in args.modes}

        async def gateway_pass(conns) -> tuple[float, float]:
            sent_before = gw.tally[("sent", "control")]
            user = sys_s = 0.0
            for _ in range(args.ticks):
                await asyncio.sleep(args.gap_s)  # the receiver reads; kernel buffers stay small
                gw.timers = TimerWheel(gw.timers.slot_ns, time.time_ns())
                due_ns = time.time_ns() - 2 * gw.timers.slot_ns  # filed in the current slot: due at once
                for conn in conns:
                    conn.session.last_send_ns = due_ns - 2 * gw._heartbeat_ns
                    gw.timers.add(conn, due_ns)
                u0, s0 = _cpu()
                await gw.tick_due()
                u1, s1 = _cpu()
                user += u1 - u0
                sys_s += s1 - s0
            sent = gw.tally[("sent", "control")] - sent_before
            if sent != len(conns) * args.ticks:
                raise RuntimeError(f"{sent} heartbeats written, {len(conns) * args.ticks} expected")
            return user, sys_s

        async def bare(kind: str) -> tuple[float, float]:
            user = sys_s = 0.0
            for _ in range(args.ticks):
                await asyncio.sleep(args.gap_s)
                u0, s0 = _cpu()
                if kind == "write":
                    for t in transports:
                        t.write(frame)
                elif kind == "oswrite":
                    for t, fd in zip(transports, fds):
                        if not t.get_write_buffer_size():
                            os.write(fd, frame)
                        else:
                            t.write(frame)
                else:
                    for s in socks:
                        s.send(frame)
                u1, s1 = _cpu()
                user += u1 - u0
                sys_s += s1 - s0
            return user, sys_s

        for n in range(args.repeat):
            for mode in args.modes:
                if mode == "gateway":
                    user, sys_s = await gateway_pass(real)
                elif mode == "gateway-nosock":
                    user, sys_s = await gateway_pass(fake)
                else:
                    user, sys_s = await bare(mode)
                count = args.ticks * len(transports)
                results[mode].append((user / count, sys_s / count))
                print(f"run {n + 1}: {mode:15s} {(user + sys_s) / count * 1e6:6.2f} us CPU per heartbeat "
                      f"(user {user / count * 1e6:.2f}, system {sys_s / count * 1e6:.2f})", file=sys.stderr, flush=True)
        print(f"CPU per heartbeat, {args.loop}, {args.connections} idle connections, {args.ticks} ticks, {args.repeat} runs "
              f"(median: total = user + system, us):")
        for mode in args.modes:
            totals = [u + s for u, s in results[mode]]
            print(f"  {mode:15s} {statistics.median(totals) * 1e6:6.2f} [{min(totals) * 1e6:.2f}-{max(totals) * 1e6:.2f}]"
                  f" = {statistics.median(u for u, _ in results[mode]) * 1e6:.2f} + "
                  f"{statistics.median(s for _, s in results[mode]) * 1e6:.2f}")
        return 0
    finally:
        for s in socks:  # the duplicated fds too, or the receiver never sees its sockets close
            s.close()
        for t in transports:
            t.close()
        server.close()
        try:
            await loop.run_in_executor(None, child.wait, 30)  # the loop runs meanwhile: the transports close
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.heartbeatcpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=5000, help="idle connections (default %(default)s: one "
                   "worker's share of 10,000)")
    p.add_argument("--ticks", type=int, default=20, help="timer passes per mode and run (default %(default)s)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--gap-s", type=float, default=0.05, help="pause between passes (default %(default)s)")
    p.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES),
                   help=f"comma-separated, of {','.join(MODES)} (default all)")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="event loop (default %(default)s)")
    p.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.receiver:
        return receiver(args.port, args.connections)
    if min(args.connections, args.ticks, args.repeat) < 1 or any(m not in MODES for m in args.modes):
        p.error(f"counts must be >= 1 and modes of {','.join(MODES)}")
    if args.loop == "asyncio":
        return asyncio.run(measure(args))
    import uvloop

    return uvloop.run(measure(args))


if __name__ == "__main__":
    sys.exit(main())
