"""The ingest: venue messages in, books of record kept, sequenced deltas published to NATS.

Adapter around the pure ``BookEngine``. For each raw venue message (from a capture replay, later from
live providers) it parses with the venue parser, applies to the engine, and publishes each delta once,
encoded once, to ``md.v1.<venue>.<symbol>`` with ``ts_event_ns`` (venue time, rebased on replay),
``ts_ingest_ns`` (when the ingest received the message) and ``ts_publish_ns`` (just before publish). It
answers snapshot requests on ``md.v1.snap.<venue>.<symbol>`` and announces its instrument directory
(epoch, seq, tick size per instrument) on ``md.v1.meta.instruments.<venue>`` every second, when an
instrument appears, and when asked on ``md.v1.ctl.announce``.

Bad input never stops the ingest: an unparseable message is logged and counted, a delta for a book with
no snapshot yet is dropped and counted.

Latency instrumentation (names in ``feed.catalog``): ``bookcast_hop_upstream_seconds`` observes
``ts_ingest_ns - ts_event_ns`` and ``bookcast_hop_ingest_seconds`` ``ts_publish_ns - ts_ingest_ns`` for every
delta. On replay ``ts_event_ns`` is the venue's time rebased by the capture's shift, so the upstream hop is
the *recorded* one (the recorder's receive minus the venue's stamp). A negative upstream hop (the venue's
clock ahead of the receiver's; the bundled Coinbase capture is about -13 ms at the median) is observed as
0 and counted in ``bookcast_ingest_upstream_clock_skew_total``, so a skewed clock is visible rather than
hidden or mistaken for speed. With OTLP on (``otlp_endpoint``), one delta in ``trace_sample_every`` gets a
trace (``feed.otlp``): its ``traceparent`` travels in the NATS headers and in the delta.

Integrity and status (PROTOCOL.md section 11, ``feed.integrity``): every book is checked at the end of each venue
burst (never inside one); a book still crossed or locked then is an integrity fault (counted by venue and kind)
and the instrument's status becomes ``crossed`` until a later burst ends with a sound book. Status changes are
published on the instrument's delta subject, ordered with its deltas, as ``{"type":"instrument_status",
"instrument","status","reason","since_ns","ts_publish_ns","epoch","seq"}``; snapshots and directory entries
carry ``"status"``. A capture that ends (no ``--loop``) leaves its instruments ``stale`` (reason
``upstream_ended``): nothing updates them any more. With a provider pool (``feed.providers.pool``) the pool adds
``stale`` (upstream silent beyond the venue's bound), ``resyncing`` and failover. ``/readyz`` is 503 while NATS
is down or any instrument is ``stale``, with the stale venues in its body.

Deltas before any snapshot: from a capture they are dropped, with one WARNING per instrument when it starts and
a summary (instrument and count) when the capture ends; ``/v1/status`` lists them under ``no_snapshot``.

Test hooks, off by default (both read on every message, so a test may change them while the ingest runs):
``upstream_lag_ns`` moves every rebased event time back by a fixed amount, so the upstream looks that much
slower ("a lagging upstream"); ``ingest_delay_ns`` holds every delta that long between receiving and
publishing it, in order, without slowing the reading ("a slow ingest").
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from aiohttp import web
from prometheus_client import CollectorRegistry

from feed.otlp import TRACEPARENT, Otlp, endpoint_from
from feed import metrics as prom
from feed import natsauth
from feed import wire
from feed.capture import CaptureRecord, replay
from feed.errors import RemoteError
from feed.integrity import (SEQ_FAULT_KINDS, BurstChecker, BurstEnd, Status, StatusChange, StatusTracker, Top,
                            book_top, venue_top)
from feed.model import (VENUE_INFO_EVENTS, BookSnapshot, MarketResolved, TickSizeChange, Trade, VenueEvent,
                        VenueSeqFault, canonical, split_instrument)
from feed.sequencer import BookEngine, DeltaBeforeSnapshot, InstrumentAdded, SequencedDelta
from feed.subjects import ANNOUNCE_REQUEST, PREFIX, delta_subject, directory_subject, trade_subject, unescape_token
from feed.venues import UnknownVenue, VenueSession, parser_for, session_for

log = logging.getLogger("bookcast.ingest")

# Instrument metadata fields a venue message may carry, passed through to the directory and /v1/instruments.
VENUE_METADATA = ("market", "min_order_size", "question", "outcome")

@dataclass
class IngestConfig:
    nats_url: str = "nats://127.0.0.1:4222"
    captures: list[Path] = field(default_factory=list)
    speed: float | None = 1.0  # replay speed factor; None = as fast as possible
    loop: bool = False
    name: str = "ingest"
    announce_interval_s: float = 1.0
    epoch_base: str | None = None  # default: random per process, so a restart is a new epoch
    otlp_endpoint: str | None = None  # OTLP/gRPC traces; None = off
    trace_sample_every: int = 1000  # with OTLP on: trace one delta in this many
    upstream_lag_ns: int = 0  # test hook: event times moved back by this much (a lagging upstream)
    ingest_delay_ns: int = 0  # test hook: publish each delta this long after receiving it (a slow ingest)
    burst_idle_s: float = 0.25  # a venue burst with no message for this long is over (feed.integrity)
    providers: Any = None  # feed.providers.config.PoolConfig: read live providers instead of captures
    nats_credentials: natsauth.NatsCredentials = field(default_factory=natsauth.NatsCredentials)
    ha: Any = None  # feed.ha.HaConfig: join the regions' publishing lease; None = always publish


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ingest's observability options and test hooks, for ``bookcast replay``."""
    p.add_argument("--otlp-endpoint", default=endpoint_from(None),
                   help="OTLP/gRPC endpoint for sampled traces, e.g. http://127.0.0.1:4317 "
                        "(default $OTEL_EXPORTER_OTLP_ENDPOINT; unset = off)")
    p.add_argument("--trace-sample-every", type=int, default=IngestConfig.trace_sample_every,
                   help="with OTLP on, trace one delta in this many (default %(default)s)")
    p.add_argument("--test-upstream-lag-ms", type=float, default=0.0,
                   help="test hook: move venue event times back by this much, a lagging upstream (default off)")
    natsauth.add_arguments(p)
    from feed import ha
    ha.add_arguments(p)


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    """``IngestConfig`` from ``bookcast replay``'s arguments."""
    return IngestConfig(nats_url=args.nats, captures=list(args.captures), speed=args.speed or None, loop=args.loop,
                        name=args.name, otlp_endpoint=args.otlp_endpoint,
                        trace_sample_every=max(1, args.trace_sample_every),
                        upstream_lag_ns=int(args.test_upstream_lag_ms * 1e6),
                        nats_credentials=natsauth.credentials_from_args(args), ha=_ha_config(args))


