"""``bookcast bench fanout``: open-loop fan-out, bookcast's gateway beside nats-server's WebSocket listener.

For every (clients, publish rate) point and each target, one *cell*, on fresh processes:

1. a nats-server (``feed.natsserver``; its WebSocket listener on for the ``nats`` target) and the synthetic
   ingest (``loadtest.bench.publisher``), idle;
2. ``bookcast``: a real ``bookcast gateway --workers W`` fed by it; ``nats``: nothing more;
3. warm-up connections (8 per worker; they leave before step 4); server RSS; the clients, spread over
   ``client_procs`` processes (``loadtest.bench.clients``), connect and subscribe to every instrument;
   server RSS again, so ``(idle - base) / connected`` is the RSS per idle connection;
4. CPU counters, then the publisher sends ``rate x duration`` deltas on its open-loop schedule; clients
   drain until they hold the final seq of every instrument (or ``drain_s`` passes); CPU counters again.

Server processes: the gateway supervisor and its workers (``bookcast``), nats-server (``nats``); CPU is
``/proc/<pid>/stat`` utime + stime over step 4. The nats-server's CPU in a ``bookcast`` cell is reported
apart as ``upstream_nats_cpu_s`` (it feeds one subscriber per worker there). Latency is receipt minus the
scheduled publish time, merged from every client process's HDR histogram; the spread of a message is its
last receipt minus its first, across all clients.

Every cell checks its own accounting: ``published x subscribers = delivered + gap_lost + resync_skipped
+ tail_lost`` (see ``loadtest.bench.clients``), no redelivered seqs, and for bookcast no gaps. A cell
that breaks those is a *harness failure* (exit 1); connect failures, closed connections and losses under
overload are measurements, reported per cell.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from feed.natsserver import NatsServer
from feed.procs import free_port, stop_process, wait_until
from loadtest.bench import floor, procstat, report
from loadtest.bench.procstat import TICKS_PER_S as _TICKS_PER_S
from loadtest.bench.clients import LATENCY_MAX_US, new_histogram
from loadtest.bench.ipc import BenchError, Child

OTLP_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
START_TIMEOUT_S = 240.0  # a loaded shared machine takes minutes to import and start a gateway's workers
# The processes holding the idle connections run at a lower CPU priority than the healthy clients, for both
# targets: the healthy clients are the instrument, and a heartbeat reader queued ahead of them on a 2-core
# machine shows as the server's latency. They only need to keep their sockets drained and answer pings
# (within 5 s): nice 10 still gives them ~10% of a core each against a busy machine.
IDLE_NICE = 10
WARMUP_PER_WORKER = 8  # SO_REUSEPORT hashes connections over workers: 8 per worker miss one < 1% of the time


@dataclass
class FanoutConfig:
    clients: list[int]
    rates_per_s: list[float]
    duration_s: float
    instruments: int
    client_procs: int
    workers: int
    out_dir: Path
    targets: list[str]
    drain_s: float = 10.0
    connect_timeout_s: float = 120.0
    repeat: int = 1
    idle: int = 0  # idle-connections mode: this many idle connections beside ``clients`` healthy ones
    saturated_busy_pct: float = 90.0
    gateway_args: list[str] = field(default_factory=list)  # extra ``bookcast gateway`` options (A/B runs)
    toggles: dict[str, bool] = field(default_factory=dict)
    command: str = ""


def config_from_args(args: argparse.Namespace) -> FanoutConfig:
    if args.quick:
        defaults = {"clients": [20], "rates": [50.0], "duration_s": 3.0, "instruments": 4, "client_procs": 2,
                    "workers": 1}
    elif args.idle:
        cpus = os.cpu_count() or 1
        defaults = {"clients": [20], "rates": [100.0], "duration_s": 20.0, "instruments": 10, "client_procs": cpus,
                    "workers": cpus}
    else:
        cpus = os.cpu_count() or 1
        defaults = {"clients": [100, 1000, 5000], "rates": [10.0, 100.0], "duration_s": 20.0, "instruments": 10,
                    "client_procs": cpus, "workers": cpus}
    pick = lambda name: defaults[name] if getattr(args, name) is None else getattr(args, name)  # noqa: E731
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return FanoutConfig(
        clients=pick("clients"), rates_per_s=pick("rates"), duration_s=pick("duration_s"),
        instruments=pick("instruments"), client_procs=pick("client_procs"), workers=pick("workers"),
        out_dir=args.out or Path("run") / "bench" / f"fanout-{stamp}", targets=args.targets,
        drain_s=args.drain_s, connect_timeout_s=args.connect_timeout_s, repeat=args.repeat, idle=args.idle or 0,
        saturated_busy_pct=args.saturated_busy_pct, gateway_args=shlex.split(args.gateway_args or ""),
        toggles={"exporter": args.exporter == "on", "ebpf": args.ebpf == "on", "otlp": args.otlp == "on"},
        command=" ".join(["bookcast", *sys.argv[1:]]) if sys.argv[0].endswith(("bookcast", "cli.py")) else "",
    )


def _cli_help(*command: str) -> str:
    """``bookcast COMMAND --help`` output, or "" when there is no such command."""
    out = subprocess.run([sys.executable, "-m", "feed.cli", *command, "--help"], capture_output=True, text=True,
                         timeout=60)
    return out.stdout if out.returncode == 0 else ""


def unavailable_toggles(toggles: dict[str, bool]) -> list[str]:
    """One message per overhead toggle asked "on" that cannot be honoured here (yet).

    * ``exporter``: runs ``bookcast probe --region bench=<gateway ws>`` beside the gateway in bookcast cells;
    * ``otlp``: passes ``--otlp-endpoint $OTEL_EXPORTER_OTLP_ENDPOINT`` to the gateway (and the probe);
    * ``ebpf``: runs ``bookcast ebpf --pid <server pid> ... --port P`` beside the server processes of every cell
      and waits for ``bookcast_ebpf_up{reason="ok"} 1``.
    """
    problems = []
    if toggles.get("exporter") and "--region" not in _cli_help("probe"):
        problems.append("--exporter on: not available yet (no `bookcast probe --region NAME=URL` command)")
    if toggles.get("otlp"):
        if "--otlp-endpoint" not in _cli_help("gateway"):
            problems.append("--otlp on: not available yet (`bookcast gateway` has no --otlp-endpoint option)")
        elif not os.environ.get(OTLP_ENV):
            problems.append(f"--otlp on: set {OTLP_ENV} to a running OTLP/gRPC collector (nothing to export to)")
    if toggles.get("ebpf"):
        ebpf_help = _cli_help("ebpf")
        if "--pid" not in ebpf_help or "--port" not in ebpf_help:
            problems.append("--ebpf on: not available yet (no `bookcast ebpf --pid PID --port PORT` command)")
    return problems


# -- one cell ----------------------------------------------------------------------------------------


def _say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


async def _progress(awaitable, what: str, every_s: float = 5.0):
    """Await ``awaitable``, saying ``what`` and the time spent every ``every_s`` until it is done."""
    task = asyncio.ensure_future(awaitable)
    started = time.monotonic()
    while not task.done():
        await asyncio.wait({task}, timeout=every_s)
        if not task.done():
            _say(f"{what} ({time.monotonic() - started:.0f} s)")
    return task.result()


def _http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as r:
        return json.loads(r.read())


def _lists(base: str, instruments: list[str]) -> bool:
    try:
        listed = {i["instrument"] for i in _http_json(base + "/v1/instruments")["instruments"]}
    except OSError:
        return False
    return listed.issuperset(instruments)


def _spawn_cli(args: list[str], log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "feed.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)


def _split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _metrics_text(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


GATEWAY_HOP = "bookcast_hop_nats_gateway_seconds"
OTHERS_NAMED_PCT = 5.0    # a cell whose others % reaches this names the busiest outside processes in its log line


class HopReading(NamedTuple):
    """One scrape of a latency histogram, summed over its labels: ``sum_s`` seconds, ``count``
    observations, ``buckets`` the cumulative counts by upper bound in seconds (ascending, ``inf`` last)."""
    sum_s: float
    count: int
    buckets: tuple[tuple[float, int], ...]


def hop_reading(metrics_text: str | None, name: str = GATEWAY_HOP) -> HopReading:
    """Histogram ``name`` from a Prometheus text exposition, summed over its labels (empty when absent: a
    gateway that has observed nothing yet exposes no series)."""
    from prometheus_client.parser import text_string_to_metric_families

    total_s, count, buckets = 0.0, 0, {}
    for family in text_string_to_metric_families(metrics_text or ""):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_sum":
                total_s += sample.value
            elif sample.name == f"{name}_count":
                count += int(sample.value)
            elif sample.name == f"{name}_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0) + int(sample.value)
    return HopReading(total_s, count, tuple(sorted(buckets.items())))


def hop_window(before: HopReading, after: HopReading, quantile: float = 0.99) -> tuple[float | None, float | None]:
    """(mean ms, ``quantile`` ms) of what the histogram observed between two readings (pure; ``None`` when it
    observed nothing). The quantile is interpolated linearly inside its bucket, as Prometheus's
    ``histogram_quantile`` does (the first bucket starts at 0; one in the ``+Inf`` bucket reads as the highest
    finite bound), so it is as coarse as the buckets (``feed.catalog.LATENCY_BUCKETS_S``: ... 1, 2.5, 5, 10, 25 ms ...)."""
    n = after.count - before.count
    if n <= 0:
        return None, None
    mean_ms = 1000 * (after.sum_s - before.sum_s) / n
    earlier = dict(before.buckets)
    window = [(le, c - earlier.get(le, 0)) for le, c in after.buckets]
    if not window or window[-1][1] <= 0:
        return mean_ms, None
    rank = quantile * window[-1][1]
    lower_le, lower_c = 0.0, 0
    for le, c in window:
        if c >= rank:
            if le == float("inf"):
                return mean_ms, 1000 * lower_le
            return mean_ms, 1000 * (lower_le + (le - lower_le) * (rank - lower_c) / max(c - lower_c, 1))
        lower_le, lower_c = le, c
    return mean_ms, 1000 * lower_le


def _start_ebpf(pids: list[int], log_path: Path) -> subprocess.Popen:
    """``bookcast ebpf`` tracing ``pids``; returns once its probes are attached.

    Raises:
        BenchError: the probes cannot load here (the reason ``bookcast_ebpf_up`` gives).
    """
    port = free_port()
    proc = _spawn_cli(["ebpf", *(a for pid in pids for a in ("--pid", str(pid))), "--port", str(port)], log_path)

    def attached() -> bool:
        up = re.search(r'^bookcast_ebpf_up\{reason="([^"]*)"\} (\S+)', _metrics_text(port) or "", re.M)
        if up and float(up[2]) != 1:
            stop_process(proc)
            raise BenchError(f"--ebpf on: the eBPF probes did not load (reason={up[1]}); see {log_path}")
        return up is not None

    wait_until(attached, 60, what="eBPF probes attached", proc=proc, interval_s=0.1)
    return proc


def _start_latency_probe(ws_url: str, otlp: bool, logs: Path, tag: str) -> subprocess.Popen:
    """``bookcast probe`` on the gateway, writing to its own chDB under ``logs``; returns once /metrics answers."""
    port = free_port()
    args = ["probe", "--region", f"bench={ws_url}", "--http-port", str(port), "--clickhouse", str(logs / f"chdb-{tag}")]
    if otlp:
        args += ["--otlp-endpoint", os.environ[OTLP_ENV]]
    proc = _spawn_cli(args, logs / f"probe-{tag}.log")
    wait_until(lambda: _metrics_text(port) is not None, 60, what="latency probe /metrics", proc=proc, interval_s=0.1)
    return proc


@dataclass
class Counters:
    server_cpu_s: float
    upstream_cpu_s: float
    publisher_cpu_s: float
    loadgen_cpu_s: float
    idle_loadgen_cpu_s: float
    machine_busy: int
    machine_total: int
    at_s: float
    server_wait: tuple[float, int]       # run-queue wait (s, runs): procstat.runqueue_wait
    upstream_wait: tuple[float, int]
    loadgen_wait: tuple[float, int]
    server_preemptions: int              # procstat.preemptions

    @classmethod
    def read(cls, server: list[int], upstream: list[int], publisher: int, loadgen: list[int],
             idlers: list[int] = ()) -> Counters:
        """``loadgen``: every client process, ``idlers`` (a subset): those holding the idle connections."""
        return cls(procstat.cpu_s(server), procstat.cpu_s(upstream), procstat.cpu_s([publisher]),
                   procstat.cpu_s(loadgen), procstat.cpu_s(list(idlers)) if idlers else 0.0,
                   *procstat.machine_ticks(), time.monotonic(), procstat.runqueue_wait(server),
                   procstat.runqueue_wait(upstream), procstat.runqueue_wait(loadgen), procstat.preemptions(server))


async def run_cell(config: FanoutConfig, target: str, clients: int, rate_per_s: float, label: str,
                   idle: int = 0, repeat: int = 0) -> dict[str, Any]:
    """Run one cell on fresh processes and return its summary (see ``summarise``). ``idle`` > 0: that many
    idle connections (connected, subscribed to nothing) are held beside the ``clients`` healthy ones, and
    RSS per idle connection is theirs.

    Raises:
        BenchError / RuntimeError / TimeoutError: a process failed to start or missed a deadline.
    """
    logs = config.out_dir / "logs"
    tag = f"{target}-c{clients}-r{rate_per_s:g}" + (f"-idle{idle}" if idle else "") + (f"-n{repeat}" if repeat else "")
    nats = NatsServer(name=f"nats-{tag}", websocket_port=0 if target == "nats" else None, workdir=str(logs))
    gateway: subprocess.Popen | None = None
    sidecars: list[subprocess.Popen] = []
    helpers: list[Child] = []
    floor_probe: floor.FloorProbe | None = None
    try:
        nats.start()
        publisher = await Child.start("publisher", "loadtest.bench.publisher",
                                      ["--nats", nats.url, "--instruments", str(config.instruments)],
                                      logs / f"publisher-{tag}.log")
        helpers.append(publisher)
        instruments = (await publisher.expect("ready", START_TIMEOUT_S))["instruments"]
        if target == "bookcast":
            port = free_port()
            otlp = ["--otlp-endpoint", os.environ[OTLP_ENV]] if config.toggles.get("otlp") else []
            gateway = _spawn_cli(["gateway", "--nats", nats.url, "--port", str(port), "--workers", str(config.workers),
                                  *otlp, *config.gateway_args], logs / f"gateway-{tag}.log")
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda: _lists(base, instruments), START_TIMEOUT_S, what="gateway listing the benchmark instruments",
                       proc=gateway, interval_s=0.1)
            if config.workers > 1:
                wait_until(lambda: len(procstat.children(gateway.pid)) == config.workers, START_TIMEOUT_S,
                           what=f"{config.workers} gateway workers", proc=gateway)
            server_pids = [gateway.pid, *procstat.children(gateway.pid)]
            upstream_pids = [nats.pid]
            url = f"ws://127.0.0.1:{port}/v1/ws"
        else:
            server_pids, upstream_pids = [nats.pid], []
            url = f"ws://127.0.0.1:{nats.websocket_port}"
        if config.toggles.get("ebpf"):
            sidecars.append(_start_ebpf(server_pids, logs / f"ebpf-{tag}.log"))
        if config.toggles.get("exporter") and target == "bookcast":
            sidecars.append(_start_latency_probe(url, config.toggles.get("otlp", False), logs, tag))
        client_args = ["--target", target, "--url", url, "--instruments", ",".join(instruments),
                       "--connect-timeout-s", str(config.connect_timeout_s)]
        # Warm-up connections, reaching every worker, pay the servers' one-off costs (lazy imports, hubs,
        # buffers) and stay connected while RSS is measured without and with the clients, so neither those
        # costs nor memory they freed and the clients reused skew RSS per idle connection. They leave before
        # publishing starts.
        warmups = WARMUP_PER_WORKER * (config.workers if target == "bookcast" else 1)
        warmup = await Child.start("warm-up clients", "loadtest.bench.clients",
                                   [*client_args, "--clients", str(warmups)], logs / f"clients-{tag}-warmup.log")
        helpers.append(warmup)
        await warmup.expect("ready", config.connect_timeout_s + 60)
        rss_base = procstat.rss_bytes(server_pids)
        loadgen: list[Child] = []
        idlers: list[Child] = []
        rss_idle = rss_base
        idle_results: list[dict] = []
        if idle:
            for i, n in enumerate(_split(idle, config.client_procs)):
                idlers.append(await Child.start(f"idle-{i}", "loadtest.bench.clients",
                                                [*client_args, "--idle", "--nice", str(IDLE_NICE), "--clients", str(n)],
                                                logs / f"clients-{tag}-idle-{i}.log"))
                helpers.append(idlers[-1])
            idle_ready = await _progress(
                asyncio.gather(*(c.expect("ready", config.connect_timeout_s + 60) for c in idlers)),
                f"{label} connecting {idle} idle connections")
            idle_connected = sum(r["connected"] for r in idle_ready)
            await _settle_rss(server_pids)
            rss_idle = procstat.rss_bytes(server_pids)
            _say(f"{label} {idle_connected}/{idle} idle connections held; RSS "
                 f"+{(rss_idle - rss_base) / max(idle_connected, 1) / 1024:.1f} KiB per idle connection")
        for i, n in enumerate(_split(clients, config.client_procs)):
            loadgen.append(await Child.start(f"clients-{i}", "loadtest.bench.clients", [*client_args, "--clients", str(n)],
                                             logs / f"clients-{tag}-{i}.log"))
            helpers.append(loadgen[-1])
        readies = await _progress(asyncio.gather(*(c.expect("ready", config.connect_timeout_s + 60) for c in loadgen)),
                                  f"{label} connecting {clients} clients")
        connected = sum(r["connected"] for r in readies)
        if not idle:
            idle_connected = connected
            await _settle_rss(server_pids)
            rss_idle = procstat.rss_bytes(server_pids)
        await warmup.stop()
        _say(f"{label} {connected}/{clients} clients ready; RSS +{(rss_idle - rss_base) / max(idle_connected, 1) / 1024:.1f}"
             f" KiB per idle connection; publishing {rate_per_s:g} msg/s for {config.duration_s:g} s")

        pids = (server_pids, upstream_pids, publisher.pid, [c.pid for c in (*loadgen, *idlers)], [c.pid for c in idlers])
        load_before = os.getloadavg()[0]
        hop_port = port if target == "bookcast" else None
        hop_before = hop_reading(_metrics_text(hop_port)) if hop_port else None
        everyone_before = procstat.every_process_cpu_s()
        floor_probe = floor.FloorProbe().start()  # stopped in the finally below, also when the cell fails
        before = Counters.read(*pids)
        count = max(1, round(rate_per_s * config.duration_s))
        await publisher.send("run", rate_per_s=rate_per_s, count=count)
        t0_ns = (await publisher.expect("started", 10))["t0_ns"]
        published = await _progress(publisher.expect("done", config.duration_s * 3 + 60),
                                     f"{label} publishing for {config.duration_s:g} s")
        for c in loadgen:
            await c.send("finish", final_seqs=published["final_seqs"], drain_s=config.drain_s)
        results = await _progress(asyncio.gather(*(c.expect("result", config.drain_s + 120) for c in loadgen)),
                                  f"{label} draining (up to {config.drain_s:g} s)")
        after = Counters.read(*pids)
        floor_probe.stop()
        everyone_after = procstat.every_process_cpu_s()
        hop_after = hop_reading(_metrics_text(hop_port)) if hop_port else None
        load_after = os.getloadavg()[0]
        rss_end = procstat.rss_bytes(server_pids)
        for c in idlers:
            await c.send("finish", final_seqs={}, drain_s=0)
            idle_results.append(await c.expect("result", 60))
    finally:
        if floor_probe is not None:
            floor_probe.stop()
        for helper in reversed(helpers):
            await helper.stop()
        for proc in (*sidecars, gateway):
            if proc is not None:
                stop_process(proc, grace_s=10)
        nats.stop()
    for proc in sidecars:
        if proc.returncode not in (0, -signal.SIGTERM):
            raise BenchError(f"bookcast {proc.args[3]} exited with {proc.returncode} during the cell; see {logs}")
    return summarise(
        target=target, clients=clients, rate_per_s=rate_per_s, config=config, results=results,
        published=published, t0_ns=t0_ns, before=before, after=after, rss=(rss_base, rss_idle, rss_end),
        idle=idle, idle_connected=idle_connected, idle_results=idle_results, repeat=repeat,
        load_average=(load_before, load_after),
        others_top=procstat.busiest_others(everyone_before, everyone_after,
                                           [*pids[0], *pids[1], pids[2], *pids[3], os.getpid()]),
        gateway_hop=(hop_before, hop_after) if hop_port else None, floor_samples=floor_probe.samples,
    )


async def _settle_rss(pids: list[int], timeout_s: float = 10.0) -> None:
    """Wait (up to ``timeout_s``) until the servers' RSS stops growing over half a second: the last
    connections' buffers are allocated after their handshake."""
    last = procstat.rss_bytes(pids)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = procstat.rss_bytes(pids)
        if now <= last:
            return
        last = now


