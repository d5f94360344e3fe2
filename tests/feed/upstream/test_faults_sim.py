"""Each simulator fault knob, set over HTTP on a running ``bookcast simulate``, seen by a real ``VenueLink``:
drop / duplicate / reorder / reset as venue seq faults, a locked book, stall-while-alive, disconnect,
refused handshakes, latency and lag; Kalshi RSA-PSS auth checked by the simulator; bad frames."""
from __future__ import annotations

import asyncio
import contextlib
import statistics

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from feed.model import BookIncrement, VenueSeqKind
from feed.upstream import LinkEvent, ProviderSpec
from feed.upstream.links import VenueLink
from feed.upstream.venue_protocol import Backoff
from feed.procs import free_port
from tests.feed.upstream.simproc import simulator
from tests.feed.upstream.test_links_sim import Collector, wait_for

SOURCE = "polymarket/sol-15m-20251211.jsonl"


class Recorder(Collector):
    """A Collector that also keeps (recv - event) delays of book deltas and the time of each data message."""

    def __init__(self, venue: str) -> None:
        super().__init__(venue)
        self.delays_s: list[float] = []
        self.data_messages = 0
        self.details: list[tuple[LinkEvent, str]] = []
        self.bad_parses = 0
        self.unlisted = 0

    def on_message(self, record) -> None:
        from feed.errors import VenueMessageError

        self.data_messages += 1
        try:
            events = self.session.parse(record.msg).events
        except VenueMessageError:
            self.bad_parses += 1
            return
        for event in events:
            if getattr(event, "instrument", "").endswith("UNLISTED-SIM"):
                self.unlisted += 1
            if isinstance(event, BookIncrement) and event.ts_event_ns:
                self.delays_s.append((record.recv_ts_ns - event.ts_event_ns) / 1e9)
            self._apply(event)

    def _apply(self, event) -> None:
        from feed.model import Trade, VenueSeqFault
        from feed.sequencer import DeltaBeforeSnapshot, NegativeLevel

        if isinstance(event, VenueSeqFault):
            self.faults.append(event)
        if isinstance(event, Trade):
            self.trades += 1
        with contextlib.suppress(DeltaBeforeSnapshot, NegativeLevel):  # after injected faults: no resync here
            self.engine.apply(event)

    def on_event(self, event: LinkEvent, detail: str) -> None:
        super().on_event(event, detail)
        self.details.append((event, detail))

    def kinds(self) -> list[VenueSeqKind]:
        return [f.kind for f in self.faults]

    def recent_delay_s(self, n: int = 5) -> float:
        return statistics.median(self.delays_s[-n:]) if len(self.delays_s) >= n else 0.0


