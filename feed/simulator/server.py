"""``bookcast simulate``: a local venue (WebSocket + REST) that speaks Polymarket's, Coinbase Advanced
Trade's or Kalshi's live protocol from a real capture, with fault knobs.

Adapter around the pure ``feed.simulator.world``. One process is one provider. Endpoints (all on
``--port``, loopback by default):

=====================================================  ==========================================
``/ws/market``  (polymarket), ``/`` (coinbase),         the venue's WebSocket (``/ws`` works for all)
``/trade-api/ws/v2`` (kalshi)
``GET /book?token_id=``                                 Polymarket REST book
``GET /api/v3/brokerage/market/product_book?product_id=``  Coinbase Advanced Trade REST book
``GET /trade-api/v2/markets/{ticker}/orderbook``        Kalshi REST book
``GET /sim/faults``, ``POST /sim/faults`` ``{knob: value}``  read / set the fault knobs (400 on a bad knob)
``GET /sim/status``                                     venue, instruments, progress, connections, counters
``POST /sim/start`` ``{"start_at_ns": N}``              start a ``--paused`` simulator (N simulators at one instant)
``GET /healthz``                                        200 once the capture is loaded
=====================================================  ==========================================

Time: the capture is paced from ``--start-at-ns`` (default: now), so N simulators given the same start
serve the same venue events with the same event times whenever they were started (a late one catches
up at once). ``--once`` stops after one pass (books then stay still); otherwise the capture loops, each
pass shifted by the file's span plus its mean gap.

Keepalive: Polymarket's text ``PING`` is answered ``PONG``; WebSocket pings are answered (all venues);
Coinbase sends ``heartbeats`` every ``--heartbeat-interval-s`` to subscribers; Kalshi pings every
``--ping-interval-s``. All of these continue during a ``stall``. Kalshi handshakes are checked against
``--kalshi-public-key`` when given (RSA-PSS, ``feed.upstream.venue_protocol.kalshi_verify``; 401 if bad).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from feed.capture import CaptureError, CaptureRecord, read_capture
from feed.model import BookSnapshot
from feed.simulator.world import RENDERERS, TARGET_VENUES, Faults, Renderer, World, WorldError, target_symbol
from feed.upstream import venue_protocol as vp

log = logging.getLogger("bookcast.simulate")

EXAMPLES = """examples:
  bookcast simulate --venue coinbase --capture ../shared/data/coinbase-advanced/coinbase-advanced-level2-20260809.jsonl.gz --port 9001
  bookcast simulate --venue polymarket --capture ../shared/data/polymarket/btc-1h-20251211.jsonl --port 9002 --speed 10
  bookcast simulate --venue kalshi --capture ../shared/data/polymarket/sol-15m-20251211.jsonl --port 9003 --fault latency_ms=50
  curl -X POST -d '{"stall": true}' http://127.0.0.1:9001/sim/faults     # stall-while-alive now
  curl -X POST -d '{"disconnect": true}' http://127.0.0.1:9001/sim/faults  # drop every connection
  curl http://127.0.0.1:9001/sim/status

