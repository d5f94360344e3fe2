"""PROTOCOL.md section 4: the gateway sends WebSocket ping frames and closes a connection that stops answering
them (``--ws-ping-interval-s``: a ping after that long without a frame from the client, closed when no answer
comes within half of it). A real aiohttp gateway worker (no NATS needed: nothing is subscribed), real clients."""
from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from feed.gateway.app import Gateway, add_routes
from feed.gateway.config import GatewayConfig
from feed.gateway.server import runner_timer_kwargs
from feed.procs import free_port

PING_INTERVAL_S = 4.0  # the answering client has 2 s to answer each ping, even on a loaded machine


async def test_a_client_that_stops_answering_pings_is_closed_and_one_that_answers_stays():
    config = GatewayConfig(ws_ping_interval_s=PING_INTERVAL_S)
    gw = Gateway(config, CollectorRegistry())
    app = web.Application()
    add_routes(app, gw)
    runner = web.AppRunner(app, access_log=None, **runner_timer_kwargs(config))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"ws://127.0.0.1:{port}/v1/ws"
    try:
        async with aiohttp.ClientSession() as http:
            answering = await http.ws_connect(url, autoping=True)
            silent = await http.ws_connect(url, autoping=False)  # reads, never answers a ping
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
            assert not answering.closed  # it answered every ping (aiohttp's autoping): still served
            await answering.close()
    finally:
        await runner.cleanup()
