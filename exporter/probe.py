"""``bookcast probe``: the latency probe. Subscribes like any client, in every region, and measures each message.

For each region (a gateway URL with a name) it runs the SDK's ``BookClient`` on the configured instruments
(default: every instrument the region's ``/v1/instruments`` lists) and, for every verified delta, takes the
per-hop latencies from the message's own stamps (``exporter.latency``; why that defeats coordinated
omission is explained there) and records them into:

* Prometheus (``/metrics``): ``bookcast_probe_latency_seconds{region,hop}`` histograms (10 µs .. 10 s
  buckets), and exact quantiles as a summary ``bookcast_probe_latency_window_seconds{region,hop,window,quantile}``
  (p50, p90, p99, p99.9, p99.99; its _count and _sum cover the window) with
  ``bookcast_probe_latency_max_seconds{region,hop,window}`` over sliding windows of 1 m and 10 m, computed
  from rotating HDR histograms every ``update_interval_s``;
  gaps, resyncs, reconnects, clock-skewed samples and stale instruments (no message and no heartbeat for
  ``stale_after_s``);
* ClickHouse (``exporter.clickhouse``, chDB by default): one ``latency_samples`` row per delta, and one
  ``book_events`` row per snapshot and delta of the ticks region (the first region unless told);
* OTLP, when an endpoint is set: the same histograms as exponential histograms, and a ``client`` span for
  every traced delta (``feed.otlp``).

Clock-skewed hop values (negative, or above an hour: ``exporter.latency.skewed``) are never recorded as a
latency: they are counted in ``bookcast_probe_clock_skew_total`` and left out of the histograms and windows
(the raw stamps still go to ClickHouse, where the report counts them apart).

Runs and host context: every row carries ``--run-id`` (``bookcast up`` passes its run's id); the store's
tables get a TTL of ``--retention`` (``exporter.clickhouse``); every update interval the probe writes one
``host_samples`` row: /proc/pressure/cpu's "some" total and, with ``--ebpf-url``, the eBPF exporter's
run-queue delay sums, which the verdict reads as the host's CPU saturation.

Reader delay: the SDK stamps ``recv_ns`` when it takes a frame off the socket; the probe stamps ``ts_read_ns``
when its own loop gets to the event, so its own slowness is the ``reader`` hop, apart from the network.
Test hook, off by default: ``reader_delay_s`` handles every event that long after it was received (a slow
reader), keeping order.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from feed.catalog import CATALOG
from exporter.clickhouse import BOOK_EVENTS, HOST_SAMPLES, LATENCY_SAMPLES, ClickHouseError, ClickHouseWriter, open_backend
from exporter.latency import QUANTILES, SlidingWindow, StaleTracker, skewed
from feed.hops import WRITE_STAMP, Hop, hops_ns
from feed.runstate import DEFAULT_RETENTION_S, default_store
from feed.otlp import TRACEPARENT, Otlp, endpoint_from
from feed import metrics as prom
from feed.client import BookClient, BookUpdated, UpdateKind

log = logging.getLogger("bookcast.probe")

EXAMPLES = """examples:
  bookcast probe                                                   # every instrument of ws://127.0.0.1:8080/v1/ws, region "local"
  bookcast probe --region eu=ws://10.0.0.1:8080/v1/ws --region us=ws://10.1.0.1:8080/v1/ws --http-port 9475
  bookcast probe --instrument coinbase:SKL-USD --instrument coinbase:DASH-BTC --stale-after-s 30
  bookcast probe --clickhouse clickhouse://127.0.0.1:9000 --otlp-endpoint http://127.0.0.1:4317
  bookcast probe --no-clickhouse --duration-s 60                   # Prometheus only, for one minute"""

# (label, length in s, slices): the window moves in steps of one slice.
WINDOWS: tuple[tuple[str, float, int], ...] = (("1m", 60.0, 6), ("10m", 600.0, 10))
# the probe process's GIL switch interval (CPython's default 5 ms): see ``main``
PROBE_SWITCH_INTERVAL_S = 0.0005


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    ws_url: str

    @property
    def http_base(self) -> str:
        """``http://host:port`` of the gateway serving ``ws_url``."""
        parts = urlsplit(self.ws_url)
        return urlunsplit(("https" if parts.scheme == "wss" else "http", parts.netloc, "", "", ""))


