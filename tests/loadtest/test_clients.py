"""The benchmark's lean WebSocket client (``loadtest.bench.clients``) against a real aiohttp server: the
handshake, frames split across reads and fragmented, server pings answered (so heartbeats do not close
idle clients), close codes, and the delta scan against ``feed.wire``'s encoding."""
from __future__ import annotations

import asyncio
import contextlib

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

    async with _serving(handler) as url:
        yield url, seen


@contextlib.asynccontextmanager
async def _serving(handler):
    """A real aiohttp server on a loopback port with ``handler`` at ``/ws``; yields its ws:// URL."""
    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}/ws"
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


def _deltas(book, count, ts_ns):
    return [book.next_delta(ts_ns + i) for i in range(count)]


def test_the_tally_counts_chained_dup_gapped_and_early_deltas_and_clamps_latency_into_the_histogram():
    tally = lean.Tally(["bench:I0000", "bench:I0001"])
    client = lean.Client(tally, nats=False)
    tally.on_delta(client, 0, 1, 0, 0, 5_000)  # no snapshot held yet
    assert tally.errors == {"delta before the instrument's snapshot": 1} and tally.delivered == 0
    client.held = [0, 0]
    tally.on_delta(client, 0, 1, 0, 1_000_000, 3_000_000)  # chains: 2 ms
    tally.on_delta(client, 0, 1, 0, 1_000_000, 3_500_000)  # redelivered
    tally.on_delta(client, 0, 4, 3, 1_000_000, 1_000_400)  # skips seqs 2 and 3: 400 ns, below 1 us
    tally.on_delta(client, 1, 1, 0, 0, (lean.LATENCY_MAX_US + 5) * 1000)  # later than the histogram's top
    assert client.held == [4, 1] and tally.delivered == 3
    assert (tally.counts["dups"], tally.counts["gaps"], tally.counts["gap_lost"]) == (1, 1, 2)
    assert tally.latency_us == {2000: 1, 0: 1, lean.LATENCY_MAX_US + 5: 1}
    hist = tally.histogram()
    assert hist.get_total_count() == 3 and hist.get_min_value() == 1
    assert hist.get_max_value() >= lean.LATENCY_MAX_US and hist.get_value_at_percentile(50) == 2000
    # the first and last receipt of a message over this process's clients, and how many got it
    other = lean.Client(tally, nats=False)
    other.held = [0, 0]
    tally.on_delta(other, 0, 1, 0, 1_000_000, 4_000_000)
    assert tally.receipts[1 * 2 + 0] == [3_000_000, 4_000_000, 2]


def test_the_tally_signals_once_every_live_client_holds_the_final_seq():
    tally = lean.Tally(["bench:I0000"])
    a, b = lean.Client(tally, nats=True), lean.Client(tally, nats=True)
    tally.on_delta(a, 0, 1, 0, 0, 1)
    tally.finish([a, b], {"bench:I0000": 2})
    assert tally.pending == 2 and not tally.all_done.is_set()
    tally.on_delta(a, 0, 2, 1, 0, 1)
    tally.on_delta(b, 0, 2, 1, 0, 1)  # missed seq 1 (a gap): still reaches the final seq
    assert tally.all_done.is_set() and tally.counts["gap_lost"] == 1
    result = tally.result([a, b])
    assert result["delivered"] == 3 and result["hist"]


async def test_nats_messages_split_at_every_byte_with_and_without_reply_to_reach_the_tally():
    book = SyntheticBook("bench:I0000", "e1")
    payloads = _deltas(book, 3, 1_700_000_000_000_000_000)
    stream = (b"INFO {}\r\n+OK\r\nPING\r\n"
              + b"MSG md.v1.bench.I0000 1 %d\r\n%s\r\n" % (len(payloads[0]), payloads[0])
              + b"MSG md.v1.bench.I0000 1 _INBOX.x %d\r\n%s\r\n" % (len(payloads[1]), payloads[1])
              + b"PONG\r\n"
              + b"MSG md.v1.bench.I0000 1 %d\r\n%s\r\n" % (len(payloads[2]), payloads[2]))
    tally = lean.Tally(["bench:I0000"])
    client = lean.Client(tally, nats=True)
    proto = lean.WsProtocol(client, b"")
    proto.transport = _Wire()
    proto.upgraded.set_result(None)
    client.proto = proto
    for i in range(len(stream)):  # one byte per NATS read: every split point
        client.on_message(stream[i:i + 1], 1_700_000_000_001_000_000)
    assert tally.delivered == 3 and client.held == [3] and not tally.errors and client.ready.is_set()
    assert sum(tally.latency_us.values()) == 3
    assert len(proto.transport.written) == 1  # the PING answered with one PONG


