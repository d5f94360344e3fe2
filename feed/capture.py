"""Capture files (PROTOCOL.md section 9): read, replay as if live, write, and record from a live venue.

A capture is JSON Lines, one message per line in receive order::

    {"recv_ts_ns": 1618677817118782976, "venue": "coinbase", "msg": {"type": "l2update", ...}}

``msg`` is the raw venue message as JSON-decoded from one WebSocket text frame (a frame holding a JSON
array stays an array; a text frame that is not JSON, such as Polymarket's ``"PONG"``, is kept as a JSON
string). Files whose name ends in ``.gz`` are gzip-compressed.

An adapter module: it does file and network I/O and reads the clock. The clock and sleep are parameters
so tests can drive time.
"""
from __future__ import annotations

import asyncio
import gzip
import math
import time
from importlib import resources
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import aiohttp
import orjson

from feed.errors import RemoteError
from feed.venues import VENUES, UnknownVenue

BUNDLED_CAPTURE = "coinbase-level2-20210417.jsonl.gz"


def bundled_capture() -> Path:
    """Path of the bundled Coinbase recording (shipped with its licence in ``feed/data``)."""
    return Path(str(resources.files("feed") / "data" / BUNDLED_CAPTURE))


StrPath = str | PathLike[str]
ClockNs = Callable[[], int]
Sleep = Callable[[float], Awaitable[Any]]

DEFAULT_URLS = {
    "coinbase": "wss://ws-feed.exchange.coinbase.com",
    "polymarket": "wss://ws-subscriptions-clob.polymarket.com/ws/market",
}
# Application-level keepalive text some venues require (Polymarket closes idle market-channel
# connections unless the client sends "PING" about every 10 s; it answers "PONG").
KEEPALIVE_TEXT = {"polymarket": "PING"}
# With speed=None, replay still yields to the event loop after this many records without a sleep.
YIELD_EVERY_RECORDS = 256


class CaptureError(RemoteError):
    """A capture file is malformed. The message names the file and the 1-based line number."""


@dataclass(frozen=True, slots=True)
class CaptureRecord:
    """One capture line: ``recv_ts_ns`` (wall-clock ns when the recorder received ``msg``), the venue
    name, and the raw venue message."""

    recv_ts_ns: int
    venue: str
    msg: Any


@dataclass(frozen=True, slots=True)
class ReplayItem:
    """A record released by ``replay``.

    ``shift_ns`` maps the record's recorded timestamps into replay wall-clock time:
    ``record.recv_ts_ns + shift_ns`` is the time it was scheduled for release, and a venue event time
    rebased as ``ts_event_ns + shift_ns`` keeps the recorded upstream latency (recv - event) exactly,
    at any speed. ``pass_index`` counts passes over the file from 0 (``loop=True`` makes more than one).
    """

    record: CaptureRecord
    shift_ns: int
    pass_index: int


def _open(path: StrPath, mode: str) -> IO[bytes]:
    """Open ``path`` in binary ``mode`` (``"rb"``/``"wb"``), gzip if the name ends in ``.gz``."""
    if Path(path).suffix == ".gz":
        return gzip.open(path, mode)  # type: ignore[return-value]
    return open(path, mode)


def read_capture(path: StrPath) -> Iterator[CaptureRecord]:
    """Yield the records of a capture file in file order. Blank lines are skipped.

    Raises:
        CaptureError: a line that is not JSON, not an object, or lacks an int ``recv_ts_ns``, a non-empty
            string ``venue`` or a ``msg``; the message says ``<path>:<line>: <what is wrong>``.
        OSError: the file cannot be read.
    """
    with _open(path, "rb") as lines:
        for line_no, line in enumerate(lines, start=1):
            if line.strip():
                yield _record_of(line, path, line_no)


