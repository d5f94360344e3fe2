"""One client-load process of the fan-out benchmark: many lean WebSocket clients on one event loop, one tally.

Each client opens its own WebSocket and takes every delta of every benchmark instrument, from either

* ``bookcast``: a bookcast gateway (``/v1/ws``): ``subscribe`` to all instruments, ready once it holds a
  snapshot of each (PROTOCOL.md section 3/4), or
* ``nats``: nats-server's WebSocket listener, speaking the NATS protocol: ``CONNECT``, one ``SUB`` per
  delta subject, ready at the ``PONG`` that answers the ``PING`` after them.

Both receive the same payloads (bookcast adds ``ts_send_ns``).

The load generator must cost less than the servers it measures, so a client is an ``asyncio.Protocol``
with its own RFC 6455 client handshake and frame parser (server frames are unmasked; the client masks
what it sends, section 5.3): every frame that arrived in one read is handled in that ``data_received``
call, with no task switch or queue per message, and all of them get that read's receive time. Of a
delta it reads only what the tally needs, by scanning the bytes (``scan_delta``: instrument, ``seq``,
``prev_seq``, ``ts_publish_ns``); snapshots, resyncs and errors (rare) are decoded in full. The
checksum-verifying client is the locustfile's.

Per delta a client checks that it chains on the seq it holds and counts ``recv - ts_publish_ns`` (the
publisher's scheduled time) per whole microsecond (one dict update; the HDR histogram is built from the
counts once, for the result), and the earliest and latest receipt of each message across this process's
clients. A NATS ``MSG`` line and the delta after it are matched in place in the read's bytes (no split,
no payload copy).

Accounting, per client and instrument, from the seq first held (the snapshot's, or 0 for NATS) to the
publisher's final seq: every seq is either ``delivered`` or lost as ``gap_lost`` (skipped by a delta that
does not chain: never for bookcast), ``resync_skipped`` (jumped over by a snapshot after a ``resync``)
or ``tail_lost`` (not received by the drain deadline, e.g. a closed connection). Redelivered seqs are
``dups`` and are in none of those.

``--idle``: the clients connect (and, for NATS, finish the ``CONNECT`` / ``PING`` / ``PONG`` exchange)
but subscribe to nothing and answer pings, to hold many idle connections at the least load-generator
CPU: a bookcast idle client drops every text frame unread (a heartbeat a second each; a read that is one
whole small text frame is dropped before any parsing); a NATS one reads its NATS ``PING`` / ``PONG``
(nats-server sends nothing else to a connection without subscriptions).

    python -m loadtest.bench.clients --target bookcast --url ws://127.0.0.1:8080/v1/ws --clients 500 \\
        --instruments bench:I0000,bench:I0001

Lines (``loadtest.bench.ipc``): out ``ready {connected, failed, errors}``; in ``finish {final_seqs,
drain_s}``; out ``result {...}`` (see ``Tally.result``). Exits when stdin closes.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import struct
import time
from collections import Counter
from urllib.parse import urlsplit

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


# The delta's head as ``feed.wire`` writes it (keys in this order, no spaces); greedy up to the stamp, which is
# at the end. One C-level match costs about 0.7x of orjson.loads of the whole delta (measured on a ~300-byte
# benchmark delta: 5.5 vs 7.7 us on the loaded machine; a pure-Python bytes.find scan was 11 us).
_DELTA = re.compile(rb'\{"type":"delta","instrument":"([^"]*)","epoch":"[^"]*","seq":(\d+),"prev_seq":(\d+)'
                    rb'.*"ts_publish_ns":(\d+)', re.S)


# A NATS ``MSG <subject> <sid> [reply-to] <#bytes>\r\n`` line (NATS client protocol), matched in place.
_NATS_MSG = re.compile(rb'MSG [^ \r\n]+ (\d+) (?:[^ \r\n]+ )?(\d+)\r\n')


def scan_delta(data: bytes, start: int = 0, end: int | None = None) -> tuple[bytes, int, int, int] | None:
    """``(instrument, seq, prev_seq, ts_publish_ns)`` of the encoded PROTOCOL.md delta in ``data[start:end]``
    (matched in place: no slice is copied), read by matching its keys rather than decoding it, or None when
    it is not a delta in ``feed.wire``'s key order."""
    m = _DELTA.match(data, start, len(data) if end is None else end)
    if m is None:
        return None
    return m[1], int(m[2]), int(m[3]), int(m[4])


# -- RFC 6455 client side ---------------------------------------------------------------------------