async def test_nats_noise_is_an_error_and_a_malformed_msg_line_closes_the_connection():
    tally = lean.Tally(["bench:I0000"])
    client = lean.Client(tally, nats=True)
    proto = lean.WsProtocol(client, b"")
    proto.transport = _Wire()
    client.proto = proto
    client.on_message(b"MSG md.v1.bench.I0000 1 7\r\n{\"a\":1}\r\n-ERR 'Slow Consumer'\r\nWHAT\r\n", 1)
    assert tally.errors == {"nats: a message that is not a benchmark delta": 1,
                            "nats -ERR 'Slow Consumer'": 1, "nats: unknown operation b'WHAT'": 1}
    assert not proto.transport.closed
    client.on_message(b"MSG md.v1.bench.I0000 x 7\r\n", 1)
    assert tally.errors["nats: malformed MSG line"] == 1 and proto.transport.closed


def test_a_bookcast_delta_is_scanned_in_place_and_one_for_an_unknown_instrument_is_an_error():
    tally = lean.Tally(["bench:I0000"])
    client = lean.Client(tally, nats=False)
    client.held = [0]
    known, unknown = SyntheticBook("bench:I0000", "e1"), SyntheticBook("bench:I0099", "e1")
    client.on_message(wire.with_send_ts(known.next_delta(1_000_000), 2_000_000), 3_000_000)
    client.on_message(unknown.next_delta(1_000_000), 3_000_000)
    client.on_message(b'{"type":"delta","instrument":"bench:I0000"}', 3_000_000)
    assert client.held == [1] and tally.latency_us == {2000: 1}
    assert tally.errors == {"delta for an unknown instrument bench:I0099": 1,
                            "a delta without instrument, seq, prev_seq or ts_publish_ns": 1}


async def test_a_client_process_holds_its_connections_after_its_result_until_stdin_closes(tmp_path):
    """The bench reads every client process's CPU once all results are in: a process that exited after its
    own result read as zero there (one of two client processes lost: "harness" halved, "others" inflated),
    and its closes landed in the servers' measured window."""
    from loadtest.bench.ipc import Child

    open_now: set = set()
    closed: list = []

    async def handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        open_now.add(ws)
        async for _ in ws:
            pass
        open_now.discard(ws)
        closed.append(ws)
        return ws

    async with _serving(handler) as url:
        child = await Child.start("clients", "loadtest.bench.clients",
                                  ["--target", "bookcast", "--url", url, "--instruments", "", "--idle", "--clients", "3"],
                                  tmp_path / "clients.log")
        try:
            await _hold_after_result(child, open_now, closed)
        finally:
            await child.stop()


async def _hold_after_result(child, open_now: set, closed: list) -> None:
    assert (await child.expect("ready", 30))["connected"] == 3
    await child.send("finish", final_seqs={}, drain_s=0)
    result = await child.expect("result", 30)
    assert result["connected"] == 3
    await child.send("finish", final_seqs={}, drain_s=0)   # a second finish: no second result
    # alive, every connection open, after its result (the bench's counters are read now): a bounded
    # negative observation (the process used to exit within milliseconds of its result)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(child.proc.wait()), 1.5)
    assert child.proc.returncode is None and len(open_now) == 3 and closed == []
    child.proc.stdin.close()
    assert await asyncio.wait_for(child.proc.wait(), 30) == 0
    await _until(lambda: len(closed) == 3)
    assert (await child.proc.stdout.read()) == b""      # nothing more was said after the one result
