"""Capture files: reading real recordings, replay pacing on a fake clock, writing, and recording from a local
WebSocket server."""
from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from feed.capture import (
    DEFAULT_URLS,
    YIELD_EVERY_RECORDS,
    CaptureError,
    CaptureRecord,
    CaptureWriter,
    ReplayItem,
    default_subscribe,
    read_capture,
    record,
    replay,
)
from feed.errors import RemoteError
from feed.venues import UnknownVenue, polymarket

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MS = 1_000_000
T0 = 1_700_000_000_000_000_000  # recorded recv time of the first record in hand-made captures
START = 1_800_000_000_000_000_000  # the fake wall clock when replay starts


def write_lines(path: Path, recv_times_ns: list[int], venue: str = "coinbase") -> Path:
    with path.open("wb") as out:
        for i, recv_ts_ns in enumerate(recv_times_ns):
            out.write(orjson.dumps({"recv_ts_ns": recv_ts_ns, "venue": venue, "msg": {"type": "x", "n": i}}) + b"\n")
    return path


class FakeTime:
    """A wall clock that only moves when slept on (plus an optional oversleep per sleep) or told to."""

    def __init__(self, now_ns: int = START, oversleep_ns: int = 0) -> None:
        self.now_ns = now_ns
        self.oversleep_ns = oversleep_ns
        self.sleeps_s: list[float] = []

    def clock_ns(self) -> int:
        return self.now_ns

    async def sleep(self, seconds: float) -> None:
        self.sleeps_s.append(seconds)
        if seconds > 0:
            self.now_ns += round(seconds * 1e9) + self.oversleep_ns


async def collect(items: AsyncIterator[ReplayItem], fake: FakeTime, limit: int | None = None,
                  consume_ns: int = 0) -> list[tuple[ReplayItem, int]]:
    """(item, fake clock at release) pairs; the consumer spends ``consume_ns`` on each item."""
    out = []
    async with asyncio.timeout(10), contextlib.aclosing(items):
        async for item in items:
            out.append((item, fake.now_ns))
            fake.now_ns += consume_ns
            if len(out) == limit:
                break
    return out


# -- reading --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "venue", "lines"),
    [
        ("polymarket/btc-1h-20251211.jsonl", "polymarket", 900),
        ("polymarket/sol-15m-20251211.jsonl", "polymarket", 743),
        ("coinbase/coinbase-level2-20210417.jsonl", "coinbase", 9946),
    ],
)
def test_reads_real_captures(name, venue, lines):
    path = DATA / name
    assert path.is_file(), f"shared recording missing: {path}"
    records = list(read_capture(path))
    assert len(records) == lines
    assert {r.venue for r in records} == {venue}
    assert all(isinstance(r.msg, dict) for r in records)
    recv_times = [r.recv_ts_ns for r in records]
    assert recv_times == sorted(recv_times)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b'{"recv_ts_ns": 1, "venue": "coinbase", "msg": {', "not JSON"),
        (b'[1, "coinbase", {}]', "a capture line must be a JSON object, got list"),
        (b'{"recv_ts_ns": "1", "venue": "coinbase", "msg": {}}', "field 'recv_ts_ns' must be an integer (ns), got '1'"),
        (b'{"recv_ts_ns": 1.5, "venue": "coinbase", "msg": {}}', "field 'recv_ts_ns' must be an integer (ns), got 1.5"),
        (b'{"recv_ts_ns": true, "venue": "x", "msg": {}}', "field 'recv_ts_ns' must be an integer (ns), got True"),
        (b'{"recv_ts_ns": 1, "msg": {}}', "field 'venue' must be a non-empty string, got None"),
        (b'{"recv_ts_ns": 1, "venue": "coinbase"}', "missing field 'msg'"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, error):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"recv_ts_ns": 1, "venue": "coinbase", "msg": {"type": "ok"}}\n\n' + line + b"\n")
    records = read_capture(path)
    assert next(records) == CaptureRecord(1, "coinbase", {"type": "ok"})  # streamed: good lines come first
    with pytest.raises(CaptureError) as caught:
        next(records)
    assert str(caught.value).startswith(f"{path}:3: {error}"), str(caught.value)
    assert isinstance(caught.value, RemoteError)


