"""The gateway against a live looping replay: conformance, mid-stream subscribe, bad input, floods."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from decimal import Decimal

import aiohttp
import orjson
import pytest

from feed.book import L2Book
from feed.client import BookClient
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.e2e
CONFORMANCE = SHARED_DATA.parent / "tools" / "conformance.py"


def test_conformance_all_green(live_stack, shared_data):
    """../shared/tools/conformance.py, an outside client's view of PROTOCOL.md, passes every check."""
    assert CONFORMANCE.is_file(), f"missing {CONFORMANCE}"
    out = subprocess.run([sys.executable, str(CONFORMANCE), live_stack.base, "--seconds", "4"],
                         capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, out.stdout + out.stderr
    assert lines[-1].endswith(" 0 failed") and int(lines[-1].split()[0]) >= 20, lines[-1]
    assert not [ln for ln in lines if ln.startswith("FAIL")]


async def _next_json(ws: aiohttp.ClientWebSocketResponse, timeout_s: float = 5.0) -> dict:
    msg = await ws.receive(timeout=timeout_s)
    assert msg.type is aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg.type} {msg.data!r}"
    return orjson.loads(msg.data)


async def test_mid_stream_subscribe_gets_snapshot_then_contiguous_deltas(live_stack):
    listing = live_stack.instruments()
    busy = max(listing, key=lambda i: i["seq"])
    assert busy["seq"] > 0  # the stream is under way
    inst = busy["instrument"]
    async with aiohttp.ClientSession() as s, s.ws_connect(live_stack.ws_url, max_msg_size=0) as ws:
        await ws.send_str(json.dumps({"op": "subscribe", "id": "m1", "instruments": [inst]}))
        ack = await _next_json(ws)
        assert ack == {"type": "subscribed", "id": "m1", "instruments": [inst], "recovered": {inst: False}}
        first = await _next_json(ws)
        while first["type"] == "heartbeat":
            first = await _next_json(ws)
        assert first["type"] == "snapshot" and first["instrument"] == inst
        assert first["seq"] >= busy["seq"]
        book = L2Book(inst)
        book.apply_snapshot([(Decimal(p), Decimal(q)) for p, q in first["bids"]],
                            [(Decimal(p), Decimal(q)) for p, q in first["asks"]])
        assert book.checksum() == first["checksum"]
        seq, deltas = first["seq"], 0
        while deltas < 30:
            m = await _next_json(ws)
            if m["type"] != "delta":
                assert m["type"] == "heartbeat"
                continue
            assert (m["epoch"], m["prev_seq"], m["seq"]) == (first["epoch"], seq, seq + 1)
            book.apply_wire_changes(m["changes"])
            assert book.checksum() == m["checksum"]
            assert m["ts_ingest_ns"] <= m["ts_publish_ns"] <= m["ts_send_ns"]
            seq, deltas = m["seq"], deltas + 1


BAD_REQUESTS = [
    ("non-JSON", "this is not json", "bad_request", None),
    ("non-object", "[1, 2]", "bad_request", None),
    ("unknown op", json.dumps({"op": "launch", "id": 7}), "bad_request", 7),
    ("missing op", json.dumps({"id": "x"}), "bad_request", "x"),
    ("wrong type", json.dumps({"op": "subscribe", "id": 8, "instruments": "coinbase:SKL-USD"}), "bad_request", 8),
    ("wrong conflate", json.dumps({"op": "subscribe", "id": 9, "instruments": ["coinbase:SKL-USD"],
                                   "conflate_ms": 9999}), "bad_request", 9),
    ("unknown instrument", json.dumps({"op": "subscribe", "id": 10, "instruments": ["coinbase:NOPE"]}),
     "unknown_instrument", 10),
    ("too many instruments", json.dumps({"op": "subscribe", "id": 11,
                                         "instruments": [f"coinbase:X{i}" for i in range(1001)]}),
     "too_many_instruments", 11),
    ("resync unsubscribed", json.dumps({"op": "resync", "id": 12, "instrument": "coinbase:NOPE"}),
     "unknown_instrument", 12),
]


