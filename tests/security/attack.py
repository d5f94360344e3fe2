"""Hostile clients for the gateway, and the command that measures it under attack.

Attacks (each bounded in count and time, and only ever aimed at loopback: ``check_loopback``):

* ``silent_sockets``   TCP connections that never send a byte (an fd flood).
* ``slowloris``        upgrade requests dribbled one byte at a time, never finished.
* ``idle_websockets``  complete, well-behaved WebSocket connections that subscribe to nothing and answer
                       pings (the "2,000 idle connections" case: what they cost, whether they are kept).
* ``fuzz_cases``       one connection per named bad input (bad frames, bad HTTP, bad requests), recording
                       the answer each got; ``random_frames`` sends random bytes after an upgrade.

``HealthyClient`` is the control: it subscribes, checks every delta's ``prev_seq``/epoch against what it
holds and measures ``recv - ts_publish_ns`` (NATS + gateway + socket), while an attack runs.

Run the whole measurement (figures for the issue's closing note; starts its own stack on free ports)::

    .venv/bin/python -m tests.security.attack --duration-s 10 --idle 2000 --silent 2000 --slowloris 300 \\
        --out run/security/attack
    .venv/bin/python -m tests.security.attack --help
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ipaddress
import json
import os
import random
import resource
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

# -- safety ----------------------------------------------------------------------------------------


def check_loopback(host: str) -> None:
    """Refuse any target outside 127.0.0.0/8 and ::1: these tools only ever attack our own processes.

    Raises:
        ValueError: ``host`` is not a loopback address.
    """
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise ValueError(f"refusing to attack {host!r}: loopback addresses only")


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- raw WebSocket (RFC 6455) ----------------------------------------------------------------------


def frame(opcode: int, payload: bytes, *, mask: bool = True, fin: bool = True, rsv: int = 0) -> bytes:
    """One RFC 6455 frame (section 5.2). ``mask=False`` makes the unmasked client frame servers must refuse."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def handshake_request(host: str, port: int, path: str = "/v1/ws", *, version: str = "13",
                      extra: dict[str, str] | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", f"Sec-WebSocket-Version: {version}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class HttpAnswer:
    status: int | None  # None: the server closed or reset without an HTTP answer
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


async def read_http_head(reader: asyncio.StreamReader, timeout_s: float = 5.0) -> HttpAnswer:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    except TimeoutError:
        return HttpAnswer(None, {"x-attack-outcome": "timeout"})
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        return HttpAnswer(None, {"x-attack-outcome": "closed"})
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return HttpAnswer(None)
    headers = {}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    body = b""
    length = int(headers.get("content-length", "0") or 0)
    if status != 101 and length:
        with contextlib.suppress(Exception):
            body = await asyncio.wait_for(reader.readexactly(min(length, 65536)), timeout_s)
    return HttpAnswer(status, headers, body)


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(opcode, payload) of the next server frame (servers never mask)."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return b0 & 0x0F, await reader.readexactly(n)


async def next_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout_s: float = 5.0) -> str:
    """What the server answers next, in words: ``error:<code>``, ``close:<code>``, ``reset`` or ``timeout``.

    Data, heartbeats and pongs are skipped; pings are answered."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            opcode, payload = await asyncio.wait_for(read_frame(reader), max(0.01, deadline - time.monotonic()))
            if opcode == 0x8:
                return f"close:{struct.unpack('!H', payload[:2])[0] if len(payload) >= 2 else 1005}"
            if opcode == 0x9:
                writer.write(frame(0xA, payload))
                continue
            if opcode == 0x1:
                msg = orjson.loads(payload)
                if msg.get("type") == "error":
                    return f"error:{msg.get('code')}:{len(msg.get('message', ''))}"
                if msg.get("type") in ("subscribed", "unsubscribed", "pong"):
                    return msg["type"]
    except TimeoutError:
        return "timeout"
    except (asyncio.IncompleteReadError, ConnectionError):
        return "reset"


async def open_raw(host: str, port: int, *, path: str = "/v1/ws", version: str = "13",
                   extra: dict[str, str] | None = None, timeout_s: float = 5.0):
    """An upgraded raw connection: (reader, writer, HttpAnswer). The answer's status says whether it took."""
    check_loopback(host)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 20), timeout_s)
    writer.write(handshake_request(host, port, path, version=version, extra=extra))
    return reader, writer, await read_http_head(reader, timeout_s)