async def test_kalshi_knobs_one_by_one(shared_data, tmp_path):
    with simulator("kalshi", shared_data / SOURCE, extra=["--speed", "30", "--ping-interval-s", "0.3"],
                   log_path=tmp_path / "sim.log") as sim:
        symbols = sim.status()["instruments"]
        link = VenueLink(ProviderSpec("sim-k", "kalshi", sim.ws_url, rest_url=sim.base), ping_interval_s=0.3,
                         backoff=Backoff(base_s=0.05, max_s=0.2))
        got = Recorder("kalshi")
        task = asyncio.create_task(link.run(symbols, got.on_message, got.on_event))
        try:
            await wait_for(lambda: len(got.delays_s) > 5, 30, "deltas flowing")
            assert got.faults == []

            def after(kind: VenueSeqKind, start: int):
                return lambda: kind in got.kinds()[start:]

            for knob, kind in (("drop_next", VenueSeqKind.GAP), ("duplicate_next", VenueSeqKind.DUPLICATE),
                               ("reorder_next", VenueSeqKind.RESET)):
                start = len(got.faults)
                sim.faults(**{knob: 1})
                await wait_for(after(kind, start), 20, f"{knob} -> {kind}")
            assert got.kinds().count(VenueSeqKind.GAP) >= 2  # drop, and the reorder's jump

            start = len(got.faults)
            snapshots_before = got.events[LinkEvent.CONNECTED]
            sim.faults(reset_seq=True)
            await wait_for(after(VenueSeqKind.RESET, start), 20, "reset_seq -> reset")
            assert got.events[LinkEvent.CONNECTED] == snapshots_before  # same connection, venue-side reset

            crossed = got.engine.crossed
            sim.faults(crossed=True)
            await wait_for(lambda: got.engine.crossed > crossed, 20, "a locked book")
            assert sim.status()["counters"]["crossed_total"] == 1

            # bad input from the provider: every bad frame is reported (ERROR) or refused by the parser
            errors, bad_parses = len(got.errors), got.bad_parses
            sim.faults(bad_next=3, flood_next=50)
            await wait_for(lambda: any("not JSON" in e for e in got.errors[errors:]), 20, "the non-JSON frame")
            await wait_for(lambda: got.bad_parses >= bad_parses + 1 and got.unlisted >= 51, 20, "wrong type + unlisted")

            # stall-while-alive: pings keep coming, data stops; on resume the lost seqs are a gap.
            sim.faults(stall=True)
            await asyncio.sleep(0.3)
            data, alive = got.data_messages, got.events[LinkEvent.ALIVE]
            await wait_for(lambda: got.events[LinkEvent.ALIVE] >= alive + 3, 10, "ALIVE while stalled")
            await wait_for(lambda: sim.status()["counters"]["stalled_total"] > 3, 20, "data held back")
            assert got.data_messages == data, "no data during a stall"
            start = len(got.faults)
            sim.faults(stall=False)
            await wait_for(after(VenueSeqKind.GAP, start), 20, "a gap after the stall")

            # disconnect: the link reconnects and resubscribes (a fresh session: no false reset)
            connects = got.events[LinkEvent.CONNECTED]
            sim.faults(disconnect=True)
            await wait_for(lambda: got.events[LinkEvent.CONNECTED] > connects, 20, "reconnected")
            assert got.events[LinkEvent.DISCONNECTED] >= 1

            # a dead provider: handshakes refused with 503, reported as errors, until it comes back
            errors = len(got.errors)
            sim.faults(refuse_connections=True, disconnect=True)
            await wait_for(lambda: any("HTTP 503" in e for e in got.errors[errors:]), 20, "503 on connect")
            connects = got.events[LinkEvent.CONNECTED]
            sim.faults(refuse_connections=False)
            await wait_for(lambda: got.events[LinkEvent.CONNECTED] > connects, 20, "back after the outage")

            # latency and lag move the delay between the venue's event time and our receive time
            await wait_for(lambda: len(got.delays_s) > 10, 20, "deltas again")
            base = got.recent_delay_s()
            sim.faults(latency_ms=400)
            await wait_for(lambda: got.recent_delay_s() > base + 0.3, 30, "latency_ms=400 seen")
            sim.faults(latency_ms=0, lag_s=1.5)
            await wait_for(lambda: got.recent_delay_s() > base + 1.3, 30, "lag_s=1.5 seen")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_coinbase_heartbeats_prove_alive_during_stall(shared_data):
    with simulator("coinbase", shared_data / "coinbase/coinbase-level2-20210417.jsonl",
                   extra=["--speed", "2", "--heartbeat-interval-s", "0.2", "--fault", "stall=true"]) as sim:
        link = VenueLink(ProviderSpec("sim-c", "coinbase", sim.ws_url, rest_url=sim.base), ping_interval_s=60)
        got = Recorder("coinbase")
        task = asyncio.create_task(link.run(sim.status()["instruments"], got.on_message, got.on_event))
        try:
            await wait_for(lambda: sum(1 for e, d in got.details if e is LinkEvent.ALIVE and d == "heartbeats") >= 3,
                           20, "heartbeats while stalled")
            await wait_for(lambda: sim.status()["counters"]["stalled_total"] > 0, 20, "data held back")
            # Heartbeats share the connection's sequence_num, so the data lost in the stall shows as gaps.
            await wait_for(lambda: VenueSeqKind.GAP in got.kinds(), 20, "the loss seen through heartbeat seqs")
            data = got.data_messages
            sim.faults(stall=False)
            await wait_for(lambda: got.data_messages > data, 20, "data after the stall")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_a_quiet_venue_sends_heartbeats_and_no_data_and_resumes_without_a_gap(shared_data):
    """``quiet`` is the venue's own silence (no fault): heartbeats go on with no seq used, so no gap is seen,
    and data resumes where the venue stopped."""
    from feed.venues.coinbase import is_heartbeat

    with simulator("coinbase", shared_data / "coinbase/coinbase-level2-20210417.jsonl",
                   extra=["--speed", "2", "--heartbeat-interval-s", "0.2"]) as sim:
        link = VenueLink(ProviderSpec("sim-c", "coinbase", sim.ws_url, rest_url=sim.base), ping_interval_s=60)
        got = Recorder("coinbase")
        data: list[int] = []  # venue data messages (not heartbeats)

        def on_message(record) -> None:
            if not is_heartbeat(record.msg):
                data.append(1)
            got.on_message(record)

        def beats() -> int:
            return sum(1 for e, d in got.details if e is LinkEvent.ALIVE and d == "heartbeats")

        task = asyncio.create_task(link.run(sim.status()["instruments"], on_message, got.on_event))
        try:
            await wait_for(lambda: len(data) > 20, 30, "data before the quiet")
            sim.faults(quiet=True)  # the one record already due may still go out
            first = beats()
            await wait_for(lambda: beats() >= first + 2, 30, "heartbeats once quiet")
            position, data_then, then = sim.status()["position"], len(data), beats()
            await wait_for(lambda: beats() >= then + 5, 30, "heartbeats while quiet")
            assert sim.status()["position"] == position  # the venue's clock stood still
            assert len(data) == data_then
            sim.faults(quiet=False)
            await wait_for(lambda: len(data) > data_then + 5, 30, "data after the quiet")
            assert VenueSeqKind.GAP not in got.kinds(), got.faults
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _write_key(path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


async def test_kalshi_auth_checked_by_the_simulator(shared_data, tmp_path, caplog):
    good = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "public.pem").write_bytes(good.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    _write_key(tmp_path / "good.pem", good)
    _write_key(tmp_path / "bad.pem", bad)
    with simulator("kalshi", shared_data / SOURCE,
                   extra=["--speed", "20", "--kalshi-public-key", str(tmp_path / "public.pem")]) as sim:
        symbols = sim.status()["instruments"]
        results = {}
        for name in ("good", "bad"):
            spec = ProviderSpec(f"k-{name}", "kalshi", sim.ws_url, rest_url=sim.base,
                                auth={"key_id": "key-123", "private_key_path": str(tmp_path / f"{name}.pem")})
            link = VenueLink(spec, backoff=Backoff(base_s=0.05, max_s=0.1))
            got = Recorder("kalshi")
            task = asyncio.create_task(link.run(symbols, got.on_message, got.on_event))
            try:
                if name == "good":
                    await wait_for(lambda: got.engine.instruments, 20, "books with a good key")
                    assert (await link.fetch_snapshot(symbols[0]))["type"] == "orderbook_snapshot"
                else:
                    await wait_for(lambda: any("HTTP 401" in e for e in got.errors), 20, "401 with a bad key")
                    assert got.events[LinkEvent.CONNECTED] == 0
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            results[name] = got
    logged = caplog.text + "".join(d for g in results.values() for _, d in g.details)
    assert "key-123" not in logged and "PRIVATE KEY" not in logged


async def test_bad_frames_are_reported_and_skipped():
    """A provider sending non-JSON text and binary frames: ERROR events, nothing passed on, link alive."""
    async def handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()  # the subscribe frame
        await ws.send_str("{not json")
        await ws.send_bytes(b"\x00\x01")
        await ws.send_str('{"event_type": "book", "asset_id": "A", "bids": [], "asks": [], "timestamp": "1"}')
        await ws.receive()
        return ws

    app = web.Application()
    app.router.add_get("/ws/market", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    got = Recorder("polymarket")
    link = VenueLink(ProviderSpec("bad", "polymarket", f"ws://127.0.0.1:{port}/ws/market"), ping_interval_s=60)
    task = asyncio.create_task(link.run(["A"], got.on_message, got.on_event))
    try:
        await wait_for(lambda: got.engine.instruments, 10, "the good message after the bad ones")
        assert got.data_messages == 1
        assert any("not JSON" in e for e in got.errors) and any("binary" in e for e in got.errors)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.cleanup()
