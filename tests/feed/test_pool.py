"""The provider pool against in-process fake links (the Link protocol of feed.upstream), on real recorded data.

The ingest is real (books of record, sequencer, status); only NATS is replaced by a list of what was published.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from decimal import Decimal

import orjson
import pytest
from prometheus_client import CollectorRegistry

from feed.book import L2Book
from feed.capture import CaptureRecord, read_capture
from feed.ingest import Ingest, IngestConfig
from feed.model import BookSnapshot
from feed.providers.config import VenueConfig
from feed.upstream import LinkEvent, ProviderSpec, UpstreamError
from feed.providers.pool import VenuePool
from feed.providers.scoring import ScoringPolicy
from feed.sequencer import BookEngine
from feed.stack import bundled_capture
from feed.subjects import delta_subject
from feed.venues import parser_for


class FakeNats:
    def __init__(self) -> None:
        self.published: list[tuple[str, dict]] = []

    async def publish(self, subject: str, payload: bytes, headers=None) -> None:
        self.published.append((subject, orjson.loads(payload)))

    def of(self, instrument: str, type_: str) -> list[dict]:
        subject = delta_subject(instrument)
        return [m for s, m in self.published if s == subject and m.get("type") == type_]


class FakeLink:
    """Speaks the Link protocol: a script queue of venue messages and link events."""

    def __init__(self, spec: ProviderSpec) -> None:
        self.spec = spec
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.rest: dict[str, object] = {}
        self.fetches = 0
        self.connected = True

    async def run(self, symbols, on_message, on_event) -> None:
        on_event(LinkEvent.CONNECTED, self.spec.ws_url)
        while True:
            item = await self.inbox.get()
            if item == "disconnect":
                self.connected = False
                on_event(LinkEvent.DISCONNECTED, "test")
            elif item == "connect":
                self.connected = True
                on_event(LinkEvent.CONNECTED, self.spec.ws_url)
            elif isinstance(item, LinkEvent):
                on_event(item, "test")
            elif self.connected:
                on_message(CaptureRecord(time.time_ns(), self.spec.venue, item))

    async def fetch_snapshot(self, symbol: str):
        self.fetches += 1
        reply = self.rest.get(symbol)
        if isinstance(reply, Exception):
            raise reply
        if reply is None:
            raise UpstreamError(f"no book for {symbol}")
        return reply


def records(n: int):
    return [r for r in itertools.islice(read_capture(bundled_capture()), n)]


def coinbase_products(recs) -> list[str]:
    return sorted({r.msg["product_id"] for r in recs if isinstance(r.msg, dict) and r.msg.get("type") == "snapshot"})


POLICY = ScoringPolicy(stale_after_s=0.3, max_lag_s=0.5, probation_s=0.05, resample_interval_s=60)


class Rig:
    def __init__(self, venue: str, symbols, names=("a", "b", "c"), *, rest: bool = False, stale_after_s: float = 30.0,
                 policy: ScoringPolicy = POLICY) -> None:
        self.registry = CollectorRegistry()
        self.ingest = Ingest(IngestConfig(epoch_base="t"), registry=self.registry)
        self.nats = self.ingest.nc = FakeNats()
        self.ingest.nats_connected = True
        specs = [ProviderSpec(n, venue, f"ws://127.0.0.1:1/{n}", "http://127.0.0.1:1" if rest else None)
                 for n in names]
        self.links = {s.name: FakeLink(s) for s in specs}
        self.pool = VenuePool(self.ingest, VenueConfig(venue, tuple(symbols), tuple(specs), stale_after_s, policy),
                              links=self.links, snapshot_grace_s=0.05)
        self.ingest.pools.append(self.pool)
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> Rig:
        self.task = asyncio.get_running_loop().create_task(self.pool.run())
        await self.until(lambda: all(p.connected for p in self.pool.providers.values()), "links connected")
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    def send(self, msg, to=None) -> None:
        for name in to or self.links:
            self.links[name].inbox.put_nowait(msg)

    async def until(self, cond, what: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.005)

    async def drained(self) -> None:
        await self.until(lambda: all(l.inbox.empty() for l in self.links.values())
                         and all(p.queue.empty() for p in self.pool.providers.values())
                         and not self.pool.lock.locked(), "queues drained")
        async with self.pool.lock:
            pass

    def metric(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def reference(recs) -> BookEngine:
    engine = BookEngine("ref")
    parse = parser_for("coinbase")
    for r in recs:
        for ev in parse(r.msg).events:
            try:
                engine.apply(ev)
            except Exception:  # noqa: BLE001 - deltas before a snapshot: not in the reference either
                pass
    return engine


def client_books(rig: Rig, recs, instruments) -> dict[str, L2Book]:
    """What a client holding the first snapshot and applying every published delta ends with; asserts the
    stream is gap-free and duplicate-free within one epoch."""
    parse = parser_for("coinbase")
    books = {}
    for r in recs:
        for ev in parse(r.msg).events:
            if isinstance(ev, BookSnapshot) and ev.instrument not in books:
                books[ev.instrument] = L2Book(ev.instrument)
                books[ev.instrument].apply_snapshot(ev.bids, ev.asks)
    for inst in instruments:
        deltas = rig.nats.of(inst, "delta")
        seqs = [d["seq"] for d in deltas]
        assert seqs == list(range(1, len(seqs) + 1)), f"{inst}: seqs not contiguous from 1"
        assert len({d["epoch"] for d in deltas}) <= 1, f"{inst}: epoch changed on a lossless switch"
        for d in deltas:
            books[inst].apply_wire_changes(d["changes"])
            assert books[inst].checksum() == d["checksum"]
    return books


async def test_disconnect_of_the_selected_provider_is_a_lossless_switch_without_duplicates():
    recs = records(1500)
    products = coinbase_products(recs)
    async with Rig("coinbase", products) as rig:
        for r in recs[:700]:
            rig.send(r.msg)
        await rig.drained()
        assert rig.pool.scorer.selected == "a"
        rig.send("disconnect", to=["a"])
        for r in recs[700:]:
            rig.send(r.msg)
        await rig.drained()
        assert rig.pool.scorer.selected in ("b", "c")
        assert rig.metric("bookcast_ingest_provider_switches_total", venue="coinbase", reason="disconnect") == 1
        assert rig.metric("bookcast_ingest_provider_errors_total", venue="coinbase", provider="a", kind="disconnect") == 1
    ref = reference(recs)
    insts = [f"coinbase:{p}" for p in products]
    books = client_books(rig, recs, insts)
    total = 0
    for inst in insts:
        assert books[inst] == ref.instruments[inst].book == rig.ingest.engine.instruments[inst].book
        assert rig.ingest.engine.seq_of(inst)[1] == ref.seq_of(inst)[1]  # every venue event exactly once
        total += ref.seq_of(inst)[1]
    assert total > 500


async def test_switch_to_a_provider_that_is_behind_waits_for_it_then_continues_the_same_epoch():
    recs = records(1500)
    products = coinbase_products(recs)
    async with Rig("coinbase", products, names=("a", "b")) as rig:
        for r in recs[:800]:
            rig.send(r.msg, to=["a"])
        for r in recs[:600]:
            rig.send(r.msg, to=["b"])  # b is 200 messages behind
        await rig.drained()
        rig.send("disconnect", to=["a"])
        await rig.drained()
        assert rig.pool.catching_up is not None and rig.pool.catching_up[0] == "b"
        published = len(rig.nats.published)
        for r in recs[600:]:
            rig.send(r.msg, to=["b"])
        await rig.drained()
        assert rig.pool.catching_up is None
        assert len(rig.nats.published) > published
    ref = reference(recs)
    insts = [f"coinbase:{p}" for p in products]
    books = client_books(rig, recs, insts)
    for inst in insts:
        assert books[inst] == ref.instruments[inst].book


async def test_bad_input_is_counted_and_skipped_never_published():
    recs = records(400)
    products = coinbase_products(recs)
    async with Rig("coinbase", products, names=("a", "b")) as rig:
        for r in recs:
            rig.send(r.msg)
        await rig.drained()
        before = list(rig.nats.published)
        bad = [
            "not json at all",  # a text frame
            {"type": "l2update", "product_id": products[0], "time": "2021-04-17T16:43:40Z",
             "changes": [["buy", "NaN", "1"]]},
            {"type": "l2update", "product_id": products[0], "time": 12, "changes": []},
            {"type": "l2update", "product_id": products[0], "time": "2021-04-17T16:43:40Z", "changes": "x"},
            {"type": "snapshot", "product_id": "NOPE-USD", "bids": [["1", "1"]], "asks": []},
            [1, 2, 3],
        ]
        for m in bad:
            rig.send(m, to=["a"])
        for _ in range(2000):  # a flood of unknown-instrument updates
            rig.send({"type": "l2update", "product_id": "NOPE-USD", "time": "2021-04-17T16:43:40Z",
                      "changes": [["buy", "1", "1"]]}, to=["a"])
        await rig.drained()
        assert rig.nats.published == before
        errors = {k: rig.metric("bookcast_ingest_provider_errors_total", venue="coinbase", provider="a", kind=k)
                  for k in ("malformed", "unknown_instrument")}
        assert errors["malformed"] == 5 and errors["unknown_instrument"] == 2001
        await rig.until(lambda: rig.pool.scorer.selected == "b", "a excluded for its error rate")
        assert rig.metric("bookcast_ingest_provider_switches_total", venue="coinbase", reason="error_rate") == 1


async def test_snapshot_less_start_fetches_a_rest_snapshot_and_applies_the_buffered_deltas():
    recs = records(1500)
    products = coinbase_products(recs)
    target = products[0]
    snap = next(r.msg for r in recs if r.msg.get("type") == "snapshot" and r.msg.get("product_id") == target)
    async with Rig("coinbase", products, names=("a",), rest=True) as rig:
        rig.links["a"].rest[target] = snap
        for r in recs:
            if r.msg.get("type") == "snapshot" and r.msg.get("product_id") == target:
                continue  # the stream never sends this product's snapshot
            rig.send(r.msg)
        await rig.drained()
        inst = f"coinbase:{target}"
        await rig.until(lambda: inst in rig.ingest.engine.instruments, "book from REST")
        await rig.drained()
        assert rig.links["a"].fetches >= 1
    ref = reference(recs)
    assert rig.ingest.engine.instruments[inst].book == ref.instruments[inst].book


async def test_rest_snapshot_errors_and_429_are_counted_and_retried():
    recs = records(600)
    products = coinbase_products(recs)
    target = products[0]
    snap = next(r.msg for r in recs if r.msg.get("type") == "snapshot" and r.msg.get("product_id") == target)
    throttled = UpstreamError("429 Too Many Requests")
    throttled.status = 429
    async with Rig("coinbase", products, names=("a",), rest=True) as rig:
        link = rig.links["a"]
        link.rest[target] = throttled
        for r in recs:
            if not (r.msg.get("type") == "snapshot" and r.msg.get("product_id") == target):
                rig.send(r.msg)
        await rig.until(lambda: link.fetches >= 2, "retries")
        link.rest[target] = snap
        inst = f"coinbase:{target}"
        await rig.until(lambda: inst in rig.ingest.engine.instruments, "book from REST after 429s")
        assert rig.metric("bookcast_ingest_provider_errors_total", venue="coinbase", provider="a", kind="throttled") >= 2


def pm_book(asset: str, ts_ms: int, bids, asks) -> dict:
    return {"event_type": "book", "asset_id": asset, "market": "0xm", "timestamp": str(ts_ms), "hash": "0x0",
            "bids": [{"price": p, "size": s} for p, s in bids], "asks": [{"price": p, "size": s} for p, s in asks]}


def pm_change(asset: str, ts_ms: int, changes, best_bid: str, best_ask: str) -> dict:
    return {"event_type": "price_change", "market": "0xm", "timestamp": str(ts_ms), "price_changes": [
        {"asset_id": asset, "price": p, "size": s, "side": side, "hash": "h", "best_bid": best_bid,
         "best_ask": best_ask} for side, p, s in changes]}


async def test_crossed_after_burst_on_the_selected_provider_tells_clients_and_moves_to_a_healthy_one():
    inst = "polymarket:tok"
    t0 = int(time.time() * 1000)
    async with Rig("polymarket", ["tok"], names=("a", "b")) as rig:
        rig.send(pm_book("tok", t0, [("0.40", "10"), ("0.39", "5")], [("0.42", "8"), ("0.43", "4")]))
        await rig.drained()
        # a buy of 12 at 0.43 takes both asks: the bid level first, then the removals, one timestamp
        rig.send(pm_change("tok", t0 + 1, [("BUY", "0.43", "12")], "0.43", "0.44"))
        rig.send(pm_change("tok", t0 + 1, [("SELL", "0.42", "0"), ("SELL", "0.43", "0")], "0.43", "0.44"), to=["b"])
        rig.send(pm_change("tok", t0 + 1, [("SELL", "0.44", "3")], "0.43", "0.44"))
        await rig.drained()
        await rig.until(lambda: rig.pool.scorer.selected == "b", "switch away from the crossed provider")
        await rig.drained()
        statuses = [m["status"] for m in rig.nats.of(inst, "instrument_status")]
        assert statuses[:1] == ["crossed"] and statuses[-1] == "ok"
        assert rig.metric("bookcast_ingest_integrity_faults_total", venue="polymarket", kind="crossed") == 1
        assert rig.metric("bookcast_ingest_provider_switches_total", venue="polymarket", reason="integrity") == 1
        book = rig.ingest.engine.instruments[inst].book
        assert not book.is_crossed()
        assert book.best_bid() == (Decimal("0.43"), Decimal("12")) and book.best_ask() == (Decimal("0.44"), Decimal("3"))
        # the crossed history was lossy: a new epoch from b's book, announced with the status
        last = rig.nats.of(inst, "instrument_status")[-1]
        snap = rig.ingest.snapshot(inst)
        assert last["epoch"] == snap["epoch"] != rig.nats.of(inst, "delta")[0]["epoch"]
        assert snap["status"] == "ok" and snap["seq"] == last["seq"] == 0


async def test_crossing_inside_a_burst_is_neither_a_fault_nor_a_status():
    inst = "polymarket:tok"
    t0 = int(time.time() * 1000)
    async with Rig("polymarket", ["tok"], names=("a",)) as rig:
        rig.send(pm_book("tok", t0, [("0.40", "10")], [("0.42", "8"), ("0.43", "4"), ("0.44", "5")]))
        rig.send(pm_change("tok", t0 + 1, [("BUY", "0.43", "12")], "0.43", "0.44"))
        rig.send(pm_change("tok", t0 + 1, [("SELL", "0.42", "0"), ("SELL", "0.43", "0")], "0.43", "0.44"))
        rig.send(pm_change("tok", t0 + 2, [("BUY", "0.41", "1")], "0.43", "0.44"))
        await rig.drained()
        await rig.until(lambda: not rig.pool.providers["a"].checker._open, "bursts closed")
        await rig.drained()
        assert rig.nats.of(inst, "instrument_status") == []
        assert rig.metric("bookcast_ingest_integrity_faults_total", venue="polymarket", kind="crossed") == 0
        assert len(rig.nats.of(inst, "delta")) == 3


async def test_silent_upstream_makes_the_venue_stale_and_data_clears_it():
    recs = records(300)
    products = coinbase_products(recs)
    async with Rig("coinbase", products, names=("a",), stale_after_s=0.3) as rig:
        for r in recs:
            rig.send(r.msg)
        await rig.drained()
        inst = f"coinbase:{products[0]}"
        await rig.until(lambda: rig.ingest.statuses.status(inst).value == "stale", "stale after 0.3 s of silence")
        ready, body = rig.ingest.readiness()
        assert not ready and body["stale"] == {"coinbase": len(products)}
        assert rig.ingest.snapshot(inst)["status"] == "stale"
        assert rig.ingest.directory("coinbase")["instruments"][0]["status"] == "stale"
        rig.send(LinkEvent.ALIVE)
        await rig.until(lambda: rig.ingest.statuses.status(inst).value == "ok", "a heartbeat clears it")
        msgs = rig.nats.of(inst, "instrument_status")
        assert [m["status"] for m in msgs] == ["stale", "ok"]
        assert msgs[0]["reason"] == "upstream_silent" and isinstance(msgs[0]["since_ns"], int)
        assert rig.metric("bookcast_ingest_instruments_by_status", venue="coinbase", status="ok") == len(products)


async def test_status_lists_providers_with_scores():
    recs = records(200)
    async with Rig("coinbase", coinbase_products(recs), names=("a", "b")) as rig:
        for r in recs:
            rig.send(r.msg)
        await rig.drained()
        await rig.until(lambda: rig.pool.last_decision is not None, "an evaluation")
        st = rig.ingest.status()["providers"]["coinbase"]
        assert st["selected"] == "a" and [p["name"] for p in st["providers"]] == ["a", "b"]
        assert all(0 < p["score"] <= 1 and p["health"] in ("probation", "healthy") for p in st["providers"])
        assert rig.metric("bookcast_ingest_provider_selected", venue="coinbase", provider="a") == 1
        assert rig.metric("bookcast_ingest_provider_messages_total", venue="coinbase", provider="b") == 200


@pytest.fixture(autouse=True)
def _no_leaked_tasks():
    yield