def close_writer(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()


# -- the attacks ----------------------------------------------------------------------------------


@dataclass
class FloodResult:
    """What became of ``attempted`` attacker connections over ``duration_s``."""

    attack: str
    attempted: int
    opened: int = 0  # TCP connect succeeded
    refused: int = 0  # TCP connect failed (reset, refused, timed out)
    cut: int = 0  # closed by the server during the attack
    held_at_end: int = 0  # still open when the attack stopped
    http_answers: dict[str, int] = field(default_factory=dict)  # status -> count, when the server answered
    cut_after_s_median: float | None = None
    cut_after_s_max: float | None = None


async def _watch_closed(reader: asyncio.StreamReader, opened_at: float, result: FloodResult, cut_after: list[float],
                        stop: asyncio.Event) -> bool:
    """Wait until the server closes (True) or ``stop`` (False); records an HTTP answer if one came."""
    read = asyncio.ensure_future(reader.read(4096))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while True:
            done, _ = await asyncio.wait({read, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if read in done:
                try:
                    data = read.result()
                except (ConnectionError, OSError):
                    data = b""
                if data.startswith(b"HTTP/1."):
                    status = data.split(b" ", 2)[1].decode(errors="replace")
                    result.http_answers[status] = result.http_answers.get(status, 0) + 1
                if not data:
                    cut_after.append(time.monotonic() - opened_at)
                    return True
                read = asyncio.ensure_future(reader.read(4096))
                continue
            return False
    finally:
        read.cancel()
        stopper.cancel()


async def _flood(name: str, host: str, port: int, n: int, duration_s: float, dribble: bytes | None,
                 byte_interval_s: float, concurrency: int = 256, sources: list[str] | None = None,
                 grace_s: float = 0.0) -> FloodResult:
    check_loopback(host)
    result = FloodResult(name, n)
    stop = asyncio.Event()
    cut_after: list[float] = []
    gate = asyncio.Semaphore(concurrency)
    writers: list[asyncio.StreamWriter] = []

    async def one(source: str | None) -> None:
        async with gate:
            try:
                local = (source, 0) if source else None
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=local), 5)
            except (OSError, TimeoutError):
                result.refused += 1
                return
        result.opened += 1
        writers.append(writer)
        opened_at = time.monotonic()
        dribbler = None
        if dribble is not None:
            async def drip() -> None:
                for i in range(len(dribble)):
                    if stop.is_set() or writer.is_closing():
                        return
                    with contextlib.suppress(Exception):
                        writer.write(dribble[i:i + 1])
                    await asyncio.sleep(byte_interval_s)
            dribbler = asyncio.ensure_future(drip())
        closed = await _watch_closed(reader, opened_at, result, cut_after, stop)
        if dribbler is not None:
            dribbler.cancel()
        if closed:
            result.cut += 1
        else:
            result.held_at_end += 1

    tasks = [asyncio.ensure_future(one(sources[i % len(sources)] if sources else None)) for i in range(n)]
    await asyncio.sleep(duration_s)
    if grace_s > 0:  # the server's timers get this long to cut the connections opened last
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), grace_s)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for w in writers:
        close_writer(w)
    if cut_after:
        cut_after.sort()
        result.cut_after_s_median = round(cut_after[len(cut_after) // 2], 3)
        result.cut_after_s_max = round(cut_after[-1], 3)
    return result


def loopback_sources(first: int, count: int) -> list[str]:
    """``count`` distinct loopback source addresses 127.0.0.<first>.. (Linux routes all of 127/8 locally)."""
    return [f"127.0.{(first + i) // 250}.{(first + i) % 250 + 2}" for i in range(count)]


async def silent_sockets(host: str, port: int, n: int, duration_s: float,
                         sources: list[str] | None = None, grace_s: float = 0.0) -> FloodResult:
    """``n`` TCP connections that never send a byte, held for ``duration_s`` (from ``sources`` in turn);
    ``grace_s`` more for the server to cut those still open (``held_at_end``: open after both)."""
    return await _flood("silent_sockets", host, port, n, duration_s, None, 0.0, sources=sources, grace_s=grace_s)


async def slowloris(host: str, port: int, n: int, duration_s: float, byte_interval_s: float = 1.0,
                    sources: list[str] | None = None, grace_s: float = 0.0) -> FloodResult:
    """``n`` upgrade requests sent one byte every ``byte_interval_s``, never completed."""
    request = handshake_request(host, port)[:-2] + b"X-Padding: " + b"a" * 4096
    return await _flood("slowloris", host, port, n, duration_s, request, byte_interval_s, sources=sources,
                        grace_s=grace_s)


class IdleWebSocket:
    """A connected, well-behaved, silent client: answers pings, reads and discards everything else."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                opcode, payload = await read_frame(self.reader)
                if opcode == 0x9:
                    self.writer.write(frame(0xA, payload))
                elif opcode == 0x8:
                    self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                    return
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return
        finally:
            self.closed.set()

    def close(self) -> None:
        self.task.cancel()
        close_writer(self.writer)


async def idle_websockets(host: str, port: int, n: int, *, token: str | None = None, concurrency: int = 128,
                          timeout_s: float = 5.0) -> tuple[list[IdleWebSocket], Counter]:
    """Open ``n`` idle WebSocket connections, ``concurrency`` handshakes at a time, each given ``timeout_s``;
    returns them and a Counter of failed handshakes by answer (HTTP status, ``timeout`` or ``closed``)."""
    gate = asyncio.Semaphore(concurrency)
    failures: Counter = Counter()
    conns: list[IdleWebSocket] = []
    path = "/v1/ws" + (f"?token={token}" if token else "")

    async def one() -> None:
        async with gate:
            try:
                reader, writer, answer = await open_raw(host, port, path=path, timeout_s=timeout_s)
            except (OSError, TimeoutError) as exc:
                failures[type(exc).__name__] += 1
                return
            if answer.status != 101:
                failures[str(answer.status or answer.headers.get("x-attack-outcome"))] += 1
                close_writer(writer)
                return
            conns.append(IdleWebSocket(reader, writer))

    await asyncio.gather(*(one() for _ in range(n)))
    return conns, failures


MAX_ERROR_MESSAGE_CHARS = 400
CASE_TIMEOUT_S = 20.0  # every case has a prompt answer; this long only so a starved machine is not a finding


@dataclass
class CaseResult:
    case: str
    expected: str
    answer: str

    @property
    def ok(self) -> bool:
        """The expected answer; an error reply's message (its length is the answer's last part) must also
        stay short, so no input is echoed back whole."""
        if not self.answer.startswith(self.expected):
            return False
        if self.answer.startswith("error:"):
            return int(self.answer.rsplit(":", 1)[1]) <= MAX_ERROR_MESSAGE_CHARS
        return True


async def _ws_case(host: str, port: int, payload: bytes, extra: dict[str, str] | None = None,
                   token: str | None = None) -> str:
    headers = dict(extra or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        reader, writer, answer = await open_raw(host, port, extra=headers, timeout_s=CASE_TIMEOUT_S)
    except (OSError, TimeoutError):
        return "connect_failed"
    try:
        if answer.status != 101:
            return f"http:{answer.status or answer.headers.get('x-attack-outcome')}"
        writer.write(payload)
        return await next_answer(reader, writer, CASE_TIMEOUT_S)
    finally:
        close_writer(writer)


async def _http_case(host: str, port: int, raw: bytes) -> str:
    check_loopback(host)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CASE_TIMEOUT_S)
    except (OSError, TimeoutError):
        return "connect_failed"
    try:
        writer.write(raw)
        answer = await read_http_head(reader, CASE_TIMEOUT_S)
        return f"http:{answer.status}" if answer.status is not None else "reset"
    finally:
        close_writer(writer)


def fuzz_catalog(host: str, port: int, *, strict: bool = True, token: str | None = None
                 ) -> list[tuple[str, str, Any]]:
    """(case, expected answer prefix, coroutine factory) for every named bad input.

    ``strict`` expects the RFC 6455 answers of issue 10 (1002 for unmasked frames, 426 for a wrong
    version, 1007 for invalid UTF-8); without it the expectations are the pre-hardening ones."""
    text = lambda obj: frame(0x1, orjson.dumps(obj))  # noqa: E731

    def ws(payload: bytes, extra: dict[str, str] | None = None):
        return _ws_case(host, port, payload, extra, token)

    big_name = "coinbase:" + "X" * 8192
    cases: list[tuple[str, str, Any]] = [
        ("not JSON", "error:bad_request", lambda: ws(frame(0x1, b"hello"))),
        ("JSON array", "error:bad_request", lambda: ws(text([1, 2]))),
        ("unknown op", "error:bad_request", lambda: ws(text({"op": "nuke"}))),
        ("huge number", "error:bad_request", lambda: ws(frame(0x1, b'{"op":"ping","id":' + b"9" * 400 + b"}"))),
        ("deep nesting", "error:bad_request", lambda: ws(frame(0x1, b"[" * 5000 + b"]" * 5000))),
        ("8 KB instrument name (echo truncated)", "error:unknown_instrument",
         lambda: ws(text({"op": "subscribe", "instruments": [big_name]}))),
        ("binary frame", "close:1008", lambda: ws(frame(0x2, b"\x00\x01"))),
        ("oversize frame (70 KB)", "close:1009", lambda: ws(frame(0x1, b" " * 70_000))),
        ("invalid UTF-8 text", "close:1007" if strict else "error:bad_request",
         lambda: ws(frame(0x1, b'{"op":"\xff\xfe"}'))),
        ("unmasked client frame", "close:1002" if strict else "pong",
         lambda: ws(frame(0x1, b'{"op":"ping"}', mask=False))),
        ("reserved bit set", "close:1002", lambda: ws(frame(0x1, b'{"op":"ping"}', rsv=4))),
        ("unknown opcode", "close:1002", lambda: ws(frame(0x3, b""))),
        ("fragmented control frame", "close:1002", lambda: ws(frame(0x9, b"x", fin=False))),
        ("continuation without start", "close:1002", lambda: ws(frame(0x0, b"x"))),
        ("ping flood then ping request", "pong", lambda: ws(frame(0x9, b"p") * 200 + text({"op": "ping"}))),
        ("wrong WebSocket version", "http:426" if strict else "http:", lambda: _http_case(
            host, port, handshake_request(host, port, version="8"))),
        ("garbage request line", "http:400", lambda: _http_case(host, port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")),
        ("header too long", "http:4", lambda: _http_case(host, port, b"GET /v1/ws HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n")),
        ("unknown path", "http:404", lambda: _http_case(host, port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")),
    ]
    return cases


async def fuzz_cases(host: str, port: int, *, strict: bool = True, token: str | None = None) -> list[CaseResult]:
    out = []
    for case, expected, run in fuzz_catalog(host, port, strict=strict, token=token):
        out.append(CaseResult(case, expected, await run()))
    return out


async def random_frames(host: str, port: int, n: int, seed: int = 0, token: str | None = None) -> Counter:
    """``n`` connections each sending random bytes after a good upgrade; a Counter of the answers."""
    rng = random.Random(seed)
    answers: Counter = Counter()
    for _ in range(n):
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))
        answer = await _ws_case(host, port, junk, token=token)
        answers[answer.split(":")[0] + ":" + answer.split(":")[1] if answer.count(":") else answer] += 1
    return answers


# -- the control ----------------------------------------------------------------------------------


@dataclass
class HealthyStats:
    deltas: int = 0
    snapshots: int = 0
    gaps: int = 0
    resyncs: int = 0
    disconnects: int = 0
    latencies_ns: list[int] = field(default_factory=list, repr=False)
    disconnect_reasons: list[str] = field(default_factory=list)

    def quantile_ms(self, q: float) -> float | None:
        if not self.latencies_ns:
            return None
        values = sorted(self.latencies_ns)
        return round(values[min(len(values) - 1, int(q * len(values)))] / 1e6, 3)

    def summary(self) -> dict[str, Any]:
        return {"deltas": self.deltas, "snapshots": self.snapshots, "gaps": self.gaps, "resyncs": self.resyncs,
                "disconnects": self.disconnects, "disconnect_reasons": self.disconnect_reasons,
                "p50_ms": self.quantile_ms(0.5), "p99_ms": self.quantile_ms(0.99)}


class HealthyClient:
    """Subscribes to ``instruments`` and checks the stream is contiguous (PROTOCOL.md section 4)."""

    def __init__(self, url: str, instruments: list[str], token: str | None = None, warmup_s: float = 1.0) -> None:
        self.url = url + (f"?token={token}" if token else "")
        self.instruments = instruments
        self.stats = HealthyStats()
        self.warmup_s = warmup_s  # latencies of the first deltas after the snapshots are not counted

    async def run(self, stop: asyncio.Event) -> HealthyStats:
        held: dict[str, tuple[str, int]] = {}
        measure_from = time.monotonic() + self.warmup_s
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.url, max_msg_size=0, heartbeat=None) as ws:
                await ws.send_str(orjson.dumps({"op": "subscribe", "instruments": self.instruments}).decode())
                while not stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.5)
                    except TimeoutError:
                        continue
                    now_ns = time.time_ns()
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        self.stats.disconnects += 1
                        self.stats.disconnect_reasons.append(f"{msg.type.name} code={ws.close_code} "
                                                             f"data={msg.data!r} extra={msg.extra!r}"[:200])
                        break
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        continue
                    m = orjson.loads(msg.data)
                    kind = m.get("type")
                    if kind == "snapshot":
                        self.stats.snapshots += 1
                        held[m["instrument"]] = (m["epoch"], m["seq"])
                    elif kind == "delta":
                        inst = m["instrument"]
                        if held.get(inst) != (m["epoch"], m["prev_seq"]):
                            self.stats.gaps += 1
                            held.pop(inst, None)
                            await ws.send_str(orjson.dumps({"op": "resync", "instrument": inst}).decode())
                            continue
                        held[inst] = (m["epoch"], m["seq"])
                        self.stats.deltas += 1
                        if m.get("ts_publish_ns") and time.monotonic() >= measure_from:
                            self.stats.latencies_ns.append(now_ns - m["ts_publish_ns"])
                    elif kind == "resync":
                        self.stats.resyncs += 1
                        held.pop(m["instrument"], None)
        return self.stats


# -- process figures ------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (VmRSS), bytes."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def open_fds(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{p}/fd"))
    return total


def http_status(url: str, timeout_s: float = 2.0) -> int | str:
    """The HTTP status of GET ``url``, or why there was none: ``timeout``, ``reset``, ``refused``, ``error``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except TimeoutError:
        return "timeout"
    except urllib.error.URLError as exc:
        return _no_answer(exc.reason)
    except OSError as exc:
        return _no_answer(exc)


def _no_answer(exc: object) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionError):  # http.client.RemoteDisconnected is one
        return "reset"
    return "error"