def _ha_config(args: argparse.Namespace):
    from feed import ha
    return ha.config_from_args(args)


class VenueMetrics:
    def __init__(self, registry: CollectorRegistry | None, venue: str, built: dict[str, Any]) -> None:
        def child(name: str):
            return prom.shared(built, name, registry).labels(venue)

        self.messages = child("bookcast_ingest_messages_total")
        self.parse_errors = child("bookcast_ingest_parse_errors_total")
        self.ignored = child("bookcast_ingest_ignored_total")
        self.deltas = child("bookcast_ingest_deltas_published_total")
        self.trades = child("bookcast_ingest_trades_published_total")
        self.dropped = child("bookcast_ingest_dropped_deltas_total")
        self.crossed = child("bookcast_ingest_crossed_books_total")
        self.clock_skew = child("bookcast_ingest_upstream_clock_skew_total")
        self.hop_upstream = child("bookcast_hop_upstream_seconds")
        self.hop_ingest = child("bookcast_hop_ingest_seconds")
        self.integrity = prom.shared(built, "bookcast_ingest_integrity_faults_total", registry)
        self.by_status = prom.shared(built, "bookcast_ingest_instruments_by_status", registry)
        self.venue = venue

    def fault(self, kind: str) -> None:
        self.integrity.labels(self.venue, kind).inc()


