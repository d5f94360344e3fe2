"""A dead ingest cannot say its books are stale: the gateway notices its directory announcements stopped.

Real nats-server, ingest and gateway. The ingest is SIGKILLed (no goodbye); within ``--ingest-silent-s``
plus one announcement interval the gateway sends ``instrument_status`` ``stale`` (reason ``ingest_silent``)
to a subscribed client and ``/readyz`` is 503 naming the venue. A new ingest brings the venue back: status
``ok`` and ``/readyz`` 200.
"""
from __future__ import annotations

import asyncio
import signal
import time
import urllib.error
import urllib.request

import aiohttp
import orjson
import pytest

from feed.stack import bundled_capture
from tests.e2e.harness import http_ok

pytestmark = pytest.mark.e2e


def _readyz(base: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(base + "/readyz", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def _statuses(ws: aiohttp.ClientWebSocketResponse, instrument: str, until: str, timeout_s: float) -> list[dict]:
    """Read ``ws`` until an ``instrument_status`` of ``instrument`` with status ``until`` arrives; return every
    ``instrument_status`` seen (raises TimeoutError naming what arrived)."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            frame = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            break
        assert frame.type is aiohttp.WSMsgType.TEXT, frame
        msg = orjson.loads(frame.data)
        if msg.get("type") == "instrument_status" and msg.get("instrument") == instrument:
            seen.append(msg)
            if msg["status"] == until:
                return seen
    raise TimeoutError(f"no instrument_status {until!r} for {instrument} within {timeout_s} s; saw {seen}")


async def test_killed_ingest_makes_instruments_stale_and_readyz_503_until_a_new_one_announces(make_stack):
    stack = make_stack(workers=1, gateway_args=["--ingest-silent-s", "2"])
    stack.start_nats()
    stack.start_gateway()
    stack.start_ingest([bundled_capture()], speed=1.0, loop=True)
    instruments = await asyncio.to_thread(stack.wait_instruments, 10, 90)
    inst = instruments[0]
    async with aiohttp.ClientSession() as http, http.ws_connect(stack.ws_url, heartbeat=None) as ws:
        await ws.send_json({"op": "subscribe", "id": 1, "instruments": [inst]})
        assert _readyz(stack.base)[0] == 200

        stack.ingest.send_signal(signal.SIGKILL)
        stack.ingest.wait(timeout=30)
        seen = await _statuses(ws, inst, "stale", 60)
        assert seen[-1]["reason"] == "ingest_silent", seen
        assert "ts_send_ns" in seen[-1]
        code, body = _readyz(stack.base)
        assert code == 503 and "ingest silent for venue coinbase" in body, (code, body)
        listing = {i["instrument"]: i["status"] for i in stack.instruments()}
        assert listing[inst] == "stale", listing

        stack.start_ingest([bundled_capture()], speed=1.0, loop=True)  # a new ingest: a new epoch
        seen = await _statuses(ws, inst, "ok", 90)
        assert seen[-1]["status"] == "ok"
        deadline = time.monotonic() + 30
        while not http_ok(stack.base + "/readyz"):
            assert time.monotonic() < deadline, _readyz(stack.base)
            await asyncio.sleep(0.1)
        assert "resumed" in stack.log("gateway") and "marked stale (ingest_silent)" in stack.log("gateway")