async def http_status_async(url: str, timeout_s: float = 2.0) -> int | str:
    """``http_status`` on this event loop (no thread): GET ``url`` on a new connection."""
    parts = urllib.parse.urlsplit(url)
    check_loopback(parts.hostname or "")
    writer = None
    try:
        async def get() -> int | str:
            nonlocal writer
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
            writer.write(f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n"
                         .encode())
            line = await reader.readline()
            if not line:
                return "reset"
            try:
                return int(line.split()[1])
            except (IndexError, ValueError):
                return "error"
        return await asyncio.wait_for(get(), timeout_s)
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return _no_answer(exc)
    finally:
        if writer is not None:
            close_writer(writer)


async def health_probe(url: str, stop: asyncio.Event, interval_s: float = 0.25, timeout_s: float = 2.0,
                       latencies_s: list[float] | None = None) -> Counter:
    """GET ``url`` every ``interval_s`` until ``stop``; a Counter of the answers (``http_status``); each
    answer's latency appended to ``latencies_s`` when given."""
    seen: Counter = Counter()
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        started = loop.time()
        seen[await http_status_async(url, timeout_s)] += 1
        if latencies_s is not None:
            latencies_s.append(round(loop.time() - started, 3))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
    return seen


class ControlProcess:
    """The healthy client and the ``/healthz`` probe in a process of their own, as a real client is on
    another machine: the attack tools' CPU (thousands of sockets in this process) never delays the control,
    so what it sees is the gateway's doing. ``start()``, then ``await stop()`` -> (HealthyStats, Counter).
    """

    def __init__(self, ws_url: str, instruments: list[str], token: str | None, health_url: str, *,
                 probe_interval_s: float = 0.25, probe_timeout_s: float = 2.0) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._ready = ctx.Event()
        self._out = ctx.Queue()
        self.health_latencies_s: list[float] = []
        self.proc = ctx.Process(target=_control_main, daemon=True, args=(
            ws_url, instruments, token, health_url, probe_interval_s, probe_timeout_s, self._stop, self._ready,
            self._out))

    def start(self) -> ControlProcess:
        self.proc.start()
        return self

    async def ready(self, timeout_s: float = 60.0) -> None:
        """Wait until the healthy client has its first snapshot (it is streaming)."""
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self._ready.wait, timeout_s):
            raise TimeoutError(f"the control client had no snapshot within {timeout_s} s")

    async def stop(self, timeout_s: float = 60.0) -> tuple[HealthyStats, Counter]:
        """Stop the control and return what it saw (``health_latencies_s`` keeps each probe's latency); the
        process is gone (by PID) when this returns."""
        self._stop.set()
        loop = asyncio.get_running_loop()
        try:
            stats, statuses, self.health_latencies_s = await loop.run_in_executor(None, self._out.get, True, timeout_s)
            return stats, statuses
        finally:
            await loop.run_in_executor(None, self.proc.join, 10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)


