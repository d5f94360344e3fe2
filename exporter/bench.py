"""Benchmark: what the gateway's per-message instrumentation costs. ``python -m exporter.bench --help``.

One run, two peers: an embedded nats-server, one ingest replaying the bundled Coinbase recording in a loop
(``--speed``, default as fast as it goes), and two single-worker gateways on that same stream, one with
``--instrumentation on`` (hop histogram, frame and byte counters: what production runs) and one with
``--instrumentation off``. ``--clients`` WebSocket readers per gateway (in this process) subscribe to every
instrument and count the deltas delivered. After ``--warmup-s`` it measures for ``--duration-s``:

* delivered deltas per second, per gateway, and their ratio (on / off; the target is a loss under 5 %);
* gateway CPU seconds (user + system, from /proc) per million deliveries;
* p99 of the delivery latency ``recv - ts_publish_ns`` (NATS + gateway + socket) seen by the readers.

Both peers share the machine and the stream at the same moment, so load from elsewhere hits both alike.
Writes the figures as JSON (``--out``) and prints one line. ``--short`` is a smoke run of a few seconds.

Exit codes: 0 figures written, 1 the run failed (a process died, nothing delivered).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.request import urlopen

import aiohttp
from hdrh.histogram import HdrHistogram

from feed import wire
from feed.natsserver import NatsServer
from feed.procs import free_port, stop_process, wait_until
from feed.stack import bundled_capture, spawn

EXAMPLES = """examples:
  python -m exporter.bench                               # 20 s, 8 readers per gateway, replay as fast as it goes
  python -m exporter.bench --short                       # smoke run: 3 s, 2 readers per gateway
  python -m exporter.bench --duration-s 60 --clients 16 --out bench/exporter-overhead.json"""

_DELTA_PREFIX = b'{"type":"delta"'
_PUBLISH_KEY = b'"ts_publish_ns":'
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (``/proc/<pid>/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass
class Peer:
    """One gateway under test and what its readers saw."""

    name: str
    instrumentation: str
    port: int = 0
    proc: object = None
    delivered: int = 0
    counting: bool = False
    latency: HdrHistogram = field(default_factory=lambda: HdrHistogram(1_000, 60 * 10**9, 3))


def _publish_ns(frame: bytes) -> int | None:
    at = frame.find(_PUBLISH_KEY)
    if at < 0:
        return None
    start = at + len(_PUBLISH_KEY)
    end = frame.find(b",", start)
    return int(frame[start:end if end > 0 else -1])


async def _reader(session: aiohttp.ClientSession, peer: Peer, instruments: list[str], stop: asyncio.Event) -> None:
    async with session.ws_connect(f"ws://127.0.0.1:{peer.port}/v1/ws", max_msg_size=0) as ws:
        await ws.send_str(wire.encode_request(wire.Subscribe(None, tuple(instruments))).decode())
        while not stop.is_set():
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                return
            data = msg.data.encode() if isinstance(msg.data, str) else msg.data
            if not peer.counting or not data.startswith(_DELTA_PREFIX):
                continue
            peer.delivered += 1
            published = _publish_ns(data)
            if published is not None:
                peer.latency.record_value(max(time.time_ns() - published, 0))


async def _measure(peers: list[Peer], instruments: list[str], clients: int, warmup_s: float,
                   duration_s: float) -> dict[str, float]:
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        readers = [asyncio.create_task(_reader(session, peer, instruments, stop))
                   for _ in range(clients) for peer in peers]
        await asyncio.sleep(warmup_s)  # the benchmark's warm-up period itself, not a synchronisation
        cpu0 = {p.name: cpu_seconds(p.proc.pid) for p in peers}
        for p in peers:
            p.counting = True
        t0 = time.monotonic()
        await asyncio.sleep(duration_s)
        elapsed_s = time.monotonic() - t0
        for p in peers:
            p.counting = False
        cpu = {p.name: cpu_seconds(p.proc.pid) - cpu0[p.name] for p in peers}
        stop.set()
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return {"elapsed_s": elapsed_s, **{f"cpu_s_{k}": v for k, v in cpu.items()}}


def run(args: argparse.Namespace) -> dict:
    capture = bundled_capture()
    nats_server = NatsServer(port=0, name="bench-exporter")
    peers = [Peer("on", "on"), Peer("off", "off")]
    ingest = None
    try:
        nats_server.start()
        for p in peers:
            p.port = free_port()
            p.proc = spawn(["gateway", "--nats", nats_server.url, "--port", str(p.port), "--workers", "1",
                            "--instrumentation", p.instrumentation, "--name", f"bench-{p.name}"])
        for p in peers:
            wait_until(lambda: _ready(p.port), 20, what=f"gateway {p.name} /readyz", proc=p.proc)
        ingest = spawn(["replay", "--nats", nats_server.url, "--speed", str(args.speed), "--loop", str(capture)])
        instruments: list[str] = []

        def listed() -> bool:
            instruments[:] = [i["instrument"] for i in _json(f"http://127.0.0.1:{peers[0].port}/v1/instruments")]
            return len(instruments) >= 10
        wait_until(listed, 30, what="gateway lists the capture's instruments", proc=ingest)
        figures = asyncio.run(_measure(peers, instruments, args.clients, args.warmup_s, args.duration_s))
        for name, proc in [("ingest", ingest), *((f"gateway {p.name}", p.proc) for p in peers)]:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} during the run")
    finally:
        for proc in [ingest, *(p.proc for p in peers)]:
            if proc is not None:
                stop_process(proc, grace_s=10)
        nats_server.stop()
    out: dict = {"command": " ".join(sys.argv), "clients_per_gateway": args.clients, "speed": args.speed,
                 "duration_s": figures["elapsed_s"], "instruments": len(instruments), "peers": {}}
    for p in peers:
        if not p.delivered:
            raise RuntimeError(f"gateway {p.name} delivered nothing")
        cpu_s = figures[f"cpu_s_{p.name}"]
        out["peers"][p.name] = {
            "delivered_per_s": p.delivered / figures["elapsed_s"],
            "delivered": p.delivered,
            "cpu_s": cpu_s,
            "cpu_s_per_million": cpu_s / p.delivered * 1e6,
            "p99_delivery_ms": p.latency.get_value_at_percentile(99) / 1e6,
        }
    on, off = out["peers"]["on"], out["peers"]["off"]
    out["ratio_delivered"] = on["delivered_per_s"] / off["delivered_per_s"]
    out["ratio_cpu_per_delivery"] = on["cpu_s_per_million"] / off["cpu_s_per_million"]
    out["target_met"] = out["ratio_delivered"] >= 0.95
    return out


def _ready(port: int) -> bool:
    try:
        with urlopen(f"http://127.0.0.1:{port}/readyz", timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


def _json(url: str) -> list[dict]:
    with urlopen(url, timeout=2) as r:
        return json.loads(r.read())["instruments"]


def summary_line(out: dict) -> str:
    on, off = out["peers"]["on"], out["peers"]["off"]
    return (f"exporter overhead: delivered {on['delivered_per_s']:,.0f}/s instrumented vs {off['delivered_per_s']:,.0f}/s "
            f"not (ratio {out['ratio_delivered']:.3f}, target >= 0.95 {'met' if out['target_met'] else 'MISSED'}); "
            f"gateway CPU {on['cpu_s_per_million']:.1f} vs {off['cpu_s_per_million']:.1f} s per million deliveries "
            f"(x{out['ratio_cpu_per_delivery']:.3f}); p99 delivery {on['p99_delivery_ms']:.2f} vs "
            f"{off['p99_delivery_ms']:.2f} ms; {out['clients_per_gateway']} readers per gateway, {out['duration_s']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exporter.bench", description=__doc__.splitlines()[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=20.0, help="measured time (default %(default)s)")
    p.add_argument("--warmup-s", type=float, default=3.0, help="time before measuring (default %(default)s)")
    p.add_argument("--clients", type=int, default=8, help="readers per gateway (default %(default)s)")
    p.add_argument("--speed", type=float, default=0.0, help="replay speed, 0 = as fast as possible (default %(default)s)")
    p.add_argument("--short", action="store_true", help="smoke run: 3 s measured, 1 s warm-up, 2 readers per gateway")
    p.add_argument("--out", type=Path, default=Path(".bookcast") / "bench-exporter-overhead.json", help="JSON figures (default %(default)s)")
    args = p.parse_args(argv)
    if args.short:
        args.duration_s, args.warmup_s, args.clients = 3.0, 1.0, 2
    try:
        out = run(args)
    except (RuntimeError, TimeoutError) as exc:
        print(f"exporter bench failed: {exc}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(summary_line(out))
    print(f"figures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
