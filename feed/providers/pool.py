"""The provider pool of one venue: every configured provider connected at once (hot standby), the best read.

Adapter around the pure ``feed.providers.scoring.Scorer`` and ``feed.integrity``; it owns the links' tasks and
feeds the ingest's books of record (``feed.ingest.Ingest.apply_events``).

How it works, per venue:

* Every provider's link runs all the time. Each provider keeps its own **shadow book** per instrument, built
  from its own stream only (its snapshot, then its deltas) and checked at the end of each venue burst
  (``feed.integrity.BurstChecker``). Every message updates the scorer (data, latency, venue event time);
  link events (connected, disconnected, error, alive, throttled) too.
* Only the **selected** provider's events reach the books of record and so the clients. The same venue event
  arriving from two providers is therefore published once; trades are also de-duplicated by trade id (or
  time, price, size and side) across switches.
* **Switch** (``Scorer.evaluate`` decides, every ``evaluate_interval_s`` and at once after a disconnect or an
  integrity fault): if the new provider has reached the venue event time the books of record were at, the
  switch completes at once, else when it does (at most ``catchup_max_s`` later). Completing diffs the new
  provider's shadow book of each instrument against the book of record and publishes the difference as an
  ordinary delta: **lossless**, same epoch, contiguous seq, and events the old provider already delivered are
  not sent again. An instrument whose book of record is known to be wrong (an integrity fault of the old
  provider) restarts instead in a **new epoch** from the new provider's book (**lossy**). An instrument the
  new provider has no book of yet is ``resyncing`` until it has one (its stream's snapshot, or REST).
* **Snapshot-less starts**: deltas before a provider's first snapshot of an instrument are buffered (at most
  ``max_pending`` per instrument); if no snapshot comes within ``snapshot_grace_s`` the pool fetches one
  through the provider's link (venue REST), applies it, then the buffered deltas newer than it (all of them
  if the snapshot has no event time). Failed fetches are retried with backoff; a 429 counts as throttled.
* **Integrity faults** of a provider's book (crossed or locked after a burst, or not the venue's own top of
  book) mark that shadow book invalid (a REST snapshot repairs it, or the stream's next snapshot). For the
  selected provider the instrument also becomes ``crossed`` (or ``resyncing`` for a top mismatch) for
  clients, the fault is counted, and the provider is excluded (``Fault.INTEGRITY``) so the pool moves to a
  healthy one; alone, it waits for its repair.
* **Staleness**: when the selected provider has sent neither data nor a heartbeat for the venue's
  ``stale_after_s`` (or no provider is connected that long), every instrument of the venue is ``stale``.
* **Bad input** (not JSON-decodable frames arrive as text, wrong types, unknown instruments, a flood beyond
  ``max_queue`` messages) is counted by provider and kind and skipped; it never reaches clients.

Metrics (``feed.catalog``, providers block): ``bookcast_ingest_provider_selected``, ``_score``,
``_lag_seconds``, ``_messages_total``, ``_errors_total`` (kind: disconnect, error_reply, malformed,
unknown_instrument, flood, throttled, stale, lag, error_rate, integrity), ``_switches_total`` (reason) and
``bookcast_ingest_provider_up``.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from decimal import Decimal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sortedcontainers import SortedDict

from feed.capture import CaptureRecord
from feed.errors import RemoteError
from feed.integrity import SEQ_FAULT_KINDS, BurstChecker, BurstEnd, Status, Top, venue_top
from feed.model import (BestBidAsk, BookDelta, BookIncrement, BookSnapshot, MarketResolved, Side,
                        TickSizeChange, Trade, VenueEvent, VenueSeqFault, instrument_id, split_instrument)
from feed.providers.config import PoolConfig, VenueConfig
from feed.providers.scoring import Decision, Fault, Scorer
from feed.sequencer import NegativeLevel, absolute_changes
from feed.upstream import Link, LinkEvent, ProviderSpec, UpstreamError, open_link
from feed.venues import VenueSession, parser_for, session_for

log = logging.getLogger("bookcast.providers")

class ShadowBook:
    """A provider's own book of one instrument: exact ``Decimal`` levels only (no wire strings, no checksum),
    so a standby's 40,000-level snapshot costs a fraction of a book of record."""

    __slots__ = ("_bids", "_asks")

    def __init__(self) -> None:
        self._bids: SortedDict = SortedDict()  # negated price -> size, best first
        self._asks: SortedDict = SortedDict()

    def apply_snapshot(self, bids, asks) -> None:
        self._bids = SortedDict({-p: s for p, s in bids if s})
        self._asks = SortedDict({p: s for p, s in asks if s})

    def apply_changes(self, changes) -> None:
        for c in changes:
            levels, key = (self._bids, -c.price) if c.side is Side.BID else (self._asks, c.price)
            if c.size:
                levels[key] = c.size
            else:
                levels.pop(key, None)

    def size_at(self, side: Side, price: Decimal) -> Decimal:
        return (self._bids.get(-price) if side is Side.BID else self._asks.get(price)) or Decimal(0)

    def top(self) -> Top:
        return (-self._bids.peekitem(0)[0] if self._bids else None, self._asks.peekitem(0)[0] if self._asks else None)

    def depth(self, side: Side) -> list[tuple[Decimal, Decimal]]:
        if side is Side.BID:
            return [(-p, s) for p, s in self._bids.items()]
        return list(self._asks.items())


