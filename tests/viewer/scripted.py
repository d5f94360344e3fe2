"""A scripted PROTOCOL.md v1 peer for the viewer's browser tests, on a free loopback port.

The real gateway cannot yet send some of what the page must handle: ``instrument_status`` and a
snapshot ``status`` (section 11, the providers issue), auth (section 8, the security issue), nor, on
purpose, faults (a wrong checksum, a seq gap, a frame that is not JSON). This server speaks the protocol
as written (401 on the upgrade and on REST without a valid token; ``subscribed`` replies) and sends the
frames the test gives it, so the page's handling of each is tested in a real browser. It serves the
viewer through ``feed.gateway.viewer.add_routes``, as the gateway does.

Runs an aiohttp server on its own event loop in a thread; ``stop()`` ends it (no process to stop).
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

from aiohttp import web

from feed.gateway.viewer import add_routes
from feed.procs import free_port


class ScriptedGateway:
    def __init__(self, instruments: list[str], token: str | None = None) -> None:
        self.instruments = instruments
        self.token = token
        self.port = free_port()
        self.requests: list[dict[str, Any]] = []  # WebSocket requests received, in order
        self.rest_auth: list[str | None] = []  # Authorization header of each /v1/instruments request
        self.ws_tokens: list[str | None] = []  # ?token= of each WebSocket upgrade
        self._clients: list[web.WebSocketResponse] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="scripted-gateway", daemon=True)
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> ScriptedGateway:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("scripted gateway did not start")
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            for ws in list(self._clients):
                await ws.close()
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/instruments", self._instruments)
        app.router.add_get("/v1/ws", self._ws)
        add_routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    # -- protocol -----------------------------------------------------------------------------------
    def _authorized(self, presented: str | None) -> bool:
        return self.token is None or presented == self.token

    async def _instruments(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization")
        self.rest_auth.append(header)
        bearer = header[len("Bearer "):] if header and header.startswith("Bearer ") else None
        if not self._authorized(bearer):
            return web.json_response({"type": "error", "code": "unauthorized", "message": "token missing or invalid"},
                                     status=401)
        return web.json_response({"instruments": [
            {"instrument": i, "venue": i.split(":")[0], "epoch": "e1", "seq": 0, "status": "stale"}
            for i in self.instruments]})

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        token = request.query.get("token")
        self.ws_tokens.append(token)
        if not self._authorized(token):
            return web.json_response({"type": "error", "code": "unauthorized", "message": "token missing or invalid"},
                                     status=401)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._clients.append(ws)
        try:
            async for msg in ws:
                req = json.loads(msg.data)
                self.requests.append(req)
                if req.get("op") == "subscribe":
                    await ws.send_str(json.dumps({"type": "subscribed", "id": req.get("id"),
                                                  "instruments": req["instruments"],
                                                  "recovered": {i: False for i in req["instruments"]}}))
                elif req.get("op") == "unsubscribe":
                    await ws.send_str(json.dumps({"type": "unsubscribed", "id": req.get("id"),
                                                  "instruments": req["instruments"]}))
        finally:
            self._clients.remove(ws)
        return ws

    # -- driving it from the test (any thread) ------------------------------------------------------
    def send(self, frame: str | dict[str, Any]) -> None:
        """Send one text frame (a dict is JSON-encoded, ``ts_send_ns`` added) to every connected client."""
        if isinstance(frame, dict):
            frame = json.dumps({**frame, "ts_send_ns": time.time_ns()} if "type" in frame else frame)

        async def send_all() -> None:
            for ws in list(self._clients):
                await ws.send_str(frame)

        asyncio.run_coroutine_threadsafe(send_all(), self._loop).result(10)

    def close_clients(self, code: int) -> None:
        async def close_all() -> None:
            for ws in list(self._clients):
                await ws.close(code=code)

        asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(10)

    def ops(self, op: str) -> list[dict[str, Any]]:
        return [r for r in list(self.requests) if r.get("op") == op]

    @property
    def connected(self) -> int:
        return len(self._clients)
