"""Connection hygiene (feed.gateway.hygiene): the pure tables, then a real aiohttp listener under abuse."""
from __future__ import annotations

import asyncio
import logging
import struct

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from feed.gateway.hygiene import (
    ConnectionTable,
    Guard,
    GuardMetrics,
    HygieneLimits,
    MaskCheck,
    RejectLog,
    RejectReason,
    SourceRateLimiter,
    install,
    middleware,
    origin_allowed,
)
from feed.procs import free_port
from tests.security.attack import frame, handshake_request, read_frame, read_http_head

# -- pure ------------------------------------------------------------------------------------------


def test_connection_table_caps_per_source_and_total_and_keeps_rest_headroom():
    t = ConnectionTable(per_source_cap=2, total_cap=4, rest_headroom=1)
    assert t.open("a") is None and t.open("a") is None
    assert t.open("a") is RejectReason.PER_SOURCE_CAP
    t.exempt = frozenset({"local"})
    assert [t.open("local") for _ in range(2)] == [None, None]  # exempt from the per-source cap...
    assert t.open("local") is RejectReason.TOTAL_CAP  # ...not from the total
    t.close("local")
    t.close("local")
    assert t.open("b") is None and t.open("c") is None
    assert t.open("d") is RejectReason.TOTAL_CAP
    t.close("a")
    assert t.open("d") is None
    assert t.websocket_cap == 3
    t.websockets = 3
    assert not t.can_upgrade()
    for s in ("a", "b", "c", "d"):
        t.close(s)
    assert t.per_source == {} and t.total == 0


def test_reject_log_says_it_once_per_interval():
    rl = RejectLog(interval_s=10)
    first = rl.note("per_source_cap", "127.0.0.2", 0.0)
    assert first and "per_source_cap=1" in first
    assert all(rl.note("per_source_cap", "127.0.0.2", t / 10) is None for t in range(1, 99))
    line = rl.note("idle_timeout", "127.0.0.3", 10.0)
    assert "per_source_cap=98" in line and "idle_timeout=1" in line and "127.0.0.2 (98)" in line


