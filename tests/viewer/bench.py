"""Viewer benchmark: does the page keep up with a busy book? Figures, not a test.

    .venv/bin/python -m tests.viewer.bench                       # 20 s at 4x on coinbase:SKL-USD
    .venv/bin/python -m tests.viewer.bench --speed 8 --duration-s 30 --out run/bench/viewer
    .venv/bin/python -m tests.viewer.bench --micro               # the page's book code alone, per operation

Starts nats-server, one gateway worker and an ingest looping the bundled Coinbase recording at
``--speed``; opens the viewer in headless Chromium on ``--instrument`` and, in the same run, a plain
Python WebSocket client (aiohttp, no verification: the peer) on the same instrument. After
``--duration-s`` it downloads what the page saw and reports, for both, the gateway -> client latency of
every delta (``recv_ts_ns - ts_send_ns``; the page's receive time is taken in its WebSocket handler, on
the browser's main thread) as p50/p99/max and the page/peer ratios, plus the page's work per frame
(parse, verify the CRC-32, record) and its checksum failures. Writes ``OUT.json`` and prints Markdown.
Every process it starts it stops, by PID. Exit 0 ok, 1 a failure (the page failed a checksum or fell
behind), 2 usage.

``--micro``: no stack; in the same browser, the page's own modules on a 1,000-level-per-side book: one
snapshot load, then 20,000 single-level deltas applied, 20,000 checksums, 20,000 JSON.parse of a delta
frame, in µs per operation (``OUT-micro.json``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

from feed.stack import bundled_capture
from tests.e2e.harness import Stack
from tests.viewer.browser import Browser, missing


def quantiles(samples_ns: list[int]) -> dict[str, float | int]:
    s = sorted(samples_ns)
    if not s:
        return {"n": 0}
    pick = lambda q: s[min(len(s) - 1, max(0, int(q * len(s) + 0.999999) - 1))]  # noqa: E731 - nearest rank
    return {"n": len(s), "p50_us": pick(0.5) / 1e3, "p99_us": pick(0.99) / 1e3, "max_us": s[-1] / 1e3}


class Peer(threading.Thread):
    """A plain WebSocket client on its own event loop: ``recv_ns - ts_send_ns`` of every delta."""

    def __init__(self, ws_url: str, instrument: str) -> None:
        super().__init__(daemon=True, name="bench-peer")
        self.ws_url, self.instrument = ws_url, instrument
        self.samples_ns: list[int] = []
        self.first_recv_ns = self.last_recv_ns = 0
        self.stop = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(self.ws_url) as ws:
            await ws.send_str(json.dumps({"op": "subscribe", "instruments": [self.instrument], "channels": ["book", "trades"]}))
            while not self.stop.is_set():
                try:
                    frame = await ws.receive(timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                recv_ns = time.time_ns()
                if frame.type is not aiohttp.WSMsgType.TEXT:
                    break
                msg = json.loads(frame.data)
                if msg.get("type") == "delta":
                    self.samples_ns.append(recv_ns - msg["ts_send_ns"])
                    self.first_recv_ns = self.first_recv_ns or recv_ns
                    self.last_recv_ns = recv_ns


MICRO_JS = """
const done = arguments[0];
Promise.all([import('/static/book.js'), import('/static/decimal.js')]).then(([bk, dc]) => {
  const bids = [], asks = [];
  for (let i = 0; i < 1000; i++) {
    bids.push([dc.canonical((0.5 - i * 0.0001).toFixed(4)), String(10 + i)]);
    asks.push([dc.canonical((0.51 + i * 0.0001).toFixed(4)), String(10 + i)]);
  }
  const book = new bk.Book();
  let t = performance.now(); book.loadSnapshot(bids, asks); const snapshot = performance.now() - t;
  const N = 20000, changes = [];
  for (let i = 0; i < N; i++) {
    const side = i % 2 ? 'bid' : 'ask', k = (i * 7919) % 1000;
    changes.push([[side, (side === 'bid' ? bids : asks)[k][0], String(i % 5 === 0 ? 0 : i)]]);
  }
  t = performance.now(); for (const c of changes) book.applyChanges(c); const apply = performance.now() - t;
  t = performance.now(); for (let i = 0; i < N; i++) book.checksum(); const sum = performance.now() - t;
  const text = JSON.stringify({type: 'delta', instrument: 'coinbase:SKL-USD', epoch: '9cc20320', seq: 1234,
    prev_seq: 1233, changes: [['bid', '0.7902', '468']], checksum: 296230226, ts_event_ns: 1618677817118782976,
    ts_ingest_ns: 1618677817118782976, ts_publish_ns: 1618677817118782976, ts_send_ns: 1618677817118782976});
  t = performance.now(); for (let i = 0; i < N; i++) JSON.parse(text); const parse = performance.now() - t;
  done({snapshot_load_2000_levels_ms: snapshot, delta_apply_us: apply * 1000 / N,
        checksum_us: sum * 1000 / N, json_parse_delta_us: parse * 1000 / N});
}).catch((e) => done({error: String(e)}));
"""


def micro(out: Path) -> int:
    from tests.viewer.scripted import ScriptedGateway

    with tempfile.TemporaryDirectory(prefix="bookcast-viewer-micro-") as tmp:
        gateway = ScriptedGateway(["coinbase:SKL-USD"]).start()
        browser = None
        try:
            browser = Browser(Path(tmp))
            browser.driver.get(gateway.base + "/")
            figures = browser.driver.execute_async_script(MICRO_JS)
        finally:
            if browser is not None:
                browser.quit()
            gateway.stop()
    if "error" in figures:
        print(f"viewer bench: {figures['error']}", file=sys.stderr)
        return 1
    peer = python_peer()
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}-micro.json").write_text(json.dumps({"page": figures, "python_l2book": peer}, indent=2) + "\n")
    print("| operation | page (JS, Chromium) | Python L2Book (feed.book) | page / Python |\n|---|---|---|---|")
    for k, v in figures.items():
        print(f"| {k} | {v:.2f} | {peer[k]:.2f} | {v / peer[k]:.2f}x |")
    return 0


def python_peer() -> dict[str, float]:
    """The same operations on the SDK's book (``feed.book.L2Book``, Decimal keys), same sizes."""
    import orjson
    from decimal import Decimal

    from feed.book import L2Book
    from feed.model import LevelChange, Side

    bids = [(Decimal(f"{0.5 - i * 0.0001:.4f}"), Decimal(10 + i)) for i in range(1000)]
    asks = [(Decimal(f"{0.51 + i * 0.0001:.4f}"), Decimal(10 + i)) for i in range(1000)]
    book = L2Book("coinbase:SKL-USD")
    t = time.perf_counter()
    book.apply_snapshot(bids, asks)
    snapshot_ms = (time.perf_counter() - t) * 1e3
    n = 20000
    changes = []
    for i in range(n):
        side = Side.BID if i % 2 else Side.ASK
        price = (bids if side is Side.BID else asks)[(i * 7919) % 1000][0]
        changes.append([LevelChange(side, price, Decimal(0 if i % 5 == 0 else i))])
    t = time.perf_counter()
    for c in changes:
        book.apply_changes(c)
    apply_us = (time.perf_counter() - t) * 1e6 / n
    t = time.perf_counter()
    for _ in range(n):
        book.checksum()
    checksum_us = (time.perf_counter() - t) * 1e6 / n
    text = orjson.dumps({"type": "delta", "instrument": "coinbase:SKL-USD", "epoch": "9cc20320", "seq": 1234,
                         "prev_seq": 1233, "changes": [["bid", "0.7902", "468"]], "checksum": 296230226,
                         "ts_event_ns": 1618677817118782976, "ts_ingest_ns": 1618677817118782976,
                         "ts_publish_ns": 1618677817118782976, "ts_send_ns": 1618677817118782976})
    t = time.perf_counter()
    for _ in range(n):
        orjson.loads(text)
    parse_us = (time.perf_counter() - t) * 1e6 / n
    return {"snapshot_load_2000_levels_ms": snapshot_ms, "delta_apply_us": apply_us, "checksum_us": checksum_us,
            "json_parse_delta_us": parse_us}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.viewer.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instrument", default="coinbase:SKL-USD")
    p.add_argument("--speed", type=float, default=4.0, help="replay speed factor (default %(default)s)")
    p.add_argument("--duration-s", type=float, default=20.0, help="seconds measured (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("run/bench/viewer"), help="writes OUT.json (default %(default)s)")
    p.add_argument("--micro", action="store_true", help="only the page's book code, per operation (no stack)")
    args = p.parse_args(argv)
    if args.speed <= 0 or args.duration_s <= 0:
        p.error("--speed and --duration-s must be positive")
    why = missing()
    if why:
        print(f"viewer bench: {why}", file=sys.stderr)
        return 2
    if args.micro:
        return micro(args.out)
    with tempfile.TemporaryDirectory(prefix="bookcast-viewer-bench-") as tmp:
        stack = Stack(Path(tmp), workers=1)
        browser = peer = None
        try:
            print(f"starting the stack (replay at {args.speed}x, looping)...", file=sys.stderr)
            stack.start_nats()
            stack.start_gateway()
            stack.start_ingest([bundled_capture()], speed=args.speed, loop=True)
            stack.wait_instruments(10)
            browser = Browser(Path(tmp) / "chromium")
            browser.driver.get(f"{stack.base}/?instrument={args.instrument}")
            browser.wait(lambda: browser.text("book-state") == "live, verified", 30, "page live")
            peer = Peer(stack.ws_url, args.instrument)
            peer.start()
            print(f"measuring for {args.duration_s:.0f} s...", file=sys.stderr)
            time.sleep(args.duration_s)  # the measurement window itself, not a synchronisation
            peer.stop.set()
            state = browser.state()
            path = browser.download(timeout_s=60)
            peer.join(10)
            page_ns = []  # the deltas the page received while the peer was measuring
            for line in path.read_text().splitlines():
                record = json.loads(line)
                msg = record["msg"]
                if (isinstance(msg, dict) and msg.get("type") == "delta"
                        and peer.first_recv_ns <= record["recv_ts_ns"] <= peer.last_recv_ns):
                    page_ns.append(record["recv_ts_ns"] - msg["ts_send_ns"])
        finally:
            if browser is not None:
                browser.quit()
            stack.stop()
    page_q, peer_q = quantiles(page_ns), quantiles(peer.samples_ns)
    ratio = {k: round(page_q[k] / peer_q[k], 2) for k in ("p50_us", "p99_us", "max_us") if peer_q.get(k)}
    figures = {
        "instrument": args.instrument, "speed": args.speed, "duration_s": args.duration_s,
        "page_gateway_to_page": page_q, "peer_gateway_to_client": peer_q, "page_over_peer": ratio,
        "page_frames": state["frames"], "page_work_mean_us": round(state["workMs"] * 1e3 / max(1, state["frames"]), 1),
        "page_work_max_us": round(state["workMaxMs"] * 1e3, 1),
        "page_draws": state["renders"], "page_draw_mean_ms": round(state["renderMs"] / max(1, state["renders"]), 2),
        "page_draw_max_ms": round(state["renderMaxMs"], 1), "page_checksum_failures": state["stats"]["checksumFailures"],
        "page_verified": state["stats"]["verified"], "page_gaps": state["stats"]["gaps"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"| {args.instrument} at {args.speed}x, {args.duration_s:.0f} s | deltas | p50 | p99 | max |\n|---|---|---|---|---|")
    for name, q in (("viewer page (Chromium)", page_q), ("Python peer", peer_q)):
        print(f"| {name} | {q.get('n', 0)} | {q.get('p50_us', 0):.0f} µs | {q.get('p99_us', 0):.0f} µs | {q.get('max_us', 0):.0f} µs |")
    print(f"| page / peer | | {ratio.get('p50_us')}x | {ratio.get('p99_us')}x | {ratio.get('max_us')}x |")
    print(f"\npage work per frame: {figures['page_work_mean_us']} µs mean, {figures['page_work_max_us']} µs max over "
          f"{figures['page_frames']} frames; draw {figures['page_draw_mean_ms']} ms mean, {figures['page_draw_max_ms']} ms max "
          f"over {figures['page_draws']} draws; checksum failures {figures['page_checksum_failures']}, gaps {figures['page_gaps']}")
    print(f"wrote {args.out}.json", file=sys.stderr)
    behind = page_q.get("n", 0) < 0.9 * peer_q.get("n", 0)
    return 1 if figures["page_checksum_failures"] or figures["page_gaps"] or behind else 0


if __name__ == "__main__":
    sys.exit(main())