def _control_main(ws_url, instruments, token, health_url, probe_interval_s, probe_timeout_s, stop_flag, ready_flag,
                  out) -> None:
    async def main() -> tuple[HealthyStats, Counter, list[float]]:
        stop = asyncio.Event()
        client = HealthyClient(ws_url, instruments, token)

        async def watch() -> None:
            while not stop_flag.is_set():
                if client.stats.snapshots and not ready_flag.is_set():
                    ready_flag.set()
                await asyncio.sleep(0.05)
            stop.set()

        watcher = asyncio.ensure_future(watch())
        latencies_s: list[float] = []
        probe = asyncio.ensure_future(health_probe(health_url, stop, probe_interval_s, probe_timeout_s, latencies_s))
        stats = await client.run(stop)
        await stop.wait()  # a client that was disconnected early still probes until the end
        watcher.cancel()
        return stats, await probe, latencies_s

    out.put(asyncio.run(main()))


# -- the measurement command ----------------------------------------------------------------------


async def measure_phase(name: str, base_url: str, ws_url: str, instruments: list[str], duration_s: float,
                        attack=None, token: str | None = None) -> dict[str, Any]:
    """Run the healthy client and a /healthz probe for ``duration_s`` while ``attack()`` (a coroutine
    factory returning a JSON-able result) runs; returns the phase's figures."""
    control = ControlProcess(ws_url, instruments, token, base_url + "/healthz").start()
    await control.ready()
    attack_result = None
    started = time.monotonic()
    if attack is not None:
        attack_result = await attack()
    remaining = duration_s - (time.monotonic() - started)
    if remaining > 0:
        await asyncio.sleep(remaining)
    stats, statuses = await control.stop()
    return {"phase": name, "healthy": stats.summary(), "healthz": {str(k): v for k, v in statuses.items()},
            "attack": attack_result}


