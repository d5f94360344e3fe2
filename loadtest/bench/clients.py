"""One client-load process of the fan-out benchmark: many asyncio WebSocket clients, one tally.

Each client opens its own WebSocket and takes every delta of every benchmark instrument, from either

* ``bookcast``: a bookcast gateway (``/v1/ws``): ``subscribe`` to all instruments, ready once it holds a
  snapshot of each (PROTOCOL.md section 3/4), or
* ``nats``: nats-server's WebSocket listener, speaking the NATS protocol (``loadtest.natsproto``):
  ``CONNECT``, one ``SUB`` per delta subject, ready at the ``PONG`` that answers the ``PING`` after them.

Both receive the same payloads (bookcast adds ``ts_send_ns``). Per delta a client checks that it chains
on the seq it holds (a lean check: the checksum-verifying client is the locustfile's) and records
``recv - ts_publish_ns`` (the publisher's scheduled time) in an HDR histogram in microseconds, and the
earliest and latest receipt of each message across this process's clients.

Accounting, per client and instrument, from the seq first held (the snapshot's, or 0 for NATS) to the
publisher's final seq: every seq is either ``delivered`` or lost as ``gap_lost`` (skipped by a delta that
does not chain: never for bookcast), ``resync_skipped`` (jumped over by a snapshot after a ``resync``)
or ``tail_lost`` (not received by the drain deadline, e.g. a closed connection). Redelivered seqs are
``dups`` and are in none of those.

    python -m loadtest.bench.clients --target bookcast --url ws://127.0.0.1:8080/v1/ws --clients 500 \\
        --instruments bench:I0000,bench:I0001

Lines (``loadtest.bench.ipc``): out ``ready {connected, failed, errors}``; in ``finish {final_seqs,
drain_s}``; out ``result {...}`` (see ``Tally.result``). Exits when stdin closes.
"""
from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

import aiohttp
import orjson
import uvloop
from hdrh.histogram import HdrHistogram

from feed import wire
from feed.subjects import delta_subject
from loadtest import natsproto
from loadtest.bench.ipc import commands, emit
from loadtest.bench.procstat import raise_nofile_limit

LATENCY_MAX_US = 600_000_000  # 10 minutes: anything later is clamped (and shows as the max)
MAX_ERROR_KINDS = 20


def new_histogram() -> HdrHistogram:
    """Latency histogram in microseconds, 1 us .. 10 min, 3 significant figures."""
    return HdrHistogram(1, LATENCY_MAX_US, 3)