# -- writing ----------------------------------------------------------------------------------------------
RECORDS = [
    CaptureRecord(T0, "coinbase", {"type": "l2update", "product_id": "BAND-GBP", "changes": [["buy", "14.755", "0"]]}),
    CaptureRecord(T0 + 1, "polymarket", [{"event_type": "book", "asset_id": "1" * 70, "bids": [], "asks": []}]),
    CaptureRecord(T0 + 2, "polymarket", "PONG"),
    CaptureRecord(T0 + 3, "coinbase", {"type": "match", "trade_id": 2**63 - 1, "note": "caf\u00e9 \u2192"}),
]


@pytest.mark.parametrize("name", ["round.jsonl", "round.jsonl.gz"])
def test_writer_round_trip(tmp_path, name):
    path = tmp_path / name
    with CaptureWriter(path) as writer:
        for rec in RECORDS:
            writer.write(rec.recv_ts_ns, rec.venue, rec.msg)
    assert writer.count == len(RECORDS)
    assert list(read_capture(path)) == RECORDS
    raw = path.read_bytes()
    if name.endswith(".gz"):
        assert raw[:2] == b"\x1f\x8b"
        raw = gzip.decompress(raw)
    assert raw.count(b"\n") == len(RECORDS)


def test_writer_flushes_each_line(tmp_path):
    path = tmp_path / "live.jsonl"
    with CaptureWriter(path) as writer:
        writer.write(T0, "coinbase", {"type": "x"})
        assert list(read_capture(path)) == [CaptureRecord(T0, "coinbase", {"type": "x"})]


def test_writer_refuses_unserializable(tmp_path):
    with CaptureWriter(tmp_path / "x.jsonl") as writer, pytest.raises(TypeError):
        writer.write(T0, "coinbase", {"price": object()})


# -- replay ---------------------------------------------------------------------------------------------
async def test_replay_schedule_is_absolute_and_drift_free(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [T0 + k * 10 * MS for k in range(100)])
    fake = FakeTime(oversleep_ns=1 * MS)  # every sleep oversleeps by 1 ms
    released = await collect(replay(path, clock_ns=fake.clock_ns, sleep=fake.sleep), fake)
    assert len(released) == 100
    for k, (item, now_ns) in enumerate(released):
        scheduled_ns = item.record.recv_ts_ns + item.shift_ns
        assert scheduled_ns == START + k * 10 * MS
        assert scheduled_ns <= now_ns <= scheduled_ns + 1 * MS  # late by at most one oversleep, never more
        assert item.pass_index == 0
    # The first record is due at once; every sleep after the first makes up for the previous oversleep.
    assert fake.sleeps_s == pytest.approx([0.010] + [0.009] * 98)
    assert fake.now_ns == START + 990 * MS + 1 * MS  # sleeping the gaps would have drifted to START + 1089 ms


async def test_replay_releases_late_records_at_once_keeping_the_schedule(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [T0, T0 + 10 * MS, T0 + 20 * MS, T0 + 200 * MS])
    fake = FakeTime()
    released = await collect(replay(path, clock_ns=fake.clock_ns, sleep=fake.sleep), fake, consume_ns=50 * MS)
    assert [item.shift_ns for item, _ in released] == [START - T0] * 4
    assert [now for _, now in released] == [START, START + 50 * MS, START + 100 * MS, START + 200 * MS]
    assert fake.sleeps_s == pytest.approx([0.050])  # only the last record was still in the future


async def test_replay_speed_scales_gaps_but_not_latency(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [T0, T0 + 40 * MS, T0 + 100 * MS])
    fake = FakeTime()
    released = await collect(replay(path, speed=4.0, clock_ns=fake.clock_ns, sleep=fake.sleep), fake)
    assert [now for _, now in released] == [START, START + 10 * MS, START + 25 * MS]
    for item, now_ns in released:
        assert item.record.recv_ts_ns + item.shift_ns == now_ns
        venue_event_ns = item.record.recv_ts_ns - 7 * MS  # recorded upstream latency 7 ms
        assert now_ns - (venue_event_ns + item.shift_ns) == 7 * MS