async def _expect_close(ws: aiohttp.ClientWebSocketResponse, timeout_s: float = 5.0) -> int | None:
    while True:
        msg = await ws.receive(timeout=timeout_s)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
            return ws.close_code


async def test_bad_input_gets_documented_errors_and_spares_a_healthy_client(live_stack):
    instruments = [i["instrument"] for i in live_stack.instruments()]
    async with BookClient(live_stack.ws_url, instruments) as healthy:
        await healthy.wait_for(lambda: all(healthy.book(i) is not None for i in instruments), 20)
        deltas_before = healthy.stats.deltas
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(live_stack.ws_url) as ws:
                for name, payload, code, rid in BAD_REQUESTS:
                    await ws.send_str(payload)
                    reply = await _next_json(ws)
                    while reply["type"] == "heartbeat":
                        reply = await _next_json(ws)
                    assert reply["type"] == "error", name
                    assert reply["code"] == code, (name, reply)
                    assert reply.get("id") == rid, (name, reply)
                    assert reply["message"], name
                await ws.send_str(json.dumps({"op": "ping", "id": "alive"}))
                reply = await _next_json(ws)
                assert reply["type"] == "pong" and reply["id"] == "alive"  # bad requests never close
            async with s.ws_connect(live_stack.ws_url, max_msg_size=0) as ws:
                await ws.send_str(json.dumps({"op": "ping", "pad": "x" * (65 * 1024)}))
                assert await _expect_close(ws) == 1009
            async with s.ws_connect(live_stack.ws_url) as ws:
                await ws.send_bytes(b'{"op":"ping"}')
                assert await _expect_close(ws) == 1008
            async with s.ws_connect(live_stack.ws_url) as ws:
                # A flood: far over 20/s sustained and burst 50, sent without waiting for replies.
                sent = 0
                try:
                    for i in range(400):
                        await ws.send_str(json.dumps({"op": "ping", "id": i}))
                        sent += 1
                except aiohttp.ClientConnectionResetError:
                    pass  # the gateway closed the flood (4029) before we finished sending it
                assert sent >= 150
                codes: dict[str, int] = {}
                while True:
                    msg = await ws.receive(timeout=10)
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        break
                    m = orjson.loads(msg.data)
                    key = m["type"] if m["type"] != "error" else m["code"]
                    codes[key] = codes.get(key, 0) + 1
                assert ws.close_code == 4029
                assert 50 <= codes.get("pong", 0) < sent and codes.get("rate_limited", 0) >= 99, codes
        await healthy.wait_for(lambda: healthy.stats.deltas > deltas_before + 20, 20)
        st = healthy.stats
        assert st.gaps == 0 and st.checksum_mismatches == 0 and not st.resyncs_received and st.reconnects == 0, st
        assert healthy.connected


