"""The benchmark's lean WebSocket client (``loadtest.bench.clients``) against a real aiohttp server: the
handshake, frames split across reads and fragmented, server pings answered (so heartbeats do not close
idle clients), close codes, and the delta scan against ``feed.wire``'s encoding."""
from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from feed import wire
from loadtest.bench import clients as lean
from loadtest.bench.publisher import SyntheticBook


def test_scan_delta_reads_what_the_tally_needs_from_a_wire_delta():
    book = SyntheticBook("bench:I0007", "e1")
    for i in range(12):
        encoded = book.next_delta(1_700_000_000_000_000_000 + i)
    for payload in (encoded, wire.with_send_ts(encoded, 42)):
        msg = wire.loads(payload)
        assert lean.scan_delta(payload) == (b"bench:I0007", msg["seq"], msg["prev_seq"], msg["ts_publish_ns"])
    assert lean.scan_delta(book.snapshot()) is None
    assert lean.scan_delta(b'{"type":"delta","instrument":"x"}') is None


class Recorder:
    def __init__(self, tally):
        self.tally = tally
        self.messages: list[bytes] = []
        self.close_codes: list[int | None] = []

    def on_message(self, payload, now):
        self.messages.append(payload)

    def on_closed(self, code):
        self.close_codes.append(code)


@pytest.fixture
async def server():
    seen = {}

    async def handler(request):
        ws = web.WebSocketResponse(heartbeat=0.3)  # pings every 0.3 s; no pong within 0.15 s closes
        await ws.prepare(request)
        seen["ws"] = ws
        async for msg in ws:
            if msg.data == "burst":
                for i in range(300):
                    await ws.send_str('{"n":%d,"pad":"%s"}' % (i, "x" * (i * 7)))
            elif msg.data == "close":
                await ws.close(code=4008, message=b"slow consumer")
            else:
                await ws.send_str("echo:" + msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}/ws", seen
    finally:
        await runner.cleanup()


async def _open(url):
    host, port, request = lean.handshake_request(url)
    rec = Recorder(lean.Tally([]))
    _, proto = await asyncio.get_running_loop().create_connection(lambda: lean.WsProtocol(rec, request), host, port)
    await asyncio.wait_for(proto.upgraded, 10)
    return rec, proto


async def _until(condition, timeout_s=10.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_messages_arrive_whole_and_in_order_and_pings_keep_the_client_alive(server):
    url, seen = server
    rec, proto = await _open(url)
    proto.send(1, b"hello")  # masked client frame: the server reads it
    await _until(lambda: rec.messages == [b"echo:hello"])
    proto.send(1, b"burst")  # 300 frames of growing size, many per read, some split over reads
    await _until(lambda: len(rec.messages) == 301)
    assert [m.split(b",")[0] for m in rec.messages[1:]] == [b'{"n":%d' % i for i in range(300)]
    assert rec.messages[-1].endswith(b"x" * 299 * 7 + b'"}')
    await asyncio.sleep(1.2)  # four heartbeat periods: unanswered pings would have closed it
    assert not proto.lost.done() and not seen["ws"].closed
    proto.send(1, b"close")
    await asyncio.wait_for(proto.lost, 10)
    assert rec.close_codes == [4008]


async def test_fragmented_messages_are_reassembled():
    got = []
    rec = Recorder(lean.Tally([]))
    rec.on_message = lambda payload, now: got.append(payload)
    proto = lean.WsProtocol(rec, b"")
    proto.upgraded.set_result(None)
    frames = b"\x01\x03abc" + b"\x00\x02de" + b"\x80\x01f" + b"\x81\x02gh"
    for i in range(len(frames)):  # one byte per read: every split point
        proto.data_received(frames[i:i + 1])
    assert got == [b"abcdef", b"gh"]


def test_client_frames_are_masked_per_rfc6455():
    for n in (0, 5, 200, 70_000):
        payload = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
        frame = lean.client_frame(2, payload)
        assert frame[0] == 0x82 and frame[1] & 0x80
        head = 2 + {126: 2, 127: 8}.get(frame[1] & 0x7F, 0)
        key, body = frame[head:head + 4], frame[head + 4:]
        assert bytes(b ^ key[i % 4] for i, b in enumerate(body)) == payload


class _Wire:
    """A transport that keeps what the client writes."""

    def __init__(self):
        self.written = []
        self.closed = False

    def write(self, data):
        self.written.append(data)

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True


async def test_an_idle_client_drops_text_frames_unread_but_answers_pings_and_closes():
    got = []
    rec = Recorder(lean.Tally([]))
    rec.idle, rec.nats = True, False
    rec.on_message = lambda payload, now: got.append(payload)
    proto = lean.WsProtocol(rec, b"")
    proto.transport = _Wire()
    proto.upgraded.set_result(None)
    heartbeat = b'{"type":"heartbeat","ts_send_ns":1,"seqs":{}}'
    proto.data_received(b"\x81" + bytes([len(heartbeat)]) + heartbeat)  # the one-frame read: dropped at once
    proto.data_received(b"\x81\x02hi\x89\x04ping")  # two frames in one read: the text one skipped, the ping answered
    assert got == [] and len(proto.transport.written) == 1
    pong = proto.transport.written[0]
    assert pong[0] == 0x8A and pong[1] == 0x80 | 4  # a masked pong carrying the ping's 4 bytes
    assert bytes(b ^ pong[2 + i % 4] for i, b in enumerate(pong[6:])) == b"ping"
    proto.data_received(b"\x88\x02\x0f\xa0")  # close 4000
    assert proto.close_code == 4000 and proto.transport.closed
    nats_idle = Recorder(lean.Tally([]))
    nats_idle.idle, nats_idle.nats = True, True
    assert not lean.WsProtocol(nats_idle, b"").skip_text  # NATS PING / PONG ride in its frames
