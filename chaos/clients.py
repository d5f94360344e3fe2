"""Drill clients: a faulted and a control group of real SDK clients, and the independent checker.

Adapter module. ``ClientGroups`` runs every ``feed.client.BookClient`` in a background thread with its own
event loop, one per client (so chaostoolkit's synchronous activities can read them at any time) and records into a
``Recorder``:

* every verified delivery: (monotonic s, group, client, instrument, e2e latency s, url);
* every client-visible event: connected, disconnected, connect failed, gap detected (a resync the client
  asked for), resync received, instrument status (PROTOCOL.md section 11), with the URL it came on.

The control group (Netflix ChAP's control) subscribes the same instruments on a path no drill faults, so
"during" p99 of the faulted group is read beside the control's in the same seconds.

``Checker`` is the independent client: it builds its own books straight from NATS (the ingest's deltas
plus an ingest snapshot, verified by ``feed.client.verify.VerifiedBooks``), never through a gateway. At the
end of a drill the runner pauses the ingest (SIGSTOP, recorded in the state file), waits until every book
stops moving, and ``compare`` counts, per client and instrument, books that differ from the checker's at
the same seq, or are behind it, while the client saw no gap, resync or status for that instrument since
the fault began: these are the **undetected gaps** (a wrong book the user was never told about).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import nats
import orjson

from feed import wire
from feed.client.sdk import BookClient, ConnectFailed, Connected, Disconnected
from feed.client.regions import RegionMoved
from feed.client.verify import (BookCrossed, BookUpdated, GapDetected, ResyncReceived, SendResync, Shutdown,
                                VerifiedBooks)
from feed.subjects import delta_subject, snapshot_subject

log = logging.getLogger("bookcast.chaos.clients")

DETECTION_KINDS = ("disconnected", "connect_failed", "gap_detected", "resync_received", "instrument_status",
                   "book_crossed", "region_moved", "shutdown")


@dataclass(frozen=True, slots=True)
class Delivery:
    t_s: float            # time.monotonic() at receipt
    group: str
    client: int
    instrument: str
    e2e_s: float | None   # receipt minus the venue event (or ingest) stamp
    url: str


@dataclass(frozen=True, slots=True)
class ClientEvent:
    t_s: float
    group: str
    client: int
    kind: str             # connected, disconnected, connect_failed, gap_detected, resync_received,
                          # instrument_status, book_crossed, region_moved, shutdown
    instrument: str | None
    url: str | None
    detail: str = ""


@dataclass
class Recorder:
    """Thread-safe log of deliveries and events (written by the client thread, read by activities)."""

    deliveries: list[Delivery] = field(default_factory=list)
    events: list[ClientEvent] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def delivery(self, d: Delivery) -> None:
        with self.lock:
            self.deliveries.append(d)

    def event(self, e: ClientEvent) -> None:
        with self.lock:
            self.events.append(e)

    def snapshot(self) -> tuple[list[Delivery], list[ClientEvent]]:
        with self.lock:
            return list(self.deliveries), list(self.events)


class ClientGroups:
    """``groups``: {name: (urls, n_clients)}; every client subscribes every instrument. ``urls`` is a list
    of gateway URLs (one region) or a list of lists (regions, preferred first: ``BookClient(regions=...)``)."""

    def __init__(self, groups: dict[str, tuple[list[str], int]], instruments: list[str], *,
                 ws_heartbeat_s: float = 1.0) -> None:
        self.groups = groups
        self.instruments = instruments
        self.ws_heartbeat_s = ws_heartbeat_s
        self.recorder = Recorder()
        self.clients: dict[tuple[str, int], BookClient] = {}
        # one event loop and thread per client: a client busy verifying a deep snapshot (Coinbase BTC-USD,
        # 1.1 MB: seconds on a loaded machine) must not hold the control group's deliveries, nor another
        # client's pongs, as separate users' processes would not
        self.loops: dict[tuple[str, int], asyncio.AbstractEventLoop] = {}
        self._threads: list[threading.Thread] = []
        self._tasks: dict[tuple[str, int], asyncio.Task] = {}

    def start(self) -> None:
        for group, (urls, n) in self.groups.items():
            for i in range(n):
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=f"drill-client-{group}-{i}", daemon=True)
                thread.start()
                self.loops[(group, i)] = loop
                self._threads.append(thread)
                asyncio.run_coroutine_threadsafe(self._start(group, i, urls), loop).result(30)

    async def _start(self, group: str, i: int, urls: list) -> None:
        where = ({"regions": urls} if urls and not isinstance(urls[0], str) else {"urls": urls})
        client = BookClient(instruments=self.instruments, reconnect_backoff_s=(0.05, 0.5),
                            connect_timeout_s=2.0, ws_heartbeat_s=self.ws_heartbeat_s, **where)
        self.clients[(group, i)] = client
        client.start()
        self._tasks[(group, i)] = asyncio.create_task(self._consume(group, i, client))

    def _on_each(self, make, timeout_s: float = 30.0) -> dict:
        """{key: result of ``make(client)``'s coroutine, run on that client's loop} (all started at once)."""
        futures = {key: asyncio.run_coroutine_threadsafe(make(c), self.loops[key]) for key, c in self.clients.items()}
        return {key: f.result(timeout_s) for key, f in futures.items()}

    async def _consume(self, group: str, i: int, client: BookClient) -> None:
        rec = self.recorder
        async for ev in client.events():
            now = time.monotonic()
            if isinstance(ev, BookUpdated):
                e2e = ev.e2e_ns / 1e9 if ev.e2e_ns is not None else None
                rec.delivery(Delivery(now, group, i, ev.instrument, e2e, client.connected_url or ""))
            elif isinstance(ev, Connected):
                rec.event(ClientEvent(now, group, i, "connected", None, ev.url, "resume" if ev.resume else ""))
            elif isinstance(ev, Disconnected):
                rec.event(ClientEvent(now, group, i, "disconnected", None, ev.url, f"{ev.close_code} {ev.error or ''}"))
            elif isinstance(ev, ConnectFailed):
                rec.event(ClientEvent(now, group, i, "connect_failed", None, ev.url, ev.error[:120]))
            elif isinstance(ev, GapDetected):
                rec.event(ClientEvent(now, group, i, "gap_detected", ev.instrument, client.connected_url,
                                      f"{ev.reason} {ev.detail}"[:160]))
            elif isinstance(ev, ResyncReceived):
                rec.event(ClientEvent(now, group, i, "resync_received", ev.instrument, client.connected_url))
            elif isinstance(ev, BookCrossed):
                rec.event(ClientEvent(now, group, i, "book_crossed", ev.instrument, client.connected_url))
            elif isinstance(ev, RegionMoved):
                rec.event(ClientEvent(now, group, i, "region_moved", None, ev.to_url,
                                      f"{ev.from_region}->{ev.to_region} {ev.reason}"))
            elif isinstance(ev, Shutdown):
                rec.event(ClientEvent(now, group, i, "shutdown", None, client.connected_url))
            elif type(ev).__name__ == "InstrumentStatus":
                rec.event(ClientEvent(now, group, i, "instrument_status", getattr(ev, "instrument", None),
                                      client.connected_url, str(getattr(ev, "status", ""))))

    def seqs(self) -> dict[tuple[str, int], dict[str, int]]:
        """{(group, client): {instrument: seq}} of the books held (cheap: no copies)."""
        async def take(c):
            return {i: lb.seq for i in self.instruments if (lb := c.local_book(i)) is not None}
        return self._on_each(take)

    def books(self) -> dict[tuple[str, int], dict[str, tuple[int, Any]]]:
        """{(group, client): {instrument: (seq, book copy)}} taken on each client's thread."""
        async def take(c):
            out = {}
            for inst in self.instruments:
                lb = c.local_book(inst)
                if lb is not None:
                    out[inst] = (lb.seq, lb.book.copy())
            return out
        return self._on_each(take)

    def stop(self) -> None:
        async def close(key):
            await self.clients[key].close()
            task = self._tasks.get(key)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        try:
            futures = [asyncio.run_coroutine_threadsafe(close(key), loop) for key, loop in self.loops.items()
                       if key in self.clients]
            for f in futures:
                try:
                    f.result(30)
                except Exception as exc:  # noqa: BLE001 - close the others
                    log.warning("closing a drill client: %s", exc)
        finally:
            for loop in self.loops.values():
                loop.call_soon_threadsafe(loop.stop)
            for thread in self._threads:
                thread.join(10)