def _markdown(report: dict[str, Any]) -> str:
    base = next((p for p in report["phases"] if p["phase"] == "baseline"), None)
    base_p99 = base["healthy"]["p99_ms"] if base else None
    rows = ["| phase | attacker held / cut | healthy deltas | gaps | resyncs | p50 ms | p99 ms | p99 vs baseline | "
            "/healthz ok |", "|---|---|---|---|---|---|---|---|---|"]
    for p in report["phases"]:
        h, a = p["healthy"], p.get("attack") or {}
        held = f"{a.get('held_at_end', a.get('held', '-'))} / {a.get('cut', '-')}" if a else "-"
        ratio = (f"{h['p99_ms'] / base_p99:.2f}x" if base_p99 and h["p99_ms"] else "-")
        ok = p["healthz"].get("200", 0)
        total = sum(p["healthz"].values())
        rows.append(f"| {p['phase']} | {held} | {h['deltas']} | {h['gaps']} | {h['resyncs']} | {h['p50_ms']} | "
                    f"{h['p99_ms']} | {ratio} | {ok}/{total} |")
    lines = ["# Gateway under attack", "", f"run: {report['started']}, {report['config']}", "", *rows, ""]
    idle = report.get("idle")
    if idle:
        lines += [f"Idle WebSocket connections: {idle['held']} held of {idle['attempted']} "
                  f"(handshake failures {idle['failures']}); gateway RSS {idle['rss_before_mb']} MB -> "
                  f"{idle['rss_after_mb']} MB = {idle['rss_per_connection_kb']} KB per connection; opened at "
                  f"{idle['handshakes_per_s']} handshakes/s (load average {idle['load_average']:.1f}).", ""]
    if report.get("fuzz"):
        lines += ["| bad input | expected | answer |", "|---|---|---|"]
        lines += [f"| {c['case']} | {c['expected']} | {c['answer']}{'' if c['ok'] else '  **(differs)**'} |"
                  for c in report["fuzz"]]
        lines.append("")
    if report.get("random_frames"):
        lines += [f"Random frames after a good upgrade: {report['random_frames']}", ""]
    return "\n".join(lines)


