"""PROTOCOL.md section 4: the gateway sends WebSocket ping frames and closes a connection that stops answering
them (``--ws-ping-interval-s``: a ping after that long without a frame from the client, dropped when no answer
comes within half of it; ``feed.gateway.liveness``, run by the worker's timer pass), and answers the client's
own pings. A real aiohttp gateway worker with its timer pass (no NATS needed: nothing is subscribed), real
clients."""
from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from feed.gateway.app import Gateway, add_routes
from feed.gateway.config import GatewayConfig
from feed.gateway.server import runner_timer_kwargs
from feed.procs import free_port

PING_INTERVAL_S = 4.0  # the answering client has 2 s to answer each ping, even on a loaded machine


@contextlib.asynccontextmanager
async def worker(config: GatewayConfig):
    """A gateway worker serving on a free loopback port with its timer pass (what ``Gateway.start`` runs
    beside NATS); yields (gateway, WebSocket URL), stopped on exit."""
    gw = Gateway(config, CollectorRegistry())
    app = web.Application()
    add_routes(app, gw)
    runner = web.AppRunner(app, access_log=None, **runner_timer_kwargs(config))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    ticks = asyncio.get_running_loop().create_task(gw._ticks())
    try:
        yield gw, f"ws://127.0.0.1:{port}/v1/ws"
    finally:
        ticks.cancel()
        await runner.cleanup()


async def test_a_client_that_stops_answering_pings_is_closed_and_one_that_answers_stays():
    async with worker(GatewayConfig(ws_ping_interval_s=PING_INTERVAL_S)) as (gw, url):
        async with aiohttp.ClientSession() as http:
            answering = await http.ws_connect(url, autoping=True)  # aiohttp answers pings while we read
            silent = await http.ws_connect(url, autoping=False)  # reads, never answers a ping
            answered: list[aiohttp.WSMsgType] = []

            async def read_answering() -> None:
                while True:
                    msg = await answering.receive()
                    answered.append(msg.type)
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        return

            reader = asyncio.get_running_loop().create_task(read_answering())
            pings = 0
            deadline = time.monotonic() + 10 * PING_INTERVAL_S
            closed = None
            while time.monotonic() < deadline:
                try:
                    msg = await asyncio.wait_for(silent.receive(), deadline - time.monotonic())
                except asyncio.TimeoutError:
                    break
                if msg.type is aiohttp.WSMsgType.PING:
                    pings += 1
                elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING,
                                  aiohttp.WSMsgType.ERROR):
                    closed = msg.type
                    break
            assert pings >= 1, "the gateway never pinged the silent client"
            assert closed is not None, f"a client that never answered {pings} ping(s) is still open"
            # the answering client is pinged again and again: still served two ping rounds later
            seen = len(answered)
            hold_until = time.monotonic() + 2 * PING_INTERVAL_S
            while time.monotonic() < hold_until and not reader.done():
                await asyncio.wait([reader], timeout=hold_until - time.monotonic())
            assert not reader.done(), f"the answering client was closed: {answered[-3:]}"
            assert len(answered) > seen  # heartbeats kept coming
            assert gw.metrics.ping_timeouts._value.get() == 1  # the silent one, counted once
            assert len(gw.connections) == 1  # and its handler ended: dropped from the worker's table
            reader.cancel()
            await answering.close()


async def test_the_gateway_answers_a_client_ping_with_its_payload():
    async with worker(GatewayConfig()) as (_, url), aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url, autoping=False)
        await ws.ping(b"are you there")
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.PONG, b"are you there")
        await ws.send_str('{"op":"ping","id":1}')  # the protocol's own ping still answered after it
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type is aiohttp.WSMsgType.TEXT and '"pong"' in msg.data, msg
        await ws.close()