PENDING_DELTAS_MAX = 10_000   # deltas held per instrument while its snapshot is awaited (oldest dropped)


def deltas_past(held: Iterable[tuple[Any, Any, Any]], epoch: str, seq: int) -> list[Any]:
    """Pure: of the deltas ``held`` while a snapshot was awaited, as ``(epoch, seq, message)`` in arrival order,
    the messages to apply after the snapshot ``(epoch, seq)``: all but those of its epoch at or before its seq (the
    snapshot already holds them). Another epoch's delta is kept, so that the book sees the epoch change.

    The book is built the way venues document it (Coinbase's level2 and Binance's "how to manage a local order
    book": buffer the stream, take a snapshot, drop what it covers, apply the rest): over NATS the snapshot reply
    and the deltas come on different subscriptions, and nats-py runs each subscription's callbacks in its own
    task, so a burst published right after the reply can be read before the reply's awaiting task resumes."""
    return [msg for e, s, msg in held if not (e == epoch and isinstance(s, int) and s <= seq)]


def _decoded(data: bytes | dict) -> dict | None:
    """The JSON object ``data`` holds (itself when already decoded), or None when it is not one."""
    if isinstance(data, dict):
        return data
    try:
        head = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return head if isinstance(head, dict) else None


class Checker:
    """Independent books from NATS (ingest deltas + ingest snapshots), in its own thread and loop.

    Deltas of an instrument it holds no book of (its snapshot is on the way) are held, and those the snapshot
    does not cover are applied after it (``deltas_past``); a snapshot older than the book held (a second
    request's late reply) is dropped. Without both, a burst that overtook the reply left the checker behind the
    ingest with nothing to tell it so once the stream went quiet (an "undetected gap" that was the checker's)."""

    def __init__(self, nats_url: str, instruments: list[str], kv_region: str | None = None) -> None:
        self.nats_url = nats_url
        self.kv_region = kv_region   # regions: fall back on the region's KV books (feed.ha) for a snapshot
        self.instruments = instruments
        self.verified = VerifiedBooks()
        self.resyncs = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="drill-checker", daemon=True)
        self._nc = None
        self._repair: asyncio.Task | None = None
        self.paused = False      # set while the runner holds the ingest paused (no snapshot can be answered)
        self._pending: dict[str, deque[tuple[Any, Any, dict]]] = {}

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> None:
        self._nc = await nats.connect(self.nats_url, name="drill-checker", max_reconnect_attempts=-1)
        for inst in self.instruments:
            await self._nc.subscribe(delta_subject(inst), cb=self._on_msg)
        for inst in self.instruments:
            await self._snapshot(inst)
        self._repair = self.loop.create_task(self._repair_missing())

    async def _repair_missing(self, interval_s: float = 1.0) -> None:
        """Ask again for the snapshot of any instrument the checker holds no book of (a timed-out request,
        a gap whose resync failed) while the ingest can answer."""
        while True:
            await asyncio.sleep(interval_s)
            if self.paused:
                continue
            for inst in self.instruments:
                if self.verified.books.get(inst) is None:
                    await self._snapshot(inst)

    async def _snapshot(self, inst: str) -> None:
        try:
            reply = await self._nc.request(snapshot_subject(inst), b"", timeout=5)
        except Exception as exc:  # noqa: BLE001 - the ingest may be the thing being faulted
            failure: Exception = exc
            if self.kv_region is not None:
                from feed.ha import read_kv_snapshot

                try:
                    snap = await read_kv_snapshot(self._nc, self.kv_region, inst)
                except Exception as kv_exc:  # noqa: BLE001
                    snap, failure = None, kv_exc
                if snap is not None:
                    self._apply_snapshot(wire.dumps(snap))
                    return
            log.info("checker: snapshot of %s failed: %s", inst, failure)
            return
        self._apply_snapshot(reply.data)

    async def _on_msg(self, msg) -> None:
        self._on_live(msg.data)

    def _on_live(self, data: bytes | dict) -> None:
        """One message of the live stream: applied, or held when it is a delta of a book not held. Decoded
        once here; what is not a JSON object goes to ``VerifiedBooks`` as it came (its error, its count)."""
        head = _decoded(data)
        if head is not None and head.get("type") == "delta":
            inst = head.get("instrument")
            if isinstance(inst, str) and inst not in self.verified.books:
                pending = self._pending.get(inst)
                if pending is None:
                    pending = self._pending[inst] = deque(maxlen=PENDING_DELTAS_MAX)
                pending.append((head.get("epoch"), head.get("seq"), head))
                return
        self._apply(data if head is None else head)

    def _apply_snapshot(self, data: bytes) -> None:
        """Apply one snapshot reply, then the held deltas past it; drop it when the book held is at or past it
        in the same epoch."""
        head = _decoded(data)
        inst = head.get("instrument") if head is not None else None
        held = self.verified.books.get(inst) if isinstance(inst, str) else None
        if held is not None and held.epoch == head.get("epoch") and isinstance(head.get("seq"), int) \
                and head["seq"] <= held.seq:
            return
        self._apply(data if head is None else head)
        held = self.verified.books.get(inst) if isinstance(inst, str) else None
        if held is None:
            return   # not a snapshot we could use: its fault already asked for another
        for msg in deltas_past(self._pending.pop(inst, ()), held.epoch, held.seq):
            self._on_live(msg)   # held again once a gap among them drops the book

    def _apply(self, data: bytes | dict) -> None:
        for out in self.verified.on_message(data, time.time_ns()):
            if isinstance(out, SendResync):
                self.resyncs += 1
                self.loop.create_task(self._snapshot(out.instrument))

    def books(self) -> dict[str, tuple[int, Any]]:
        async def take():
            out = {}
            for inst in self.instruments:
                lb = self.verified.books.get(inst)
                if lb is not None:
                    out[inst] = (lb.seq, lb.book.copy())
            return out
        return asyncio.run_coroutine_threadsafe(take(), self.loop).result(30)

    def seqs(self) -> dict[str, int]:
        async def take():
            return {i: lb.seq for i in self.instruments if (lb := self.verified.books.get(i)) is not None}
        return asyncio.run_coroutine_threadsafe(take(), self.loop).result(30)

    def resnapshot(self) -> None:
        async def again():
            for inst in self.instruments:
                await self._snapshot(inst)
        asyncio.run_coroutine_threadsafe(again(), self.loop).result(60)

    def stop(self) -> None:
        async def close():
            if self._repair is not None:
                self._repair.cancel()
            if self._nc is not None:
                await self._nc.close()
        try:
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        except Exception:  # noqa: BLE001
            pass
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def compare(reference: dict[str, tuple[int, Any]], clients: dict[tuple[str, int], dict[str, tuple[int, Any]]],
            told: set[tuple[str, int, str]]) -> dict[str, Any]:
    """Pure: compare every client book with the checker's. ``told``: (group, client, instrument) that saw a
    gap, resync or status after the fault began (a wrong book they were told about is detected).

    Returns {"compared", "equal", "undetected": [..], "detected_wrong": [..], "missing": [..]}."""
    out: dict[str, Any] = {"compared": 0, "equal": 0, "undetected": [], "detected_wrong": [], "missing": []}
    for (group, i), books in sorted(clients.items()):
        for inst, (ref_seq, ref_book) in sorted(reference.items()):
            key = f"{group}#{i} {inst}"
            if inst not in books:
                out["missing"].append(key)
                continue
            seq, book = books[inst]
            out["compared"] += 1
            if seq == ref_seq and book == ref_book:
                out["equal"] += 1
                continue
            why = f"{key}: client seq={seq} checker seq={ref_seq}" + ("" if seq != ref_seq else " books differ")
            (out["detected_wrong"] if (group, i, inst) in told else out["undetected"]).append(why)
    return out


