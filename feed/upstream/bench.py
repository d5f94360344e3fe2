"""Figures for issue 16 part A (a command, not a test): ``python -m feed.upstream.bench [--json FILE]``.

1. Parse cost per venue message on real recordings, with the per-provider ``VenueSession`` seq checks,
   as microseconds per message and as a ratio to the Coinbase Exchange parser measured in the same run
   (the machine is shared and noisy: compare ratios, not absolutes).
2. Reconnect time of a ``VenueLink`` after its provider drops the connection: a real ``bookcast simulate``
   (Kalshi, from a Polymarket recording) told to ``disconnect``, timed from the HTTP request to the next
   ``LinkEvent.CONNECTED`` (the backoff's first draw is in [10, 50] ms).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from feed.capture import read_capture
from feed.simulator.proc import simulator
from feed.simulator.world import RENDERERS, World
from feed.venues import session_for

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _kalshi_messages(path: Path) -> list:
    world = World("kalshi")
    records = list(read_capture(path))
    renderer = RENDERERS["kalshi"](world)
    symbols = sorted({s.upper() for r in records if isinstance(r.msg, dict) and (s := r.msg.get("asset_id"))})
    out = renderer.subscribe({"id": 1, "cmd": "subscribe",
                              "params": {"channels": ["orderbook_delta", "trade"], "market_tickers": symbols}}, 1)
    for record in records:
        out += renderer.render(world.apply(record, 0), 1)
    return out


def _levels(event) -> int:
    """Price levels an event carries (snapshot levels, delta changes; a trade counts one)."""
    if hasattr(event, "bids"):
        return len(event.bids) + len(event.asks)
    return len(getattr(event, "changes", ())) or 1


def parse_costs(rounds: int = 3) -> list[dict]:
    inputs = {
        "coinbase exchange (peer)": [r.msg for r in read_capture(DATA / "coinbase/coinbase-level2-20210417.jsonl")],
        "coinbase advanced": [r.msg for r in read_capture(DATA / "coinbase-advanced/coinbase-advanced-level2-20260809.jsonl.gz")],
        "polymarket book": [r.msg for r in read_capture(DATA / "polymarket/btc-1h-20251211.jsonl")],
        "kalshi (simulated from sol-15m)": _kalshi_messages(DATA / "polymarket/sol-15m-20251211.jsonl"),
    }
    venue = {"coinbase exchange (peer)": "coinbase", "coinbase advanced": "coinbase", "polymarket book": "polymarket",
             "kalshi (simulated from sol-15m)": "kalshi"}
    rows = []
    for name, msgs in inputs.items():
        best = float("inf")
        for _ in range(rounds):
            session = session_for(venue[name])
            start = time.perf_counter()
            for msg in msgs:
                session.parse(msg)
            best = min(best, time.perf_counter() - start)
        levels = sum(_levels(e) for msg in msgs for e in session_for(venue[name]).parse(msg).events)
        rows.append({"input": name, "messages": len(msgs), "levels": levels, "us_per_message": best / len(msgs) * 1e6,
                     "us_per_level": best / max(1, levels) * 1e6})
    peer = rows[0]["us_per_message"]
    for row in rows:
        row["ratio_to_peer"] = row["us_per_message"] / peer
    return rows


async def reconnect_times(n: int = 10) -> dict:
    from feed.upstream import LinkEvent, ProviderSpec
    from feed.upstream.links import VenueLink

    times_ms = []
    with simulator("kalshi", DATA / "polymarket/sol-15m-20251211.jsonl", extra=["--speed", "20"]) as sim:
        connected = asyncio.Event()

        def on_event(event, detail):
            if event is LinkEvent.CONNECTED:
                connected.set()

        link = VenueLink(ProviderSpec("bench", "kalshi", sim.ws_url, rest_url=sim.base))
        task = asyncio.create_task(link.run(sim.status()["instruments"], lambda r: None, on_event))
        await asyncio.wait_for(connected.wait(), 20)
        for _ in range(n):
            connected.clear()
            start = time.perf_counter()
            await asyncio.to_thread(sim.faults, disconnect=True)
            await asyncio.wait_for(connected.wait(), 20)
            times_ms.append((time.perf_counter() - start) * 1e3)
            await asyncio.sleep(0.2)
        task.cancel()
    return {"disconnects": n, "median_ms": statistics.median(times_ms), "max_ms": max(times_ms)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m feed.upstream.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if not DATA.is_dir():
        print(f"shared data not found at {DATA}", file=sys.stderr)
        return 2
    print("parsing the real recordings ...", file=sys.stderr)
    costs = parse_costs()
    print("timing reconnects against a simulator ...", file=sys.stderr)
    reconnect = asyncio.run(reconnect_times())
    print("| input | messages | levels | us/message | us/level | us/message vs Coinbase Exchange |\n|---|---|---|---|---|---|")
    for row in costs:
        print(f"| {row['input']} | {row['messages']} | {row['levels']} | {row['us_per_message']:.1f} | "
              f"{row['us_per_level']:.2f} | {row['ratio_to_peer']:.2f} |")
    print(f"\nreconnect after a provider disconnect: median {reconnect['median_ms']:.1f} ms, "
          f"max {reconnect['max_ms']:.1f} ms over {reconnect['disconnects']}")
    if args.json:
        args.json.write_text(json.dumps({"parse": costs, "reconnect": reconnect}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