def _record_of(line: bytes, path: StrPath, line_no: int) -> CaptureRecord:
    where = f"{path}:{line_no}"
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise CaptureError(f"{where}: not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CaptureError(f"{where}: a capture line must be a JSON object, got {type(obj).__name__}")
    recv_ts_ns = obj.get("recv_ts_ns")
    if isinstance(recv_ts_ns, bool) or not isinstance(recv_ts_ns, int):
        raise CaptureError(f"{where}: field 'recv_ts_ns' must be an integer (ns), got {recv_ts_ns!r}")
    venue = obj.get("venue")
    if not isinstance(venue, str) or not venue:
        raise CaptureError(f"{where}: field 'venue' must be a non-empty string, got {venue!r}")
    if "msg" not in obj:
        raise CaptureError(f"{where}: missing field 'msg'")
    return CaptureRecord(recv_ts_ns, venue, obj["msg"])


async def replay(
    path: StrPath,
    *,
    speed: float | None = 1.0,
    loop: bool = False,
    clock_ns: ClockNs = time.time_ns,
    sleep: Sleep = asyncio.sleep,
) -> AsyncIterator[ReplayItem]:
    """Release a capture's records as if the venue were sending them live.

    Pacing (``speed`` a positive number): the record with recorded time ``r`` in pass ``p`` is released
    at ``start_ns + (r + p * period_ns - first_ns) / speed``, where ``start_ns`` is ``clock_ns()`` when
    replay starts and ``first_ns`` the first record's ``recv_ts_ns``. Every release is scheduled against
    that fixed start (an absolute schedule), so sleep overshoot never accumulates; a record already
    late is released at once. ``shift_ns`` is the scheduled release time minus ``r``: the record's own
    receive time maps to its release time, gaps between records are divided by ``speed``, and the
    latency of each record (recv - event) is kept unscaled.

    ``speed=None``: as fast as the consumer takes them; ``shift_ns`` is ``clock_ns()`` at release minus
    ``r``. Either way the generator yields to the event loop at least every ``YIELD_EVERY_RECORDS``
    records.

    ``loop=True``: after the last record, start again from the top, forever. Each pass is shifted by
    ``period_ns`` = the file's span (last - first ``recv_ts_ns``) plus its mean gap between records
    (at least 1 ns), so replayed timestamps keep moving forward: the next pass's first record comes one
    mean gap after this pass's last. An empty capture yields nothing, even with ``loop=True``.

    The file stays open while the generator is suspended: to stop early, close it
    (``async with contextlib.aclosing(replay(...)) as items``).

    Raises:
        ValueError: ``speed`` is not None and not a finite positive number.
        CaptureError: a malformed line (when it is reached).
    """
    if speed is not None and not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"speed must be a finite positive number or None, got {speed!r}")
    start_ns = clock_ns()
    first_ns: int | None = None
    period_ns = 0
    pass_index = 0
    since_yield = 0
    while True:
        count = 0
        last_ns = 0
        for record in read_capture(path):
            if first_ns is None:
                first_ns = record.recv_ts_ns
            count += 1
            last_ns = record.recv_ts_ns
            if speed is None:
                release_ns = clock_ns()
            else:
                release_ns = start_ns + round((record.recv_ts_ns + pass_index * period_ns - first_ns) / speed)
                wait_ns = release_ns - clock_ns()
                if wait_ns > 0:
                    await sleep(wait_ns / 1e9)
                    since_yield = 0
            since_yield += 1
            if since_yield >= YIELD_EVERY_RECORDS:
                await sleep(0)
                since_yield = 0
            yield ReplayItem(record, release_ns - record.recv_ts_ns, pass_index)
        if not loop or first_ns is None:
            return
        if pass_index == 0:
            span_ns = last_ns - first_ns
            period_ns = span_ns + max(1, span_ns // max(1, count - 1))
        pass_index += 1


class CaptureWriter:
    """Append-only capture writer: one JSON line per ``write``, flushed at once (a crash loses at most
    the line being written). Gzip-compressed if the path ends in ``.gz``. Truncates an existing file.

    Use as a context manager, or call ``close()``. ``count`` is the number of records written.
    """

    def __init__(self, path: StrPath) -> None:
        self.path = path
        self.count = 0
        self._file = _open(path, "wb")

    def write(self, recv_ts_ns: int, venue: str, msg: Any) -> None:
        """Write one record. ``msg`` must be JSON-serializable (orjson; ints within 64 bits).

        Raises:
            TypeError: ``msg`` cannot be serialized (orjson.JSONEncodeError).
        """
        self._file.write(orjson.dumps({"recv_ts_ns": recv_ts_ns, "venue": venue, "msg": msg}) + b"\n")
        self._file.flush()
        self.count += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def default_subscribe(venue: str, symbols: list[str]) -> list[dict[str, Any]]:
    """The subscribe messages to send after connecting to ``DEFAULT_URLS[venue]``.

    coinbase: ``[{"type": "subscribe", "product_ids": symbols, "channels": ["level2_batch", "matches"]}]``
    (``level2_batch``: the same ``snapshot``/``l2update`` messages as ``level2``, batched every 50 ms, and
    the one Coinbase serves without authentication). polymarket: ``[{"assets_ids": symbols, "type": "market"}]``
    with token ids as symbols.

    Raises:
        UnknownVenue: a venue with no known subscribe message.
    """
    if venue == "coinbase":
        return [{"type": "subscribe", "product_ids": list(symbols), "channels": ["level2_batch", "matches"]}]
    if venue == "polymarket":
        return [{"assets_ids": list(symbols), "type": "market"}]
    raise UnknownVenue(f"unknown venue {venue!r}; known venues: {', '.join(sorted(VENUES))}")


async def record(
    url: str,
    venue: str,
    subscribe: list[Any],
    out_path: StrPath,
    *,
    duration_s: float | None = None,
    max_messages: int | None = None,
    clock_ns: ClockNs = time.time_ns,
    keepalive_interval_s: float = 10.0,
) -> int:
    """Record a live venue WebSocket into a capture file; return the number of records written.

    Connects to ``url``, sends each of ``subscribe`` as a JSON text frame, then writes every text frame
    received, stamped with ``clock_ns()`` taken on receipt, until ``duration_s`` (seconds since connecting,
    measured on the event loop's monotonic clock) has passed, ``max_messages`` records are written, or
    the venue closes the connection (not an error: the count so far is returned). Both limits None means
    record until the venue closes or the task is cancelled. Binary frames are not recorded. For venues in
    ``KEEPALIVE_TEXT`` the keepalive text is sent every ``keepalive_interval_s``; the venue's replies are
    recorded like any other text frame (as JSON strings if not JSON).

    Raises:
        aiohttp.ClientError: the connection failed or broke.
        OSError: the capture file cannot be written.
    """
    keepalive_text = KEEPALIVE_TEXT.get(venue)
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        for message in subscribe:
            await ws.send_str(orjson.dumps(message).decode())
        keepalive = None
        if keepalive_text is not None:
            keepalive = asyncio.create_task(_keepalive(ws, keepalive_text, keepalive_interval_s))
        try:
            with CaptureWriter(out_path) as writer:
                deadline = asyncio.timeout(duration_s)
                try:
                    async with deadline:
                        while max_messages is None or writer.count < max_messages:
                            frame = await ws.receive()
                            recv_ts_ns = clock_ns()
                            if frame.type is aiohttp.WSMsgType.TEXT:
                                writer.write(recv_ts_ns, venue, _decode_text(frame.data))
                            elif frame.type is aiohttp.WSMsgType.ERROR:
                                raise aiohttp.ClientError(f"websocket error from {url}: {ws.exception()!r}")
                            elif frame.type in _CLOSING_FRAMES:
                                break
                except TimeoutError:
                    if not deadline.expired():
                        raise
            return writer.count
        finally:
            if keepalive is not None:
                keepalive.cancel()
                # A keepalive that failed on a closing connection changes nothing: the receive loop saw it.
                await asyncio.gather(keepalive, return_exceptions=True)


_CLOSING_FRAMES = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


def _decode_text(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


async def _keepalive(ws: aiohttp.ClientWebSocketResponse, text: str, interval_s: float) -> None:
    while not ws.closed:
        await asyncio.sleep(interval_s)
        await ws.send_str(text)