_MASK = os.urandom(4)


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame (RFC 6455 section 5.2), masked with this process's key (section 5.3)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    if not n:
        return head + _MASK
    key = (_MASK * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + _MASK + masked


def handshake_request(url: str) -> tuple[str, int, bytes]:
    """``(host, port, request bytes)`` of the opening handshake for a ``ws://`` URL (RFC 6455 section 4.1)."""
    parts = urlsplit(url)
    if parts.scheme != "ws" or not parts.hostname:
        raise ValueError(f"expected a ws:// URL, got {url!r}")
    port = parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET {path} HTTP/1.1\r\nHost: {parts.hostname}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    return parts.hostname, port, request


class WsProtocol(asyncio.Protocol):
    """One client WebSocket: handshake, then every complete frame of each read handed to ``client``."""

    def __init__(self, client: Client, request: bytes) -> None:
        self.client = client
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buf = b""
        self.fragments: list[bytes] = []
        self.fragment_opcode = 0
        self.close_code: int | None = None
        # an idle bookcast client reads nothing it is sent (a heartbeat a second, PROTOCOL.md section 4): a
        # read that is exactly one whole small text frame is dropped unparsed, so holding 10,000 idle
        # connections costs the load generator as little CPU as it can (pings and closes still parsed).
        # An idle NATS client still reads its frames (NATS PING / PONG ride in them; the server sends
        # nothing else to a connection without subscriptions).
        self.skip_text = bool(getattr(client, "idle", False)) and not getattr(client, "nats", False)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError(f"closed during the handshake: {exc or 'EOF'}"))
        if not self.lost.done():
            self.lost.set_result(None)
        code = self.close_code
        if code is None and self.upgraded.done() and not self.upgraded.exception():
            code = 1006  # RFC 6455 section 7.1.5: closed without a close frame
        self.client.on_closed(code)

    def send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(opcode, payload))

    def data_received(self, data: bytes) -> None:
        if self.skip_text and len(data) >= 2 and data[0] == 0x81 and len(data) == data[1] + 2 and not self.buf \
                and self.upgraded.done():
            return  # one whole unmasked text frame of < 126 bytes, nothing before it: an idle client drops it
        now = time.time_ns()
        buf = self.buf + data if self.buf else data
        if not self.upgraded.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            status = buf[:buf.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                self.upgraded.set_exception(ConnectionError(f"upgrade refused: {status[:120].decode(errors='replace')}"))
                self.transport.close()  # type: ignore[union-attr]
                return
            self.upgraded.set_result(None)
            buf = buf[end + 4:]
        pos, size = 0, len(buf)
        client = self.client
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1] & 0x7F
            start = pos + 2
            if b1 == 126:
                if size - pos < 4:
                    break
                b1 = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif b1 == 127:
                if size - pos < 10:
                    break
                b1 = int.from_bytes(buf[pos + 2:pos + 10], "big")
                start = pos + 10
            end = start + b1
            if end > size:
                break
            payload = buf[start:end]
            pos = end
            opcode = b0 & 0x0F
            if opcode == 0 or not b0 & 0x80:  # fragmented message (RFC 6455 section 5.4)
                if opcode:
                    self.fragment_opcode = opcode
                self.fragments.append(payload)
                if not b0 & 0x80:
                    continue
                opcode, payload = self.fragment_opcode, b"".join(self.fragments)
                self.fragments = []
            if opcode == 1 or opcode == 2:
                if not self.skip_text:
                    client.on_message(payload, now)
            elif opcode == 9:
                self.send(10, payload)
            elif opcode == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.send(8, payload[:2])
                self.transport.close()  # type: ignore[union-attr]
                break
        self.buf = buf[pos:] if pos < size else b""


