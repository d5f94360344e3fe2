"""Server CPU per delivery over real loopback WebSockets, fixed batches: the gateway's variants side by side
with minimal aiohttp and picows fan-out servers (uvloop on/off, TCP_NODELAY, SO_SNDBUF, transports).

``bookcast bench fanout`` needs a quiet machine: when the machine is busy a server falls behind, takes more
messages per loop pass and spends less CPU per delivery, so its figures measure the load. Here the server
runs in this process and is handed ``--batch`` deltas per loop pass every ``--interval-ms`` (as nats-py
hands over what it read in one pass), so every mode does the same work whatever the load; the figure is
this process's CPU time (user + system, ``getrusage``: the socket writes and the kernel's loopback TCP work
done in the sender's context included) over the publishing window, divided by the deliveries the clients
counted. Clients: ``loadtest.bench.clients`` (the lean load generator) in a separate process, every client
subscribed to one instrument. Modes alternate (A, B, C, A, B, C, ...) ``--repeat`` times so a busy spell
of a shared machine hits all of them; the output gives the median and range per mode and the ratio to
the first mode.

Modes:

* ``gateway``: the bookcast gateway worker (``feed.gateway.app``: ``Gateway``, ``Session``, write-through,
  the instrument machine), aiohttp, uvloop, default socket options (TCP_NODELAY on, as uvloop sets it);
* ``gateway-asyncio``: the same on asyncio's own event loop;
* ``gateway-nagle``: the same with TCP_NODELAY cleared on every client socket;
* ``gateway-sndbuf``: the same with SO_SNDBUF of 256 KiB (``socket_sndbuf_bytes``);
* ``aiohttp-min``: a minimal aiohttp fan-out: ``await ws.send_str(text)`` to every client (aiohttp frames
  per client);
* ``aiohttp-raw``: a minimal aiohttp fan-out writing one shared, pre-framed text frame to every client's
  transport (what the gateway's write-through does, without the gateway);
* ``picows``: a minimal picows fan-out: ``transport.send(TEXT, payload)`` to every client (picows frames
  per client, in C).

    python -m loadtest.bench.fanoutsock --connections 1000 --messages 300 --modes gateway,gateway-asyncio
    python -m loadtest.bench.fanoutsock --connections 1000 --modes aiohttp-min,aiohttp-raw,picows,gateway

Exit codes: 0 printed, 1 a mode failed (clients did not connect, deliveries missing), 2 usage.
"""
from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from feed import wire
from feed.book import L2Book
from feed.gateway.framing import text_frame
from feed.procs import free_port
from loadtest.bench.ipc import Child

INST = "bench:I0000"
MODES = ("gateway", "gateway-asyncio", "gateway-nagle", "gateway-sndbuf", "aiohttp-min", "aiohttp-raw", "picows")
SNDBUF_BYTES = 256 * 1024


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _book() -> L2Book:
    book = L2Book(INST)
    book.apply_snapshot([(Decimal("0.40"), Decimal(100))], [(Decimal("0.60"), Decimal(100))])
    return book


def _snapshot(book: L2Book) -> bytes:
    return wire.dumps(wire.snapshot_message(INST, "e1", 0, book, ts_event_ns=None, ts_ingest_ns=1, ts_publish_ns=1))


def _deltas(book: L2Book, messages: int) -> list[bytes]:
    out = []
    for i in range(messages):
        changes = [["bid", format(Decimal(1 + i % 39) / 100, "f"), str(i + 1)]]
        book.apply_wire_changes(changes)
        out.append(orjson.dumps({"type": "delta", "instrument": INST, "epoch": "e1", "seq": i + 1, "prev_seq": i,
                                 "changes": changes, "checksum": book.checksum(), "ts_ingest_ns": 1,
                                 "ts_publish_ns": 0}))
    return out


def _stamp(payload: bytes) -> bytes:
    """The delta with a fresh ``ts_publish_ns`` (the clients' latency origin) and ``ts_send_ns``."""
    now = time.time_ns()
    return wire.with_send_ts(payload.replace(b'"ts_publish_ns":0', b'"ts_publish_ns":%d' % now), now)