class Tally:
    """Counters and receive times of every client of this process."""

    def __init__(self, instruments: list[str]) -> None:
        self.index = {name: i for i, name in enumerate(instruments)}
        self.width = len(instruments)
        self.hist = new_histogram()
        self.receipts: dict[int, list[int]] = {}  # seq * width + index -> [first recv ns, last recv ns, receivers]
        self.counts = Counter()
        self.errors: Counter[str] = Counter()
        self.final: list[int] | None = None
        self.pending = 0  # (client, instrument) pairs still short of the final seq once ``final`` is known
        self.all_done = asyncio.Event()

    def error(self, text: str) -> None:
        if text in self.errors or len(self.errors) < MAX_ERROR_KINDS:
            self.errors[text] += 1

    def on_delta(self, client: Client, msg: dict, recv_ns: int) -> None:
        i = self.index.get(msg.get("instrument"))
        if i is None:
            self.error(f"delta for an unknown instrument {str(msg.get('instrument'))[:80]}")
            return
        held, seq, prev_seq = client.held[i], msg["seq"], msg["prev_seq"]
        if held < 0:
            self.error("delta before the instrument's snapshot")
            return
        if seq <= held:
            self.counts["dups"] += 1
            return
        if prev_seq != held:
            self.counts["gaps"] += 1
            self.counts["gap_lost"] += max(prev_seq - held, 0)
        client.held[i] = seq
        self.counts["delivered"] += 1
        self.hist.record_value(min(max((recv_ns - msg["ts_publish_ns"]) // 1000, 1), LATENCY_MAX_US))
        key = seq * self.width + i
        seen = self.receipts.get(key)
        if seen is None:
            self.receipts[key] = [recv_ns, recv_ns, 1]
        else:
            seen[0], seen[1], seen[2] = min(seen[0], recv_ns), max(seen[1], recv_ns), seen[2] + 1
        if self.final is not None and held < self.final[i] <= seq:
            self._pair_done()

    def on_snapshot(self, client: Client, msg: dict) -> None:
        i = self.index.get(msg.get("instrument"))
        if i is None:
            return
        held, seq = client.held[i], msg["seq"]
        if held < 0:
            client.base[i] = seq
            client.snapshots += 1
            if client.snapshots == self.width:
                client.ready.set()
        elif seq > held:
            self.counts["resync_skipped"] += seq - held
        if seq > held:
            client.held[i] = seq
            if self.final is not None and held < self.final[i] <= seq:
                self._pair_done()

    def _pair_done(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.all_done.set()

    def finish(self, clients: list[Client], final_seqs: dict[str, int]) -> None:
        """The publisher is done at ``final_seqs``: count what each live client still lacks."""
        self.final = [final_seqs[name] for name in self.index]
        self.pending = sum(1 for c in clients if not c.closed for h, f in zip(c.held, self.final) if h < f)
        if self.pending == 0:
            self.all_done.set()

    def on_closed(self, client: Client) -> None:
        """A client's connection ended: after ``finish``, its missing pairs will never arrive."""
        if self.final is None:
            return
        missing = sum(1 for h, f in zip(client.held, self.final) if h < f)
        if missing:
            self.pending -= missing
            if self.pending == 0:
                self.all_done.set()

    def result(self, clients: list[Client]) -> dict:
        """The process's counts: ``expected`` seqs owed to its connected clients, their fate, the histogram
        (base64 HDR), ``receipts`` as ``[key, first_ns, last_ns, receivers]`` rows, and errors."""
        connected = [c for c in clients if c.ready.is_set()]
        expected = tail_lost = 0
        for c in connected:
            for base, held, final in zip(c.base, c.held, self.final):
                expected += final - base
                tail_lost += max(final - held, 0)
        return {
            "connected": len(connected),
            "closed_early": sum(1 for c in connected if c.closed),
            "expected": expected,
            "tail_lost": tail_lost,
            **{k: self.counts[k] for k in ("delivered", "gaps", "gap_lost", "resync_skipped", "dups", "resyncs")},
            "hist": self.hist.encode().decode(),
            "receipts": [[k, *v] for k, v in self.receipts.items()],
            "errors": dict(self.errors),
        }


class Client:
    """One WebSocket connection's state: the seq held per instrument index (-1: no snapshot yet)."""

    def __init__(self, tally: Tally, nats: bool) -> None:
        self.tally = tally
        self.held = [0 if nats else -1] * tally.width
        self.base = [0] * tally.width
        self.snapshots = 0
        self.ready = asyncio.Event()
        self.settled = asyncio.Event()  # ready, or failed to get there
        self.closed = False
        self.parser = natsproto.NatsParser() if nats else None

    async def run(self, session: aiohttp.ClientSession, url: str, instruments: list[str],
                  connect_gate: asyncio.Semaphore, timeout_s: float) -> None:
        """Connect, subscribe, wait until ready (``settled`` either way), then receive until the end."""
        try:
            async with connect_gate:
                ws = await asyncio.wait_for(session.ws_connect(url, max_msg_size=0), timeout_s)
                await self._subscribe(ws, instruments)
                receiving = asyncio.ensure_future(self._receive(ws))
                ready = asyncio.ensure_future(self.ready.wait())
                await asyncio.wait({receiving, ready}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
                ready.cancel()
                if not self.ready.is_set():
                    if not receiving.done():
                        receiving.cancel()
                        raise ConnectionError(f"not ready within {timeout_s:.0f} s")
                    raise receiving.exception() or ConnectionError("closed before ready")
            self.settled.set()
            await receiving
        except (aiohttp.ClientError, OSError, TimeoutError, natsproto.NatsProtocolError) as exc:
            self.tally.error(f"{type(exc).__name__}: {str(exc)[:120]}")
        finally:
            self.settled.set()
            self.closed = True
            self.tally.on_closed(self)

    async def _subscribe(self, ws: aiohttp.ClientWebSocketResponse, instruments: list[str]) -> None:
        if self.parser is None:
            await ws.send_str(wire.encode_request(wire.Subscribe(1, tuple(instruments))).decode())
            return
        commands = [natsproto.connect_command("bench-client")]
        commands += [natsproto.sub_command(delta_subject(name), sid) for sid, name in enumerate(instruments, 1)]
        await ws.send_bytes(b"".join(commands) + natsproto.PING)

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        tally = self.tally
        async for frame in ws:
            now = time.time_ns()
            if frame.type is aiohttp.WSMsgType.TEXT:
                self._on_bookcast(orjson.loads(frame.data), now)
            elif frame.type is aiohttp.WSMsgType.BINARY and self.parser is not None:
                for msg in self.parser.feed(frame.data):
                    if type(msg) is natsproto.Msg:
                        tally.on_delta(self, orjson.loads(msg.payload), now)
                    elif type(msg) is natsproto.Ping:
                        await ws.send_bytes(natsproto.PONG)
                    elif type(msg) is natsproto.Pong:
                        self.ready.set()
                    elif type(msg) is natsproto.Err:
                        tally.error(f"nats -ERR {msg.text}")
            else:
                break
        if ws.close_code is not None and ws.close_code != 1000:
            tally.error(f"closed by the server with code {ws.close_code}")

    def _on_bookcast(self, msg: dict, now: int) -> None:
        kind = msg.get("type")
        if kind == "delta":
            self.tally.on_delta(self, msg, now)
        elif kind == "snapshot":
            self.tally.on_snapshot(self, msg)
        elif kind == "resync":
            self.tally.counts["resyncs"] += 1
        elif kind == "error":
            self.tally.error(f"error reply {msg.get('code')}: {str(msg.get('message'))[:120]}")


async def main_async(args: argparse.Namespace) -> int:
    raise_nofile_limit()
    instruments = args.instruments.split(",")
    tally = Tally(instruments)
    clients = [Client(tally, args.target == "nats") for _ in range(args.clients)]
    gate = asyncio.Semaphore(args.connect_concurrency)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.ensure_future(c.run(session, args.url, instruments, gate, args.connect_timeout_s))
                 for c in clients]
        settling = [asyncio.ensure_future(c.settled.wait()) for c in clients]
        await asyncio.wait(settling, timeout=args.connect_timeout_s)
        for client, task, waiter in zip(clients, tasks, settling):
            waiter.cancel()
            if not client.ready.is_set():
                task.cancel()  # late: counted as failed, never as a subscriber
        ready = sum(1 for c in clients if c.ready.is_set())
        emit("ready", connected=ready, failed=len(clients) - ready, errors=dict(tally.errors))
        async for command in commands():
            if command["cmd"] == "finish":
                tally.finish(clients, command["final_seqs"])
                try:
                    await asyncio.wait_for(tally.all_done.wait(), command["drain_s"])
                except TimeoutError:
                    pass
                emit("result", **tally.result(clients))
                break
        for task in tasks:
            task.cancel()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.clients", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=["bookcast", "nats"], required=True)
    p.add_argument("--url", required=True, help="ws:// URL of the gateway's /v1/ws or nats-server's WebSocket")
    p.add_argument("--clients", type=int, required=True, help="WebSocket clients in this process")
    p.add_argument("--instruments", required=True, help="comma-separated instrument ids; every client takes all")
    p.add_argument("--connect-concurrency", type=int, default=50, help="connections being opened at once")
    p.add_argument("--connect-timeout-s", type=float, default=120.0,
                   help="until every client of this process is ready; later ones count as failed")
    return uvloop.run(main_async(p.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