def with_write_stamps(ws_url: str) -> str:
    """``ws_url`` asking the gateway for ``write_stamp`` notices (the gateway_queue hop; an additive
    extension, docs/protocol-notes.md; a gateway without it ignores the parameter)."""
    parts = urlsplit(ws_url)
    query = "&".join(q for q in (parts.query, "write_stamps=1") if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def parse_region(text: str) -> Region:
    """``NAME=ws://host:port/v1/ws`` (or a bare URL, named ``local``). Raises ValueError on a bad URL."""
    name, sep, url = text.partition("=")
    if not sep:
        name, url = "local", text
    if urlsplit(url).scheme not in ("ws", "wss") or not name:
        raise ValueError(f"region must be NAME=ws://host:port/v1/ws, got {text!r}")
    return Region(name, url)


@dataclass
class ProbeConfig:
    regions: list[Region]
    instruments: list[str] | None = None  # None: all listed by each region's /v1/instruments
    stale_after_s: float = 10.0
    update_interval_s: float = 2.0
    clickhouse: str | None = field(default_factory=lambda: str(default_store()))  # chDB path or clickhouse:// URL; None: none
    ticks_region: str | None = None  # default: the first region
    otlp_endpoint: str | None = None
    otlp_export_interval_s: float = 10.0
    list_timeout_s: float = 30.0
    run_id: str = ""
    retention_s: float | None = DEFAULT_RETENTION_S
    ebpf_url: str | None = None  # the eBPF exporter's /metrics, for run-queue delay
    reader_delay_s: float = 0.0  # test hook: handle each event this long after it was received (a slow reader)
    no_ticks: bool = False  # write no book events
    failover: bool = False  # each region's client also holds the other regions (preferred: its own) and moves


class ProbeMetrics:
    """The probe's Prometheus metrics on its own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        names = ("bookcast_probe_latency_seconds", "bookcast_probe_latency_max_seconds", "bookcast_probe_messages_total", "bookcast_probe_clock_skew_total",
                 "bookcast_probe_gaps_total", "bookcast_probe_resyncs_total", "bookcast_probe_reconnects_total",
                 "bookcast_probe_stale_instruments", "bookcast_probe_connected", "bookcast_probe_failovers_total")
        self.m = {n: prom.build(n, registry) for n in names}


@dataclass
class _Window:
    label: str
    window: SlidingWindow
    max: Any  # gauge child
    count: int = 0  # the last update's figures
    sum_s: float = 0.0
    quantiles_s: dict[float, float] = field(default_factory=dict)


@dataclass
class _HopState:
    hist: Any
    skew: Any
    windows: list[_Window]
    otlp_attrs: dict[str, str]


@dataclass
class _Seen:
    """Counts already exported from the SDK's cumulative stats."""

    gaps: int = 0
    reconnects: int = 0
    heartbeats: int = 0
    resyncs: Counter[str] = field(default_factory=Counter)
    failovers: Counter[str] = field(default_factory=Counter)


class RegionProbe:
    """One region: a ``BookClient`` and what it measures. ``on_event`` is the per-message path."""

    def __init__(self, region: Region, instruments: list[str], metrics: ProbeMetrics, *, stale_after_s: float,
                 writer: ClickHouseWriter | None, write_ticks: bool, otlp: Otlp | None, otlp_hist: Any,
                 clock_ns=time.time_ns, monotonic_s=time.monotonic, run_id: str = "",
                 reader_delay_s: float = 0.0, fallbacks: list[Region] | None = None) -> None:
        self.region = region
        self.run_id = run_id
        self.reader_delay_s = reader_delay_s
        self.clock_ns = clock_ns
        self.instruments = instruments
        self.writer = writer
        self.write_ticks = write_ticks
        self.otlp = otlp
        self.otlp_hist = otlp_hist
        self.monotonic_s = monotonic_s
        m, name = metrics.m, region.name
        self.hops: dict[Hop, _HopState] = {}
        for hop in Hop:
            windows = [
                _Window(label, SlidingWindow(length_s, slices),
                        m["bookcast_probe_latency_max_seconds"].labels(name, hop.value, label))
                for label, length_s, slices in WINDOWS
            ]
            self.hops[hop] = _HopState(m["bookcast_probe_latency_seconds"].labels(name, hop.value),
                                       m["bookcast_probe_clock_skew_total"].labels(name, hop.value), windows,
                                       {"region": name, "hop": hop.value})
        self.messages = m["bookcast_probe_messages_total"].labels(name)
        self.gaps = m["bookcast_probe_gaps_total"].labels(name)
        self.resyncs = m["bookcast_probe_resyncs_total"]
        self.reconnects = m["bookcast_probe_reconnects_total"].labels(name)
        self.stale_gauge = m["bookcast_probe_stale_instruments"].labels(name)
        self.connected = m["bookcast_probe_connected"].labels(name)
        self.stale = StaleTracker(instruments, stale_after_s, monotonic_s())
        self.failovers = m["bookcast_probe_failovers_total"]
        if fallbacks:  # a client of its own region first, moving to the others (SDK region failover)
            self.client = BookClient(regions=[[with_write_stamps(r.ws_url)] for r in (region, *fallbacks)],
                                     instruments=instruments, clock_ns=clock_ns, event_queue_size=100_000)
        else:
            self.client = BookClient([with_write_stamps(region.ws_url)], instruments, clock_ns=clock_ns,
                                     event_queue_size=100_000)
        self.measured = 0
        self._seen = _Seen()

    async def run(self) -> None:
        """Consume the client's events until cancelled."""
        async with self.client:
            async for event in self.client:
                if isinstance(event, BookUpdated):
                    if self.reader_delay_s:
                        wait_s = (event.recv_ns + self.reader_delay_s * 1e9 - self.clock_ns()) / 1e9
                        if wait_s > 0:
                            await asyncio.sleep(wait_s)
                    self.on_update(event, self.monotonic_s(), self.clock_ns())

    def on_update(self, ev: BookUpdated, now_s: float, read_ns: int | None = None) -> None:
        self.stale.message(ev.instrument, now_s)
        msg = ev.msg
        if self.write_ticks and self.writer is not None:
            self.writer.add(BOOK_EVENTS.name, _tick_row(self.region.name, ev, self.run_id))
        if ev.kind is not UpdateKind.DELTA:
            return  # a snapshot carries the stamps of the book's last delta, not its own journey
        hops = hops_ns(msg, ev.recv_ns, read_ns)
        if hops is None:
            return
        self.measured += 1
        self.messages.inc()
        for hop, value_ns in hops.items():
            state = self.hops[hop]
            if skewed(value_ns):
                state.skew.inc()
                continue  # a clock's doing, not a latency: counted, never recorded as one
            state.hist.observe(value_ns / 1e9)
            for w in state.windows:
                w.window.record(value_ns, now_s)
            if self.otlp_hist is not None:
                self.otlp_hist.record(value_ns / 1e9, state.otlp_attrs)
        if self.writer is not None:
            self.writer.add(LATENCY_SAMPLES.name, (
                ev.recv_ns, self.region.name, ev.instrument, ev.epoch, ev.seq, msg.get("ts_event_ns", 0),
                msg["ts_ingest_ns"], msg["ts_publish_ns"], msg["ts_send_ns"], self.run_id,
                _stamp(msg.get(WRITE_STAMP)), read_ns or 0))
        traceparent = msg.get(TRACEPARENT)
        if traceparent is not None and self.otlp is not None:
            self.otlp.hop_span("client", traceparent, msg["ts_send_ns"], ev.recv_ns,
                               {"instrument": ev.instrument, "seq": ev.seq, "region": self.region.name})

    def update(self, now_s: float) -> None:
        """Refresh the window quantiles, the stale count and the counters kept by the SDK."""
        for state in self.hops.values():
            for w in state.windows:
                w.count, values, max_ns = w.window.summary(now_s)
                w.sum_s = w.window.sum_ns(now_s) / 1e9
                w.quantiles_s = {q: v / 1e9 for q, v in values.items()}
                w.max.set(max_ns / 1e9)
        stats, seen = self.client.stats, self._seen
        if stats.heartbeats_seen != seen.heartbeats:
            seen.heartbeats = stats.heartbeats_seen
            self.stale.heartbeat(now_s)
        self.stale_gauge.set(len(self.stale.stale(now_s)))
        broken = stats.gaps + stats.checksum_mismatches
        self.gaps.inc(broken - seen.gaps)
        seen.gaps = broken
        self.reconnects.inc(stats.reconnects - seen.reconnects)
        seen.reconnects = stats.reconnects
        for reason, count in stats.resyncs_received.items():
            self.resyncs.labels(self.region.name, reason).inc(count - seen.resyncs[reason])
            seen.resyncs[reason] = count
        for reason, count in stats.failovers.items():  # the client's region moves (RegionMoved), by reason
            self.failovers.labels(self.region.name, reason).inc(count - seen.failovers[reason])
            seen.failovers[reason] = count
        self.connected.set(1 if self.client.connected else 0)


class WindowSummaries:
    """Collector exposing every region's window quantiles as the summary
    ``bookcast_probe_latency_window_seconds`` (figures of the last update)."""

    def __init__(self, regions: list[RegionProbe]) -> None:
        self.regions = regions

    def collect(self):
        spec = CATALOG["bookcast_probe_latency_window_seconds"]
        family = Metric(spec.name, spec.help, "summary")
        for rp in self.regions:
            for hop, state in rp.hops.items():
                for w in state.windows:
                    labels = {"region": rp.region.name, "hop": hop.value, "window": w.label}
                    for q in QUANTILES:
                        family.add_sample(spec.name, {**labels, "quantile": f"{q:g}"}, w.quantiles_s.get(q, 0.0))
                    family.add_sample(f"{spec.name}_count", labels, w.count)
                    family.add_sample(f"{spec.name}_sum", labels, w.sum_s)
        yield family


def _stamp(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def read_cpu_pressure_us(path: str = "/proc/pressure/cpu") -> int:
    """/proc/pressure/cpu's "some" total: µs during which at least one task waited for a CPU (0 without PSI)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("some "):
                    return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def read_own_wait_ns() -> int:
    """How long this process's main thread (the event loop: the reader) was runnable but waiting for a CPU
    (ns, /proc/self/task/<pid>/schedstat; 0 without schedstats)."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/schedstat") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def parse_runqueue(text: str) -> tuple[float, int]:
    """``(sum_s, count)`` of ``bookcast_ebpf_runqueue_latency_seconds`` over every role in an exposition."""
    total_s, count = 0.0, 0
    for line in text.splitlines():
        if line.startswith("bookcast_ebpf_runqueue_latency_seconds_sum"):
            total_s += float(line.rsplit(" ", 1)[1])
        elif line.startswith("bookcast_ebpf_runqueue_latency_seconds_count"):
            count += int(float(line.rsplit(" ", 1)[1]))
    return total_s, count


def _tick_row(region: str, ev: BookUpdated, run_id: str = "") -> tuple:
    msg = ev.msg
    if ev.kind is UpdateKind.SNAPSHOT:
        levels = [("bid", p, s) for p, s in msg["bids"]] + [("ask", p, s) for p, s in msg["asks"]]
        prev_seq = 0
    else:
        levels = msg["changes"]
        prev_seq = msg["prev_seq"]
    return (ev.recv_ns, region, ev.instrument, ev.epoch, ev.seq, prev_seq, ev.kind.value, msg["checksum"],
            msg.get("ts_event_ns", 0), msg.get("ts_ingest_ns", 0), [c[0] for c in levels], [c[1] for c in levels],
            [c[2] for c in levels], run_id)


async def list_instruments(region: Region, timeout_s: float) -> list[str]:
    """Instrument ids listed by the region's gateway, waiting up to ``timeout_s`` for a non-empty list.

    Raises:
        TimeoutError: the gateway did not list any instrument in time (the message says why).
    """
    deadline = time.monotonic() + timeout_s
    why = "no instruments listed"
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(region.http_base + "/v1/instruments", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    body = await r.json()
                    listed = [i["instrument"] for i in body.get("instruments", [])]
                    if listed:
                        return listed
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                why = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.5)
    raise TimeoutError(f"region {region.name}: {region.http_base}/v1/instruments after {timeout_s} s: {why}")


class Probe:
    """Every region's probe, the ClickHouse writer, OTLP, and the HTTP app serving ``/metrics``."""

    def __init__(self, config: ProbeConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = ProbeMetrics(self.registry)
        self.regions: list[RegionProbe] = []
        self.registry.register(WindowSummaries(self.regions))
        self.writer: ClickHouseWriter | None = None
        self.otlp: Otlp | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """List instruments, open ClickHouse and OTLP, start every region's client and the updater.

        Raises:
            TimeoutError: a region listed no instruments in time.
            ClickHouseError: the ClickHouse target cannot be opened.
        """
        cfg = self.config
        listed = {}
        for region in cfg.regions:
            listed[region.name] = cfg.instruments or await list_instruments(region, cfg.list_timeout_s)
        if cfg.clickhouse:
            loop = asyncio.get_running_loop()
            backend = await loop.run_in_executor(
                None, lambda: open_backend(cfg.clickhouse, retention_s=cfg.retention_s))
            self.writer = ClickHouseWriter(backend, registry=self.registry)
            self.writer.start()
        otlp_hist = None
        if cfg.otlp_endpoint:
            self.otlp = Otlp(cfg.otlp_endpoint, "bookcast-probe", export_interval_s=cfg.otlp_export_interval_s)
            otlp_hist = self.otlp.meter.create_histogram(
                "bookcast_probe_latency_seconds", unit="s",
                description="Per-hop latency of every delta the probe received, from the message's own stamps.")
        ticks_region = None if cfg.no_ticks else (cfg.ticks_region or cfg.regions[0].name)
        for region in cfg.regions:
            rp = RegionProbe(region, listed[region.name], self.metrics, stale_after_s=cfg.stale_after_s,
                             writer=self.writer, write_ticks=region.name == ticks_region, otlp=self.otlp,
                             otlp_hist=otlp_hist, run_id=cfg.run_id, reader_delay_s=cfg.reader_delay_s,
                             fallbacks=[r for r in cfg.regions if r is not region] if cfg.failover else None)
            self.regions.append(rp)
            log.info("region %s: %s, %d instruments", region.name, region.ws_url, len(rp.instruments))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(rp.run(), name=f"probe-{rp.region.name}") for rp in self.regions]
        self._tasks.append(loop.create_task(self._updater(), name="probe-updater"))

    async def _updater(self) -> None:
        session = aiohttp.ClientSession() if self.config.ebpf_url else None
        try:
            while True:
                await self._sample_host(session)
                await asyncio.sleep(self.config.update_interval_s)
                now_s = time.monotonic()
                for rp in self.regions:
                    rp.update(now_s)
        finally:
            if session is not None:
                await session.close()

    async def _sample_host(self, session: aiohttp.ClientSession | None) -> None:
        """One ``host_samples`` row: CPU pressure now and, when the eBPF exporter runs, its run-queue sums."""
        if self.writer is None:
            return
        runq_s, runq_n = 0.0, 0
        if session is not None:
            try:
                async with session.get(self.config.ebpf_url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                    runq_s, runq_n = parse_runqueue(await r.text())
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                log.debug("eBPF exporter at %s: %s", self.config.ebpf_url, exc)
        self.writer.add(HOST_SAMPLES.name, (time.time_ns(), self.config.run_id, read_cpu_pressure_us(), runq_s, runq_n,
                                            read_own_wait_ns()))

    async def stop(self) -> None:
        """Stop the clients, then write every buffered row and export pending OTLP data."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for rp in self.regions:
            await rp.client.close()
        loop = asyncio.get_running_loop()
        if self.writer is not None:
            await loop.run_in_executor(None, self.writer.stop)
            await loop.run_in_executor(None, self.writer.backend.close)
        if self.otlp is not None:
            await loop.run_in_executor(None, self.otlp.shutdown)

    def status(self) -> dict[str, Any]:
        return {"regions": {rp.region.name: {"url": rp.region.ws_url, "instruments": len(rp.instruments),
                                             "connected": rp.client.connected, "measured": rp.measured,
                                             "gaps": rp.client.stats.gaps}
                            for rp in self.regions},
                "clickhouse": None if self.writer is None else {"target": self.writer.backend.target,
                                                                "written": self.writer.written_rows,
                                                                "dropped": self.writer.dropped_rows}}

    def http_app(self) -> web.Application:
        """``/metrics``, ``/healthz``, ``/v1/status`` (regions, connections, ClickHouse writer) and
        ``/v1/latency/report?since=10m&until_ns=&run=&instrument=&region=&top=10&budget_ms=&format=text|json``
        (``until_ns``: the window's end, default now; ``run``: default this probe's run, ``all``): the report
        from this probe's own store (an embedded chDB store can only be read by the process holding it)."""
        app = prom.ops_app(self.registry, self.status)
        app.router.add_get("/v1/latency/report", self._report)
        return app

    async def _report(self, request: web.Request) -> web.Response:
        from exporter.report import UnknownInstrument, build_report, format_text, parse_duration_s
        from exporter.verdict import Params

        if self.writer is None:
            return web.json_response({"error": "this probe writes no ClickHouse store (--no-clickhouse)"}, status=404)
        q = request.query
        try:
            since_s = parse_duration_s(q.get("since", "10m"))
            top = int(q.get("top", "10"))
            params = Params(budget_ns=float(q.get("budget_ms", "100")) * 1e6)
            until_ns = int(q.get("until_ns") or time.time_ns())
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        run_id = q.get("run", self.config.run_id or None)
        try:
            report = await asyncio.to_thread(build_report, self.writer.backend, since_s=since_s, now_ns=until_ns,
                                             run_id=None if run_id == "all" else run_id,
                                             instrument=q.get("instrument") or None, region=q.get("region") or None,
                                             top=top, params=params)
        except UnknownInstrument as exc:
            if not any(str(exc) in rp.instruments for rp in self.regions):
                return web.json_response({"error": f"unknown instrument {exc}", "code": "unknown_instrument"},
                                         status=404)
            report = None
        if report is None:
            return web.json_response({"error": f"no sample of {q.get('instrument')} yet"}, status=503)
        headers = {"X-Bookcast-Samples": str(report.samples)}
        if q.get("format") == "json":
            return web.Response(body=orjson.dumps(report.to_json(), option=orjson.OPT_SERIALIZE_NUMPY),
                                content_type="application/json", headers=headers)
        return web.Response(text=format_text(report) + "\n", headers=headers)


# -- command line ---------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--region", action="append", type=parse_region, metavar="NAME=URL",
                   help="a region's gateway WebSocket URL, repeatable (default local=ws://127.0.0.1:8080/v1/ws)")
    p.add_argument("--instrument", action="append", metavar="ID",
                   help="instrument to measure, repeatable (default: every instrument each region lists)")
    p.add_argument("--http-host", default="127.0.0.1", help="address of /metrics (default %(default)s)")
    p.add_argument("--http-port", type=int, default=9475, help="port of /metrics, 0 = none (default %(default)s)")
    p.add_argument("--stale-after-s", type=float, default=10.0,
                   help="an instrument with no message and no heartbeat this long is stale (default %(default)s)")
    p.add_argument("--clickhouse", default=None,
                   help="chDB path, or clickhouse://host:9000 for a server (default: <bookcast home>/chdb, "
                        "see feed.runstate)")
    p.add_argument("--run-id", default="", help="run id every row carries (bookcast up passes its own)")
    p.add_argument("--retention", default="7d",
                   help="keep samples this long in the store (TTL where the backend has one): 1h, 7d (default %(default)s)")
    p.add_argument("--ebpf-url", help="the eBPF exporter's /metrics, read for run-queue delay (host CPU context)")
    p.add_argument("--test-reader-delay-ms", type=float, default=0.0,
                   help="test hook: handle each message this long after it was received, a slow reader (default off)")
    p.add_argument("--no-clickhouse", action="store_true", help="do not write samples or book events")
    p.add_argument("--ticks-region", help="region whose book events go to ClickHouse (default: the first)")
    p.add_argument("--no-ticks", action="store_true", help="write no book events (latency samples only)")
    p.add_argument("--otlp-endpoint", default=endpoint_from(None),
                   help="OTLP/gRPC endpoint for metrics and client spans (default $OTEL_EXPORTER_OTLP_ENDPOINT; unset = off)")
    p.add_argument("--otlp-export-interval-s", type=float, default=10.0, help="OTLP metric export period (default %(default)s)")
    p.add_argument("--failover", action="store_true",
                   help="each region's client also holds the other regions and moves between them (SDK region "
                        "failover), counted in bookcast_probe_failovers_total{region,reason}; latency is then "
                        "labelled with the client's own region wherever it is served")
    p.add_argument("--duration-s", type=float, help="stop after this many seconds (default: until SIGTERM/SIGINT)")


def main(args: argparse.Namespace) -> int:
    regions = args.region or [Region("local", "ws://127.0.0.1:8080/v1/ws")]
    names = [r.name for r in regions]
    if len(set(names)) != len(names):
        log.error("region names must differ, got %s", names)
        return 2
    if args.ticks_region and args.ticks_region not in names:
        log.error("--ticks-region %s is not one of the regions %s", args.ticks_region, names)
        return 2
    from exporter.report import parse_duration_s

    try:
        retention_s = parse_duration_s(args.retention)
    except ValueError as exc:
        log.error("--retention: %s", exc)
        return 2
    config = ProbeConfig(regions=regions, instruments=args.instrument, stale_after_s=args.stale_after_s,
                         clickhouse=None if args.no_clickhouse else (args.clickhouse or str(default_store())),
                         ticks_region=args.ticks_region,
                         otlp_endpoint=args.otlp_endpoint, otlp_export_interval_s=args.otlp_export_interval_s,
                         run_id=args.run_id, retention_s=retention_s, ebpf_url=args.ebpf_url,
                         reader_delay_s=args.test_reader_delay_ms / 1000, no_ticks=args.no_ticks,
                         failover=args.failover)
    # Reports (``/v1/latency/report``) are built in a worker thread holding the GIL for ~100 ms of numpy and
    # Python; at the default 5 ms switch interval the reading loop waits up to that long at each syscall it
    # makes while one runs (the GIL convoy, bpo-7946) and its frames queue in the socket, measured as network
    # latency. A shorter interval hands the loop the GIL sooner: the instrument keeps reading while asked.
    sys.setswitchinterval(PROBE_SWITCH_INTERVAL_S)
    try:
        return asyncio.run(_serve(config, args.http_host, args.http_port, args.duration_s))
    except KeyboardInterrupt:
        return 0


async def _serve(config: ProbeConfig, http_host: str, http_port: int, duration_s: float | None) -> int:
    probe = Probe(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await probe.start()
    except (TimeoutError, ClickHouseError) as exc:
        log.error("probe cannot start: %s", exc)
        await probe.stop()
        return 1
    runner = None
    if http_port:
        runner = web.AppRunner(probe.http_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, http_host, http_port).start()
        log.info("probe serving http://%s:%d/metrics", http_host, http_port)
    try:
        await asyncio.wait_for(stop.wait(), duration_s)
    except TimeoutError:
        pass
    log.info("probe stopping: flushing ClickHouse and OTLP")
    await probe.stop()
    if runner is not None:
        await runner.cleanup()
    status = probe.status()
    log.info("probe stopped: %s", status)
    return 0