@dataclass(slots=True)
class Shadow:
    """One provider's own book of one instrument."""

    book: ShadowBook | None = None
    valid: bool = False
    ts_event_ns: int | None = None
    pending: deque = field(default_factory=deque)  # BookDelta buffered before a snapshot
    fetch: asyncio.Task | None = None


@dataclass(eq=False)
class Provider:
    spec: ProviderSpec
    link: Link
    queue: asyncio.Queue
    shadows: dict[str, Shadow] = field(default_factory=dict)
    checker: BurstChecker = field(default_factory=BurstChecker)
    session: VenueSession | None = None  # parser + venue seq checks of this provider's connection
    last_heard_ns: int | None = None  # data or heartbeat
    connected: bool = False
    dropped: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def top(self, instrument: str) -> Top | None:
        sh = self.shadows.get(instrument)
        if sh is None or sh.book is None or not sh.valid:
            return None
        return sh.book.top()


def _apply_to_shadow(sh: Shadow, ev: Any) -> bool:
    """Apply a delta (absolute sizes) or an increment (signed sizes, Kalshi) to a shadow book; False if an
    increment would take a level below zero (the book disagrees with the venue; nothing is applied)."""
    if isinstance(ev, BookDelta):
        sh.book.apply_changes(ev.changes)
        return True
    try:
        sh.book.apply_changes(absolute_changes(ev, sh.book.size_at))
    except NegativeLevel:
        return False
    return True


def _snapshot_of(instrument: str, sh: Shadow) -> BookSnapshot:
    assert sh.book is not None
    return BookSnapshot(instrument, tuple(sh.book.depth(Side.BID)), tuple(sh.book.depth(Side.ASK)), sh.ts_event_ns)