async def test_replay_as_fast_as_possible_still_yields_to_the_loop(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [T0 + k * 1000 * MS for k in range(600)])
    fake = FakeTime()
    released = await collect(replay(path, speed=None, clock_ns=fake.clock_ns, sleep=fake.sleep), fake, consume_ns=1)
    assert len(released) == 600
    assert fake.sleeps_s == [0] * (600 // YIELD_EVERY_RECORDS)
    for item, now_ns in released:
        assert item.record.recv_ts_ns + item.shift_ns == now_ns


async def test_replay_loop_moves_timestamps_forward_every_pass(tmp_path):
    recorded = [T0, T0 + 1000 * MS, T0 + 1000 * MS, T0 + 4000 * MS]  # span 4 s, mean gap 1.333 s
    path = write_lines(tmp_path / "c.jsonl", recorded)
    fake = FakeTime()
    released = await collect(replay(path, loop=True, clock_ns=fake.clock_ns, sleep=fake.sleep), fake, limit=12)
    assert [item.pass_index for item, _ in released] == [0] * 4 + [1] * 4 + [2] * 4
    period_ns = 4000 * MS + 4000 * MS // 3
    rebased = [item.record.recv_ts_ns + item.shift_ns for item, _ in released]
    assert rebased == [START + p * period_ns + (r - T0) for p in range(3) for r in recorded]
    assert rebased == [now for _, now in released]
    assert all(a <= b for a, b in zip(rebased, rebased[1:]))
    assert rebased[4] > rebased[3] and rebased[8] > rebased[7]  # strictly forward across passes


async def test_replay_loop_of_empty_capture_ends(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    fake = FakeTime()
    assert await collect(replay(path, loop=True, clock_ns=fake.clock_ns, sleep=fake.sleep), fake) == []


@pytest.mark.parametrize("speed", [0, -1.0, float("nan"), float("inf")])
async def test_replay_rejects_bad_speed(tmp_path, speed):
    path = write_lines(tmp_path / "c.jsonl", [T0])
    with pytest.raises(ValueError, match="speed must be"):
        await anext(replay(path, speed=speed))


async def test_replay_real_capture_time_scaled(tmp_path):
    path = DATA / "coinbase" / "coinbase-level2-20210417.jsonl"
    assert path.is_file(), f"shared recording missing: {path}"
    recorded = list(read_capture(path))
    first_ns, last_ns = recorded[0].recv_ts_ns, recorded[-1].recv_ts_ns
    assert 30_000 * MS < last_ns - first_ns < 31_000 * MS  # data/README.md: 30.8 s
    fake = FakeTime()
    released = await collect(replay(path, speed=100.0, clock_ns=fake.clock_ns, sleep=fake.sleep), fake)
    assert [item.record for item, _ in released] == recorded
    assert fake.now_ns == START + round((last_ns - first_ns) / 100)
    rebased = [item.record.recv_ts_ns + item.shift_ns for item, _ in released]
    assert all(a <= b for a, b in zip(rebased, rebased[1:]))


# -- recording -----------------------------------------------------------------------------------------
Handler = Callable[[web.WebSocketResponse], Awaitable[None]]


@contextlib.asynccontextmanager
async def ws_server(handler: Handler) -> AsyncIterator[str]:
    """A real aiohttp WebSocket server on 127.0.0.1, any free port; yields its URL."""

    async def endpoint(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await handler(ws)
        return ws

    app = web.Application()
    app.router.add_get("/ws", endpoint)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"ws://127.0.0.1:{port}/ws"
    finally:
        await runner.cleanup()


def counting_clock() -> Callable[[], int]:
    ticks = iter(range(T0, T0 + 1_000_000, 1000))
    return lambda: next(ticks)


SUBSCRIBE = default_subscribe("coinbase", ["BAND-GBP", "SKL-BTC"])
FRAMES = [
    '{"type":"snapshot","product_id":"BAND-GBP","bids":[["14.755","3.1"]],"asks":[["14.806","1.2"]]}',
    '[{"event_type":"book","asset_id":"a","bids":[],"asks":[],"timestamp":"1"},{"event_type":"book"}]',
    "not json",
    '{"type":"l2update","product_id":"BAND-GBP","changes":[],"time":"2021-04-17T16:43:37Z"}',
]


@pytest.mark.parametrize("name", ["rec.jsonl", "rec.jsonl.gz"])
async def test_record_until_max_messages(tmp_path, name):
    subscribes_seen = []

    async def venue(ws: web.WebSocketResponse) -> None:
        subscribes_seen.append(orjson.loads((await ws.receive()).data))
        for frame in FRAMES:
            await ws.send_str(frame)
        async for _ in ws:  # hold the connection open until the recorder closes it
            pass

    out = tmp_path / name
    async with ws_server(venue) as url, asyncio.timeout(10):
        count = await record(url, "coinbase", SUBSCRIBE, out, max_messages=3, clock_ns=counting_clock())
    assert count == 3
    assert subscribes_seen == SUBSCRIBE
    assert list(read_capture(out)) == [
        CaptureRecord(T0, "coinbase", orjson.loads(FRAMES[0])),
        CaptureRecord(T0 + 1000, "coinbase", orjson.loads(FRAMES[1])),  # a list frame stays a list
        CaptureRecord(T0 + 2000, "coinbase", "not json"),
    ]


async def test_record_stops_when_the_venue_closes(tmp_path):
    async def venue(ws: web.WebSocketResponse) -> None:
        await ws.receive()
        await ws.send_str(FRAMES[0])
        await ws.send_str(FRAMES[3])
        await ws.close()

    out = tmp_path / "closed.jsonl"
    async with ws_server(venue) as url, asyncio.timeout(10):
        count = await record(url, "coinbase", SUBSCRIBE, out, clock_ns=counting_clock())
    assert count == 2
    assert [r.msg["type"] for r in read_capture(out)] == ["snapshot", "l2update"]


async def test_record_for_a_duration(tmp_path):
    async def venue(ws: web.WebSocketResponse) -> None:
        await ws.receive()
        await ws.send_str(FRAMES[0])
        async for _ in ws:
            pass

    out = tmp_path / "timed.jsonl"
    loop = asyncio.get_running_loop()
    async with ws_server(venue) as url, asyncio.timeout(10):
        started_s = loop.time()
        count = await record(url, "coinbase", SUBSCRIBE, out, duration_s=0.2)
        elapsed_s = loop.time() - started_s
    assert count == 1
    assert 0.2 <= elapsed_s < 5
    (only,) = read_capture(out)
    assert only.msg == orjson.loads(FRAMES[0]) and only.venue == "coinbase"


async def test_record_sends_polymarket_keepalive(tmp_path):
    texts_seen = []

    async def venue(ws: web.WebSocketResponse) -> None:
        texts_seen.append((await ws.receive()).data)  # the subscribe
        texts_seen.append((await ws.receive()).data)  # the keepalive
        await ws.send_str("PONG")
        await ws.close()

    out = tmp_path / "poly.jsonl"
    subscribe = default_subscribe("polymarket", ["1" * 70])
    async with ws_server(venue) as url, asyncio.timeout(10):
        count = await record(url, "polymarket", subscribe, out, keepalive_interval_s=0.01)
    assert count == 1
    assert [orjson.loads(texts_seen[0]), texts_seen[1]] == [subscribe[0], "PING"]
    (pong,) = read_capture(out)
    assert pong.msg == "PONG"
    assert polymarket.parse(pong.msg).ignored == "text frame 'PONG'"


def test_default_subscribe_and_urls():
    assert default_subscribe("coinbase", ["BAND-GBP"]) == [
        {"type": "subscribe", "product_ids": ["BAND-GBP"], "channels": ["level2_batch", "matches"]}
    ]
    assert default_subscribe("polymarket", ["123", "456"]) == [{"assets_ids": ["123", "456"], "type": "market"}]
    assert DEFAULT_URLS == {
        "coinbase": "wss://ws-feed.exchange.coinbase.com",
        "polymarket": "wss://ws-subscriptions-clob.polymarket.com/ws/market",
    }
    with pytest.raises(UnknownVenue, match="known venues: coinbase, kalshi, polymarket"):
        default_subscribe("binance", ["X"])
