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

Negative hops (clocks that disagree) are recorded as 0 and counted in ``bookcast_probe_clock_skew_total``.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from feed.catalog import CATALOG
from exporter.clickhouse import BOOK_EVENTS, DEFAULT_CHDB_PATH, LATENCY_SAMPLES, ClickHouseError, ClickHouseWriter, open_backend
from exporter.latency import QUANTILES, SlidingWindow, StaleTracker, summarize
from feed.hops import Hop, hops_ns
from feed.otlp import TRACEPARENT, Otlp, endpoint_from
from feed import metrics as prom
from feed.client import BookClient, BookUpdated, UpdateKind

log = logging.getLogger("bookcast.probe")

EXAMPLES = """examples:
  bookcast probe                                                   # every instrument of ws://127.0.0.1:8080/v1/ws, region "local"
  bookcast probe --region eu=ws://10.0.0.1:8080/v1/ws --region us=ws://10.1.0.1:8080/v1/ws --http-port 9475
  bookcast probe --instrument coinbase:BTC-USD --instrument coinbase:ETH-USD --stale-after-s 30
  bookcast probe --clickhouse clickhouse://127.0.0.1:9000 --otlp-endpoint http://127.0.0.1:4317
  bookcast probe --no-clickhouse --duration-s 60                   # Prometheus only, for one minute"""

# (label, length in s, slices): the window moves in steps of one slice.
WINDOWS: tuple[tuple[str, float, int], ...] = (("1m", 60.0, 6), ("10m", 600.0, 10))


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    ws_url: str

    @property
    def http_base(self) -> str:
        """``http://host:port`` of the gateway serving ``ws_url``."""
        parts = urlsplit(self.ws_url)
        return urlunsplit(("https" if parts.scheme == "wss" else "http", parts.netloc, "", "", ""))


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
    clickhouse: str | None = str(DEFAULT_CHDB_PATH)  # chDB path or clickhouse:// URL; None: no ClickHouse
    ticks_region: str | None = None  # default: the first region
    otlp_endpoint: str | None = None
    otlp_export_interval_s: float = 10.0
    list_timeout_s: float = 30.0


class ProbeMetrics:
    """The probe's Prometheus metrics on its own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        names = ("bookcast_probe_latency_seconds", "bookcast_probe_latency_max_seconds", "bookcast_probe_messages_total", "bookcast_probe_clock_skew_total",
                 "bookcast_probe_gaps_total", "bookcast_probe_resyncs_total", "bookcast_probe_reconnects_total",
                 "bookcast_probe_stale_instruments", "bookcast_probe_connected")
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


class RegionProbe:
    """One region: a ``BookClient`` and what it measures. ``on_event`` is the per-message path."""

    def __init__(self, region: Region, instruments: list[str], metrics: ProbeMetrics, *, stale_after_s: float,
                 writer: ClickHouseWriter | None, write_ticks: bool, otlp: Otlp | None, otlp_hist: Any,
                 clock_ns=time.time_ns, monotonic_s=time.monotonic) -> None:
        self.region = region
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
        self.client = BookClient([region.ws_url], instruments, clock_ns=clock_ns, event_queue_size=100_000)
        self.measured = 0
        self._seen = _Seen()

    async def run(self) -> None:
        """Consume the client's events until cancelled."""
        async with self.client:
            async for event in self.client:
                if isinstance(event, BookUpdated):
                    self.on_update(event, self.monotonic_s())

    def on_update(self, ev: BookUpdated, now_s: float) -> None:
        self.stale.message(ev.instrument, now_s)
        msg = ev.msg
        if self.write_ticks and self.writer is not None:
            self.writer.add(BOOK_EVENTS.name, _tick_row(self.region.name, ev))
        if ev.kind is not UpdateKind.DELTA:
            return  # a snapshot carries the stamps of the book's last delta, not its own journey
        hops = hops_ns(msg, ev.recv_ns)
        if hops is None:
            return
        self.measured += 1
        self.messages.inc()
        for hop, value_ns in hops.items():
            state = self.hops[hop]
            if value_ns < 0:
                state.skew.inc()
                value_ns = 0
            state.hist.observe(value_ns / 1e9)
            for w in state.windows:
                w.window.record(value_ns, now_s)
            if self.otlp_hist is not None:
                self.otlp_hist.record(value_ns / 1e9, state.otlp_attrs)
        if self.writer is not None:
            self.writer.add(LATENCY_SAMPLES.name, (
                ev.recv_ns, self.region.name, ev.instrument, ev.epoch, ev.seq, msg.get("ts_event_ns", 0),
                msg["ts_ingest_ns"], msg["ts_publish_ns"], msg["ts_send_ns"]))
        traceparent = msg.get(TRACEPARENT)
        if traceparent is not None and self.otlp is not None:
            self.otlp.hop_span("client", traceparent, msg["ts_send_ns"], ev.recv_ns,
                               {"instrument": ev.instrument, "seq": ev.seq, "region": self.region.name})

    def update(self, now_s: float) -> None:
        """Refresh the window quantiles, the stale count and the counters kept by the SDK."""
        for state in self.hops.values():
            for w in state.windows:
                merged = w.window.merged(now_s)
                w.count, values, max_ns = summarize(merged)
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