fault knobs (--fault KNOB=VALUE at start, or POST /sim/faults at run time):
  latency_ms, jitter_ms, lag_s      delay every message / data served N s behind
  error_rate                        fraction of REST requests and WebSocket handshakes answered 503
  stall                             stall-while-alive: pings, PONG and heartbeats answered, data lost
  rest_429, refuse_connections      REST answers 429 / handshakes answered 503
  drop_next, duplicate_next, reorder_next   drop / send twice / swap the next N data messages
  crossed, reset_seq, disconnect    one-shot: a locked book / venue seq reset with new snapshots / close all
  bad_next, flood_next              one-shot: N bad frames (not JSON, wrong type, unlisted instrument) / N unlisted deltas
  quiet                             not a fault: the venue goes quiet (its clock stops; heartbeats go on, no seq used)"""

WS_PATHS = {"polymarket": "/ws/market", "coinbase": "/", "kalshi": vp.KALSHI_WS_PATH}


class Connection:
    """One subscriber: its renderer and an ordered send queue that applies latency, jitter and lag."""

    def __init__(self, sim: Simulator, ws: web.WebSocketResponse, renderer: Renderer) -> None:
        self.sim = sim
        self.ws = ws
        self.renderer = renderer
        self.queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        self.last_due_ns = 0
        self.held: str | None = None  # a message held back by reorder
        self.sent = 0

    def send(self, msgs: list[dict | str], *, data: bool = True) -> None:
        faults = self.sim.faults
        for msg in msgs:
            text = msg if isinstance(msg, str) else orjson.dumps(msg).decode()
            if data:
                if faults.stall:
                    self.sim.counters["stalled_total"] += 1
                    continue
                if faults.drop_next > 0:
                    faults.drop_next -= 1
                    self.sim.counters["dropped_total"] += 1
                    continue
                if faults.reorder_next > 0 and self.held is None:
                    faults.reorder_next -= 1
                    self.held = text
                    self.sim.counters["reordered_total"] += 1
                    continue
            self._enqueue(text, data)
            if data and faults.duplicate_next > 0:
                faults.duplicate_next -= 1
                self.sim.counters["duplicated_total"] += 1
                self._enqueue(text, data)
            if data and self.held is not None:
                held, self.held = self.held, None
                self._enqueue(held, data)

    def _enqueue(self, text: str, data: bool) -> None:
        faults = self.sim.faults
        delay_ms = faults.latency_ms + (self.sim.rng.uniform(0, faults.jitter_ms) if faults.jitter_ms else 0.0)
        due_ns = time.time_ns() + int(delay_ms * 1e6) + (int(faults.lag_s * 1e9) if data else 0)
        due_ns = max(due_ns, self.last_due_ns)  # latency never reorders
        self.last_due_ns = due_ns
        self.queue.put_nowait((due_ns, text))

    async def writer(self) -> None:
        while True:
            due_ns, text = await self.queue.get()
            wait_ns = due_ns - time.time_ns()
            if wait_ns > 0:
                await asyncio.sleep(wait_ns / 1e9)
            if self.ws.closed:
                return
            try:
                await self.ws.send_str(text)
            except (ConnectionError, RuntimeError):
                return
            self.sent += 1
            self.sim.counters["sent_total"] += 1


class Simulator:
    def __init__(self, venue: str, captures: list[Path], *, speed: float = 1.0, once: bool = False,
                 start_at_ns: int | None = None, faults: Faults | None = None, kalshi_public_key: Any = None,
                 heartbeat_interval_s: float = 1.0, ping_interval_s: float = 10.0, seed: int | None = None,
                 paused: bool = False) -> None:
        if venue not in TARGET_VENUES:
            raise WorldError(f"unknown venue {venue!r}; known: {', '.join(TARGET_VENUES)}")
        if not speed > 0:
            raise ValueError(f"--speed must be positive, got {speed}")
        self.venue = venue
        self.speed = speed
        self.once = once
        self.faults = faults or Faults()
        self.kalshi_public_key = kalshi_public_key
        self.heartbeat_interval_s = heartbeat_interval_s
        self.ping_interval_s = ping_interval_s
        self.rng = random.Random(seed)
        self.records: list[CaptureRecord] = [r for path in captures for r in read_capture(path)]
        self.records.sort(key=lambda r: r.recv_ts_ns)
        # Parse once, before anything listens: refuses a capture that cannot feed this venue, and every
        # pass reuses the events.
        self.world = World(venue)
        self.events = [self.world.parse(r) for r in self.records]
        self.instruments = sorted({target_symbol(venue, e.instrument) for events in self.events for e in events
                                   if isinstance(e, BookSnapshot)})
        if not self.instruments:
            raise WorldError(f"the capture has no book for a {venue} simulator")
        self.start_at_ns = start_at_ns if start_at_ns is not None else time.time_ns()
        self.started: asyncio.Event | None = None  # created on the loop in run_world
        self.paused = paused
        self.connections: set[Connection] = set()
        self.position = 0
        self.pass_index = 0
        self.done = False
        self.counters = {k: 0 for k in ("sent_total", "dropped_total", "duplicated_total", "reordered_total",
                                        "stalled_total", "rest_requests_total", "rest_errors_total",
                                        "handshakes_refused_total", "disconnects_total", "crossed_total",
                                        "resets_total", "connections_total", "bad_frames_total")}

    # -- the venue's clock ------------------------------------------------------------------------
    async def run_world(self) -> None:
        self.started = asyncio.Event()
        if not self.paused:
            self.started.set()
        await self.started.wait()
        first_ns = self.records[0].recv_ts_ns
        span_ns = self.records[-1].recv_ts_ns - first_ns
        period_ns = span_ns + max(1, span_ns // max(1, len(self.records) - 1))
        yielded = time.monotonic()
        while True:
            for i, record in enumerate(self.records):
                while self.faults.quiet:  # a quiet venue: its clock stands still, so it resumes where it was
                    self._one_shots()
                    paused_ns = time.time_ns()
                    await asyncio.sleep(0.05)
                    self.start_at_ns += time.time_ns() - paused_ns
                due_ns = self.start_at_ns + round((record.recv_ts_ns - first_ns + self.pass_index * period_ns) / self.speed)
                wait_ns = due_ns - time.time_ns()
                if wait_ns > 0:
                    await asyncio.sleep(wait_ns / 1e9)
                    yielded = time.monotonic()
                elif time.monotonic() - yielded > 0.01:  # catching up: still serve pings, REST and control
                    await asyncio.sleep(0)
                    yielded = time.monotonic()
                self.position = i + 1
                tick = self.world.apply(record, due_ns - record.recv_ts_ns, self.events[i])
                self._one_shots()
                if tick.moves or tick.trades or tick.listed:
                    now_ns = time.time_ns()
                    for conn in list(self.connections):
                        conn.send(conn.renderer.render(tick, now_ns))
            if self.once:
                self.done = True
                log.info("capture done after one pass; books stay as they are")
                while True:
                    self._one_shots()
                    await asyncio.sleep(0.05)
            self.pass_index += 1

    def _one_shots(self) -> None:
        faults = self.faults
        if not (faults.crossed or faults.reset_seq or faults.disconnect or faults.bad_next or faults.flood_next) \
                or not self.connections:
            return
        now_ns = time.time_ns()
        if faults.bad_next or faults.flood_next:
            bad, flood = faults.bad_next, faults.flood_next
            faults.bad_next = faults.flood_next = 0
            self.counters["bad_frames_total"] += bad + flood
            for conn in self.connections:
                conn.send(conn.renderer.bad_messages(bad, now_ns) + conn.renderer.flood(flood, now_ns), data=False)
        if faults.crossed:
            faults.crossed = False
            self.counters["crossed_total"] += 1
            for conn in self.connections:
                conn.send(conn.renderer.crossed(now_ns))
        if faults.reset_seq:
            faults.reset_seq = False
            self.counters["resets_total"] += 1
            for conn in self.connections:
                conn.send(conn.renderer.reset_seq(now_ns))
        if faults.disconnect:
            faults.disconnect = False
            self.counters["disconnects_total"] += 1
            for conn in list(self.connections):
                asyncio.ensure_future(conn.ws.close(code=1001, message=b"simulated disconnect"))

    # -- WebSocket -------------------------------------------------------------------------------
    async def ws_handler(self, request: web.Request) -> web.StreamResponse:
        faults = self.faults
        if faults.refuse_connections or (faults.error_rate and self.rng.random() < faults.error_rate):
            self.counters["handshakes_refused_total"] += 1
            return web.json_response({"error": "simulated outage"}, status=503)
        if self.venue == "kalshi" and self.kalshi_public_key is not None:
            why = vp.kalshi_verify(self.kalshi_public_key, request.headers, "GET", request.path)
            if why is not None:
                return web.json_response({"error": why}, status=401)
        heartbeat = self.ping_interval_s if self.venue == "kalshi" else None
        ws = web.WebSocketResponse(heartbeat=heartbeat, autoping=True, max_msg_size=1 << 20)
        await ws.prepare(request)
        conn = Connection(self, ws, RENDERERS[self.venue](self.world))
        self.connections.add(conn)
        self.counters["connections_total"] += 1
        writer = asyncio.ensure_future(conn.writer())
        writer.add_done_callback(_log_failure)
        beats = asyncio.ensure_future(self._heartbeats(conn)) if self.venue == "coinbase" else None
        if beats is not None:
            beats.add_done_callback(_log_failure)
        try:
            async for frame in ws:
                if frame.type is not WSMsgType.TEXT:
                    continue
                if frame.data == vp.POLYMARKET_PING_TEXT:
                    conn._enqueue(vp.POLYMARKET_PONG_TEXT, False)
                    continue
                try:
                    msg = orjson.loads(frame.data)
                except orjson.JSONDecodeError:
                    conn.send([_bad_request(self.venue, "bad JSON")], data=False)
                    continue
                conn.send(conn.renderer.subscribe(msg, time.time_ns()), data=False)
        finally:
            self.connections.discard(conn)
            writer.cancel()
            if beats is not None:
                beats.cancel()
        return ws

    async def _heartbeats(self, conn: Connection) -> None:
        while not conn.ws.closed:
            await asyncio.sleep(self.heartbeat_interval_s)
            beat = conn.renderer.heartbeat(time.time_ns())
            if beat is not None:
                conn.send([beat], data=False)

    # -- REST ------------------------------------------------------------------------------------
    async def _rest(self, request: web.Request, symbol: str | None) -> web.Response:
        self.counters["rest_requests_total"] += 1
        faults = self.faults
        if faults.latency_ms or faults.jitter_ms:
            await asyncio.sleep((faults.latency_ms + self.rng.uniform(0, faults.jitter_ms)) / 1e3)
        if faults.rest_429:
            self.counters["rest_errors_total"] += 1
            return web.json_response({"error": "Too Many Requests"}, status=429)
        if faults.error_rate and self.rng.random() < faults.error_rate:
            self.counters["rest_errors_total"] += 1
            return web.json_response({"error": "simulated server error"}, status=503)
        if self.venue == "kalshi" and self.kalshi_public_key is not None:
            why = vp.kalshi_verify(self.kalshi_public_key, request.headers, "GET", request.path)
            if why is not None:
                return web.json_response({"error": why}, status=401)
        if not symbol or symbol not in self.world.books:
            return web.json_response({"error": f"No orderbook exists for {symbol!r}"}, status=404)
        return web.json_response(RENDERERS[self.venue](self.world).rest_book(symbol, time.time_ns()),
                                 dumps=lambda o: orjson.dumps(o).decode())

    async def rest_polymarket(self, request: web.Request) -> web.Response:
        return await self._rest(request, request.query.get("token_id"))

    async def rest_coinbase(self, request: web.Request) -> web.Response:
        return await self._rest(request, request.query.get("product_id"))

    async def rest_kalshi(self, request: web.Request) -> web.Response:
        return await self._rest(request, request.match_info["ticker"])

    # -- control ---------------------------------------------------------------------------------
    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.as_dict())

    async def post_faults(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object {knob: value}")
            self.faults.update(changes)
        except (ValueError, orjson.JSONDecodeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        log.info("faults now %s", {k: v for k, v in self.faults.as_dict().items() if v})
        self._one_shots()
        return web.json_response(self.faults.as_dict())

    async def post_start(self, request: web.Request) -> web.Response:
        """Start a ``--paused`` simulator: body ``{"start_at_ns": N}`` (optional; default now). 409 if running."""
        try:
            body = orjson.loads(await request.read() or b"{}")
            start_at_ns = body.get("start_at_ns", time.time_ns()) if isinstance(body, dict) else None
            if isinstance(start_at_ns, bool) or not isinstance(start_at_ns, int):
                raise ValueError("start_at_ns must be an integer (Unix ns)")
        except (ValueError, orjson.JSONDecodeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if self.started is None or self.started.is_set():
            return web.json_response({"error": "already running"}, status=409)
        self.start_at_ns = start_at_ns
        self.paused = False
        self.started.set()
        return web.json_response({"start_at_ns": start_at_ns})

    def status(self) -> dict[str, Any]:
        return {"venue": self.venue, "instruments": self.instruments, "records": len(self.records),
                "position": self.position, "pass": self.pass_index, "done": self.done, "paused": self.paused,
                "start_at_ns": self.start_at_ns, "connections": len(self.connections),
                "faults": self.faults.as_dict(), "counters": dict(self.counters)}

    async def get_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    def app(self) -> web.Application:
        app = web.Application()
        ws_path = WS_PATHS[self.venue]
        app.router.add_get(ws_path, self.ws_handler)
        if ws_path != "/ws":
            app.router.add_get("/ws", self.ws_handler)
        app.router.add_get("/book", self.rest_polymarket)
        app.router.add_get("/api/v3/brokerage/market/product_book", self.rest_coinbase)
        app.router.add_get("/trade-api/v2/markets/{ticker}/orderbook", self.rest_kalshi)
        app.router.add_get("/sim/faults", self.get_faults)
        app.router.add_post("/sim/faults", self.post_faults)
        app.router.add_get("/sim/status", self.get_status)
        app.router.add_post("/sim/start", self.post_start)
        app.router.add_get("/healthz", self.healthz)
        return app


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("connection task failed: %r", task.exception(), exc_info=task.exception())


def _bad_request(venue: str, why: str) -> dict:
    if venue == "kalshi":
        return {"type": "error", "msg": {"code": 1, "msg": why}}
    if venue == "coinbase":
        return {"type": "error", "message": why}
    return {"error": why}


def simulate_command(venue: str, captures: list[Path], port: int, *, start_at_ns: int | None = None,
                     speed: float = 1.0, once: bool = False, paused: bool = False,
                     faults: dict[str, Any] | None = None, python: str = sys.executable) -> list[str]:
    """The argv that runs one simulated provider (for ``bookcast up --simulate N`` and drills): give N of
    them the same ``start_at_ns`` so they serve the same venue events."""
    cmd = [python, "-m", "feed.cli", "simulate", "--venue", venue, "--port", str(port), "--speed", str(speed)]
    for capture in captures:
        cmd += ["--capture", str(capture)]
    if start_at_ns is not None:
        cmd += ["--start-at-ns", str(start_at_ns)]
    if once:
        cmd.append("--once")
    if paused:
        cmd.append("--paused")
    for name, value in (faults or {}).items():
        cmd += ["--fault", f"{name}={str(value).lower() if isinstance(value, bool) else value}"]
    return cmd


# -- command line ------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--venue", required=True, choices=TARGET_VENUES, help="the venue protocol to speak")
    p.add_argument("--capture", required=True, action="append", type=Path,
                   help="capture file (.jsonl/.jsonl.gz); repeat for several (Kalshi: a Polymarket capture)")
    p.add_argument("--port", type=int, default=0, help="listen port (default: a free one, printed)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default %(default)s)")
    p.add_argument("--speed", type=float, default=1.0, help="replay speed factor (default %(default)s)")
    p.add_argument("--once", action="store_true", help="one pass over the capture, then books stay still")
    p.add_argument("--start-at-ns", type=int, help="wall-clock ns the capture starts at (share it across simulators)")
    p.add_argument("--paused", action="store_true", help="serve books but do not advance until POST /sim/start")
    p.add_argument("--fault", action="append", default=[], metavar="KNOB=VALUE", help="a fault knob at start")
    p.add_argument("--kalshi-public-key", type=Path, help="PEM public key: check Kalshi auth headers against it")
    p.add_argument("--heartbeat-interval-s", type=float, default=1.0, help="Coinbase heartbeats period")
    p.add_argument("--ping-interval-s", type=float, default=10.0, help="Kalshi WebSocket ping period")
    p.add_argument("--seed", type=int, help="random seed for jitter and error draws")


def main(args: argparse.Namespace) -> int:
    missing = [str(c) for c in args.capture if not c.is_file()]
    if missing:
        print(f"bookcast simulate: capture file not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    faults = Faults()
    try:
        faults.update(dict(_knob(k) for k in args.fault))
    except ValueError as exc:
        print(f"bookcast simulate: {exc}", file=sys.stderr)
        return 2
    public_key = None
    if args.kalshi_public_key is not None:
        from cryptography.hazmat.primitives import serialization

        try:
            public_key = serialization.load_pem_public_key(args.kalshi_public_key.read_bytes())
        except (OSError, ValueError) as exc:
            print(f"bookcast simulate: cannot load public key {args.kalshi_public_key}: {exc}", file=sys.stderr)
            return 2
    try:
        sim = Simulator(args.venue, args.capture, speed=args.speed, once=args.once, start_at_ns=args.start_at_ns,
                        faults=faults, kalshi_public_key=public_key, heartbeat_interval_s=args.heartbeat_interval_s,
                        ping_interval_s=args.ping_interval_s, seed=args.seed, paused=args.paused)
    except (WorldError, ValueError, CaptureError) as exc:
        print(f"bookcast simulate: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(sim, args.host, args.port))
    except KeyboardInterrupt:
        return 0


def _knob(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--fault wants KNOB=VALUE, got {text!r}")
    return name.strip(), value.strip()


async def _serve(sim: Simulator, host: str, port: int) -> int:
    from feed.procs import run_until_signalled

    runner = web.AppRunner(sim.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        print(f"bookcast simulate: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        await runner.cleanup()
        return 1
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"{host}:{port}"
    print(f"simulating {sim.venue} ({len(sim.instruments)} instruments, {len(sim.records)} records) "
          f"ws://{base}{WS_PATHS[sim.venue]}  rest http://{base}  control http://{base}/sim/status",
          file=sys.stderr, flush=True)
    code = await run_until_signalled(sim.run_world(), "simulator", log)
    for conn in list(sim.connections):
        await conn.ws.close(code=1001, message=b"simulator stopping")
    await runner.cleanup()
    return code