def _ms(hist, percentile: float) -> float:
    return hist.get_value_at_percentile(percentile) / 1000


def summarise(*, target: str, clients: int, rate_per_s: float, config: FanoutConfig,
              results: list[dict], published: dict, t0_ns: int, before: Counters, after: Counters,
              rss: tuple[int, int, int], idle: int = 0, idle_connected: int | None = None,
              idle_results: list[dict] | None = None, repeat: int = 0,
              load_average: tuple[float, float] | None = None,
              gateway_hop: tuple[HopReading, HopReading] | None = None,
              others_top: list[dict] | None = None, floor_samples: list[float] | None = None) -> dict[str, Any]:
    """Merge the client processes' results into one cell: counts, accounting check, latency and spread
    quantiles (ms), rates (/s), CPU (s), RSS (bytes), and ``harness_failures`` (empty when sound).
    ``gateway_hop``: the gateway's ``bookcast_hop_nats_gateway_seconds`` before and after the window
    (bookcast only, ``hop_reading``), giving the mean and p99 NATS publish -> gateway fan-out time of the
    cell's deltas (``hop_window``).
    ``others_top``: the busiest processes outside the cell over the window (``procstat.busiest_others``).
    ``floor_samples``: the window's ``floor.FloorProbe`` samples (CPU us per loopback send + recv)."""
    latency, spread = new_histogram(), new_histogram()
    receipts: dict[int, list[int]] = {}
    for r in results:
        latency.decode_and_add(r["hist"])
        for key, first_ns, last_ns, receivers in r["receipts"]:
            seen = receipts.get(key)
            if seen is None:
                receipts[key] = [first_ns, last_ns, receivers]
            else:
                seen[0], seen[1], seen[2] = min(seen[0], first_ns), max(seen[1], last_ns), seen[2] + receivers
    for first_ns, last_ns, receivers in receipts.values():
        if receivers > 1:
            spread.record_value(min(max((last_ns - first_ns) // 1000, 1), LATENCY_MAX_US))
    total = lambda key: sum(r[key] for r in results)  # noqa: E731
    subscribers = total("connected")
    delivered = total("delivered")
    losses = {k: total(k) for k in ("gap_lost", "resync_skipped", "tail_lost")}
    owed = published["published"] * subscribers
    failures = []
    if total("expected") != owed or delivered + sum(losses.values()) != owed:
        failures.append(f"accounting: published {published['published']} x {subscribers} subscribers = {owed}, "
                        f"clients expected {total('expected')}, delivered {delivered} + losses {sum(losses.values())}")
    if total("dups"):
        failures.append(f"{total('dups')} deltas redelivered")
    if target == "bookcast" and total("gaps"):
        failures.append(f"bookcast sent {total('gaps')} deltas that do not chain on the client's seq")
    errors: dict[str, int] = {}
    for r in results:  # each process's errors so far, connect-time ones included
        for text, n in r["errors"].items():
            errors[text] = errors.get(text, 0) + n
    last_ns = max((seen[1] for seen in receipts.values()), default=t0_ns)
    window_s = max((last_ns - t0_ns) / 1e9, published["published"] / rate_per_s)  # never shorter than publishing
    server_cpu_s = after.server_cpu_s - before.server_cpu_s
    busy, ticks = after.machine_busy - before.machine_busy, after.machine_total - before.machine_total
    rss_base, rss_idle, rss_end = rss
    idle_connected = subscribers if idle_connected is None else idle_connected
    upstream_cpu_s = after.upstream_cpu_s - before.upstream_cpu_s
    publisher_cpu_s = after.publisher_cpu_s - before.publisher_cpu_s
    loadgen_cpu_s = after.loadgen_cpu_s - before.loadgen_cpu_s
    idle_loadgen_cpu_s = after.idle_loadgen_cpu_s - before.idle_loadgen_cpu_s
    measured_s = max(after.at_s - before.at_s, 1e-9)
    waits = {k: (getattr(after, k)[0] - getattr(before, k)[0], getattr(after, k)[1] - getattr(before, k)[1])
             for k in ("server_wait", "upstream_wait", "loadgen_wait")}
    per_run_us = {k: 1e6 * w / runs if runs > 0 else None for k, (w, runs) in waits.items()}
    cpus = os.cpu_count() or 1
    busy_pct = 100 * busy / ticks if ticks else None
    # What the machine spent on everything that is not this cell's processes: other people's work on a
    # shared machine (the load generator, the publisher and the servers are counted apart).
    ours_s = server_cpu_s + loadgen_cpu_s + publisher_cpu_s + (upstream_cpu_s if target == "bookcast" else 0)
    others_pct = (max(busy / _TICKS_PER_S - ours_s, 0) / (measured_s * cpus) * 100) if ticks else None
    hop_ms, hop_p99_ms = hop_window(*gateway_hop) if gateway_hop is not None else (None, None)
    for r in idle_results or []:
        for text, n in r["errors"].items():
            errors[f"idle: {text}"] = errors.get(f"idle: {text}", 0) + n
    return {
        "repeat": repeat, "idle": idle, "idle_connected": idle_connected if idle else None,
        "idle_closed_early": sum(r["closed_early"] for r in idle_results or []) if idle else None,
        "idle_connect_failures": idle - idle_connected if idle else None,
        "target": target, "clients": clients, "rate_per_s": rate_per_s, "duration_s": config.duration_s,
        "instruments": config.instruments, "workers": config.workers if target == "bookcast" else None,
        "subscribers": subscribers, "connect_failures": clients - subscribers,
        "closed_early": total("closed_early"), "published": published["published"],
        "publisher_late_max_ms": published["late_max_ns"] / 1e6,
        "owed": owed, "delivered": delivered, "losses": losses, "gaps": total("gaps"), "dups": total("dups"),
        "resyncs": total("resyncs"),
        "offered_per_s": rate_per_s * subscribers, "delivered_per_s": delivered / window_s, "window_s": window_s,
        "latency_ms": {"p50": _ms(latency, 50), "p99": _ms(latency, 99), "p99_9": _ms(latency, 99.9),
                       "max": latency.get_max_value() / 1000, "mean": latency.get_mean_value() / 1000},
        "spread_ms": {"p50": _ms(spread, 50), "p99": _ms(spread, 99), "max": spread.get_max_value() / 1000,
                      "messages": spread.get_total_count()},
        # NATS publish -> gateway fan-out (ts_send_ns - ts_publish_ns), mean over the window's deltas (one per
        # worker per message): the part of the latency spent before the gateway writes the first frame
        "gateway_hop_mean_ms": hop_ms,
        "gateway_hop_p99_ms": hop_p99_ms,  # the same hop's p99, from the gateway's histogram buckets (coarse)
        # the kernel floor as the cell found the machine (median CPU us per loopback send + recv, sampled
        # through the window, floor.FloorProbe): the same work costs more CPU seconds when this is higher
        "floor_us": floor.median_us(floor_samples or []),
        "floor_samples": len(floor_samples or []),
        "server_cpu_s": server_cpu_s,
        "server_cpu_s_per_million": server_cpu_s / delivered * 1e6 if delivered else None,
        "upstream_nats_cpu_s": upstream_cpu_s if target == "bookcast" else None,
        "publisher_cpu_s": publisher_cpu_s,
        "loadgen_cpu_s": loadgen_cpu_s,
        "idle_loadgen_cpu_s": idle_loadgen_cpu_s if idle else None,  # of loadgen_cpu_s: the idle connections' processes
        "harness_cpu_s": loadgen_cpu_s + publisher_cpu_s,
        "harness_cores": (loadgen_cpu_s + publisher_cpu_s) / measured_s,
        "server_cores": server_cpu_s / measured_s,
        # runnable but waiting for a CPU (all threads): the total, the runs, and the mean delay per run, which is
        # what a busy machine's scheduler adds to every wake-up of the server (procstat.runqueue_wait)
        "server_runqueue_wait_s": waits["server_wait"][0], "server_runs": waits["server_wait"][1],
        "server_wait_per_run_us": per_run_us["server_wait"],
        "upstream_wait_per_run_us": per_run_us["upstream_wait"] if target == "bookcast" else None,
        "loadgen_wait_per_run_us": per_run_us["loadgen_wait"],
        # switched out while still runnable, per second (procstat.preemptions): mostly clients woken by the
        # server's own writes on this one machine
        "server_preempted_per_s": (after.server_preemptions - before.server_preemptions) / measured_s,
        "measured_s": measured_s,
        "machine_busy_pct": busy_pct,
        "others_busy_pct": others_pct,
        "others_top": others_top or [],
        "saturated": busy_pct is not None and busy_pct > config.saturated_busy_pct,
        "load_average_1m": list(load_average) if load_average else None,
        "rss_base_bytes": rss_base, "rss_idle_bytes": rss_idle, "rss_end_bytes": rss_end,
        "rss_per_idle_connection_bytes": (rss_idle - rss_base) / idle_connected if idle_connected else None,
        "errors": errors, "harness_failures": failures,
    }


# -- the whole run ---------------------------------------------------------------------------------


def _others(top: list[dict]) -> str:
    return ", ".join(f"{o['comm']} pid {o['pid']} {o['cpu_s']:.1f} s" for o in top)


def _machine() -> dict[str, Any]:
    from feed.natsserver import nats_server_binary

    version = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "kernel": os.uname().release, "python": sys.version.split()[0],
            "nats_server": version, "nofile_limit": procstat.raise_nofile_limit(),
            "loopback_floor": floor.measure().to_dict()}


async def run_all(config: FanoutConfig) -> dict[str, Any]:
    """Every cell, bookcast then nats at each point; a cell that fails is recorded and the run goes on."""
    (config.out_dir / "logs").mkdir(parents=True, exist_ok=True)
    points = [(c, r) for c in config.clients for r in config.rates_per_s]
    idles = [0, config.idle] if config.idle else [0]
    # Repeats interleave (every point once, then again), so a slow spell of a shared machine spreads over
    # points instead of spoiling one; bookcast and nats cells of one point run back to back.
    plan = [(n, t, c, r, i) for n in range(config.repeat) for c, r in points for i in idles for t in config.targets]
    run = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": _machine(),
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
           "cells": [], "failed_cells": []}
    lf = run["machine"]["loopback_floor"]
    _say(f"kernel floor: a loopback TCP send + recv of a {lf['payload_bytes']}-byte message costs {lf['send_recv_us']:.1f} us "
         f"of CPU here (getppid {lf['syscall_us']:.2f} us): "
         + ", ".join(f"{c:,} x {r:g}/s takes {floor.LoopbackFloor(**lf).cores(c * r):.2f} cores" for c, r in points[:4]))
    for n, (repeat, target, clients, rate, idle) in enumerate(plan, 1):
        label = (f"[{n}/{len(plan)}] {target} clients={clients} rate={rate:g}/s" + (f" idle={idle}" if idle else "")
                 + (f" run={repeat + 1}" if config.repeat > 1 else "") + ":")
        _say(f"{label} starting (load average {os.getloadavg()[0]:.1f})")
        try:
            cell = await run_cell(config, target, clients, rate, label, idle=idle, repeat=repeat)
        except (BenchError, RuntimeError, TimeoutError, OSError) as exc:
            _say(f"{label} FAILED: {exc}")
            run["failed_cells"].append({"target": target, "clients": clients, "rate_per_s": rate, "idle": idle,
                                        "repeat": repeat, "error": str(exc)})
            continue
        run["cells"].append(cell)
        lat = cell["latency_ms"]
        _say(f"{label} delivered {cell['delivered']:,} ({cell['delivered_per_s']:,.0f}/s of {cell['offered_per_s']:,.0f}"
             f" offered), p50 {lat['p50']:.2f} ms p99 {lat['p99']:.2f} ms max {lat['max']:.1f} ms"
             + (f" (NATS -> gateway fan-out {cell['gateway_hop_mean_ms']:.2f} ms mean, "
                f"p99 {report.or_dash(cell['gateway_hop_p99_ms'], '.1f')} ms)"
                if cell.get("gateway_hop_mean_ms") is not None else "") + ", server CPU "
             f"{cell['server_cpu_s']:.2f} s (waited {report.or_dash(cell['server_wait_per_run_us'], '.0f')} us for a CPU per run, "
             f"preempted {cell['server_preempted_per_s']:,.0f}/s), harness {cell['harness_cores']:.2f} cores, floor "
             f"{report.or_dash(cell['floor_us'], '.1f')} us, machine busy "
             f"{cell['machine_busy_pct'] or 0:.0f}% (others {cell['others_busy_pct'] or 0:.0f}%)"
             + (" SATURATED" if cell["saturated"] else "")
             + (f" (busiest others: {_others(cell['others_top'])})"
                if (cell["others_busy_pct"] or 0) >= OTHERS_NAMED_PCT and cell["others_top"] else "")
             + f", losses {sum(cell['losses'].values())}, errors {sum(cell['errors'].values())}"
             + (f", HARNESS FAILURES: {cell['harness_failures']}" if cell["harness_failures"] else ""))
    run["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return run


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the run like Ctrl-C: cells unwind and stop their processes


def run(args: argparse.Namespace) -> int:
    """Entry point of ``bookcast bench fanout``: 0 all cells ran soundly, 1 a cell failed or broke its
    accounting, 2 bad usage or an overhead toggle that is not available."""
    config = config_from_args(args)
    bad = [v for v in (*config.clients, config.instruments, config.client_procs, config.workers, config.repeat) if v < 1]
    bad += [config.idle] if config.idle < 0 else []
    if bad or any(r <= 0 for r in config.rates_per_s) or config.duration_s <= 0:
        print("bookcast bench fanout: clients, rates, duration, instruments, procs and workers must be > 0",
              file=sys.stderr)
        return 2
    problems = unavailable_toggles(config.toggles)
    if problems:
        for problem in problems:
            print(f"bookcast bench fanout: {problem}", file=sys.stderr)
        return 2
    _say(f"fan-out benchmark: clients {config.clients} x rates {config.rates_per_s} msg/s x {config.targets}, "
         f"{config.duration_s:g} s each, {config.instruments} instruments, {config.client_procs} client processes, "
         f"{config.workers} gateway workers; output {config.out_dir}")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = asyncio.run(run_all(config))
    except KeyboardInterrupt:
        print("bookcast bench fanout: interrupted; every process it started was stopped", file=sys.stderr)
        return 1
    paths = report.write(result, config.out_dir)
    for path in paths:
        print(path)
    broken = result["failed_cells"] or any(c["harness_failures"] for c in result["cells"])
    return 1 if broken else 0
