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

Test hook, off by default: ``upstream_lag_ns`` moves every rebased event time back by a fixed amount, so the
upstream looks that much slower ("a lagging upstream").
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from aiohttp import web
from prometheus_client import CollectorRegistry

from feed.otlp import TRACEPARENT, Otlp, endpoint_from
from feed import metrics as prom
from feed import wire
from feed.capture import CaptureRecord, replay
from feed.errors import RemoteError
from feed.model import TickSizeChange, Trade, canonical, split_instrument
from feed.sequencer import BookEngine, DeltaBeforeSnapshot, InstrumentAdded, SequencedDelta
from feed.subjects import ANNOUNCE_REQUEST, PREFIX, delta_subject, directory_subject, trade_subject, unescape_token
from feed.venues import parser_for

log = logging.getLogger("bookcast.ingest")


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
    from feed import ha
    ha.add_arguments(p)


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    """``IngestConfig`` from ``bookcast replay``'s arguments."""
    return IngestConfig(nats_url=args.nats, captures=list(args.captures), speed=args.speed or None, loop=args.loop,
                        name=args.name, otlp_endpoint=args.otlp_endpoint,
                        trace_sample_every=max(1, args.trace_sample_every),
                        upstream_lag_ns=int(args.test_upstream_lag_ms * 1e6), ha=_ha_config(args))


def _ha_config(args: argparse.Namespace):
    from feed import ha
    return ha.config_from_args(args)


class VenueMetrics:
    def __init__(self, registry: CollectorRegistry | None, venue: str, built: dict[str, Any]) -> None:
        def child(name: str):
            if name not in built:
                built[name] = prom.build(name, registry)
            return built[name].labels(venue)

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
        self.ha = None  # feed.ha.HaController when config.ha is set (started in start())

    def _venue(self, venue: str) -> VenueMetrics:
        vm = self.venues.get(venue)
        if vm is None:
            vm = self.venues[venue] = VenueMetrics(self.registry, venue, self._built)
        return vm

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self.nc = await nats.connect(
            self.config.nats_url, name=self.config.name, max_reconnect_attempts=-1, reconnect_time_wait=0.25,
            pending_size=256 * 1024 * 1024, error_cb=self._nats_error,
            disconnected_cb=self._nats_disconnected, reconnected_cb=self._nats_reconnected,
        )
        await self.nc.subscribe(f"{PREFIX}.snap.*.*", cb=self._on_snapshot_request)
        await self.nc.subscribe(ANNOUNCE_REQUEST, cb=self._on_announce_request)
        self._tasks.append(asyncio.get_running_loop().create_task(self._announcer()))
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
        log.warning("nats disconnected; publishing is buffered until reconnect")

    async def _nats_reconnected(self) -> None:
        log.info("nats reconnected")
        self._announce_now.set()

    async def run(self) -> None:
        """Replay every configured capture concurrently; returns when all (non-looping) ones end."""
        if self.ha is not None:
            await self.ha.wait_start()
        await asyncio.gather(*(self.replay_capture(p) for p in self.config.captures))
        self.sources_done = True
        self._dirty_venues.update(self.venues)
        self._announce_now.set()
        log.info("captures done: %d deltas published; still serving snapshots", self.published)

    async def replay_capture(self, path: Path) -> None:
        """Replay one capture; its provider gauge (``replay:<file name>``) is 1 while it runs."""
        log.info("replaying %s speed=%s loop=%s", path, self.config.speed or "max", self.config.loop)
        up = self._provider_up.labels(f"replay:{path.name}")
        up.set(1)
        try:
            async for item in replay(path, speed=self.config.speed, loop=self.config.loop):
                await self.on_record(item.record, item.shift_ns)
        finally:
            up.set(0)

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
    async def on_record(self, record: CaptureRecord, shift_ns: int = 0) -> None:
        """Handle one raw venue message received at ``clock_ns()``; ``shift_ns`` rebases venue times (and
        the ``upstream_lag_ns`` test hook moves them back)."""
        ts_ingest_ns = self.clock_ns()
        vm = self._venue(record.venue)
        vm.messages.inc()
        try:
            result = parser_for(record.venue)(record.msg)
        except RemoteError as exc:
            vm.parse_errors.inc()
            log.warning("unparseable %s message dropped: %s", record.venue, exc)
            return
        if not result.events:
            vm.ignored.inc()
            return
        for event in result.events:
            crossed_before = self.engine.crossed
            try:
                outputs = self.engine.apply(event)
            except DeltaBeforeSnapshot as exc:
                vm.dropped.inc()
                log.debug("%s", exc)
                continue
            except RemoteError as exc:
                vm.parse_errors.inc()
                log.warning("bad %s event dropped: %s", record.venue, exc)
                continue
            if self.engine.crossed != crossed_before:
                vm.crossed.inc()
            for out in outputs:
                await self._publish(out, vm, ts_ingest_ns, shift_ns - self.config.upstream_lag_ns)

    async def _publish(self, out: Any, vm: VenueMetrics, ts_ingest_ns: int, shift_ns: int) -> None:
        if isinstance(out, SequencedDelta):
            ts_event_ns = out.ts_event_ns + shift_ns if out.ts_event_ns is not None else None
            out.ts_event_ns = ts_event_ns
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
        elif isinstance(out, Trade):
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
        return wire.snapshot_message(instrument, epoch, seq, st.book, ts_event_ns=ts_event_ns,
                                     ts_ingest_ns=ts_ingest_ns, ts_publish_ns=self.clock_ns())

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
            entry = {"instrument": inst, "venue": venue, "epoch": epoch, "seq": seq}
            if inst in self.tick_sizes:
                entry["tick_size"] = self.tick_sizes[inst]
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
            for venue in venues:
                try:
                    await self.nc.publish(directory_subject(venue), wire.dumps(self.directory(venue)))
                except Exception as exc:  # noqa: BLE001 - NATS down: next round retries
                    log.debug("announce failed: %s", exc)

    # -- HTTP -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        out = {"name": self.config.name, "done": self.sources_done, "published": self.published,
               "venues": {v: self.directory(v)["instruments"] for v in self.venues}}
        if self.ha is not None:
            out["ha"] = self.ha.status()
        return out

    def http_app(self) -> web.Application:
        """``/metrics``, ``/healthz`` and ``/v1/status`` (directory and replay progress)."""
        return prom.ops_app(self.registry, self.status)
