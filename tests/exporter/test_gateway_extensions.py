"""The gateway's additive latency and REST extensions on a real stack (docs/protocol-notes.md): write stamps
splitting the client side, ``/v1/book/{id}?depth=N``, and venue metadata in ``/v1/instruments``."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import aiohttp
import pytest

from exporter.probe import with_write_stamps
from feed.client import BookClient, BookUpdated, UpdateKind
from feed.hops import Hop
from feed.stack import bundled_capture
from tests.e2e.harness import Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory, shared_data):
    s = Stack(tmp_path_factory.mktemp("extensions"))
    try:
        s.start_nats()
        s.start_gateway()
        s.start_ingest([bundled_capture(), shared_data / "polymarket" / "sol-15m-20251211.jsonl"], speed=1.0, loop=True)
        s.wait_instruments(12)
        yield s
    finally:
        s.stop()


def test_rest_book_at_a_depth(stack):
    full = json.loads(urllib.request.urlopen(stack.base + "/v1/book/coinbase:SKL-USD", timeout=5).read())
    cut = json.loads(urllib.request.urlopen(stack.base + "/v1/book/coinbase:SKL-USD?depth=3", timeout=5).read())
    assert len(full["bids"]) > 3 and len(cut["bids"]) == 3 and len(cut["asks"]) == 3 and cut["depth"] == 3
    assert cut["bids"] == full["bids"][:3] or cut["seq"] != full["seq"]
    assert "depth" not in full and cut["ts_send_ns"] > 0
    for bad in ("0", "-2", "x"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{stack.base}/v1/book/coinbase:SKL-USD?depth={bad}", timeout=5)
        assert info.value.code == 400 and json.loads(info.value.read())["code"] == "bad_request"


def test_instruments_carry_the_venues_metadata(stack):
    listing = {i["instrument"]: i for i in stack.instruments()}
    poly = [i for name, i in listing.items() if name.startswith("polymarket:")]
    assert len(poly) == 2 and all(i["market"] == "sol-15m-1765450800" for i in poly)
    assert "market" not in listing["coinbase:SKL-USD"]  # the Coinbase level2 channel gives none


async def test_write_stamps_split_the_gateway_queue_from_the_network(stack):
    # a raw client asking for them: a notice precedes every socket write and counts its frames
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(with_write_stamps(stack.ws_url)) as ws:
            await ws.send_str(json.dumps({"op": "subscribe", "id": 1, "instruments": ["coinbase:SKL-USD"]}))
            notices, covered, data = 0, 0, 0
            while data < 20:
                msg = json.loads((await asyncio.wait_for(ws.receive(), 30)).data)
                if msg["type"] == "write_stamp":
                    assert covered == 0 and msg["frames"] >= 1 and msg["ts_write_ns"] > 0
                    notices, covered = notices + 1, msg["frames"]
                    continue
                assert covered > 0, f"a frame without its write_stamp: {msg['type']}"
                covered -= 1
                data += msg["type"] == "delta"
            assert notices >= 1
        # a client not asking gets none (the protocol unchanged)
        async with http.ws_connect(stack.ws_url) as ws:
            await ws.send_str(json.dumps({"op": "subscribe", "id": 1, "instruments": ["coinbase:SKL-USD"]}))
            for _ in range(5):
                assert json.loads((await asyncio.wait_for(ws.receive(), 30)).data)["type"] != "write_stamp"
    # the SDK stamps covered messages, so the hops split
    deltas = 0
    async with BookClient([with_write_stamps(stack.ws_url)], ["coinbase:SKL-USD"]) as client:
        async def read():
            nonlocal deltas
            async for event in client:
                if isinstance(event, BookUpdated) and event.kind is UpdateKind.DELTA:
                    assert event.msg["ts_write_ns"] >= event.msg["ts_send_ns"]
                    assert Hop.GATEWAY_QUEUE in event.hops and event.hops[Hop.GATEWAY_QUEUE] >= 0
                    assert event.hops[Hop.NETWORK] == event.recv_ns - event.msg["ts_write_ns"]
                    deltas += 1
                    if deltas == 20:
                        return
        await asyncio.wait_for(read(), 60)