async def run_measurement(args: argparse.Namespace, base_url: str, ws_url: str, port: int, pid: int | None,
                          instruments: list[str]) -> dict[str, Any]:
    host = "127.0.0.1"
    d = args.duration_s
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "config": {k: v for k, v in vars(args).items() if k != "func"}, "phases": []}
    token = args.token

    def progress(msg: str) -> None:
        print(f"[attack] {msg}", file=sys.stderr, flush=True)

    progress(f"baseline {d} s")
    report["phases"].append(await measure_phase("baseline", base_url, ws_url, instruments, d, token=token))
    if args.idle:
        rss_before = rss_bytes(pid) if pid else 0
        progress(f"opening {args.idle} idle WebSocket connections")
        opened_at = time.monotonic()
        conns, failures = await idle_websockets(host, port, args.idle, token=token, concurrency=32, timeout_s=30.0)
        open_s = time.monotonic() - opened_at
        await asyncio.sleep(1.0)  # let the gateway's allocations settle before reading RSS
        rss_after = rss_bytes(pid) if pid else 0
        held = sum(1 for c in conns if not c.closed.is_set())
        report["idle"] = {"attempted": args.idle, "held": held, "failures": dict(failures),
                          "rss_before_mb": round(rss_before / 2**20, 1), "rss_after_mb": round(rss_after / 2**20, 1),
                          "rss_per_connection_kb": round((rss_after - rss_before) / max(1, held) / 1024, 1),
                          "handshakes_per_s": round(len(conns) / open_s, 1), "load_average": os.getloadavg()[0]}
        progress(f"idle: {report['idle']}")

        async def idle_attack() -> dict[str, Any]:
            return {"held": held, "cut": args.idle - held}

        report["phases"].append(await measure_phase(f"{args.idle} idle websockets", base_url, ws_url, instruments,
                                                    d, idle_attack, token))
        report["idle"]["held_after_phase"] = sum(1 for c in conns if not c.closed.is_set())
        for c in conns:
            c.close()
        await asyncio.sleep(1.0)
    if args.silent:
        progress(f"{args.silent} silent sockets for {d} s")
        report["phases"].append(await measure_phase(
            f"{args.silent} silent sockets", base_url, ws_url, instruments, d,
            lambda: _as_dict(silent_sockets(host, port, args.silent, d, loopback_sources(0, args.attack_sources))),
            token))
    if args.slowloris:
        progress(f"{args.slowloris} slowloris upgrades for {d} s")
        report["phases"].append(await measure_phase(
            f"{args.slowloris} slowloris", base_url, ws_url, instruments, d,
            lambda: _as_dict(slowloris(host, port, args.slowloris, d, args.slowloris_interval_s,
                                       loopback_sources(100, args.attack_sources))), token))
    if args.fuzz:
        progress("fuzz cases and random frames")

        async def fuzz_attack() -> dict[str, Any]:
            cases = await fuzz_cases(host, port, strict=not args.lenient, token=token)
            report["fuzz"] = [dict(asdict(c), ok=c.ok) for c in cases]
            report["random_frames"] = dict(await random_frames(host, port, args.fuzz, token=token))
            return {"cases": len(cases), "differs": sum(not c.ok for c in cases)}

        report["phases"].append(await measure_phase("fuzzing client", base_url, ws_url, instruments, d, fuzz_attack,
                                                    token))
    progress(f"baseline again {d} s (the machine's noise)")
    report["phases"].append(await measure_phase("baseline (end)", base_url, ws_url, instruments, d, token=token))
    if pid:
        report["gateway_open_fds_at_end"] = open_fds(pid)
    return report