def _tick_row(region: str, ev: BookUpdated) -> tuple:
    msg = ev.msg
    if ev.kind is UpdateKind.SNAPSHOT:
        levels = [("bid", p, s) for p, s in msg["bids"]] + [("ask", p, s) for p, s in msg["asks"]]
        prev_seq = 0
    else:
        levels = msg["changes"]
        prev_seq = msg["prev_seq"]
    return (ev.recv_ns, region, ev.instrument, ev.epoch, ev.seq, prev_seq, ev.kind.value, msg["checksum"],
            msg.get("ts_event_ns", 0), msg.get("ts_ingest_ns", 0), [c[0] for c in levels], [c[1] for c in levels],
            [c[2] for c in levels])


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
            backend = await loop.run_in_executor(None, open_backend, cfg.clickhouse)
            self.writer = ClickHouseWriter(backend, registry=self.registry)
            self.writer.start()
        otlp_hist = None
        if cfg.otlp_endpoint:
            self.otlp = Otlp(cfg.otlp_endpoint, "bookcast-probe", export_interval_s=cfg.otlp_export_interval_s)
            otlp_hist = self.otlp.meter.create_histogram(
                "bookcast_probe_latency_seconds", unit="s",
                description="Per-hop latency of every delta the probe received, from the message's own stamps.")
        ticks_region = cfg.ticks_region or cfg.regions[0].name
        for region in cfg.regions:
            rp = RegionProbe(region, listed[region.name], self.metrics, stale_after_s=cfg.stale_after_s,
                             writer=self.writer, write_ticks=region.name == ticks_region, otlp=self.otlp,
                             otlp_hist=otlp_hist)
            self.regions.append(rp)
            log.info("region %s: %s, %d instruments", region.name, region.ws_url, len(rp.instruments))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(rp.run(), name=f"probe-{rp.region.name}") for rp in self.regions]
        self._tasks.append(loop.create_task(self._updater(), name="probe-updater"))

    async def _updater(self) -> None:
        while True:
            await asyncio.sleep(self.config.update_interval_s)
            now_s = time.monotonic()
            for rp in self.regions:
                rp.update(now_s)

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
        ``/v1/latency/report?since=10m&instrument=&region=&top=10&format=text|json``: the latency report
        from this probe's own store (an embedded chDB store can only be read by the process holding it)."""
        app = prom.ops_app(self.registry, self.status)
        app.router.add_get("/v1/latency/report", self._report)
        return app

    async def _report(self, request: web.Request) -> web.Response:
        from exporter.report import build_report, format_text, parse_duration_s

        if self.writer is None:
            return web.json_response({"error": "this probe writes no ClickHouse store (--no-clickhouse)"}, status=404)
        q = request.query
        try:
            since_s = parse_duration_s(q.get("since", "10m"))
            top = int(q.get("top", "10"))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        report = await asyncio.to_thread(build_report, self.writer.backend, since_s=since_s, now_ns=time.time_ns(),
                                         instrument=q.get("instrument") or None, region=q.get("region") or None,
                                         top=top)
        headers = {"X-Bookcast-Samples": str(report.samples)}
        if q.get("format") == "json":
            return web.json_response(report.to_json(), headers=headers)
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
    p.add_argument("--clickhouse", default=str(DEFAULT_CHDB_PATH),
                   help="chDB path, or clickhouse://host:9000 for a server (default %(default)s)")
    p.add_argument("--no-clickhouse", action="store_true", help="do not write samples or book events")
    p.add_argument("--ticks-region", help="region whose book events go to ClickHouse (default: the first)")
    p.add_argument("--otlp-endpoint", default=endpoint_from(None),
                   help="OTLP/gRPC endpoint for metrics and client spans (default $OTEL_EXPORTER_OTLP_ENDPOINT; unset = off)")
    p.add_argument("--otlp-export-interval-s", type=float, default=10.0, help="OTLP metric export period (default %(default)s)")
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
    config = ProbeConfig(regions=regions, instruments=args.instrument, stale_after_s=args.stale_after_s,
                         clickhouse=None if args.no_clickhouse else args.clickhouse, ticks_region=args.ticks_region,
                         otlp_endpoint=args.otlp_endpoint, otlp_export_interval_s=args.otlp_export_interval_s)
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