class VenuePool:
    """The providers of one venue. ``links`` (name -> Link) replaces ``open_link`` (tests, simulators)."""

    def __init__(self, ingest: Any, vcfg: VenueConfig, *, links: Mapping[str, Link] | None = None,
                 clock_ns: Callable[[], int] | None = None, evaluate_interval_s: float = 0.05,
                 catchup_max_s: float = 1.0, snapshot_grace_s: float = 0.5, max_pending: int = 10_000,
                 max_queue: int = 50_000) -> None:
        self.ingest = ingest
        self.cfg = vcfg
        self.venue = vcfg.venue
        self.clock_ns = clock_ns or ingest.clock_ns
        self.parser = parser_for(vcfg.venue)
        self.instruments = {instrument_id(vcfg.venue, s) for s in vcfg.symbols}
        self.evaluate_interval_s = evaluate_interval_s
        self.catchup_max_ns = int(catchup_max_s * 1e9)
        self.snapshot_grace_s = snapshot_grace_s
        self.max_pending = max_pending
        self.scorer = Scorer([(p.name, p.weight) for p in vcfg.providers], vcfg.scoring)
        self.providers: dict[str, Provider] = {}
        for spec in vcfg.providers:
            link = links[spec.name] if links is not None else open_link(spec)
            self.providers[spec.name] = Provider(spec, link, asyncio.Queue(max_queue),
                                                 checker=BurstChecker(ingest.config.burst_idle_s),
                                                 session=session_for(vcfg.venue))
        self.lock = asyncio.Lock()
        self.record_position_ns: int | None = None  # newest venue event time forwarded to the books of record
        self.record_bad: set[str] = set()  # books of record known wrong: repaired in a new epoch
        self.catching_up: tuple[str, int] | None = None  # (provider, deadline ns)
        self.stale = False
        self.no_provider_since_ns: int | None = None
        self.switches = 0
        self.lossy_repairs = 0
        self.last_decision: Decision | None = None
        self._tasks: list[asyncio.Task] = []
        self._build_metrics()

    # -- metrics --------------------------------------------------------------------------------
    def _build_metrics(self) -> None:
        m = self.ingest.metric

        self.m_selected = m("bookcast_ingest_provider_selected")
        self.m_score = m("bookcast_ingest_provider_score")
        self.m_lag = m("bookcast_ingest_provider_lag_seconds")
        self.m_messages = m("bookcast_ingest_provider_messages_total")
        self.m_errors = m("bookcast_ingest_provider_errors_total")
        self.m_switches = m("bookcast_ingest_provider_switches_total")
        self.m_up = self.ingest.provider_up
        for p in self.providers.values():
            p.metrics["messages"] = self.m_messages.labels(self.venue, p.name)
            self.m_selected.labels(self.venue, p.name).set(0)
            self.m_up.labels(p.name).set(0)

    def _error(self, p: Provider, kind: str, now_ns: int, detail: object = "") -> None:
        self.m_errors.labels(self.venue, p.name, kind).inc()
        if kind == "throttled":
            self.scorer.throttled(p.name, now_ns)
        elif kind not in ("stale", "lag", "error_rate", "integrity", "disconnect"):
            self.scorer.error(p.name, now_ns)
        if detail:
            log.warning("provider %s/%s %s: %s", self.venue, p.name, kind, detail)

    # -- running --------------------------------------------------------------------------------
    async def run(self) -> None:
        """Run every link, its consumer and the evaluation tick until cancelled."""
        loop = asyncio.get_running_loop()
        self.no_provider_since_ns = self.clock_ns()
        symbols = list(self.cfg.symbols)
        try:
            for p in self.providers.values():
                self._tasks.append(loop.create_task(self._run_link(p, symbols), name=f"link-{p.name}"))
                self._tasks.append(loop.create_task(self._consume(p), name=f"consume-{p.name}"))
            self._tasks.append(loop.create_task(self._tick(), name=f"pool-{self.venue}"))
            await asyncio.gather(*self._tasks)
        finally:
            for t in self._tasks:
                t.cancel()
            for p in self.providers.values():
                for sh in p.shadows.values():
                    if sh.fetch is not None:
                        sh.fetch.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run_link(self, p: Provider, symbols: list[str]) -> None:
        def on_message(record: CaptureRecord) -> None:
            try:
                p.queue.put_nowait(("msg", record, self.clock_ns()))
            except asyncio.QueueFull:
                p.dropped += 1
                if p.dropped == 1 or p.dropped % 10_000 == 0:
                    log.warning("provider %s/%s floods the ingest: %d messages dropped so far",
                                self.venue, p.name, p.dropped)
                self.m_errors.labels(self.venue, p.name, "flood").inc()
                self.scorer.error(p.name, self.clock_ns())
                for sh in p.shadows.values():  # its books missed data: they need a fresh snapshot
                    sh.valid = False

        def on_event(event: LinkEvent, detail: str) -> None:
            try:
                p.queue.put_nowait(("event", (LinkEvent(event), detail), self.clock_ns()))
            except asyncio.QueueFull:
                pass

        backoff_s = 0.1
        while True:
            try:
                await p.link.run(symbols, on_message, on_event)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a link must reconnect itself; if it dies, restart it
                on_event(LinkEvent.DISCONNECTED, f"link stopped: {exc!r}")
                log.warning("provider %s/%s link stopped (%r); restarting in %.1f s", self.venue, p.name, exc, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)

    async def _consume(self, p: Provider) -> None:
        handled = 0
        while True:
            handled += 1
            if handled % 32 == 0:
                await asyncio.sleep(0)  # a full queue returns at once: let the other providers, NATS and HTTP run
            kind, payload, recv_ns = await p.queue.get()
            async with self.lock:
                try:
                    if kind == "msg":
                        await self._on_message(p, payload, recv_ns)
                    else:
                        await self._on_event(p, *payload, recv_ns)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - one bad message never stops the ingest
                    log.exception("provider %s/%s: message handling failed; skipped", self.venue, p.name)
                    self.m_errors.labels(self.venue, p.name, "malformed").inc()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.evaluate_interval_s)
            async with self.lock:
                try:
                    await self.evaluate(self.clock_ns())
                except Exception:  # noqa: BLE001
                    log.exception("pool %s: evaluation failed", self.venue)

    # -- link events ----------------------------------------------------------------------------
    async def _on_event(self, p: Provider, event: LinkEvent, detail: str, now_ns: int) -> None:
        if event is LinkEvent.CONNECTED:
            p.session.reset()  # venue seq counters start again on a new connection
            p.connected = True
            p.last_heard_ns = now_ns
            self.scorer.connected(p.name, now_ns)
            self.m_up.labels(p.name).set(1)
            log.info("provider %s/%s connected %s", self.venue, p.name, detail)
        elif event is LinkEvent.DISCONNECTED:
            was = p.connected
            p.connected = False
            self.m_up.labels(p.name).set(0)
            for sh in p.shadows.values():
                sh.valid = False  # the stream broke: a new snapshot (on resubscribe, or REST) is needed
            p.checker = BurstChecker(self.ingest.config.burst_idle_s)
            self.scorer.disconnected(p.name, now_ns)
            if was:
                self._error(p, "disconnect", now_ns)
                log.warning("provider %s/%s disconnected: %s", self.venue, p.name, detail)
            await self.evaluate(now_ns)
        elif event is LinkEvent.ALIVE:
            p.last_heard_ns = now_ns
            self.scorer.alive(p.name, now_ns)
        elif event is LinkEvent.THROTTLED:
            self._error(p, "throttled", now_ns)
        elif event is LinkEvent.ERROR:
            self._error(p, "error_reply", now_ns, detail)

    # -- data -----------------------------------------------------------------------------------
    async def _on_message(self, p: Provider, record: CaptureRecord, recv_ns: int) -> None:
        p.metrics["messages"].inc()
        vm = self.ingest.venue_metrics(self.venue)
        vm.messages.inc()
        try:
            result = p.session.parse(record.msg)
        except (RemoteError, TypeError, ValueError, AttributeError) as exc:
            vm.parse_errors.inc()
            self._error(p, "malformed", recv_ns)
            log.debug("provider %s/%s malformed message skipped: %s", self.venue, p.name, exc)
            return
        p.last_heard_ns = recv_ns
        if not result.events:
            vm.ignored.inc()
            self.scorer.alive(p.name, recv_ns)
            return
        forward: list[VenueEvent] = []
        newest: int | None = None
        known = 0
        for ev in result.events:
            if isinstance(ev, VenueSeqFault):
                await self._seq_fault(p, ev, recv_ns)
                continue
            inst = ev.instrument
            if inst not in self.instruments:
                self._error(p, "unknown_instrument", recv_ns)
                continue
            known += 1
            ts = ev.ts_event_ns
            if ts is not None and (newest is None or ts > newest):
                newest = ts
            if isinstance(ev, (Trade, TickSizeChange, MarketResolved)):
                forward.append(ev)
                continue
            sh = p.shadows.get(inst)
            if sh is None:
                sh = p.shadows[inst] = Shadow()
            if isinstance(ev, BestBidAsk):  # the venue's own top of book: judged at the burst's end
                if sh.valid:
                    await self._judge(p, p.checker.begin(inst, ts, p.top(inst)))
                    p.checker.end_message(inst, ts, recv_ns, venue_top(ev))
                continue
            if isinstance(ev, BookSnapshot):
                if sh.valid and sh.book is not None:
                    await self._judge(p, p.checker.begin(inst, ts, p.top(inst)))
                sh.book = ShadowBook()
                sh.book.apply_snapshot(ev.bids, ev.asks)
                sh.valid = True
                sh.ts_event_ns = ts
                sh.pending.clear()
                p.checker.end_message(inst, ts, recv_ns, None)  # a snapshot carries no venue top
                forward.append(ev)
                if sh.fetch is not None:
                    sh.fetch.cancel()
                    sh.fetch = None
                continue
            if not isinstance(ev, (BookDelta, BookIncrement)):
                continue
            if not sh.valid:
                sh.pending.append(ev)
                if len(sh.pending) > self.max_pending:
                    sh.pending.popleft()
                self._want_snapshot(p, inst)
                continue
            await self._judge(p, p.checker.begin(inst, ts, p.top(inst)))
            if not sh.valid:  # the burst that just ended was bad
                sh.pending.append(ev)
                continue
            if not _apply_to_shadow(sh, ev):
                await self._book_fault(p, inst, "negative_level", f"{inst}: a signed delta takes a level below zero")
                continue
            sh.ts_event_ns = ts
            p.checker.end_message(inst, ts, recv_ns, venue_top(ev))
            forward.append(ev)
        if not known:
            return
        self.scorer.message(p.name, recv_ns, newest)
        if self.scorer.selected is None:
            await self.evaluate(recv_ns)  # the first provider with data is read at once
            if p.name == self.scorer.selected:
                return  # completing the switch just published this provider's books, this message included
        if p.name == self.scorer.selected:
            await self._forward(p, forward, recv_ns)

    async def _seq_fault(self, p: Provider, fault: Any, now_ns: int) -> None:
        """A venue seq gap, duplicate or reset on one of ``p``'s streams (``feed.venues.seqcheck``)."""
        kind = SEQ_FAULT_KINDS[fault.kind]
        detail = f"stream {fault.stream} expected seq {fault.expected} got {fault.got}"
        if kind == "duplicate":  # the session dropped it: nothing reached any book
            self._error(p, "duplicate", now_ns)
            if p.name == self.scorer.selected:
                self.ingest.venue_metrics(self.venue).fault("duplicate")
            return
        for inst in fault.instruments:
            if inst in self.instruments:
                await self._book_fault(p, inst, kind, detail)

    async def _forward(self, p: Provider, events: list[VenueEvent], recv_ns: int) -> None:
        if self.catching_up is not None:
            name, deadline_ns = self.catching_up
            pos = self.scorer.position_ns(name)
            if name == p.name and (recv_ns >= deadline_ns or self.record_position_ns is None
                                   or (pos is not None and pos >= self.record_position_ns)):
                await self._complete_switch(p, recv_ns)
            return
        out: list[VenueEvent] = []
        for ev in events:
            inst = ev.instrument
            if inst in self.record_bad and not isinstance(ev, (Trade, TickSizeChange)):
                if isinstance(ev, BookSnapshot):
                    await self._repair(p, inst, recv_ns)
                continue
            out.append(ev)
            if ev.ts_event_ns is not None and (self.record_position_ns is None or ev.ts_event_ns > self.record_position_ns):
                self.record_position_ns = ev.ts_event_ns
        if out:
            await self.ingest.apply_events(self.venue, out, recv_ns)
            for ev in out:
                if isinstance(ev, BookSnapshot):
                    await self._clear_repair_status(ev.instrument)

    async def _clear_repair_status(self, inst: str) -> None:
        await self.ingest.set_condition(inst, Status.RESYNCING, False, "")
        await self.ingest.set_condition(inst, Status.CROSSED, False, "")

    # -- integrity ------------------------------------------------------------------------------
    async def _judge(self, p: Provider, end: BurstEnd | None) -> None:
        if end is None or end.fault_kind is None:
            return
        await self._book_fault(p, end.instrument, end.fault_kind, end.describe())

    async def _book_fault(self, p: Provider, inst: str, kind: str, detail: str) -> None:
        """Provider ``p``'s book of ``inst`` is wrong (``kind``: crossed, top_mismatch, seq_gap, reset,
        negative_level): it needs a fresh snapshot; if ``p`` is read, clients are told and the pool moves on."""
        sh = p.shadows.get(inst)
        was_valid = sh is not None and sh.valid
        if sh is not None:
            sh.valid = False
        now_ns = self.clock_ns()
        selected = p.name == self.scorer.selected and self.catching_up is None
        self._error(p, "integrity", now_ns)
        if was_valid or selected:
            log.warning("provider %s/%s integrity fault %s: %s%s", self.venue, p.name, kind, detail,
                        " (read provider: clients told, moving on)" if selected else " (standby)")
        if selected and inst in self.ingest.engine.instruments:
            self.ingest.venue_metrics(self.venue).fault(kind)
            self.record_bad.add(inst)
            if kind == "crossed":
                await self.ingest.set_condition(inst, Status.CROSSED, True, f"{kind}_after_burst")
            else:
                await self.ingest.set_condition(inst, Status.RESYNCING, True, kind)
            self.scorer.fault(p.name, Fault.INTEGRITY, now_ns)
            await self.evaluate(now_ns)
        self._want_snapshot(p, inst, grace=kind not in ("crossed", "top_mismatch"))

    # -- snapshots over REST --------------------------------------------------------------------
    def _want_snapshot(self, p: Provider, inst: str, *, grace: bool = True) -> None:
        sh = p.shadows.setdefault(inst, Shadow())
        if sh.fetch is not None and not sh.fetch.done():
            return
        if not p.spec.rest_url:
            return  # the stream's next snapshot (Polymarket re-sends book; reconnect resubscribes) repairs it
        sh.fetch = asyncio.get_running_loop().create_task(self._fetch(p, inst, self.snapshot_grace_s if grace else 0.0))

    async def _fetch(self, p: Provider, inst: str, grace_s: float) -> None:
        if grace_s:
            await asyncio.sleep(grace_s)  # the stream usually sends its own snapshot right after (re)subscribing
        delay_s = 0.2
        symbol = split_instrument(inst)[1]
        while True:
            sh = p.shadows[inst]
            if sh.valid:
                return
            try:
                raw = await p.link.fetch_snapshot(symbol)
                events = self.parser(raw).events  # a REST book has no stream seq: the plain parser
                snap = next((e for e in events if isinstance(e, BookSnapshot) and e.instrument == inst), None)
                if snap is None:
                    raise UpstreamError(f"REST reply for {symbol} holds no book of it")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: count, back off, retry
                status = getattr(exc, "status", None)
                self._error(p, "throttled" if status == 429 else "error_reply", self.clock_ns(),
                            f"snapshot fetch {inst}: {exc}")
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)
                continue
            async with self.lock:
                sh = p.shadows[inst]
                sh.fetch = None
                if sh.valid:
                    return
                sh.book = ShadowBook()
                sh.book.apply_snapshot(snap.bids, snap.asks)
                sh.ts_event_ns = snap.ts_event_ns
                applied = 0
                for d in sh.pending:
                    if snap.ts_event_ns is None or d.ts_event_ns is None or d.ts_event_ns > snap.ts_event_ns:
                        if not _apply_to_shadow(sh, d):
                            log.warning("provider %s/%s: buffered delta of %s does not fit the REST snapshot; "
                                        "skipped", self.venue, p.name, inst)
                            continue
                        sh.ts_event_ns = d.ts_event_ns or sh.ts_event_ns
                        applied += 1
                sh.pending.clear()
                sh.valid = True
                p.checker.forget(inst)
                log.info("provider %s/%s: %s from a REST snapshot plus %d buffered deltas", self.venue, p.name,
                         inst, applied)
                if p.name == self.scorer.selected and self.catching_up is None:
                    await self._repair(p, inst, self.clock_ns())
            return

    async def _repair(self, p: Provider, inst: str, now_ns: int) -> None:
        """Bring the book of record of ``inst`` to provider ``p``'s valid shadow book: a diff (lossless) or,
        if the book of record is known wrong, a new epoch (lossy)."""
        sh = p.shadows.get(inst)
        if sh is None or not sh.valid or sh.book is None:
            return
        snap = _snapshot_of(inst, sh)
        if inst in self.record_bad and inst in self.ingest.engine.instruments:
            self.record_bad.discard(inst)
            self.lossy_repairs += 1
            await self.ingest.reset_instrument(snap, now_ns, f"book of record was wrong; repaired from {p.name}")
        else:
            self.record_bad.discard(inst)
            await self.ingest.apply_events(self.venue, [snap], now_ns)
        await self._clear_repair_status(inst)

    # -- selection ------------------------------------------------------------------------------
    async def evaluate(self, now_ns: int) -> Decision:
        """Run the scorer, publish its gauges, act on a switch, close idle bursts, update staleness."""
        busy = {name for name, p in self.providers.items() if p.queue.qsize()}  # their silence is our backlog
        d = self.scorer.evaluate(now_ns, busy=busy)
        self.last_decision = d
        for name, fault in d.new_faults:
            self._error(self.providers[name], fault.value, now_ns)
            log.warning("provider %s/%s excluded: %s", self.venue, name, fault.value)
        for name, view in d.providers.items():
            self.m_score.labels(self.venue, name).set(view.score)
            self.m_lag.labels(self.venue, name).set(view.lag_s)
        if d.switched:
            await self._switch(d, now_ns)
        if self.catching_up is not None and now_ns >= self.catching_up[1]:
            await self._complete_switch(self.providers[self.catching_up[0]], now_ns)
        for p in self.providers.values():
            for end in p.checker.flush(now_ns, p.top):
                await self._judge(p, end)
        await self._check_stale(now_ns)
        return d

    async def _switch(self, d: Decision, now_ns: int) -> None:
        reason = d.reason.value if d.reason else "unknown"
        self.m_switches.labels(self.venue, reason).inc()
        self.switches += 1
        for name in self.providers:
            self.m_selected.labels(self.venue, name).set(1 if name == d.selected else 0)
        log.warning("venue %s: reading provider %s (was %s): %s", self.venue, d.selected, d.previous, reason)
        if d.selected is None:
            self.catching_up = None
            self.no_provider_since_ns = now_ns
            return
        self.no_provider_since_ns = None
        pos = self.scorer.position_ns(d.selected)
        if self.record_position_ns is None or (pos is not None and pos >= self.record_position_ns):
            await self._complete_switch(self.providers[d.selected], now_ns)
        else:
            self.catching_up = (d.selected, now_ns + self.catchup_max_ns)

    async def _complete_switch(self, p: Provider, now_ns: int) -> None:
        self.catching_up = None
        lossless = lossy = waiting = 0
        for inst, sh in p.shadows.items():
            if not sh.valid or sh.book is None:
                continue
            if inst in self.record_bad and inst in self.ingest.engine.instruments:
                lossy += 1
            else:
                lossless += 1
            await self._repair(p, inst, now_ns)
        for inst in list(self.ingest.engine.instruments):
            if split_instrument(inst)[0] != self.venue:
                continue
            sh = p.shadows.get(inst)
            if sh is None or not sh.valid:
                waiting += 1
                await self.ingest.set_condition(inst, Status.RESYNCING, True, "provider_switch")
                self._want_snapshot(p, inst)
        pos = self.scorer.position_ns(p.name)
        if pos is not None and (self.record_position_ns is None or pos > self.record_position_ns):
            self.record_position_ns = pos
        log.info("venue %s: now reading %s: %d instruments continued (same epoch), %d in a new epoch, "
                 "%d waiting for a snapshot", self.venue, p.name, lossless, lossy, waiting)

    async def _check_stale(self, now_ns: int) -> None:
        bound_ns = int(self.cfg.stale_after_s * 1e9)
        sel = self.scorer.selected
        if sel is None:
            since = self.no_provider_since_ns
            stale = since is not None and now_ns - since > bound_ns
            reason = "no_provider"
        else:
            heard = self.providers[sel].last_heard_ns
            stale = heard is None or now_ns - heard > bound_ns
            reason = "upstream_silent"
        if stale == self.stale:
            return
        self.stale = stale
        log.log(logging.WARNING if stale else logging.INFO, "venue %s %s", self.venue,
                f"stale: {reason} for more than {self.cfg.stale_after_s:g} s" if stale else "no longer stale")
        for inst in list(self.ingest.engine.instruments):
            if split_instrument(inst)[0] == self.venue:
                await self.ingest.set_condition(inst, Status.STALE, stale, reason if stale else "")

    # -- status ---------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The venue's providers with their health, score and lag (``/v1/status``)."""
        d = self.last_decision
        providers = []
        for name, p in self.providers.items():
            v = d.providers.get(name) if d is not None else None
            providers.append({
                "name": name, "ws_url": p.spec.ws_url, "rest_url": p.spec.rest_url, "weight": p.spec.weight,
                "selected": name == self.scorer.selected, "connected": p.connected,
                "health": (v.health if v else self.scorer.health(name)).value,
                "score": round(v.score, 4) if v else 0.0,
                "error_rate": round(v.error_rate, 4) if v else 0.0,
                "throttled_rate": round(v.throttled_rate, 4) if v else 0.0,
                "latency_s": v.latency_s if v else None,
                "lag_s": round(v.lag_s, 4) if v else 0.0,
                "fault": v.fault.value if v and v.fault else None,
                "books": sum(1 for sh in p.shadows.values() if sh.valid),
            })
        return {"selected": self.scorer.selected, "switches": self.switches, "lossy_repairs": self.lossy_repairs,
                "stale": self.stale, "catching_up": self.catching_up[0] if self.catching_up else None,
                "providers": providers}


async def run_pools(ingest: Any, config: PoolConfig, *, links: Mapping[str, Mapping[str, Link]] | None = None) -> None:
    """Run one ``VenuePool`` per configured venue on ``ingest`` until cancelled. ``links``: venue -> name -> Link
    (instead of ``open_link``)."""
    pools = [VenuePool(ingest, v, links=links.get(v.venue) if links is not None else None) for v in config.venues]
    ingest.pools.extend(pools)
    log.info("provider pools: %s", config.describe())
    await asyncio.gather(*(p.run() for p in pools))