async def _as_dict(coro) -> dict[str, Any]:
    return asdict(await coro)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.security.attack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=10.0, help="length of each phase (default %(default)s)")
    p.add_argument("--idle", type=int, default=2000, help="idle WebSocket connections (0 = skip)")
    p.add_argument("--silent", type=int, default=2000, help="silent TCP sockets (0 = skip)")
    p.add_argument("--slowloris", type=int, default=300, help="slowloris upgrades (0 = skip)")
    p.add_argument("--slowloris-interval-s", type=float, default=1.0, help="seconds between dribbled bytes")
    p.add_argument("--attack-sources", type=int, default=10,
                   help="loopback source addresses the floods come from (127.0.0.2 ...; default %(default)s)")
    p.add_argument("--fuzz", type=int, default=100, help="random-frame connections in the fuzz phase (0 = skip)")
    p.add_argument("--lenient", action="store_true", help="expect the pre-hardening answers in the fuzz table")
    p.add_argument("--workers", type=int, default=1, help="gateway workers of the stack started here")
    p.add_argument("--gateway-arg", action="append", default=[], help="extra argument for `bookcast gateway`")
    p.add_argument("--token", help="token for the healthy and idle clients (a gateway with auth on)")
    p.add_argument("--out", type=Path, default=Path("run/security/attack"), help="output prefix (.json, .md)")
    args = p.parse_args(argv)
    raise_fd_limit()
    import tempfile

    from tests.e2e.harness import Stack

    with tempfile.TemporaryDirectory(prefix="bookcast-attack-") as tmp:
        stack = Stack(Path(tmp), workers=args.workers, gateway_args=list(args.gateway_arg))
        try:
            print("[attack] starting nats-server, gateway and a looping replay", file=sys.stderr, flush=True)
            stack.start_looping_replay()
            instruments = [i["instrument"] for i in stack.instruments()]
            report = asyncio.run(run_measurement(args, stack.base, stack.ws_url, stack.gateway_port,
                                                 stack.gateway.pid, instruments))
        except (TimeoutError, RuntimeError) as exc:
            print(f"[attack] failed: {exc}\n{stack.log('gateway')[-3000:]}", file=sys.stderr)
            return 1
        finally:
            stack.stop()
        report["gateway_log_lines"] = len(stack.log("gateway").splitlines())
        report["gateway_log_errors"] = sum(" ERROR " in ln for ln in stack.log("gateway").splitlines())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    md = _markdown(report)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
