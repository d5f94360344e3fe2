"""A fault-injecting TCP proxy with Toxiproxy's vocabulary and semantics, controlled over HTTP.

Follows Shopify/toxiproxy's README (toxics, attributes, units, ``stream`` and ``toxicity``) and its REST API
paths; each proxy also reports its own counters (``stats``) so a drill can prove a fault took effect.

Toxics (``type``: attributes, units as in Toxiproxy)::

    latency     latency (ms), jitter (ms)     every chunk released latency +- jitter after it arrived
    bandwidth   rate (KB/s)                   the stream is throttled to rate kilobytes per second
    slow_close  delay (ms)                    the close of the stream is delayed by delay
    timeout     timeout (ms)                  no data passes; the connection closes after timeout
                                              (0: never closes, data is held until the toxic is removed)
    reset_peer  timeout (ms)                  the connection is reset (TCP RST) timeout after it is seen
    slicer      average_size, size_variation (bytes), delay (us)   chunks are cut into small writes
    limit_data  bytes                         the connection closes after this many bytes on the stream
    down        (none)                        bookcast's name for Toxiproxy's ``enabled: false`` per
                                              stream: affected connections are closed at once and new
                                              ones closed on accept

Every toxic has ``stream`` (``upstream``: client to server, ``downstream``: server to client, default
``downstream``) and ``toxicity`` (0..1, default 1): the probability, drawn once per connection, that the
toxic applies to that connection.

HTTP API (JSON)::

    GET    /version                             "bookcast-proxy 1"
    GET    /proxies                             {name: proxy}
    POST   /proxies                             {"name", "listen": "127.0.0.1:0", "upstream": "h:p", "enabled"}
    GET    /proxies/{name}                      proxy with toxics and stats
    POST   /proxies/{name}                      {"enabled": false} closes the listener and every connection
    DELETE /proxies/{name}
    GET    /proxies/{name}/toxics               [toxic]
    POST   /proxies/{name}/toxics               {"name", "type", "stream", "toxicity", "attributes"}
    POST   /proxies/{name}/toxics/{toxic}       {"attributes": {...}, "toxicity": ...} (update)
    DELETE /proxies/{name}/toxics/{toxic}
    POST   /reset                               every proxy enabled, every toxic removed (stats kept)

Errors: 400 with ``{"error": ...}`` naming the field for a bad request, 404 for an unknown proxy or toxic,
409 for a duplicate name. ``validate_toxic`` is pure and raises ``ToxicError`` (a ``ValueError``).

Run: ``python -m chaos.proxy --port 0 --port-file F`` (prints ``proxy api http://127.0.0.1:PORT``).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import random
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

log = logging.getLogger("bookcast.chaos.proxy")

VERSION = "bookcast-proxy 1"
STREAMS = ("upstream", "downstream")
# type -> {attribute: default}; every attribute a non-negative number.
TOXIC_TYPES: dict[str, dict[str, float]] = {
    "latency": {"latency": 0, "jitter": 0},
    "bandwidth": {"rate": 0},
    "slow_close": {"delay": 0},
    "timeout": {"timeout": 0},
    "reset_peer": {"timeout": 0},
    "slicer": {"average_size": 0, "size_variation": 0, "delay": 0},
    "limit_data": {"bytes": 0},
    "down": {},
}
_CHUNK_BYTES = 65536


class ToxicError(ValueError):
    """A toxic or proxy definition that cannot be used; the message names the field."""


@dataclass
class Toxic:
    name: str
    type: str
    stream: str
    toxicity: float
    attributes: dict[str, float]
    added_monotonic_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "stream": self.stream, "toxicity": self.toxicity,
                "attributes": dict(self.attributes)}


def validate_toxic(body: Any, existing: dict[str, Toxic] | None = None) -> Toxic:
    """A ``Toxic`` from a JSON body (Toxiproxy's shape). Pure. Raises ``ToxicError`` naming the field."""
    if not isinstance(body, dict):
        raise ToxicError("toxic: body must be a JSON object")
    kind = body.get("type")
    if kind not in TOXIC_TYPES:
        raise ToxicError(f"toxic.type: {kind!r} is not one of {', '.join(TOXIC_TYPES)}")
    stream = body.get("stream", "downstream")
    if stream not in STREAMS:
        raise ToxicError(f"toxic.stream: {stream!r} must be upstream or downstream")
    toxicity = body.get("toxicity", 1.0)
    if isinstance(toxicity, bool) or not isinstance(toxicity, (int, float)) or not 0.0 <= toxicity <= 1.0:
        raise ToxicError(f"toxic.toxicity: {toxicity!r} must be a number in [0, 1]")
    name = body.get("name") or f"{kind}_{stream}"
    if not isinstance(name, str):
        raise ToxicError(f"toxic.name: {name!r} must be a string")
    if existing is not None and name in existing:
        raise ToxicError(f"toxic.name: {name!r} already exists")
    attrs_in = body.get("attributes") or {}
    if not isinstance(attrs_in, dict):
        raise ToxicError("toxic.attributes: must be an object")
    attributes = dict(TOXIC_TYPES[kind])
    for key, value in attrs_in.items():
        if key not in attributes:
            raise ToxicError(f"toxic.attributes.{key}: not an attribute of {kind} "
                             f"(known: {', '.join(TOXIC_TYPES[kind]) or 'none'})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ToxicError(f"toxic.attributes.{key}: {value!r} must be a non-negative number")
        attributes[key] = value
    if kind == "bandwidth" and attributes["rate"] <= 0:
        raise ToxicError("toxic.attributes.rate: must be > 0 KB/s")
    return Toxic(name, kind, stream, float(toxicity), attributes)


def _hostport(text: Any, what: str) -> tuple[str, int]:
    if not isinstance(text, str) or ":" not in text:
        raise ToxicError(f"proxy.{what}: {text!r} must be host:port")
    host, _, port = text.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise ToxicError(f"proxy.{what}: port {port!r} is not a number") from None


@dataclass
class Stats:
    connections_total: int = 0
    connections_active: int = 0
    bytes_upstream: int = 0          # bytes delivered client -> server
    bytes_downstream: int = 0        # bytes delivered server -> client
    refused_disabled: int = 0        # connections refused while the proxy was disabled or down
    closed_by_toxic: int = 0         # connections closed by timeout / limit_data / down
    resets_by_toxic: int = 0         # connections reset by reset_peer
    toxic_hits: dict[str, int] = field(default_factory=dict)  # toxic name -> chunks or connections it acted on

    def hit(self, toxic: str, n: int = 1) -> None:
        self.toxic_hits[toxic] = self.toxic_hits.get(toxic, 0) + n


class _Connection:
    """One client connection and its upstream connection; two pumps (one per stream) and a watchdog."""

    def __init__(self, proxy: Proxy, client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 server: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.rolls: dict[str, bool] = {}        # toxic name -> applies to this connection
        self.seen_s: dict[str, float] = {}      # toxic name -> when this connection first saw it
        self.closed = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    def active(self, stream: str, kind: str) -> list[Toxic]:
        out = []
        for t in list(self.proxy.toxics.values()):
            if t.stream != stream or t.type != kind:
                continue
            if t.name not in self.rolls:
                self.rolls[t.name] = random.random() < t.toxicity if t.toxicity < 1.0 else True
                self.seen_s[t.name] = time.monotonic()
            if self.rolls[t.name]:
                out.append(t)
        return out

    def close(self, *, reset: bool = False) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for _, w in (self.client, self.server):
            if reset:
                sock = w.get_extra_info("socket")
                if sock is not None:
                    try:  # SO_LINGER 0: close() sends RST
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    except OSError:
                        pass
            try:
                w.transport.abort() if reset else w.close()
            except (OSError, RuntimeError):
                pass

    async def run(self) -> None:
        self.tasks = [asyncio.create_task(self._pump("upstream", self.client[0], self.server[1])),
                      asyncio.create_task(self._pump("downstream", self.server[0], self.client[1])),
                      asyncio.create_task(self._watchdog())]
        await self.closed.wait()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _watchdog(self) -> None:
        stats = self.proxy.stats
        while not self.closed.is_set():
            now = time.monotonic()
            for stream in STREAMS:
                for t in self.active(stream, "down"):
                    stats.hit(t.name)
                    stats.closed_by_toxic += 1
                    self.close()
                    return
                for t in self.active(stream, "reset_peer"):
                    if now - self.seen_s[t.name] >= t.attributes["timeout"] / 1000.0:
                        stats.hit(t.name)
                        stats.resets_by_toxic += 1
                        self.close(reset=True)
                        return
                for t in self.active(stream, "timeout"):
                    if t.attributes["timeout"] > 0 and now - self.seen_s[t.name] >= t.attributes["timeout"] / 1000.0:
                        stats.hit(t.name)
                        stats.closed_by_toxic += 1
                        self.close()
                        return
            await asyncio.sleep(0.01)

    async def _pump(self, stream: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Reader -> queue of (release time, bytes) -> writer, so latency delays without cutting throughput."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        writer_task = asyncio.create_task(self._write(stream, queue, writer))
        try:
            while True:
                try:
                    data = await reader.read(_CHUNK_BYTES)
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    break
                delay_s = 0.0
                for t in self.active(stream, "latency"):
                    jitter = t.attributes["jitter"]
                    delay_s += max(0.0, t.attributes["latency"] + random.uniform(-jitter, jitter)) / 1000.0
                    self.proxy.stats.hit(t.name)
                queue.put_nowait((time.monotonic() + delay_s, data))
            queue.put_nowait(None)
            await writer_task
        finally:
            writer_task.cancel()

    async def _write(self, stream: str, queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        stats = self.proxy.stats
        sent = 0
        while True:
            item = await queue.get()
            if item is None:
                for t in self.active(stream, "slow_close"):
                    stats.hit(t.name)
                    await asyncio.sleep(t.attributes["delay"] / 1000.0)
                self.close()
                return
            release_s, data = item
            wait_s = release_s - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            while self.active(stream, "timeout"):   # hold (timeout 0: until removed; else the watchdog closes)
                for t in self.active(stream, "timeout"):
                    stats.hit(t.name)
                await asyncio.sleep(0.01)
            for t in self.active(stream, "limit_data"):
                room = int(t.attributes["bytes"]) - sent
                if room <= len(data):
                    data = data[:max(room, 0)]
                    if data:
                        writer.write(data)
                        sent += len(data)
                        self._count(stream, len(data))
                        await writer.drain()
                    stats.hit(t.name)
                    stats.closed_by_toxic += 1
                    self.close()
                    return
            pieces = [data]
            slicers = self.active(stream, "slicer")
            if slicers and slicers[0].attributes["average_size"] > 0:
                s = slicers[0].attributes
                pieces, i = [], 0
                while i < len(data):
                    size = max(1, int(s["average_size"] + random.uniform(-s["size_variation"], s["size_variation"])))
                    pieces.append(data[i:i + size])
                    i += size
                stats.hit(slicers[0].name, len(pieces))
            bandwidth = self.active(stream, "bandwidth")
            if bandwidth:   # 1 KB pieces, each waiting its share of the rate before it is written
                pieces = [p[i:i + 1024] for p in pieces for i in range(0, len(p), 1024)]
            for n, piece in enumerate(pieces):
                if n and slicers:
                    await asyncio.sleep(slicers[0].attributes["delay"] / 1e6)
                for t in bandwidth:
                    stats.hit(t.name)
                    await asyncio.sleep(len(piece) / (t.attributes["rate"] * 1000.0))
                try:
                    writer.write(piece)
                    await writer.drain()
                except (ConnectionError, OSError, RuntimeError):
                    self.close()
                    return
                sent += len(piece)
                self._count(stream, len(piece))

    def _count(self, stream: str, n: int) -> None:
        if stream == "upstream":
            self.proxy.stats.bytes_upstream += n
        else:
            self.proxy.stats.bytes_downstream += n


class Proxy:
    """One listener forwarding to one upstream, with its toxics and counters."""

    def __init__(self, name: str, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        self.name = name
        self.listen = listen
        self.upstream = upstream
        self.enabled = False
        self.toxics: dict[str, Toxic] = {}
        self.stats = Stats()
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None

    def to_json(self) -> dict[str, Any]:
        stats = dict(vars(self.stats))
        stats["toxic_hits"] = dict(self.stats.toxic_hits)
        return {"name": self.name, "listen": f"{self.listen[0]}:{self.listen[1]}",
                "upstream": f"{self.upstream[0]}:{self.upstream[1]}", "enabled": self.enabled,
                "toxics": [t.to_json() for t in self.toxics.values()], "stats": stats}

    async def enable(self) -> None:
        if self.enabled:
            return
        self._server = await asyncio.start_server(self._accept, self.listen[0], self.listen[1], reuse_address=True)
        self.listen = self._server.sockets[0].getsockname()[:2]   # port 0 resolved, kept across disable
        self.enabled = True

    async def disable(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.enabled = False
        for conn in list(self.connections):
            conn.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats = self.stats
        stats.connections_total += 1
        downs = [t for t in self.toxics.values() if t.type == "down" and random.random() < t.toxicity]
        if not self.enabled or downs:
            stats.refused_disabled += 1
            for t in downs:
                stats.hit(t.name)
            writer.close()
            return
        try:
            server = await asyncio.open_connection(*self.upstream)
        except OSError as exc:
            log.info("proxy %s: upstream %s:%d refused: %s", self.name, *self.upstream, exc)
            writer.close()
            return
        conn = _Connection(self, (reader, writer), server)
        self.connections.add(conn)
        stats.connections_active += 1
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            stats.connections_active -= 1


class ProxyServer:
    """Every proxy plus the HTTP API (``app``). Use ``start(host, port)`` / ``stop()`` inside a loop."""

    def __init__(self) -> None:
        self.proxies: dict[str, Proxy] = {}
        self._runner: web.AppRunner | None = None
        self.api_url = ""

    def app(self) -> web.Application:
        app = web.Application()
        r = app.router
        r.add_get("/version", self._version)
        r.add_get("/proxies", self._list)
        r.add_post("/proxies", self._create)
        r.add_post("/reset", self._reset)
        r.add_get("/proxies/{name}", self._get)
        r.add_post("/proxies/{name}", self._update)
        r.add_delete("/proxies/{name}", self._delete)
        r.add_get("/proxies/{name}/toxics", self._toxics)
        r.add_post("/proxies/{name}/toxics", self._add_toxic)
        r.add_post("/proxies/{name}/toxics/{toxic}", self._update_toxic)
        r.add_delete("/proxies/{name}/toxics/{toxic}", self._delete_toxic)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        self.api_url = f"http://{bound[0]}:{bound[1]}"
        return self.api_url

    async def stop(self) -> None:
        for p in list(self.proxies.values()):
            await p.disable()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- handlers ---------------------------------------------------------------------------------------
    def _proxy(self, request: web.Request) -> Proxy:
        name = request.match_info["name"]
        if name not in self.proxies:
            raise web.HTTPNotFound(text=_err(f"no proxy named {name!r}"), content_type="application/json")
        return self.proxies[name]

    async def _body(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text=_err("body is not JSON"), content_type="application/json") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text=_err("body must be a JSON object"), content_type="application/json")
        return body

    async def _version(self, _: web.Request) -> web.Response:
        return web.Response(text=VERSION)

    async def _list(self, _: web.Request) -> web.Response:
        return web.json_response({n: p.to_json() for n, p in self.proxies.items()})

    async def _create(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        try:
            name = body.get("name")
            if not isinstance(name, str) or not name:
                raise ToxicError("proxy.name: must be a non-empty string")
            if name in self.proxies:
                return web.json_response({"error": f"proxy {name!r} already exists"}, status=409)
            proxy = Proxy(name, _hostport(body.get("listen", "127.0.0.1:0"), "listen"),
                          _hostport(body.get("upstream"), "upstream"))
        except ToxicError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if body.get("enabled", True):
            try:
                await proxy.enable()
            except OSError as exc:
                return web.json_response({"error": f"proxy.listen: cannot listen: {exc}"}, status=400)
        self.proxies[name] = proxy
        log.info("proxy %s: %s:%d -> %s:%d", name, *proxy.listen, *proxy.upstream)
        return web.json_response(proxy.to_json(), status=201)

    async def _get(self, request: web.Request) -> web.Response:
        return web.json_response(self._proxy(request).to_json())

    async def _update(self, request: web.Request) -> web.Response:
        proxy = self._proxy(request)
        body = await self._body(request)
        if "enabled" in body:
            await (proxy.enable() if body["enabled"] else proxy.disable())
            log.info("proxy %s: enabled=%s", proxy.name, proxy.enabled)
        return web.json_response(proxy.to_json())

    async def _delete(self, request: web.Request) -> web.Response:
        proxy = self._proxy(request)
        await proxy.disable()
        del self.proxies[proxy.name]
        return web.Response(status=204)

    async def _reset(self, _: web.Request) -> web.Response:
        for p in self.proxies.values():
            p.toxics.clear()
            await p.enable()
        return web.Response(status=204)

    async def _toxics(self, request: web.Request) -> web.Response:
        return web.json_response([t.to_json() for t in self._proxy(request).toxics.values()])

    async def _add_toxic(self, request: web.Request) -> web.Response:
        proxy = self._proxy(request)
        body = await self._body(request)
        try:
            toxic = validate_toxic(body, proxy.toxics)
        except ToxicError as exc:
            status = 409 if "already exists" in str(exc) else 400
            return web.json_response({"error": str(exc)}, status=status)
        toxic.added_monotonic_s = time.monotonic()
        proxy.toxics[toxic.name] = toxic
        log.info("proxy %s: toxic %s added %s", proxy.name, toxic.name, toxic.to_json())
        return web.json_response(toxic.to_json())

    async def _update_toxic(self, request: web.Request) -> web.Response:
        proxy = self._proxy(request)
        name = request.match_info["toxic"]
        if name not in proxy.toxics:
            raise web.HTTPNotFound(text=_err(f"no toxic named {name!r}"), content_type="application/json")
        old = proxy.toxics[name]
        body = await self._body(request)
        merged = {**old.to_json(), **{k: v for k, v in body.items() if k in ("toxicity", "stream")},
                  "attributes": {**old.attributes, **(body.get("attributes") or {})}}
        try:
            toxic = validate_toxic(merged)
        except ToxicError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        toxic.added_monotonic_s = old.added_monotonic_s
        proxy.toxics[name] = toxic
        return web.json_response(toxic.to_json())

    async def _delete_toxic(self, request: web.Request) -> web.Response:
        proxy = self._proxy(request)
        name = request.match_info["toxic"]
        if proxy.toxics.pop(name, None) is None:
            raise web.HTTPNotFound(text=_err(f"no toxic named {name!r}"), content_type="application/json")
        log.info("proxy %s: toxic %s removed", proxy.name, name)
        return web.Response(status=204)


def _err(text: str) -> str:
    import json

    return json.dumps({"error": text})


async def _serve(args: argparse.Namespace) -> int:
    server = ProxyServer()
    url = await server.start(args.host, args.port)
    if args.port_file:
        tmp = Path(f"{args.port_file}.tmp")      # atomic: a reader never sees an empty file
        tmp.write_text(url)
        tmp.replace(args.port_file)
    print(f"proxy api {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos.proxy", description=__doc__.split("\n")[0],
                                epilog="example:\n  python -m chaos.proxy --port 8474\n"
                                       "  curl -X POST localhost:8474/proxies -d '{\"name\":\"p\",\"upstream\":\"127.0.0.1:9000\"}'",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="API port (0: a free one)")
    p.add_argument("--port-file", help="write the API URL here once listening")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