class Server:
    """One mode's server: ``start`` -> port; ``publish(payload)`` fans one delta out; ``stop``."""

    async def start(self) -> int: ...
    def publish(self, payload: bytes) -> None: ...
    async def stop(self) -> None: ...
    def prepare(self) -> None:
        """Every client is connected and subscribed: last adjustments before publishing."""


class GatewayServer(Server):
    def __init__(self, nagle: bool = False, sndbuf: int = 0) -> None:
        self.nagle = nagle
        self.sndbuf = sndbuf

    async def start(self) -> int:
        from feed.gateway.app import Gateway, add_routes
        from feed.gateway.config import GatewayConfig
        from feed.gateway.instrument import InstrumentMachine

        self.gw = gw = Gateway(GatewayConfig(socket_sndbuf_bytes=self.sndbuf), CollectorRegistry())
        self.machine = machine = InstrumentMachine(INST)
        gw.machines[INST], gw.links[INST], gw.trade_links[INST] = machine, {}, set()
        gw._hops[INST] = gw.metrics.hop_nats_gateway("bench")
        machine.start()
        gw._execute(machine, machine.on_snapshot_reply(_snapshot(_book()), time.time_ns()))
        app = web.Application()
        add_routes(app, gw)
        return await self._serve(app)

    async def _serve(self, app: web.Application) -> int:
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port, backlog=4096).start()
        return port

    def prepare(self) -> None:
        if self.nagle:
            for conn in self.gw.connections:
                sock = conn.transport.get_extra_info("socket")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)

    def publish(self, payload: bytes) -> None:
        machine = self.machine
        self.gw._execute(machine, machine.on_message(payload.replace(b'"ts_publish_ns":0', b'"ts_publish_ns":%d' % time.time_ns()),
                                                     time.time_ns()))

    async def stop(self) -> None:
        await self.runner.cleanup()


class AiohttpServer(GatewayServer):
    """Minimal aiohttp fan-out: ``raw`` writes one shared frame to each transport, else ``send_str``."""

    def __init__(self, raw: bool) -> None:
        self.raw = raw
        self.clients: list[web.WebSocketResponse] = []
        self.pending: set[asyncio.Task] = set()

    async def start(self) -> int:
        snapshot = _snapshot(_book()).decode()

        async def handler(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse(compress=False)
            await ws.prepare(request)
            subscribed = False
            async for _msg in ws:
                if not subscribed:
                    subscribed = True
                    await ws.send_str(snapshot)
                    self.clients.append(ws)
            return ws

        app = web.Application()
        app.router.add_get("/v1/ws", handler)
        return await self._serve(app)

    def prepare(self) -> None:
        self.transports = [ws._req.transport for ws in self.clients]  # type: ignore[union-attr]

    def publish(self, payload: bytes) -> None:
        payload = _stamp(payload)
        if self.raw:
            frame = text_frame(payload)
            for t in self.transports:
                t.write(frame)
            return
        task = asyncio.get_running_loop().create_task(self._send_all(payload.decode()))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _send_all(self, text: str) -> None:
        for ws in self.clients:
            await ws.send_str(text)

    async def stop(self) -> None:
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)
        await self.runner.cleanup()


class PicowsServer(Server):
    def __init__(self) -> None:
        self.transports: list[Any] = []

    async def start(self) -> int:
        from picows import WSListener, WSMsgType, ws_create_server

        snapshot = _snapshot(_book())
        clients = self.transports
        self.text = WSMsgType.TEXT

        class Listener(WSListener):
            subscribed = False

            def on_ws_frame(self, transport, frame) -> None:
                if frame.msg_type is WSMsgType.TEXT and not self.subscribed:
                    self.subscribed = True
                    transport.send(WSMsgType.TEXT, snapshot)
                    clients.append(transport)
                elif frame.msg_type is WSMsgType.CLOSE:
                    transport.send_close(frame.get_close_code())
                    transport.disconnect()

        port = free_port()
        self.server = await ws_create_server(lambda request: Listener(), "127.0.0.1", port, backlog=4096)
        return port

    def publish(self, payload: bytes) -> None:
        payload = _stamp(payload)
        text = self.text
        for t in self.transports:
            t.send(text, payload)

    async def stop(self) -> None:
        for t in self.transports:
            t.disconnect()
        self.server.close()