def test_source_rate_limiter_bucket_and_memory_bound():
    rl = SourceRateLimiter(rate_per_s=10, burst=3, max_sources=2)
    assert [rl.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert rl.retry_after_s("a") == 1
    assert rl.allow("a", 0.1)  # one token back after 100 ms
    assert rl.allow("b", 0.1) and rl.allow("c", 0.1)
    assert list(rl.buckets) == ["b", "c"]  # the least recently seen source was forgotten
    assert SourceRateLimiter(0, 0).allow("x", 0)


@pytest.mark.parametrize("chunks,ok", [
    ([frame(0x1, b"hello")], True),
    ([frame(0x1, b"x" * 300) + frame(0x9, b"")], True),
    ([frame(0x1, b"x" * 70_000)], True),
    ([frame(0x1, b"hi", mask=False)], False),
    ([frame(0x1, b"hello") + frame(0x1, b"hi", mask=False)], False),
    ([frame(0x1, b"x" * 300)[:1], frame(0x1, b"x" * 300)[1:3], frame(0x1, b"x" * 300)[3:]], True),
    ([b"\x81", b"\x02hi"], False),  # an unmasked header split across reads
])
def test_mask_check(chunks, ok):
    check = MaskCheck()
    results = [check.feed(c) for c in chunks]
    assert all(results) is ok and check.failed is (not ok)


@pytest.mark.parametrize("origin,allowed,ok", [
    (None, ("https://viewer.example",), True),
    ("https://viewer.example", (), True),
    ("https://viewer.example", ("https://viewer.example",), True),
    ("https://VIEWER.example/", ("https://viewer.example",), True),
    ("https://evil.example", ("https://viewer.example",), False),
    ("https://viewer.example.evil", ("https://viewer.example",), False),
    ("http://viewer.example", ("https://viewer.example",), False),
    ("null", ("https://viewer.example",), False),
    ("https://anything", ("*",), True),
])
def test_origin_allow_list(origin, allowed, ok):
    assert origin_allowed(origin, allowed) is ok


# -- a real listener -------------------------------------------------------------------------------


class Listener:
    def __init__(self, limits: HygieneLimits) -> None:
        self.limits = limits
        self.registry = CollectorRegistry()
        self.guard = Guard(limits, GuardMetrics(self.registry))
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def __aenter__(self) -> Listener:
        app = web.Application(middlewares=[middleware(self.guard)])

        async def ws_handler(request: web.Request) -> web.StreamResponse:
            if request.query.get("slow"):
                await asyncio.sleep(0.3)  # e.g. checking a token while the client gives up
            if request.query.get("refuse"):
                raise web.HTTPUnauthorized(text="no\n")
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    await ws.send_str("pong")
            return ws

        async def ok(request: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        app.router.add_get("/v1/ws", ws_handler)
        app.router.add_get("/healthz", ok)
        app.router.add_get("/v1/instruments", ok)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, **self.limits.handler_args())
        await self.runner.setup()
        install(self.runner, self.guard)
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()

    def count(self, reason: str) -> float:
        return self.registry.get_sample_value("bookcast_gateway_connections_rejected_total", {"reason": reason}) or 0

    def quiet(self, reason: str) -> float:
        return self.registry.get_sample_value("bookcast_gateway_handshake_failures_total", {"reason": reason}) or 0

    async def connect(self, source: str = "127.0.0.1"):
        return await asyncio.open_connection("127.0.0.1", self.port, local_addr=(source, 0))

    async def upgrade(self, source: str = "127.0.0.1", path: str = "/v1/ws", **kw):
        reader, writer = await self.connect(source)
        writer.write(handshake_request("127.0.0.1", self.port, path, **kw))
        return reader, writer, await read_http_head(reader)


async def _closed_within(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
    """Everything the server sent until it closed (fails if it does not close in time)."""
    return await asyncio.wait_for(reader.read(), timeout_s)


async def test_silent_socket_closed_after_idle_timeout():
    async with Listener(HygieneLimits(idle_timeout_s=0.3, handshake_timeout_s=5)) as srv:
        reader, writer = await srv.connect()
        assert await _closed_within(reader, 5) == b""
        assert srv.count("idle_timeout") == 1
        writer.close()


async def test_slowloris_gets_408_after_handshake_timeout():
    async with Listener(HygieneLimits(idle_timeout_s=5, handshake_timeout_s=0.4)) as srv:
        reader, writer = await srv.connect()
        request = handshake_request("127.0.0.1", srv.port)
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def dribble() -> None:
            for i in range(len(request) - 2):
                writer.write(request[i:i + 1])
                await asyncio.sleep(0.05)

        task = asyncio.ensure_future(dribble())
        answer = await _closed_within(reader, 5)
        task.cancel()
        assert answer.startswith(b"HTTP/1.1 408") and b"handshake_timeout" in answer
        assert 0.3 < loop.time() - started < 3
        assert srv.count("handshake_timeout") == 1
        writer.close()


async def test_a_complete_head_is_not_timed_out_while_the_handler_waits_for_the_loop(monkeypatch):
    """On Python 3.11 aiohttp runs each request in a new task: between taking the parsed head off its
    queue and the handler starting, a busy loop may pass the handshake deadline. The client sent its whole
    head in time: it gets its answer, not 408."""
    from feed.gateway.hygiene import GuardedRequestHandler

    original = GuardedRequestHandler._handle_request

    async def late(self, *args, **kwargs):
        await asyncio.sleep(0.5)  # the loop is elsewhere past the 0.2 s handshake deadline
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(GuardedRequestHandler, "_handle_request", late)
    async with Listener(HygieneLimits(idle_timeout_s=5, handshake_timeout_s=0.2)) as srv:
        reader, writer = await srv.connect()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await read_http_head(reader)
        assert head.status == 200
        assert srv.count("handshake_timeout") == 0
        writer.close()


async def test_keep_alive_rest_connection_gets_the_idle_timer_again():
    async with Listener(HygieneLimits(idle_timeout_s=0.3)) as srv:
        reader, writer = await srv.connect()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await read_http_head(reader)
        assert head.status == 200
        assert await _closed_within(reader, 5) == b""
        assert srv.count("idle_timeout") == 1


async def test_per_source_cap_answers_503_and_other_sources_still_get_in():
    async with Listener(HygieneLimits(max_connections_per_source=3, idle_timeout_s=30)) as srv:
        held = [await srv.connect("127.0.0.2") for _ in range(3)]
        reader, writer = await srv.connect("127.0.0.2")
        answer = await _closed_within(reader, 5)
        assert answer.startswith(b"HTTP/1.1 503") and b"per_source_cap" in answer
        _, _, head = await srv.upgrade("127.0.0.3")
        assert head.status == 101
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{srv.port}/healthz") as r:
            assert r.status == 200
        assert srv.count("per_source_cap") == 1
        for _, w in held:
            w.close()


async def test_websockets_stop_short_of_the_total_so_rest_and_health_keep_working():
    async with Listener(HygieneLimits(max_connections=5, rest_headroom=2, max_connections_per_source=0,
                                      idle_timeout_s=30)) as srv:
        sockets = []
        for _ in range(3):
            reader, writer, head = await srv.upgrade()
            assert head.status == 101
            sockets.append(writer)
        reader, writer, head = await srv.upgrade()
        assert head.status == 503 and head.headers.get("x-bookcast-reject") == "websocket_cap"
        async with aiohttp.ClientSession() as s:
            for path in ("/healthz", "/v1/instruments"):
                async with s.get(f"http://127.0.0.1:{srv.port}{path}") as r:
                    assert r.status == 200
        assert srv.count("websocket_cap") == 1
        sockets[0].close()
        for _ in range(100):  # the freed slot is usable again
            if srv.guard.table.websockets < 3:
                break
            await asyncio.sleep(0.02)
        _, _, head = await srv.upgrade()
        assert head.status == 101


async def test_total_cap_evicts_silent_sockets_first_then_refuses_with_503():
    async with Listener(HygieneLimits(max_connections=2, max_connections_per_source=0, idle_timeout_s=30,
                                      rest_headroom=0, evict_min_idle_s=0)) as srv:
        silent_reader, silent = await srv.connect("127.0.0.4")
        ws_reader, ws_writer, head = await srv.upgrade("127.0.0.5")
        assert head.status == 101
        # at the cap: the silent socket makes room for a health check
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.6", 0))) as s:
            async with s.get(f"http://127.0.0.1:{srv.port}/healthz") as r:
                assert r.status == 200
        assert await _closed_within(silent_reader, 5) == b""
        assert srv.count("idle_evicted") == 1
        # nothing silent left to evict: the next connection is refused
        _, w2, head = await srv.upgrade("127.0.0.7")
        assert head.status == 101
        reader, _ = await srv.connect("127.0.0.8")
        assert (await _closed_within(reader, 5)).startswith(b"HTTP/1.1 503")
        assert srv.count("total_cap") == 1
        for w in (silent, ws_writer, w2):
            w.close()


async def test_a_connection_just_accepted_is_not_evicted_for_a_newcomer():
    async with Listener(HygieneLimits(max_connections=1, max_connections_per_source=0, idle_timeout_s=30,
                                      rest_headroom=0, evict_min_idle_s=0.5)) as srv:
        first_reader, first = await srv.connect("127.0.0.4")
        for _ in range(500):  # the first connection accepted (this loop serves it: poll, don't block)
            if srv.guard.table.total == 1:
                break
            await asyncio.sleep(0.01)
        assert srv.guard.table.total == 1
        reader, w = await srv.connect("127.0.0.5")  # silent for less than 0.5 s: the newcomer is refused
        assert (await _closed_within(reader, 5)).startswith(b"HTTP/1.1 503")
        assert srv.count("idle_evicted") == 0 and srv.count("total_cap") == 1
        w.close()
        await asyncio.sleep(0.6)  # the first connection is now silent past evict_min_idle_s
        reader, w = await srv.connect("127.0.0.6")
        assert await _closed_within(first_reader, 5) == b""  # evicted for the newcomer
        assert srv.count("idle_evicted") == 1
        for x in (first, w):
            x.close()


async def test_unmasked_client_frame_closes_1002():
    async with Listener(HygieneLimits()) as srv:
        reader, writer, head = await srv.upgrade()
        assert head.status == 101
        writer.write(frame(0x1, b"ping"))
        assert await asyncio.wait_for(read_frame(reader), 5) == (0x1, b"pong")
        writer.write(frame(0x1, b"ping", mask=False))
        opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
        assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 1002
        assert await _closed_within(reader, 5) == b""
        assert srv.quiet("unmasked_frame") == 1
        assert srv.registry.get_sample_value("bookcast_gateway_closes_total", {"code": "1002"}) == 1


async def test_wrong_version_426_and_origin_allow_list():
    async with Listener(HygieneLimits(allowed_origins=("https://viewer.example",))) as srv:
        _, _, head = await srv.upgrade(version="8")
        assert head.status == 426 and head.headers["sec-websocket-version"] == "13"
        _, _, head = await srv.upgrade(extra={"Origin": "https://evil.example"})
        assert head.status == 403
        _, _, head = await srv.upgrade(extra={"Origin": "https://viewer.example"})
        assert head.status == 101
        assert srv.count("bad_version") == 1 and srv.count("bad_origin") == 1


async def test_rest_rate_limit_429_health_exempt():
    async with Listener(HygieneLimits(rest_requests_per_s=1, rest_burst=5)) as srv:
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.7", 0))
        async with aiohttp.ClientSession(connector=connector) as s:
            statuses = []
            for _ in range(8):
                async with s.get(f"http://127.0.0.1:{srv.port}/v1/instruments") as r:
                    statuses.append(r.status)
                    retry = r.headers.get("Retry-After")
            assert statuses[:5] == [200] * 5 and statuses[5:] == [429] * 3 and retry == "1"
            for _ in range(10):
                async with s.get(f"http://127.0.0.1:{srv.port}/healthz") as r:
                    assert r.status == 200


async def test_malformed_http_and_vanishing_clients_are_one_debug_line_each(caplog):
    caplog.set_level(logging.DEBUG)
    async with Listener(HygieneLimits()) as srv:
        for raw in (b"\x16\x03\x01garbage\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"):
            reader, writer = await srv.connect()
            writer.write(raw)
            head = await read_http_head(reader)
            assert head.status == 400
            writer.close()
        for _ in range(5):  # gone while the server is still deciding on the upgrade
            reader, writer = await srv.connect()
            writer.write(handshake_request("127.0.0.1", srv.port, "/v1/ws?slow=1"))
            await asyncio.sleep(0.05)
            writer.transport.abort()
        for _ in range(200):
            if srv.quiet("client_vanished") >= 5:
                break
            await asyncio.sleep(0.05)
    assert srv.quiet("bad_http") == 2 and srv.quiet("client_vanished") == 5
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


async def test_a_refused_upgrade_leaves_a_plain_keep_alive_connection():
    """An upgrade the handler refuses (a 401 from the token check) leaves plain HTTP: the next request on
    the same connection is parsed as HTTP, not checked as WebSocket frames."""
    async with Listener(HygieneLimits()) as srv:
        reader, writer = await srv.connect()
        writer.write(handshake_request("127.0.0.1", srv.port, "/v1/ws?refuse=1"))
        assert (await read_http_head(reader)).status == 401
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_http_head(reader)).status == 200
        assert srv.guard.table.websockets == 0
        writer.close()