async def test_resume_after_reconnect_replays_missed_deltas(live_stack):
    inst = max(live_stack.instruments(), key=lambda i: i["seq"])["instrument"]
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(live_stack.ws_url, max_msg_size=0) as ws:
            await ws.send_str(json.dumps({"op": "subscribe", "instruments": [inst]}))
            held = None
            while held is None:
                m = await _next_json(ws)
                if m["type"] == "snapshot":
                    held = (m["epoch"], m["seq"])
        # Disconnected while the stream goes on; come back with the seq we hold.
        while max(i["seq"] for i in live_stack.instruments() if i["instrument"] == inst) < held[1] + 3:
            await asyncio.sleep(0.05)
        async with s.ws_connect(live_stack.ws_url, max_msg_size=0) as ws:
            await ws.send_str(json.dumps({"op": "subscribe", "id": 2, "instruments": [inst],
                                          "resume": {inst: {"epoch": held[0], "seq": held[1]}}}))
            ack = await _next_json(ws)
            assert ack["type"] == "subscribed" and ack["recovered"] == {inst: True}
            seq = held[1]
            for _ in range(3):
                m = await _next_json(ws)
                while m["type"] == "heartbeat":
                    m = await _next_json(ws)
                assert m["type"] == "delta" and (m["epoch"], m["prev_seq"]) == (held[0], seq), m
                seq = m["seq"]
            # A resume the ring cannot serve falls back to a snapshot.
            await ws.send_str(json.dumps({"op": "unsubscribe", "instruments": [inst]}))
            await ws.send_str(json.dumps({"op": "subscribe", "id": 3, "instruments": [inst],
                                          "resume": {inst: {"epoch": "no-such-epoch", "seq": 1}}}))
            ack = await _next_json(ws)
            while ack["type"] != "subscribed" or ack.get("id") != 3:
                ack = await _next_json(ws)
            assert ack["recovered"] == {inst: False}
            m = await _next_json(ws)
            while m["type"] not in ("snapshot", "delta"):
                m = await _next_json(ws)
            assert m["type"] == "snapshot"


def test_bookcast_tail_once_shows_top_of_book(live_stack):
    inst = max(live_stack.instruments(), key=lambda i: i["seq"])["instrument"]
    out = subprocess.run([sys.executable, "-m", "feed.cli", "tail", inst, "--url", live_stack.ws_url, "--once"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert inst in out.stdout and "seq" in out.stdout and "spread" in out.stdout
    unknown = subprocess.run([sys.executable, "-m", "feed.cli", "tail", "coinbase:NOPE", "--url", live_stack.ws_url,
                              "--once"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1


def test_rest_endpoints(live_stack):
    import urllib.error
    import urllib.request

    listing = live_stack.instruments()
    assert {i["venue"] for i in listing} == {"coinbase"} and all(i["epoch"] for i in listing)
    inst = listing[0]["instrument"]
    with urllib.request.urlopen(f"{live_stack.base}/v1/book/{inst}") as r:
        snap = json.loads(r.read())
    book = L2Book(inst)
    book.apply_snapshot([(Decimal(p), Decimal(q)) for p, q in snap["bids"]],
                        [(Decimal(p), Decimal(q)) for p, q in snap["asks"]])
    assert snap["type"] == "snapshot" and book.checksum() == snap["checksum"] and len(book) > 0
    for path, status in (("/v1/book/coinbase:NOPE", 404), ("/v1/book/no-colon", 400)):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(live_stack.base + path)
        assert err.value.code == status
    with urllib.request.urlopen(live_stack.base + "/metrics") as r:
        text = r.read().decode()
    assert "bookcast_gateway_clients" in text and "bookcast_hop_nats_gateway_seconds_bucket" in text


async def test_one_nats_subscription_per_instrument_however_many_clients(live_stack):
    """nats-server's own monitoring view: the gateway holds one subscription per instrument it serves."""
    import urllib.request

    instruments = [i["instrument"] for i in live_stack.instruments()]
    clients = [BookClient(live_stack.ws_url, instruments) for _ in range(5)]
    for c in clients:
        await c.__aenter__()
    try:
        for c in clients:
            await c.wait_for(lambda c=c: all(c.book(i) is not None for i in instruments), 20)
        url = f"http://127.0.0.1:{live_stack.nats.monitor_port}/connz?subs=1"
        with urllib.request.urlopen(url, timeout=5) as r:
            conns = json.loads(r.read())["connections"]
        gateway = [c for c in conns if c.get("name", "").startswith("gateway")]
        assert len(gateway) == 1  # one worker, one NATS connection
        subs = gateway[0]["subscriptions_list"]
        delta_subs = [s for s in subs if s.count(".") == 3 and s.startswith("md.v1.") and "*" not in s]
        assert sorted(delta_subs) == sorted(f"md.v1.coinbase.{i.split(':', 1)[1]}" for i in instruments)
    finally:
        for c in clients:
            await c.close()