class Ingest:
    """One ingest process's state. ``clock_ns`` is injectable for tests (wall clock, ns)."""

    def __init__(self, config: IngestConfig, registry: CollectorRegistry | None = None,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.config = config
        self.registry = registry
        self.clock_ns = clock_ns
        self.engine = BookEngine(config.epoch_base or secrets.token_hex(4))
        self.nc: nats.NATS | None = None
        self.tick_sizes: dict[str, str] = {}
        self.metadata: dict[str, dict[str, str]] = {}  # instrument -> what the venue says of it (VENUE_METADATA)
        self.last_ts: dict[str, tuple[int | None, int, int]] = {}  # instrument -> (event, ingest, publish)
        self.venues: dict[str, VenueMetrics] = {}
        self._built: dict[str, Any] = {}
        self._instruments_gauge = prom.build("bookcast_ingest_instruments", registry)
        self._snap_requests = prom.build("bookcast_ingest_snapshot_requests_total", registry)
        self._provider_up = prom.build("bookcast_ingest_provider_up", registry)
        self.otlp: Otlp | None = None
        self._until_trace = 1  # deltas left until the next sampled one
        self._dirty_venues: set[str] = set()
        self._announce_now = asyncio.Event()
        self.sources_done = False
        self.published = 0
        self._tasks: list[asyncio.Task] = []
        self._held: asyncio.Queue | None = None  # the ingest_delay_ns hook's deltas, in order
        self._announced_s: dict[str, float] = {}  # venue -> monotonic time of its last directory announcement
        self.statuses = StatusTracker()
        self.bursts = BurstChecker(config.burst_idle_s)  # on the books of record (captures)
        self.no_snapshot: dict[str, int] = {}  # instrument -> deltas dropped before its first snapshot
        self.venue_hashes: dict[str, str] = {}  # instrument -> the venue's last book hash (Polymarket), unverified
        self._venue_hash: str | None = None  # of the event being published
        self._recent_trades: dict[str, tuple[set, deque]] = {}
        self.pools: list[Any] = []  # feed.providers.pool.VenuePool, one per configured venue
        self.nats_connected = False
        self.first_pass_done = False  # every capture read through at least once
        self.ha = None  # feed.ha.HaController when config.ha is set (started in start())

    def metric(self, name: str) -> Any:
        """This ingest's one metric object of catalog entry ``name`` (shared with its pools and HA)."""
        return prom.shared(self._built, name, self.registry)

    @property
    def provider_up(self) -> Any:
        return self._provider_up

    def announce_all(self) -> None:
        """Announce every venue's directory at the next pass of the announcer (not waiting for the interval)."""
        self._dirty_venues.update(self.venues)
        self._announce_now.set()

    def venue_metrics(self, venue: str) -> VenueMetrics:
        """The per-venue metric children of ``venue`` (created on first use)."""
        return self._venue(venue)

    def _venue(self, venue: str) -> VenueMetrics:
        vm = self.venues.get(venue)
        if vm is None:
            vm = self.venues[venue] = VenueMetrics(self.registry, venue, self._built)
        return vm

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """``connect()`` then ``start_ha()``: what a test or an embedded ingest calls."""
        await self.connect()
        await self.start_ha()

    async def connect(self) -> None:
        """Connect to NATS, answer snapshot and announce requests, start the announcer. The first connection
        is the part an unreachable server makes wait (nats-py retries it), which the CLIs bound with
        ``--connect-timeout-s``; ``start_ha`` comes after and has bounds of its own.

        Raises: what ``nats.connect`` raises (``OSError``, ``nats.errors.NoServersError``, ...).
        """
        started_s = time.monotonic()
        self.nc = await natsauth.connect(
            self.config.nats_url, self.config.nats_credentials, name=self.config.name, max_reconnect_attempts=-1,
            reconnect_time_wait=0.25, pending_size=256 * 1024 * 1024, error_cb=self._nats_error,
            disconnected_cb=self._nats_disconnected, reconnected_cb=self._nats_reconnected,
        )
        await self.nc.subscribe(f"{PREFIX}.snap.*.*", cb=self._on_snapshot_request)
        await self.nc.subscribe(ANNOUNCE_REQUEST, cb=self._on_announce_request)
        self.nats_connected = True
        self._tasks.append(asyncio.get_running_loop().create_task(self._announcer()))
        self._tasks.append(asyncio.get_running_loop().create_task(self._burst_flusher()))
        log.info("connected to NATS at %s in %.0f ms", natsauth.redacted_url(self.config.nats_url),
                 (time.monotonic() - started_s) * 1e3)

    async def start_ha(self) -> None:
        """With ``config.ha``: bind the lease and KV books buckets and start the lease thread (waits for
        JetStream, up to ``HaConfig.jetstream_wait_s`` for the lease bucket); then OTLP when configured.

        Raises: ``RuntimeError`` (a bucket in the wrong cluster), ``TimeoutError`` or the last JetStream error
        when the lease bucket cannot be bound in time.
        """
        if self.config.ha is not None:
            from feed.ha import HaController
            self.ha = HaController(self, self.config.ha)
            await self.ha.start()
        if self.config.otlp_endpoint:
            self.otlp = Otlp(self.config.otlp_endpoint, f"bookcast-{self.config.name}")
            log.info("OTLP traces to %s, one delta in %d", self.config.otlp_endpoint, self.config.trace_sample_every)

    async def _nats_error(self, exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    async def _nats_disconnected(self) -> None:
        if self.nc is not None and self.nc.is_closed:
            return  # our own stop() closed it
        self.nats_connected = False
        log.warning("nats disconnected; publishing is buffered until reconnect")

    async def _nats_reconnected(self) -> None:
        self.nats_connected = True
        log.info("nats reconnected")
        self._announce_now.set()

    async def run(self) -> None:
        """Replay every configured capture concurrently (returns when all non-looping ones end), or, with
        ``config.providers``, run the provider pools until cancelled."""
        if self.config.providers is not None:
            from feed.providers.pool import run_pools

            await run_pools(self, self.config.providers)
            return
        if self.ha is not None:
            await self.ha.wait_start()
        await asyncio.gather(*(self.replay_capture(p) for p in self.config.captures))
        self.sources_done = True
        await self._end_of_captures()
        self._dirty_venues.update(self.venues)
        self._announce_now.set()
        log.info("captures done: %d deltas published; still serving snapshots", self.published)

    async def _end_of_captures(self) -> None:
        for end in self.bursts.close_all(self.top_of):
            await self._burst_ended(end)
        if not self.first_pass_done:
            self._first_pass_over()
        for inst in list(self.engine.instruments):
            await self.set_condition(inst, Status.STALE, True, "upstream_ended")

    async def replay_capture(self, path: Path) -> None:
        """Replay one capture; its provider gauge (``replay:<file name>``) is 1 while it runs."""
        log.info("replaying %s speed=%s loop=%s", path, self.config.speed or "max", self.config.loop)
        up = self._provider_up.labels(f"replay:{path.name}")
        up.set(1)
        sessions: dict[str, VenueSession | None] = {}  # venue -> its seq checks along the capture; None: unknown
        pass_index = 0
        try:
            async for item in replay(path, speed=self.config.speed, loop=self.config.loop):
                if item.pass_index != pass_index:
                    pass_index = item.pass_index
                    for session in sessions.values():
                        session.reset()  # a new pass starts the venue's seqs again: not a reset fault
                    if not self.first_pass_done:
                        self._first_pass_over()
                venue = item.record.venue
                if venue not in sessions:
                    try:
                        sessions[venue] = session_for(venue)
                    except UnknownVenue:
                        sessions[venue] = None  # on_record counts and logs each of its records
                await self.on_record(item.record, item.shift_ns, session=sessions[venue])
        finally:
            up.set(0)

    def _first_pass_over(self) -> None:
        self.first_pass_done = True
        for inst, count in sorted(self.no_snapshot.items()):
            if inst not in self.engine.instruments:
                log.warning("instrument %s: %d deltas dropped in a whole pass over the capture, which never gives "
                            "its snapshot", inst, count)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.ha is not None:
            await self.ha.stop()
        if self.nc is not None and not self.nc.is_closed:
            try:
                await self.nc.flush(timeout=2)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
            await self.nc.close()
        if self.otlp is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.otlp.shutdown)

    # -- data path ------------------------------------------------------------------------------
    async def on_record(self, record: CaptureRecord, shift_ns: int = 0, *,
                        session: VenueSession | None = None) -> None:
        """Handle one raw venue message received at ``clock_ns()``; ``shift_ns`` rebases venue times (and
        the ``upstream_lag_ns`` test hook moves them back)."""
        ts_ingest_ns = self.clock_ns()
        vm = self._venue(record.venue)
        vm.messages.inc()
        try:
            result = session.parse(record.msg) if session is not None else parser_for(record.venue)(record.msg)
        except RemoteError as exc:
            vm.parse_errors.inc()
            log.warning("unparseable %s message dropped: %s", record.venue, exc)
            return
        self._note_metadata(record)
        if not result.events:
            vm.ignored.inc()
            return
        await self.apply_events(record.venue, result.events, ts_ingest_ns, shift_ns - self.config.upstream_lag_ns,
                                check_bursts=True)

    async def apply_events(self, venue: str, events: Iterable[VenueEvent], ts_ingest_ns: int, shift_ns: int = 0, *,
                           check_bursts: bool = False) -> None:
        """Apply parsed venue events to the books of record and publish what they produce. ``check_bursts``:
        judge each book at its bursts' ends (``feed.integrity``), against the venue's own top of book where an
        event carries it (``feed.integrity.venue_top``: Polymarket ``best_bid``/``best_ask``)."""
        vm = self._venue(venue)
        for event in events:
            if isinstance(event, VENUE_INFO_EVENTS):
                await self._venue_info(venue, event)
                continue
            crossed_before = self.engine.crossed
            inst = event.instrument
            self._venue_hash = getattr(event, "venue_hash", None)
            if self._venue_hash is not None:
                self.venue_hashes[inst] = self._venue_hash
            if check_bursts and not isinstance(event, Trade) and inst in self.engine.instruments:
                end = self.bursts.begin(inst, event.ts_event_ns, self.top_of(inst))
                if end is not None:
                    await self._burst_ended(end)
            try:
                outputs = self.engine.apply(event)
            except DeltaBeforeSnapshot as exc:
                vm.dropped.inc()
                count = self.no_snapshot.get(inst, 0) + 1
                self.no_snapshot[inst] = count
                if count == 1:
                    log.warning("instrument %s: delta before any snapshot, dropped (and every one until a snapshot "
                                "of it arrives)", inst)
                log.debug("%s", exc)
                continue
            except RemoteError as exc:
                vm.parse_errors.inc()
                log.warning("bad %s event dropped: %s", venue, exc)
                continue
            if self.engine.crossed != crossed_before:
                vm.crossed.inc()
            for out in outputs:
                await self._publish(out, vm, ts_ingest_ns, shift_ns)
            if check_bursts and not isinstance(event, Trade) and inst in self.engine.instruments:
                self.bursts.end_message(inst, event.ts_event_ns, self.clock_ns(), venue_top(event))

    async def _venue_info(self, venue: str, event: Any) -> None:
        """Venue events that change no book: a resolved market, a venue seq fault (from a capture: counted
        and logged; a live provider's are handled by its pool), a venue top of book, a new market."""
        if isinstance(event, MarketResolved):
            if event.instrument in self.engine.instruments:
                winner = {True: " (winner)", False: " (not the winner)"}.get(event.winner, "")
                await self.set_condition(event.instrument, Status.RESOLVED, True, f"market_resolved{winner}")
        elif isinstance(event, VenueSeqFault):
            kind = SEQ_FAULT_KINDS[event.kind]
            self._venue(venue).fault(kind)
            log.warning("venue %s %s on stream %s: expected seq %d got %d (instruments %s)", venue, kind,
                        event.stream, event.expected, event.got, ", ".join(event.instruments[:5]) or "-")

    def top_of(self, instrument: str) -> Top | None:
        """(best bid price, best ask price) of a book of record; None if there is no such book."""
        st = self.engine.instruments.get(instrument)
        return None if st is None else book_top(st.book)

    async def _burst_ended(self, end: BurstEnd) -> None:
        kind = end.fault_kind
        venue = split_instrument(end.instrument)[0]
        if kind is None:
            await self.set_condition(end.instrument, Status.CROSSED, False, "")
            return
        if not self.statuses.has(end.instrument, Status.CROSSED):  # counted once per fault, not per burst
            self._venue(venue).fault(kind)
            log.warning("integrity fault %s", end.describe())
        await self.set_condition(end.instrument, Status.CROSSED, True, f"{kind}_after_burst")

    async def _burst_flusher(self) -> None:
        while True:
            await asyncio.sleep(self.bursts.burst_idle_ns / 2e9)
            try:
                for end in self.bursts.flush(self.clock_ns(), self.top_of):
                    await self._burst_ended(end)
            except Exception:  # noqa: BLE001 - never let the flusher die
                log.exception("burst flush failed")

    # -- status (PROTOCOL.md section 11) --------------------------------------------------------
    async def set_condition(self, instrument: str, condition: Status, on: bool, reason: str) -> None:
        """Turn one status condition of an instrument on or off; publish ``instrument_status`` if it changed."""
        change = self.statuses.set(instrument, condition, on, reason, self.clock_ns())
        if change is not None:
            await self.publish_status(change)

    async def publish_status(self, change: StatusChange) -> None:
        epoch, seq = self.engine.seq_of(change.instrument)
        msg = {"type": "instrument_status", "instrument": change.instrument, "status": change.status.value,
               "reason": change.reason, "since_ns": change.since_ns, "ts_publish_ns": self.clock_ns(),
               "epoch": epoch, "seq": seq}
        venue = split_instrument(change.instrument)[0]
        level = logging.INFO if change.status is Status.OK else logging.WARNING
        log.log(level, "instrument %s status %s%s", change.instrument, change.status.value,
                f" ({change.reason})" if change.reason else "")
        vm = self._venue(venue)
        counts = self.statuses.counts([i for i in self.engine.instruments if split_instrument(i)[0] == venue])
        for status, n in counts.items():
            vm.by_status.labels(venue, status.value).set(n)
        self._dirty_venues.add(venue)
        if self.nc is not None:
            try:
                await self.nc.publish(delta_subject(change.instrument), wire.dumps(msg))
            except Exception as exc:  # noqa: BLE001 - NATS down: the directory carries the status later
                log.debug("status publish failed: %s", exc)

    def status_of(self, instrument: str) -> str:
        return self.statuses.status(instrument).value

    async def reset_instrument(self, snapshot: BookSnapshot, ts_ingest_ns: int, reason: str) -> None:
        """Lossy repair: a new epoch for ``snapshot.instrument`` starting from ``snapshot`` (seq 0)."""
        inst = snapshot.instrument
        venue = split_instrument(inst)[0]
        old_epoch, old_seq = self.engine.seq_of(inst)
        self.bursts.forget(inst)
        new_epoch = self.engine.reset(inst)
        log.warning("instrument %s: new epoch %s from a fresh venue snapshot (was %s at seq %d): %s",
                    inst, new_epoch, old_epoch, old_seq, reason)
        await self.apply_events(venue, [snapshot], ts_ingest_ns)

    def trade_seen(self, trade: Trade) -> bool:
        """De-duplication of trades across providers (and switch overlaps): True if an equal trade (same
        trade id, else same time, price, size and side) was published in the last 4,096 of the instrument."""
        key = trade.trade_id or (trade.ts_event_ns, trade.price, trade.size, trade.side)
        seen = self._recent_trades.get(trade.instrument)
        if seen is None:
            seen = self._recent_trades[trade.instrument] = (set(), deque())
        keys, order = seen
        if key in keys:
            return True
        keys.add(key)
        order.append(key)
        if len(order) > 4096:
            keys.discard(order.popleft())
        return False

    def _note_metadata(self, record: CaptureRecord) -> None:
        """Keep the instrument metadata a venue message carries (Polymarket: ``market``, ``min_order_size``,
        ``question``, ``outcome`` beside ``asset_id``), announced in the directory when it changes."""
        if record.venue != "polymarket":
            return
        for msg in record.msg if isinstance(record.msg, list) else (record.msg,):
            if not isinstance(msg, dict) or not isinstance(msg.get("asset_id"), str):
                continue
            found = {k: str(msg[k]) for k in VENUE_METADATA if isinstance(msg.get(k), (str, int, float))}
            inst = f"polymarket:{msg['asset_id']}"
            if found and any(self.metadata.get(inst, {}).get(k) != v for k, v in found.items()):
                self.metadata.setdefault(inst, {}).update(found)
                self._dirty_venues.add("polymarket")
                self._announce_now.set()

    async def _publish(self, out: Any, vm: VenueMetrics, ts_ingest_ns: int, shift_ns: int) -> None:
        if isinstance(out, SequencedDelta):
            out.ts_event_ns = out.ts_event_ns + shift_ns if out.ts_event_ns is not None else None
            if self.config.ingest_delay_ns or (self._held is not None and not self._held.empty()):
                await self._hold(out, vm, ts_ingest_ns, self._venue_hash)
            else:
                await self._publish_delta(out, vm, ts_ingest_ns, self._venue_hash)
        else:
            await self._publish_other(out, vm, ts_ingest_ns, shift_ns)

    async def _hold(self, out: SequencedDelta, vm: VenueMetrics, ts_ingest_ns: int, venue_hash: str | None) -> None:
        """Test hook ``ingest_delay_ns``: publish ``out`` that long after ``ts_ingest_ns``, after every delta held
        before it (a bounded queue: a reader far ahead waits, as a slow ingest's input would)."""
        if self._held is None:
            self._held = asyncio.Queue(maxsize=100_000)
            self._tasks.append(asyncio.get_running_loop().create_task(self._release_held()))
        await self._held.put((ts_ingest_ns + self.config.ingest_delay_ns, out, vm, ts_ingest_ns, venue_hash))

    async def _release_held(self) -> None:
        while True:
            due_ns, out, vm, ts_ingest_ns, venue_hash = await self._held.get()
            wait_s = (due_ns - self.clock_ns()) / 1e9
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            await self._publish_delta(out, vm, ts_ingest_ns, venue_hash)

    async def _publish_delta(self, out: SequencedDelta, vm: VenueMetrics, ts_ingest_ns: int,
                             venue_hash: str | None = None) -> None:
        ts_event_ns = out.ts_event_ns
        span = headers = None
        if self.otlp is not None:
            self._until_trace -= 1
            if not self._until_trace:
                self._until_trace = self.config.trace_sample_every
                span, traceparent = self.otlp.start_ingest_trace(
                    ts_event_ns=ts_event_ns, ts_ingest_ns=ts_ingest_ns,
                    attributes={"instrument": out.instrument, "epoch": out.epoch, "seq": out.seq})
                headers = {TRACEPARENT: traceparent}
        ts_publish_ns = self.clock_ns()
        msg = wire.delta_message(out, ts_ingest_ns=ts_ingest_ns, ts_publish_ns=ts_publish_ns)
        if venue_hash is not None:
            msg["venue_hash"] = venue_hash  # additive: the venue's own book hash, passed through
        if headers is not None:
            msg[TRACEPARENT] = headers[TRACEPARENT]  # additive field: lets WebSocket clients join the trace
        if self.ha is not None:  # regions: only the lease holder publishes (feed.ha)
            msgs = self.ha.on_delta(out, msg)
            for m in msgs:
                await self.nc.publish(delta_subject(out.instrument), wire.dumps(m), headers=self.ha.headers(headers))
            if not msgs:
                return
        else:
            await self.nc.publish(delta_subject(out.instrument), wire.dumps(msg), headers=headers)
        if span is not None:
            span.end(end_time=ts_publish_ns)
        self.last_ts[out.instrument] = (ts_event_ns, ts_ingest_ns, ts_publish_ns)
        self.published += 1
        vm.deltas.inc()
        if ts_event_ns is not None:
            upstream_ns = ts_ingest_ns - ts_event_ns
            if upstream_ns < 0:
                vm.clock_skew.inc()
                upstream_ns = 0
            vm.hop_upstream.observe(upstream_ns / 1e9)
        vm.hop_ingest.observe((ts_publish_ns - ts_ingest_ns) / 1e9)

    async def _publish_other(self, out: Any, vm: VenueMetrics, ts_ingest_ns: int, shift_ns: int) -> None:
        if isinstance(out, Trade):
            if self.pools and self.trade_seen(out):
                return
            ts_event_ns = out.ts_event_ns + shift_ns if out.ts_event_ns is not None else None
            msg = wire.trade_message(out, ts_ingest_ns=ts_ingest_ns, ts_publish_ns=self.clock_ns())
            if ts_event_ns is not None:
                msg["ts_event_ns"] = ts_event_ns
            if self.ha is not None and not self.ha.serves(out.instrument):
                return
            await self.nc.publish(trade_subject(out.instrument), wire.dumps(msg))
            vm.trades.inc()
        elif isinstance(out, InstrumentAdded):
            self.last_ts[out.instrument] = (None, ts_ingest_ns, ts_ingest_ns)
            self._instruments_gauge.set(len(self.engine.instruments))
            self._dirty_venues.add(out.venue)
            self._announce_now.set()
        elif isinstance(out, TickSizeChange):
            self.tick_sizes[out.instrument] = canonical(out.tick_size)
            self._dirty_venues.add(split_instrument(out.instrument)[0])
            self._announce_now.set()

    # -- snapshots and directory ----------------------------------------------------------------
    def snapshot(self, instrument: str) -> dict[str, Any] | None:
        """The snapshot message of ``instrument`` at its current seq (no ts_send_ns), or None."""
        st = self.engine.instruments.get(instrument)
        if st is None:
            return None
        epoch, seq = self.engine.seq_of(instrument)
        ts_event_ns, ts_ingest_ns, _ = self.last_ts.get(instrument, (None, 0, 0))
        msg = wire.snapshot_message(instrument, epoch, seq, st.book, ts_event_ns=ts_event_ns,
                                    ts_ingest_ns=ts_ingest_ns, ts_publish_ns=self.clock_ns())
        msg["status"] = self.status_of(instrument)
        if instrument in self.venue_hashes:
            msg["venue_hash"] = self.venue_hashes[instrument]
        return msg

    async def _on_snapshot_request(self, msg) -> None:
        _, _, _, venue_token, symbol_token = msg.subject.split(".")
        instrument = f"{unescape_token(venue_token)}:{unescape_token(symbol_token)}"
        snap = self.snapshot(instrument)
        if self.ha is not None and not self.ha.serves(instrument):
            return  # a standby's book is in its own numbering: the leader answers
        if snap is None or not msg.reply:
            return  # not ours: another ingest may own it
        self._snap_requests.inc()
        await msg.respond(wire.dumps(snap))

    def directory(self, venue: str) -> dict[str, Any]:
        entries = []
        for inst in self.engine.instruments:
            if split_instrument(inst)[0] != venue or (self.ha is not None and not self.ha.serves(inst)):
                continue
            epoch, seq = self.engine.seq_of(inst)
            entry = {"instrument": inst, "venue": venue, "epoch": epoch, "seq": seq, "status": self.status_of(inst)}
            if inst in self.tick_sizes:
                entry["tick_size"] = self.tick_sizes[inst]
            entry.update(self.metadata.get(inst, {}))
            entries.append(entry)
        return {"ingest": self.config.name, "venue": venue, "done": self.sources_done, "instruments": entries}

    async def _on_announce_request(self, msg) -> None:
        self._dirty_venues.update(self.venues)
        self._announce_now.set()

    async def _announcer(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._announce_now.wait(), self.config.announce_interval_s)
                await asyncio.sleep(0.02)  # coalesce a burst of new instruments into one announcement
                venues = set(self._dirty_venues)
            except TimeoutError:
                venues = set(self.venues)
            self._announce_now.clear()
            self._dirty_venues.clear()
            if self.ha is not None and not self.ha.publishing():
                continue  # a standby announces nothing
            # every venue at least once per interval, however busy another venue keeps the dirty set: a
            # gateway takes a venue silent for a few intervals as a dead ingest (``--ingest-silent-s``)
            now_s = time.monotonic()
            venues |= {v for v in self.venues if now_s - self._announced_s.get(v, 0.0) >= self.config.announce_interval_s}
            for venue in venues:
                self._announced_s[venue] = now_s
                try:
                    await self.nc.publish(directory_subject(venue), wire.dumps(self.directory(venue)))
                except Exception as exc:  # noqa: BLE001 - NATS down: next round retries
                    log.debug("announce failed: %s", exc)

    # -- HTTP -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """``/v1/status``: directory per venue, deltas dropped before a snapshot per instrument that never got
        one (``no_snapshot``), and with a pool its providers with their scores (``providers``)."""
        out: dict[str, Any] = {
            "name": self.config.name, "done": self.sources_done, "published": self.published,
            "first_pass_done": self.first_pass_done,
            "venues": {v: self.directory(v)["instruments"] for v in self.venues},
            "no_snapshot": {i: n for i, n in sorted(self.no_snapshot.items()) if i not in self.engine.instruments},
        }
        if self.pools:
            out["providers"] = {pool.venue: pool.status() for pool in self.pools}
        if self.ha is not None:
            out["ha"] = self.ha.status()
        return out

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready: connected to NATS and no instrument ``stale``. The body lists stale instruments per venue."""
        stale: dict[str, list[str]] = {}
        for inst in self.engine.instruments:
            if self.statuses.status(inst) is Status.STALE:
                stale.setdefault(split_instrument(inst)[0], []).append(inst)
        ready = self.nats_connected and not stale
        return ready, {"ready": ready, "nats_connected": self.nats_connected,
                       "stale": {v: len(x) for v, x in stale.items()},
                       "stale_examples": {v: x[:5] for v, x in stale.items()}}

    def http_app(self) -> web.Application:
        """``/metrics``, ``/healthz``, ``/readyz`` (503 while NATS is down or an instrument is stale) and
        ``/v1/status`` (directory, replay progress, providers)."""
        app = prom.ops_app(self.registry, self.status)

        async def readyz(_: web.Request) -> web.Response:
            ready, body = self.readiness()
            return web.json_response(body, status=200 if ready else 503)

        app.router.add_get("/readyz", readyz)
        return app