def make_server(mode: str) -> Server:
    return {
        "gateway": lambda: GatewayServer(), "gateway-asyncio": lambda: GatewayServer(),
        "gateway-nagle": lambda: GatewayServer(nagle=True), "gateway-sndbuf": lambda: GatewayServer(sndbuf=SNDBUF_BYTES),
        "aiohttp-min": lambda: AiohttpServer(raw=False), "aiohttp-raw": lambda: AiohttpServer(raw=True),
        "picows": lambda: PicowsServer(),
    }[mode]()


async def one_mode(mode: str, args: argparse.Namespace, logs: Path) -> float:
    """CPU seconds of this process per delivery for ``mode``."""
    server = make_server(mode)
    port = await server.start()
    payloads = _deltas(_book(), args.messages)
    clients = await Child.start(f"clients-{mode}", "loadtest.bench.clients",
                                ["--target", "bookcast", "--url", f"ws://127.0.0.1:{port}/v1/ws", "--clients",
                                 str(args.connections), "--instruments", INST], logs / f"clients-{mode}.log")
    try:
        ready = await clients.expect("ready", 300)
        if ready["connected"] != args.connections:
            raise RuntimeError(f"{mode}: {ready['connected']}/{args.connections} clients ready: {ready['errors']}")
        await asyncio.sleep(1.0)
        server.prepare()
        interval_s = args.interval_ms / 1000
        started = cpu_s()
        for i in range(0, args.messages, args.batch):
            for payload in payloads[i:i + args.batch]:
                server.publish(payload)
            await asyncio.sleep(interval_s)
        used_s = cpu_s() - started
        await clients.send("finish", final_seqs={INST: args.messages}, drain_s=30)
        result = await clients.expect("result", 60)
    finally:
        await clients.stop()
        await server.stop()
    expected = args.connections * args.messages
    if result["delivered"] != expected:
        raise RuntimeError(f"{mode}: {result['delivered']} of {expected} deliveries counted (errors {result['errors']})")
    return used_s / expected


def run_mode(mode: str, args: argparse.Namespace, logs: Path) -> float:
    if mode == "gateway-asyncio":
        return asyncio.run(one_mode(mode, args, logs))
    import uvloop

    return uvloop.run(one_mode(mode, args, logs))


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.fanoutsock", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--messages", type=int, default=300, help="deltas published per mode and run (default 300)")
    p.add_argument("--batch", type=int, default=1, help="deltas per loop pass (default 1)")
    p.add_argument("--interval-ms", type=float, default=20.0, help="pause between passes (default 20)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--modes", default="gateway,gateway-asyncio",
                   help=f"comma-separated, the first is the reference; of {', '.join(MODES)}")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    if min(args.connections, args.messages, args.batch, args.repeat) < 1 or args.interval_ms < 0:
        p.error("every count must be >= 1")
    results: dict[str, list[float]] = {m: [] for m in modes}
    with TemporaryDirectory(prefix="fanoutsock-") as tmp:
        for n in range(args.repeat):
            for mode in modes:
                try:
                    per = run_mode(mode, args, Path(tmp))
                except (RuntimeError, OSError) as exc:
                    print(f"fanoutsock: {exc}", file=sys.stderr)
                    return 1
                results[mode].append(per)
                print(f"run {n + 1}: {mode}: {per * 1e6:.2f} us CPU per delivery", file=sys.stderr, flush=True)
    ref = modes[0]
    out(f"server CPU per delivery (user+sys), {args.connections} connections, batch {args.batch} every "
        f"{args.interval_ms:g} ms, {args.messages} messages, {args.repeat} runs:")
    for mode in modes:
        xs = results[mode]
        ratios = [a / b for a, b in zip(xs, results[ref])]
        out(f"  {mode:16s} {statistics.median(xs) * 1e6:6.2f} us [{min(xs) * 1e6:.2f}-{max(xs) * 1e6:.2f}]  "
            f"/ {ref} {statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
