"""The fault proxy against a real TCP echo server on loopback: every toxic's semantics and its counters."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from chaos.proxy import ProxyServer, ToxicError, validate_toxic


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def world():
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = echo.sockets[0].getsockname()[1]
    server = ProxyServer()
    api = await server.start()
    http = aiohttp.ClientSession()
    async with http.post(f"{api}/proxies", json={"name": "echo", "upstream": f"127.0.0.1:{port}"}) as r:
        assert r.status == 201
        proxy = await r.json()
    host, _, pport = proxy["listen"].rpartition(":")
    yield api, http, (host, int(pport))
    await http.close()
    await server.stop()
    echo.close()
    await echo.wait_closed()


async def _toxic(http, api, **body):
    async with http.post(f"{api}/proxies/echo/toxics", json=body) as r:
        assert r.status == 200, await r.text()


async def _stats(http, api):
    async with http.get(f"{api}/proxies/echo") as r:
        return (await r.json())["stats"]


async def _roundtrip(addr, payload=b"hello", timeout_s=5.0) -> tuple[bytes, float]:
    reader, writer = await asyncio.open_connection(*addr)
    t0 = time.monotonic()
    writer.write(payload)
    got = await asyncio.wait_for(reader.readexactly(len(payload)), timeout_s)
    writer.close()
    return got, time.monotonic() - t0


async def test_passthrough_counts_bytes(world):
    api, http, addr = world
    got, _ = await _roundtrip(addr, b"x" * 1000)
    assert got == b"x" * 1000
    stats = await _stats(http, api)
    assert stats["bytes_upstream"] == 1000 and stats["bytes_downstream"] == 1000
    assert stats["connections_total"] == 1


async def test_latency_delays_each_direction(world):
    api, http, addr = world
    await _toxic(http, api, type="latency", stream="downstream", attributes={"latency": 200, "jitter": 0})
    got, elapsed = await _roundtrip(addr)
    assert got == b"hello" and elapsed >= 0.19
    assert (await _stats(http, api))["toxic_hits"]["latency_downstream"] >= 1


async def test_toxicity_zero_never_applies(world):
    api, http, addr = world
    await _toxic(http, api, type="timeout", toxicity=0.0, attributes={"timeout": 0})
    got, _ = await _roundtrip(addr)
    assert got == b"hello"
    assert "timeout_downstream" not in (await _stats(http, api))["toxic_hits"]


async def test_timeout_zero_holds_until_removed(world):
    api, http, addr = world
    await _toxic(http, api, name="hang", type="timeout", stream="upstream", attributes={"timeout": 0})
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(b"held")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(reader.readexactly(4), 0.5)
    async with http.delete(f"{api}/proxies/echo/toxics/hang") as r:
        assert r.status == 204
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"   # delayed, not lost
    writer.close()


async def test_timeout_closes_after_deadline(world):
    api, http, addr = world
    await _toxic(http, api, type="timeout", attributes={"timeout": 100})
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(b"lost")
    assert await asyncio.wait_for(reader.read(10), 5) == b""   # closed, nothing delivered
    assert (await _stats(http, api))["closed_by_toxic"] == 1


async def test_reset_peer_sends_rst(world):
    api, http, addr = world
    await _toxic(http, api, type="reset_peer", attributes={"timeout": 50})
    reader, writer = await asyncio.open_connection(*addr)
    with pytest.raises(ConnectionResetError):
        for _ in range(100):
            writer.write(b"x")
            await writer.drain()
            if not await asyncio.wait_for(reader.read(10), 5):
                raise AssertionError("closed with FIN, not reset")
            await asyncio.sleep(0.02)
    assert (await _stats(http, api))["resets_by_toxic"] == 1


async def test_limit_data_truncates_then_closes(world):
    api, http, addr = world
    await _toxic(http, api, type="limit_data", attributes={"bytes": 10})
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(b"0123456789abcdef")
    got = b""
    while chunk := await asyncio.wait_for(reader.read(100), 5):
        got += chunk
    assert got == b"0123456789"


async def test_slicer_cuts_writes(world):
    api, http, addr = world
    await _toxic(http, api, type="slicer", attributes={"average_size": 4, "size_variation": 0, "delay": 100})
    got, _ = await _roundtrip(addr, b"y" * 64)
    assert got == b"y" * 64
    assert (await _stats(http, api))["toxic_hits"]["slicer_downstream"] >= 16


async def test_bandwidth_throttles(world):
    api, http, addr = world
    await _toxic(http, api, type="bandwidth", attributes={"rate": 100})   # 100 KB/s
    got, elapsed = await _roundtrip(addr, b"z" * 50_000)
    assert got == b"z" * 50_000 and elapsed >= 0.4


async def test_slow_close_delays_close(world):
    api, http, addr = world
    await _toxic(http, api, type="slow_close", stream="upstream", attributes={"delay": 300})
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(b"ab")
    assert await reader.readexactly(2) == b"ab"
    t0 = time.monotonic()
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(10), 5) == b""
    assert time.monotonic() - t0 >= 0.28


async def test_down_and_disable_refuse_connections(world):
    api, http, addr = world
    reader, writer = await asyncio.open_connection(*addr)
    await _toxic(http, api, name="down", type="down")
    assert await asyncio.wait_for(reader.read(10), 5) == b""       # live connection closed
    r2, _ = await asyncio.open_connection(*addr)
    assert await asyncio.wait_for(r2.read(10), 5) == b""           # new ones closed on accept
    async with http.post(f"{api}/reset") as r:
        assert r.status == 204
    assert (await _roundtrip(addr))[0] == b"hello"
    async with http.post(f"{api}/proxies/echo", json={"enabled": False}) as r:
        assert (await r.json())["enabled"] is False
    with pytest.raises(OSError):
        await _roundtrip(addr)
    stats = await _stats(http, api)
    assert stats["refused_disabled"] >= 1 and stats["closed_by_toxic"] >= 1


async def test_bad_requests_name_the_field(world):
    api, http, _ = world
    async with http.post(f"{api}/proxies/echo/toxics", json={"type": "latency", "attributes": {"lat": 1}}) as r:
        assert r.status == 400 and "attributes.lat" in (await r.json())["error"]
    async with http.post(f"{api}/proxies/nope/toxics", json={"type": "latency"}) as r:
        assert r.status == 404
    with pytest.raises(ToxicError, match="stream"):
        validate_toxic({"type": "latency", "stream": "sideways"})
    with pytest.raises(ToxicError, match="toxicity"):
        validate_toxic({"type": "latency", "toxicity": 2})
