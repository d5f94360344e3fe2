"""``bookcast tail``: a live top of book for one instrument, from a gateway's WebSocket.

Output (``render``), refreshed in place on a terminal; one line per refresh (``render_line``) when ``out``
is not a terminal::

    coinbase:BAND-GBP  epoch e7f3c2  seq 43  via ws://127.0.0.1:8080/v1/ws
    bid 14.755 x 3.1  ask 14.806 x 1.2  spread 0.051  mid 14.7805
          size      bid | ask       size
           3.1   14.755 | 14.806     1.2
            20    14.75 |
    latency ms  send->recv 0.210  publish->recv 0.734  event->recv 41.502  (last update 120.000 ms ago)
    msgs/s 12.0  gaps 0  resyncs 0  reconnects 0

Latencies are those of the last applied snapshot or delta (PROTOCOL.md section 4 timestamps); event->recv
falls back to the ingest time when the venue gives no event time.

Exit codes: 0 stopped (Ctrl-C) or ``--once`` printed its frame; 1 the gateway answered
``unknown_instrument``; 2 no connection (or, with ``--once``, no snapshot) within ``--connect-timeout-s``.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TextIO

from feed.book import L2Book
from feed.client.sdk import BookClient, Connected
from feed.client.verify import ErrorReceived
from feed.model import Side, canonical

DEFAULT_URL = "ws://127.0.0.1:8080/v1/ws"

_HOME = "\x1b[H"
_CLEAR_SCREEN = "\x1b[2J"
_CLEAR_LINE_END = "\x1b[K"
_CLEAR_BELOW = "\x1b[J"


@dataclass(slots=True)
class TailState:
    """What ``render`` shows besides the book. Times in ns since the Unix epoch, durations in ns."""

    instrument: str
    depth: int = 5
    url: str | None = None  # connected gateway, None while (re)connecting
    epoch: str | None = None
    seq: int | None = None
    last_recv_ns: int | None = None
    latency_ns: int | None = None  # ts_send_ns -> recv
    publish_latency_ns: int | None = None  # ts_publish_ns -> recv
    e2e_ns: int | None = None  # ts_event_ns (or ts_ingest_ns) -> recv
    messages_per_s: float = 0.0
    gaps: int = 0  # detected gaps plus checksum mismatches
    resyncs: int = 0  # requested by us plus announced by the server
    reconnects: int = 0


def render(book: L2Book | None, state: TailState, now_ns: int) -> str:
    """The full frame (lines joined with ``\\n``, no trailing newline). ``book`` is None while awaiting a
    snapshot. ``now_ns`` dates "last update ... ago"."""
    where = f"via {state.url}" if state.url else "connecting..."
    position = f"epoch {state.epoch}  seq {state.seq}" if state.epoch is not None else "awaiting snapshot"
    lines = [f"{state.instrument}  {position}  {where}"]
    if book is not None:
        lines.append(
            f"bid {_level(book.best_bid())}  ask {_level(book.best_ask())}  "
            f"spread {_dec(book.spread())}  mid {_dec(book.mid())}"
        )
        bids, asks = book.wire_levels(Side.BID, state.depth), book.wire_levels(Side.ASK, state.depth)
        width = max([len(x) for level in bids + asks for x in level] + [4])
        lines.append(f"{'size':>{width}} {'bid':>{width}} | {'ask':<{width}} {'size':>{width}}")
        for i in range(max(len(bids), len(asks), 1)):
            left = " ".join(f"{x:>{width}}" for x in reversed(bids[i])) if i < len(bids) else " " * (2 * width + 1)
            right = f"{asks[i][0]:<{width}} {asks[i][1]:>{width}}" if i < len(asks) else ""
            lines.append(f"{left} | {right}".rstrip())
    age = "" if state.last_recv_ns is None else f"  (last update {_ms(now_ns - state.last_recv_ns)} ms ago)"
    lines.append(
        f"latency ms  send->recv {_ms(state.latency_ns)}  publish->recv {_ms(state.publish_latency_ns)}  "
        f"event->recv {_ms(state.e2e_ns)}{age}"
    )
    lines.append(_counters(state))
    return "\n".join(lines)


def render_line(book: L2Book | None, state: TailState, now_ns: int) -> str:
    """One-line summary for logs and pipes (no trailing newline)."""
    head = f"{state.instrument} {state.epoch}:{state.seq}" if state.epoch is not None else f"{state.instrument} -"
    if book is None:
        top = "awaiting snapshot"
    else:
        top = (
            f"bid {_level(book.best_bid())} ask {_level(book.best_ask())} "
            f"spread {_dec(book.spread())} mid {_dec(book.mid())}"
        )
    latency = (
        f"lat_ms send {_ms(state.latency_ns)} publish {_ms(state.publish_latency_ns)} event {_ms(state.e2e_ns)}"
    )
    return f"{head} {top} {latency} {_counters(state)}"


def _counters(state: TailState) -> str:
    return (
        f"msgs/s {state.messages_per_s:.1f}  gaps {state.gaps}  resyncs {state.resyncs}  "
        f"reconnects {state.reconnects}"
    )


def _ms(ns: int | None) -> str:
    return "-" if ns is None else f"{ns / 1e6:.3f}"


def _dec(value: Decimal | None) -> str:
    return "-" if value is None else canonical(value)


def _level(level: tuple[Decimal, Decimal] | None) -> str:
    return "-" if level is None else f"{canonical(level[0])} x {canonical(level[1])}"


def _state(client: BookClient, instrument: str, depth: int, messages_per_s: float) -> TailState:
    stats = client.stats
    state = TailState(
        instrument,
        depth=depth,
        url=client.connected_url,
        messages_per_s=messages_per_s,
        gaps=stats.gaps + stats.checksum_mismatches,
        resyncs=stats.resyncs_requested + sum(stats.resyncs_received.values()),
        reconnects=stats.reconnects,
    )
    local = client.local_book(instrument)
    if local is not None:
        state.epoch, state.seq, state.last_recv_ns = local.epoch, local.seq, local.last_recv_ns
        state.latency_ns, state.publish_latency_ns, state.e2e_ns = (
            local.latency_ns, local.publish_latency_ns, local.e2e_ns,
        )
    return state


async def tail(
    urls: list[str],
    instrument: str,
    *,
    depth: int = 5,
    refresh_s: float = 0.25,
    out: TextIO | None = None,
    once: bool = False,
    connect_timeout_s: float = 10.0,
    stop: asyncio.Event | None = None,
    clock_ns: Callable[[], int] = time.time_ns,
) -> int:
    """Show a live top of book of ``instrument`` on ``out`` every ``refresh_s`` s until ``stop`` is set.

    ``out`` defaults to ``sys.stdout``. ``once``: print one full frame as soon as the first snapshot is
    held, then return. Returns the exit code of the module docstring; problems are reported on stderr.
    """
    out = out or sys.stdout
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    tty = getattr(out, "isatty", lambda: False)()
    give_up_s = loop.time() + connect_timeout_s
    ever_connected = False
    client = BookClient(urls, [instrument], connect_timeout_s=min(connect_timeout_s, 5.0), clock_ns=clock_ns)
    async with client:
        next_frame_s = last_frame_s = loop.time()
        last_messages = 0
        first_frame = True
        while not stop.is_set():
            event = await client.next_event(max(0.0, next_frame_s - loop.time()))
            if isinstance(event, Connected):
                ever_connected = True
            elif isinstance(event, ErrorReceived):
                print(f"tail: error {event.code}: {event.message}", file=sys.stderr)
                if event.code == "unknown_instrument":
                    return 1
            book = client.book(instrument)
            now_s = loop.time()
            if now_s > give_up_s and (not ever_connected or (once and book is None)):
                what = f"connect to {' '.join(urls)}" if not ever_connected else f"get a snapshot of {instrument}"
                print(f"tail: could not {what} within {connect_timeout_s} s", file=sys.stderr)
                return 2
            if once:
                if book is not None:
                    out.write(render(book, _state(client, instrument, depth, 0.0), clock_ns()) + "\n")
                    out.flush()
                    return 0
                next_frame_s = now_s + refresh_s  # wake on the next event, or to check the deadline
                continue
            if now_s < next_frame_s:
                continue
            rate = (client.stats.messages - last_messages) / max(now_s - last_frame_s, 1e-9)
            last_messages, last_frame_s, next_frame_s = client.stats.messages, now_s, now_s + refresh_s
            state = _state(client, instrument, depth, rate)
            if tty:
                frame = render(book, state, clock_ns()).replace("\n", _CLEAR_LINE_END + "\n")
                out.write((_CLEAR_SCREEN if first_frame else "") + _HOME + frame + _CLEAR_LINE_END + _CLEAR_BELOW)
                first_frame = False
            else:
                out.write(render_line(book, state, clock_ns()) + "\n")
            out.flush()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bookcast tail``: instrument, --url (repeatable), --depth, --refresh-s, --once,
    --connect-timeout-s."""
    parser.add_argument("instrument", help="instrument id, e.g. coinbase:BAND-GBP")
    parser.add_argument(
        "--url", action="append", default=None,
        help=f"gateway WebSocket URL; repeat for failover (default {DEFAULT_URL})",
    )
    parser.add_argument("--depth", type=int, default=5, help="levels shown per side (default 5)")
    parser.add_argument("--refresh-s", type=float, default=0.25, help="seconds between refreshes (default 0.25)")
    parser.add_argument("--once", action="store_true", help="print one frame after the first snapshot and exit")
    parser.add_argument(
        "--connect-timeout-s", type=float, default=10.0,
        help="give up (exit 2) when no connection, or with --once no snapshot, within this many seconds",
    )


async def main_async(args: argparse.Namespace) -> int:
    """Run ``tail`` with parsed ``add_arguments`` args; Ctrl-C stops it with exit code 0."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        loop.add_signal_handler(signal.SIGINT, stop.set)
        handled = True
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
        handled = False
    try:
        return await tail(
            args.url or [DEFAULT_URL], args.instrument, depth=args.depth, refresh_s=args.refresh_s,
            once=args.once, connect_timeout_s=args.connect_timeout_s, stop=stop,
        )
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGINT)