def group_counts(events: list[ClientEvent], since_s: float) -> dict[str, dict[str, int]]:
    """{group: {kind: count}} of events at or after ``since_s``."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in events:
        if e.t_s >= since_s:
            out[e.group][e.kind] += 1
    return {g: dict(k) for g, k in out.items()}


class GroupCheckers:
    """One independent ``Checker`` per distinct NATS URL, each group compared with its own (the provider
    drills' control group reads another ingest and NATS than the faulted group)."""

    def __init__(self, urls: dict[str, str], instruments: list[str], kv_region: str | None = None) -> None:
        self.urls = urls
        self.checkers = {u: Checker(u, instruments, kv_region) for u in dict.fromkeys(urls.values())}

    def start(self) -> None:
        for c in self.checkers.values():
            c.start()

    def books(self, group: str) -> dict[str, tuple[int, Any]]:
        return self.checkers[self.urls[group]].books()

    def seqs(self, group: str) -> dict[str, int]:
        return self.checkers[self.urls[group]].seqs()

    def resnapshot(self) -> None:
        for c in self.checkers.values():
            c.resnapshot()

    def complete(self) -> bool:
        """Every checker holds a book of every instrument."""
        return all(len(c.seqs()) == len(c.instruments) for c in self.checkers.values())

    def pause(self, paused: bool) -> None:
        for c in self.checkers.values():
            c.paused = paused

    @property
    def resyncs(self) -> int:
        return sum(c.resyncs for c in self.checkers.values())

    def stop(self) -> None:
        for c in self.checkers.values():
            c.stop()


def compare_groups(checkers: GroupCheckers, clients: dict[tuple[str, int], dict[str, tuple[int, Any]]],
                   told: set[tuple[str, int, str]]) -> dict[str, Any]:
    """``compare`` per group against that group's checker, merged."""
    out: dict[str, Any] = {"compared": 0, "equal": 0, "undetected": [], "detected_wrong": [], "missing": []}
    for group in sorted({g for g, _ in clients}):
        part = compare(checkers.books(group), {k: v for k, v in clients.items() if k[0] == group}, told)
        for k, v in part.items():
            out[k] = out[k] + v
    return out