class Tally:
    """Counters and receive times of every client of this process."""

    def __init__(self, instruments: list[str]) -> None:
        self.index = {name: i for i, name in enumerate(instruments)}
        self.index_bytes = {name.encode(): i for i, name in enumerate(instruments)}
        self.delivered = 0  # hot counter, kept out of the Counter
        self.width = len(instruments)
        # latency in whole microseconds -> deliveries: one dict update per delivery is ~10x cheaper than
        # HdrHistogram.record_value (pure Python, ~1.2 us); the histogram is built from it once, in ``result``
        self.latency_us: dict[int, int] = {}
        self.receipts: dict[int, list[int]] = {}  # seq * width + index -> [first recv ns, last recv ns, receivers]
        self.counts = Counter()
        self.errors: Counter[str] = Counter()
        self.final: list[int] | None = None
        self.pending = 0  # (client, instrument) pairs still short of the final seq once ``final`` is known
        self.all_done = asyncio.Event()
        self.ending = False  # the process is closing its connections: closes are no longer errors

    def error(self, text: str) -> None:
        if text in self.errors or len(self.errors) < MAX_ERROR_KINDS:
            self.errors[text] += 1

    def on_delta(self, client: Client, i: int, seq: int, prev_seq: int, ts_publish_ns: int, recv_ns: int) -> None:
        """One delta of instrument index ``i`` (``prev_seq -> seq``, stamped ``ts_publish_ns``) reached ``client``."""
        held_seqs = client.held
        held = held_seqs[i]
        if prev_seq != held or seq <= held or held < 0:
            if held < 0:
                self.error("delta before the instrument's snapshot")
                return
            if seq <= held:
                self.counts["dups"] += 1
                return
            self.counts["gaps"] += 1
            self.counts["gap_lost"] += max(prev_seq - held, 0)
        held_seqs[i] = seq
        self.delivered += 1
        latency = self.latency_us
        us = (recv_ns - ts_publish_ns) // 1000
        latency[us] = latency.get(us, 0) + 1
        key = seq * self.width + i
        seen = self.receipts.get(key)
        if seen is None:
            self.receipts[key] = [recv_ns, recv_ns, 1]
        else:
            if recv_ns > seen[1]:
                seen[1] = recv_ns
            seen[2] += 1
        final = self.final
        if final is not None and held < final[i] <= seq:
            self._pair_done()

    def histogram(self) -> HdrHistogram:
        """Every delivery's latency (microseconds, clamped to 1 us .. ``LATENCY_MAX_US``) as an HDR histogram."""
        hist = new_histogram()
        for us, count in self.latency_us.items():
            hist.record_value(min(max(us, 1), LATENCY_MAX_US), count)
        return hist

    def on_snapshot(self, client: Client, msg: dict) -> None:
        i = self.index.get(msg.get("instrument"))  # type: ignore[arg-type]
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
            "delivered": self.delivered,
            **{k: self.counts[k] for k in ("gaps", "gap_lost", "resync_skipped", "dups", "resyncs")},
            "hist": self.histogram().encode().decode(),
            "receipts": [[k, *v] for k, v in self.receipts.items()],
            "errors": dict(self.errors),
        }


class Client:
    """One WebSocket client's state: the seq held per instrument index (-1: no snapshot yet)."""

    def __init__(self, tally: Tally, nats: bool, idle: bool = False) -> None:
        self.tally = tally
        self.nats = nats
        self.idle = idle
        self.held = [0 if nats else -1] * tally.width
        self.base = [0] * tally.width
        self.snapshots = 0
        self.ready = asyncio.Event()
        self.settled = asyncio.Event()  # ready, or failed to get there
        self.closed = False
        self.proto: WsProtocol | None = None
        self._nats_buf = b""

    async def run(self, url: str, instruments: list[str], connect_gate: asyncio.Semaphore, timeout_s: float) -> None:
        """Connect, subscribe, wait until ready (``settled`` either way), then receive until the end."""
        loop = asyncio.get_running_loop()
        try:
            async with connect_gate:
                host, port, request = handshake_request(url)
                _, proto = await asyncio.wait_for(
                    loop.create_connection(lambda: WsProtocol(self, request), host, port), timeout_s)
                self.proto = proto
                await asyncio.wait_for(asyncio.shield(proto.upgraded), timeout_s)
                self._subscribe(instruments)
                if self.idle and not self.nats:
                    self.ready.set()
                ready = asyncio.ensure_future(self.ready.wait())
                await asyncio.wait({ready, proto.lost}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
                ready.cancel()
                if not self.ready.is_set():
                    if proto.lost.done():
                        raise ConnectionError("closed before ready")
                    proto.transport.close()  # type: ignore[union-attr]
                    raise ConnectionError(f"not ready within {timeout_s:.0f} s")
            self.settled.set()
            await proto.lost
        except (OSError, TimeoutError, ConnectionError, ValueError) as exc:
            self.tally.error(f"{type(exc).__name__}: {str(exc)[:120]}")
        finally:
            self.settled.set()
            self.on_closed(None)

    def _subscribe(self, instruments: list[str]) -> None:
        proto = self.proto
        if not self.nats:
            if not self.idle:
                proto.send(1, wire.encode_request(wire.Subscribe(1, tuple(instruments))))  # type: ignore[union-attr]
            return
        commands = [natsproto.connect_command("bench-client")]
        if not self.idle:
            commands += [natsproto.sub_command(delta_subject(name), sid) for sid, name in enumerate(instruments, 1)]
        proto.send(2, b"".join(commands) + natsproto.PING)  # type: ignore[union-attr]

    def on_closed(self, close_code: int | None) -> None:
        """The connection ended (once): after ``finish``, its missing pairs will never arrive."""
        if self.closed:
            return
        self.closed = True
        tally = self.tally
        if close_code is not None and close_code != 1000 and not tally.ending:
            tally.error(f"closed by the server with code {close_code}")
        tally.on_closed(self)

    def on_message(self, payload: bytes, now: int) -> None:
        if self.nats:
            self._on_nats(payload, now)
            return
        tally = self.tally
        fields = scan_delta(payload)
        if fields is not None:
            i = tally.index_bytes.get(fields[0])
            if i is None:
                tally.error(f"delta for an unknown instrument {fields[0][:80].decode(errors='replace')}")
            else:
                tally.on_delta(self, i, fields[1], fields[2], fields[3], now)
            return
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            tally.error("a text frame that is not JSON")
            return
        kind = msg.get("type")
        if kind == "snapshot":
            tally.on_snapshot(self, msg)
        elif kind == "resync":
            tally.counts["resyncs"] += 1
        elif kind == "error":
            tally.error(f"error reply {msg.get('code')}: {str(msg.get('message'))[:120]}")
        elif kind == "delta":
            tally.error("a delta without instrument, seq, prev_seq or ts_publish_ns")

    def _on_nats(self, data: bytes, now: int) -> None:
        """NATS protocol bytes (a message may span WebSocket frames): ``MSG`` payloads scanned like deltas."""
        tally = self.tally
        buf = self._nats_buf + data if self._nats_buf else data
        pos = 0
        while True:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            if buf.startswith(b"MSG ", pos):
                head = _NATS_MSG.match(buf, pos, end + 2)
                if head is None:
                    tally.error("nats: malformed MSG line")
                    self.proto.transport.close()  # type: ignore[union-attr]
                    return
                start = end + 2
                payload_end = start + int(head[2])
                if len(buf) < payload_end + 2:
                    break  # the payload is still on its way
                pos = payload_end + 2
                sid = int(head[1])
                fields = scan_delta(buf, start, payload_end)
                if fields is None or not 0 < sid <= tally.width:
                    tally.error("nats: a message that is not a benchmark delta")
                else:
                    tally.on_delta(self, sid - 1, fields[1], fields[2], fields[3], now)
                continue
            line = buf[pos:end]
            pos = end + 2
            if line == b"PING":
                self.proto.send(2, natsproto.PONG)  # type: ignore[union-attr]
            elif line == b"PONG":
                self.ready.set()
            elif line.startswith(b"-ERR"):
                tally.error(f"nats -ERR {line[4:].strip().decode(errors='replace')[:120]}")
            elif not (line.startswith(b"INFO ") or line == b"+OK"):
                tally.error(f"nats: unknown operation {line[:40]!r}")
        self._nats_buf = buf[pos:]


async def main_async(args: argparse.Namespace) -> int:
    raise_nofile_limit()
    if args.nice:
        os.nice(args.nice)
    instruments = [] if args.idle else [name for name in args.instruments.split(",") if name]
    tally = Tally(instruments)
    clients = [Client(tally, args.target == "nats", args.idle) for _ in range(args.clients)]
    gate = asyncio.Semaphore(args.connect_concurrency)
    tasks = [asyncio.ensure_future(c.run(args.url, instruments, gate, args.connect_timeout_s)) for c in clients]
    settling = [asyncio.ensure_future(c.settled.wait()) for c in clients]
    await asyncio.wait(settling, timeout=args.connect_timeout_s)
    for client, task, waiter in zip(clients, tasks, settling):
        waiter.cancel()
        if not client.ready.is_set():
            task.cancel()  # late: counted as failed, never as a subscriber
    ready = sum(1 for c in clients if c.ready.is_set())
    emit("ready", connected=ready, failed=len(clients) - ready, errors=dict(tally.errors))
    # After its result the process holds on, connections open, until stdin closes: the bench reads every
    # client process's CPU once all results are in, and a process gone by then would read as zero (and its
    # closes would land in the servers' measured window)
    async for command in commands():
        if command["cmd"] == "finish" and not tally.ending:
            tally.finish(clients, command["final_seqs"])
            try:
                await asyncio.wait_for(tally.all_done.wait(), command["drain_s"])
            except TimeoutError:
                pass
            emit("result", **tally.result(clients))
            tally.ending = True     # what arrives from here on is not measured: closes are not errors
    tally.ending = True
    for c in clients:
        if c.proto is not None and c.proto.transport is not None:
            c.proto.transport.close()
    for task in tasks:
        task.cancel()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.clients", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=["bookcast", "nats"], required=True)
    p.add_argument("--url", required=True, help="ws:// URL of the gateway's /v1/ws or nats-server's WebSocket")
    p.add_argument("--clients", type=int, required=True, help="WebSocket clients in this process")
    p.add_argument("--instruments", default="", help="comma-separated instrument ids; every client takes all")
    p.add_argument("--idle", action="store_true", help="connect but subscribe to nothing (idle connections)")
    p.add_argument("--connect-concurrency", type=int, default=50, help="connections being opened at once")
    p.add_argument("--nice", type=int, default=0,
                   help="lower this process's CPU priority by N (idle-connection processes: the healthy clients, "
                        "which measure, get the CPU first)")
    p.add_argument("--connect-timeout-s", type=float, default=120.0,
                   help="until every client of this process is ready; later ones count as failed")
    return uvloop.run(main_async(p.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
