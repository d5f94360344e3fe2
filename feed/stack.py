"""``bookcast up``: the whole stack on embedded defaults, in the foreground.

Starts, in order, an embedded nats-server (config in a temp dir), the ingest replaying a capture (by
default the bundled Coinbase level2 recording, looping), the gateway (N workers on one port) and, with
``--ebpf``, the eBPF exporter (``bookcast ebpf`` tracing this stack's processes; optional: when it cannot
load it serves ``bookcast_ebpf_up 0``, and if it exits the feed keeps running) and, with ``--prometheus``,
Debian's Prometheus and Alertmanager scraping all of them with bookcast's SLO rules (``dashboards.local``;
skipped with a warning when not installed). Prints where to connect.
SIGINT/SIGTERM stop everything in reverse order, by PID; children also get SIGTERM if
this process dies (PR_SET_PDEATHSIG), so nothing is left behind.

Each ``bookcast up`` is a run (``feed.runstate``): it gets a run id that the probe stamps on every sample, and
once ready ``up`` writes the state file (ports, URLs, run id, store) that ``bookcast why``, ``bookcast latency
report`` and ``bookcast tail`` read; on the way out the file is marked stopped. A busy ``--port`` is one line
naming it (exit 2), before anything starts.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from feed import runstate
from feed.capture import bundled_capture  # also imported from here by tests and tools
from feed.natsserver import NatsServer
from feed.procs import StopSignal, die_with_parent, free_port, stop_process, wait_until

log = logging.getLogger("bookcast.up")

def spawn(args: list[str], *, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m feed.cli ARGS`` in its own session (Ctrl-C reaches only us; we stop it by PID)."""
    return subprocess.Popen([sys.executable, "-m", "feed.cli", *args], start_new_session=True,
                            preexec_fn=die_with_parent, env=env)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as r:
            return r.status == 200 and b'"instrument"' in r.read() if url.endswith("/v1/instruments") else r.status == 200
    except OSError:
        return False


def _first_instrument(base: str) -> str | None:
    try:
        with urllib.request.urlopen(base + "/v1/instruments", timeout=2) as r:
            listing = json.loads(r.read())["instruments"]
        return max(listing, key=lambda i: i["seq"])["instrument"] if listing else None
    except (OSError, ValueError, KeyError):
        return None


def _bookcast_command() -> str:
    """How to run ``bookcast`` from any directory, in a new terminal (the venv's script is not always on
    PATH there): its absolute path, prefixed with ``BOOKCAST_HOME=...`` when that is set (a new terminal
    would not have it)."""
    script = Path(sys.executable).parent / "bookcast"
    command = str(script.absolute()) if script.exists() else f"{sys.executable} -m feed.cli"
    if os.environ.get("BOOKCAST_HOME"):
        command = f"BOOKCAST_HOME={runstate.home_dir()} {command}"
    return command


def port_in_use(host: str, port: int) -> bool:
    """True when ``host:port`` cannot be bound (another process listens there)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _run_state(run_id: str, *, host: str, port: int, nats_url: str, ingest_port: int, probe_url: str | None,
               ebpf_url: str | None, store: str, retention_s: float, instruments: list[str]) -> runstate.RunState:
    base = f"http://{host}:{port}"
    return runstate.RunState(run_id=run_id, pid=os.getpid(), started_ns=time.time_ns(), ws_url=f"ws://{host}:{port}/v1/ws",
                             http_url=base, nats_url=nats_url, store=store, retention_s=int(retention_s),
                             gateway_metrics_url=base + "/metrics",
                             ingest_metrics_url=f"http://127.0.0.1:{ingest_port}/metrics", probe_url=probe_url,
                             ebpf_url=ebpf_url, instruments=instruments)


def _instruments(base: str) -> list[str]:
    try:
        with urllib.request.urlopen(base + "/v1/instruments", timeout=2) as r:
            return sorted(i["instrument"] for i in json.loads(r.read())["instruments"])
    except (OSError, ValueError, KeyError):
        return []


def _ingest_status(ingest_url: str) -> dict | None:
    try:
        with urllib.request.urlopen(ingest_url + "/v1/status", timeout=0.5) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def no_snapshot_cause(status: dict | None) -> str | None:
    """Why the gateway lists no instrument, when the ingest knows: deltas without any snapshot."""
    if not status or not status.get("no_snapshot") or any(status.get("venues", {}).values()):
        return None
    missing = status["no_snapshot"]
    example, count = next(iter(missing.items()))
    return (f"the capture has deltas but no snapshot for {len(missing)} instruments (e.g. {example}: {count} deltas "
            f"dropped), so the ingest cannot build any book; record it from the start of the stream, or check it "
            f"with `bookcast replay --check FILE`")


def _wait_for_instruments(base: str, ingest_url: str, stopping: StopSignal, children) -> None:
    """Wait until the gateway lists instruments; fail naming the cause when the ingest says why it cannot."""
    cause: list[str] = []

    def ready() -> bool:
        if stopping or _http_ok(base + "/v1/instruments"):
            return True
        status = _ingest_status(ingest_url)
        if status and (status.get("first_pass_done") or status.get("done")):
            why = no_snapshot_cause(status)
            if why:
                cause.append(why)
                return True
        return False

    try:
        # generous: on a loaded 2-core machine the workers' imports alone took ~20 s (a dead gateway fails at once)
        wait_until(ready, 90, what="gateway listing instruments", proc=children[-1][1])
    except TimeoutError:
        why = no_snapshot_cause(_ingest_status(ingest_url))
        if why:
            raise RuntimeError(f"no instruments: {why}") from None
        raise
    if cause:
        raise RuntimeError(f"no instruments: {cause[0]}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="gateway listen address (default %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="gateway port, 0 = free port (default %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="gateway worker processes (default: one per core, %(default)s)")
    p.add_argument("--capture", type=Path, action="append",
                   help="capture file(s) to replay as the upstream (default: the bundled Coinbase recording)")
    p.add_argument("--speed", type=float, default=1.0, help="replay speed factor (default %(default)s)")
    p.add_argument("--no-loop", action="store_true", help="replay once instead of looping forever")
    p.add_argument("--nats-port", type=int, default=0, help="embedded nats-server port (default: a free one)")
    p.add_argument("--ingest-http-port", type=int, default=0, help="ingest /metrics port (default: a free one)")
    p.add_argument("--no-probe", action="store_true",
                   help="do not start the latency probe (per-hop latency into /metrics and the chDB store)")
    p.add_argument("--ebpf", action="store_true",
                   help="also start the eBPF exporter on this stack's processes (needs root and bcc for data)")
    p.add_argument("--ebpf-port", type=int, default=0, help="eBPF exporter /metrics port (default: a free one)")
    p.add_argument("--prometheus", action="store_true",
                   help="also start Debian's Prometheus and Alertmanager (when installed) on generated configs, "
                        "scraping every process of the stack, with bookcast's SLO rules (dashboards/)")
    p.add_argument("--alert-webhook", metavar="URL",
                   help="with --prometheus: Alertmanager sends every alert to this webhook (default: none)")
    p.add_argument("--retention", default="7d",
                   help="how long the probe's samples stay in the store (chDB TTL): 1h, 7d (default %(default)s)")
    # issue 16, provider pool (engineer pool)
    p.add_argument("--config", type=Path,
                   help="provider pool config (TOML): the ingest reads live providers instead of a capture")
    p.add_argument("--simulate", type=int, default=0, metavar="N",
                   help="run N venue simulators per capture (bookcast simulate) as the upstream providers, "
                        "read through the provider pool")
    # issue 9, regions (engineer regions): up_regions below
    p.add_argument("--regions", type=int, default=0, metavar="N",
                   help="N regions: a NATS cluster per region joined into one supercluster (plus a lease cluster), "
                        "an ingest per region (one publishes, by lease) and a gateway per region; also "
                        "[regions] count = N in the --config file (default: one region, no supercluster)")
    p.add_argument("--nats-per-region", type=int, default=0, metavar="M",
                   help="with --regions: nats-servers per region cluster (default 1 on a small machine; the "
                        "production shape is 3)")
    p.add_argument("--lease-ttl-s", type=float, default=0.0,
                   help="with --regions: publishing lease TTL in s (default 1.5)")


def _upstream_line(args: argparse.Namespace, captures: list[Path]) -> str:
    if args.config is not None and not args.simulate:
        return f"providers from {args.config} (status: ingest /v1/status)"
    text = f"{', '.join(str(c) for c in captures)} at {args.speed}x{'' if args.no_loop else ', looping'}"
    return f"{args.simulate} simulated providers per venue replaying {text}" if args.simulate else text


def simulator_urls(venue: str, port: int) -> tuple[str, str]:
    """WebSocket URL and REST base URL of a ``bookcast simulate`` process on ``port``."""
    from feed.simulator.server import WS_PATHS

    return f"ws://127.0.0.1:{port}{WS_PATHS[venue]}", f"http://127.0.0.1:{port}"


def _sim_status(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/sim/status", timeout=1) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def start_simulators(args: argparse.Namespace, captures: list[Path], children: list, workdir: str) -> Path:
    """Start ``args.simulate`` simulators per capture (one venue each, all serving the same events from one
    shared start time) and write the provider config that reads them; returns its path."""
    from feed.capture import read_capture
    from feed.providers.config import DEFAULT_STALE_AFTER_S, PoolConfig, VenueConfig, toml_text
    from feed.upstream import ProviderSpec

    start_at_ns = time.time_ns() + 3_000_000_000  # every simulator loads its capture first
    started: list[tuple[str, Path, list[tuple[int, subprocess.Popen]]]] = []
    for capture in captures:
        venue = next(iter(read_capture(capture))).venue
        sims = []
        for i in range(args.simulate):
            sim_port = free_port()
            sim_args = ["simulate", "--venue", venue, "--capture", str(capture), "--port", str(sim_port),
                        "--speed", str(args.speed), "--start-at-ns", str(start_at_ns), "--seed", str(i + 1)]
            if args.no_loop:
                sim_args.append("--once")
            proc = spawn(sim_args)
            children.append((f"simulator {venue} {i + 1}", proc))
            sims.append((sim_port, proc))
        started.append((venue, capture, sims))
    venues = []
    for venue, capture, sims in started:
        specs = []
        symbols: list[str] = []
        for i, (sim_port, proc) in enumerate(sims):
            wait_until(lambda: _sim_status(sim_port) is not None, 60, what=f"simulator {venue} {i + 1} (port "
                       f"{sim_port})", proc=proc)
            symbols = symbols or list(_sim_status(sim_port)["instruments"])
            ws_url, rest_url = simulator_urls(venue, sim_port)
            specs.append(ProviderSpec(f"sim-{venue}-{i + 1}", venue, ws_url, rest_url))
        venues.append(VenueConfig(venue, tuple(symbols), tuple(specs), DEFAULT_STALE_AFTER_S.get(venue, 30.0)))
        log.info("%d simulated %s providers replaying %s: %s", len(specs), venue, capture,
                 ", ".join(p.ws_url for p in specs))
    path = Path(workdir) / "providers.toml"
    path.write_text(toml_text(PoolConfig(tuple(venues))))
    log.info("provider config for the simulators: %s", path)
    return path


def up(args: argparse.Namespace) -> int:
    from feed.runstate import parse_duration_s

    if getattr(args, "regions", 0) or _config_regions(args.config).get("count"):
        return up_regions(args)

    if args.port and port_in_use(args.host, args.port):
        print(f"bookcast up: port {args.port} on {args.host} is already in use; "
              f"use --port 0 for a free one (or --port N)", file=sys.stderr)
        return 2
    try:
        retention_s = parse_duration_s(args.retention)
    except ValueError as exc:
        print(f"bookcast up: --retention: {exc}", file=sys.stderr)
        return 2
    port = args.port or free_port(args.host)
    captures = args.capture or [bundled_capture()]
    if args.config is not None and not args.config.is_file():
        print(f"bookcast up: provider config not found: {args.config}", file=sys.stderr)
        return 2
    if args.config is not None and args.simulate:
        print("bookcast up: give --config or --simulate, not both", file=sys.stderr)
        return 2
    if args.simulate < 0:
        print("bookcast up: --simulate needs a number of providers per venue (1 or more)", file=sys.stderr)
        return 2
    if args.config is not None:
        from feed.providers.config import ConfigError, load_config

        try:
            load_config(args.config)
        except ConfigError as exc:
            print(f"bookcast up: {exc}", file=sys.stderr)
            return 2
    for c in captures:
        if not c.is_file():
            print(f"bookcast up: capture file not found: {c}", file=sys.stderr)
            return 2
    run_id = runstate.new_run_id()
    home = runstate.home_dir()
    store = str(runstate.default_store(home))
    probe_url = ebpf_url = None
    ebpf_port = (args.ebpf_port or free_port()) if args.ebpf else 0
    stopping = StopSignal()
    children: list[tuple[str, subprocess.Popen]] = []
    optional: list[tuple[str, subprocess.Popen]] = []   # stopped with the stack; their exit does not stop it
    nats_server = NatsServer(port=args.nats_port, name="bookcast-up")
    monitoring = None  # --prometheus: dashboards.local.LocalMonitoring
    try:
        nats_server.start()
        log.info("nats-server pid=%d at %s", nats_server.pid, nats_server.url)
        ingest_port = args.ingest_http_port or free_port()
        pool_config = args.config
        if args.simulate:
            pool_config = start_simulators(args, captures, children, nats_server.workdir)
        if pool_config is not None:
            children.append(("ingest", spawn(["ingest", "--config", str(pool_config), "--nats", nats_server.url,
                                              "--http-port", str(ingest_port)])))
        else:
            ingest_args = ["replay", "--nats", nats_server.url, "--speed", str(args.speed),
                           "--http-port", str(ingest_port)]
            if not args.no_loop:
                ingest_args.append("--loop")
            children.append(("ingest", spawn(ingest_args + [str(c) for c in captures])))
        children.append(("gateway", spawn(["gateway", "--nats", nats_server.url, "--host", args.host,
                                           "--port", str(port), "--workers", str(args.workers)])))
        base = f"http://{args.host}:{port}"
        _wait_for_instruments(base, f"http://127.0.0.1:{ingest_port}", stopping, children)
        probe_line = ""
        if not args.no_probe:
            probe_port = free_port()
            probe_url = f"http://127.0.0.1:{probe_port}"
            probe_args = ["probe", "--region", f"local=ws://{args.host}:{port}/v1/ws", "--http-port", str(probe_port),
                          "--run-id", run_id, "--clickhouse", store, "--retention", f"{retention_s:g}s"]
            if args.ebpf:
                probe_args += ["--ebpf-url", f"http://127.0.0.1:{ebpf_port}/metrics"]
            probe = spawn(probe_args)
            optional.append(("probe", probe))
            try:
                wait_until(lambda: stopping or probe.poll() is not None or _http_ok(probe_url + "/healthz"), 30,
                           what="latency probe /healthz")
            except TimeoutError as exc:
                log.warning("%s; the feed runs without it", exc)
            probe_line = (f"  latency    {probe_url}/metrics (probe, run {run_id})   "
                          f"{_bookcast_command()} why\n")
        ebpf_line = ""
        if args.ebpf:
            ebpf_url = f"http://127.0.0.1:{ebpf_port}/metrics"
            ebpf = spawn(["ebpf", "--role-scan", "--under", str(os.getpid()), "--port", str(ebpf_port)])
            optional.append(("ebpf", ebpf))
            try:
                wait_until(lambda: stopping or ebpf.poll() is not None or _http_ok(ebpf_url), 60,
                           what="eBPF exporter /metrics")
            except TimeoutError as exc:
                log.warning("%s; the feed runs without it", exc)
            ebpf_line = f"  ebpf       {ebpf_url} (bookcast_ebpf_up says whether the probes run)\n"
        prometheus_line = ""
        if args.prometheus:
            monitoring, prometheus_line = _start_prometheus(args, port, ingest_port, probe_url if not args.no_probe
                                                            else None, ebpf_url if args.ebpf else None)
        if stopping:
            return 0
        example = _first_instrument(base) or "coinbase:SKL-USD"
        bookcast = _bookcast_command()
        state_file = runstate.write_state(_run_state(
            run_id, host=args.host, port=port, nats_url=nats_server.url, ingest_port=ingest_port,
            probe_url=None if args.no_probe else probe_url, ebpf_url=ebpf_url, store=store, retention_s=retention_s,
            instruments=_instruments(base)), home)
        print(
            f"\nbookcast is up (Ctrl-C stops everything)\n"
            f"  viewer     {base}/?instrument={example}   (the book viewer in a browser)\n"
            f"  WebSocket  ws://{args.host}:{port}/v1/ws\n"
            f"  REST       {base}/v1/instruments   {base}/v1/book/{example}\n"
            f"  metrics    {base}/metrics (gateway, {args.workers} workers)   "
            f"http://127.0.0.1:{ingest_port}/metrics (ingest)\n"
            f"{probe_line}"
            f"{ebpf_line}"
            f"{prometheus_line}"
            f"  NATS       {nats_server.url}\n"
            f"  upstream   {_upstream_line(args, captures)}\n"
            f"  state      {state_file} (run {run_id}; read by why, latency report, tail)\n"
            f"  try        {bookcast} tail {example}\n"
            f"             {bookcast} why\n",
            flush=True,
        )
        while not stopping:
            for name, proc in children:
                if proc.poll() is not None:
                    log.error("%s pid=%d exited with code %s; stopping the stack", name, proc.pid, proc.returncode)
                    return 1
            for name, proc in list(optional):
                if proc.poll() is not None:
                    log.warning("%s pid=%d exited with code %s; the feed keeps running", name, proc.pid, proc.returncode)
                    optional.remove((name, proc))
            time.sleep(0.2)
        return 0
    except (TimeoutError, RuntimeError) as exc:
        log.error("%s", exc)
        return 1
    finally:
        if monitoring is not None:
            monitoring.stop()
            log.info("stopped prometheus and alertmanager")
        runstate.mark_stopped(run_id, home)
        for name, proc in reversed(children + optional):
            stop_process(proc, grace_s=10.0)
            log.info("stopped %s pid=%d (exit %s)", name, proc.pid, proc.returncode)
        nats_server.cleanup()
        log.info("stopped nats-server; bye")


def _start_prometheus(args: argparse.Namespace, gateway_port: int, ingest_port: int, probe_url: str | None,
                      ebpf_metrics_url: str | None):
    """``--prometheus``: Prometheus + Alertmanager on this stack's processes (``dashboards.local``), in a temp
    dir removed at exit. Returns (monitoring or None, lines to print); a missing or failing Prometheus is
    logged and the feed runs without it."""
    import tempfile
    import weakref

    from dashboards.local import LocalMonitoring, ScrapeTarget, installed

    why = installed()
    if why:
        log.warning("--prometheus: %s; the feed runs without it", why)
        return None, f"  prometheus {why}\n"
    targets = [ScrapeTarget("bookcast-ingest", f"127.0.0.1:{ingest_port}"),
               ScrapeTarget("bookcast-gateway", f"{args.host}:{gateway_port}")]
    if probe_url:
        targets.append(ScrapeTarget("bookcast-probe", probe_url.removeprefix("http://")))
    if ebpf_metrics_url:
        targets.append(ScrapeTarget("bookcast-ebpf", ebpf_metrics_url.removeprefix("http://").removesuffix("/metrics")))
    workdir = Path(tempfile.mkdtemp(prefix="bookcast-prometheus-"))
    monitoring = LocalMonitoring(workdir, targets, webhook_url=args.alert_webhook)
    weakref.finalize(monitoring, shutil.rmtree, workdir, True)
    try:
        monitoring.start()
    except (RuntimeError, TimeoutError) as exc:
        log.warning("--prometheus: %s; the feed runs without it (logs in %s)", exc, workdir)
        monitoring.stop()
        return None, f"  prometheus failed to start: {exc}\n"
    return monitoring, (f"  prometheus {monitoring.prometheus_url}   (alerts {monitoring.prometheus_url}/alerts, "
                        f"rules and configs in {workdir})\n"
                        f"  alerts     {monitoring.alertmanager_url} (Alertmanager"
                        f"{', to ' + args.alert_webhook if args.alert_webhook else ', no receiver: --alert-webhook URL'})\n")


def _config_regions(config: Path | None) -> dict:
    """The ``[regions]`` table of the provider config (``count``, ``nats_per_region``, ``lease_ttl_s``), or {}."""
    if config is None or not config.is_file():
        return {}
    import tomllib

    try:
        table = tomllib.loads(config.read_text()).get("regions") or {}
    except (tomllib.TOMLDecodeError, OSError):
        return {}  # up() reports the config's own error
    return table if isinstance(table, dict) else {}


def up_regions(args: argparse.Namespace) -> int:
    """``bookcast up --regions N``: ``feed.regions.RegionsStack`` in the foreground, each region's endpoints
    printed like the single region's; Ctrl-C (SIGINT/SIGTERM) stops everything by PID. The upstream is the
    captures (replayed in step by every region's ingest), ``--simulate N`` simulators shared by all regions, or
    the ``--config`` providers. Exit codes: 0 stopped by a signal, 1 a process failed, 2 a usage error."""
    import tempfile

    from feed.regions import RegionsStack

    table = _config_regions(args.config)
    count = args.regions or int(table.get("count", 0))
    per_region = args.nats_per_region or int(table.get("nats_per_region", 1))
    ttl_s = args.lease_ttl_s or float(table.get("lease_ttl_s", 1.5))
    captures = args.capture or [bundled_capture()]
    problems = [text for bad, text in [
        (count < 2, f"--regions needs 2 or more regions, got {count}"),
        (per_region < 1, f"--nats-per-region must be 1 or more, got {per_region}"),
        (ttl_s <= 0, f"--lease-ttl-s must be > 0, got {ttl_s}"),
        (args.config is not None and not args.config.is_file(), f"provider config not found: {args.config}"),
        (args.config is not None and args.simulate > 0, "give --config or --simulate, not both"),
        (args.simulate < 0, "--simulate needs a number of providers per venue (1 or more)"),
        (args.ebpf or args.prometheus, "--ebpf and --prometheus run with one region only (for now)"),
    ] + [(not c.is_file(), f"capture file not found: {c}") for c in captures] if bad]
    ports = [args.port + i for i in range(count)] if args.port else []
    problems += [f"port {p} on {args.host} is already in use; use --port 0 for free ones" for p in ports
                 if port_in_use(args.host, p)]
    provider_config = args.config if args.config is not None and "venues" in _config_text_keys(args.config) else None
    if provider_config is not None and not problems:
        from feed.providers.config import ConfigError, load_config

        try:
            load_config(provider_config)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        print(f"bookcast up: {problems[0]}", file=sys.stderr)
        return 2
    stopping = StopSignal()
    stack = None
    tmp = tempfile.TemporaryDirectory(prefix="bookcast-regions-")
    children: list = []
    try:
        if args.simulate:
            provider_config = start_simulators(args, captures, children, tmp.name)
        stack = RegionsStack(Path(tmp.name), regions=count, nats_per_region=per_region, captures=captures,
                             speed=args.speed, loop=not args.no_loop, workers=args.workers, lease_ttl_s=ttl_s,
                             host=args.host, gateway_ports=ports, provider_config=provider_config)
        log.info("starting %d regions (%d nats-server each, lease cluster of %d), logs in %s", count, per_region,
                 stack.lease_servers, tmp.name)
        stack.start()
        lines = [f"\nbookcast is up: {count} regions (Ctrl-C stops everything)"]
        for p in stack.procs:
            role = p.ha().get("role", "?")
            example = _first_instrument(p.base) or "coinbase:SKL-USD"
            lines += [f"  region {p.name} (ingest {role})",
                      f"    viewer     {p.base}/?instrument={example}",
                      f"    WebSocket  {p.ws_url}",
                      f"    REST       {p.base}/v1/instruments   {p.base}/v1/book/{example}",
                      f"    metrics    {p.base}/metrics (gateway)   {p.ingest_url}/metrics (ingest)   "
                      f"{p.ingest_url}/v1/status (lease)",
                      f"    NATS       {p.nats.url}"]
        lease = stack.supercluster.lease
        lines += [f"  lease      cluster {stack.supercluster.lease_region}"
                  + (f" at {lease.url}" if lease is not None else "") + f", TTL {ttl_s:g} s",
                  f"  upstream   {_upstream_line(args, captures)}",
                  f"  SDK        BookClient(regions=[{', '.join(repr([p.ws_url]) for p in stack.procs)}], "
                  f"instruments=[...])",
                  f"  logs       {tmp.name}\n"]
        print("\n".join(lines), flush=True)
        while not stopping:
            for p in stack.procs:
                for name, proc in ((f"ingest {p.name}", p.ingest), (f"gateway {p.name}", p.gateway)):
                    if proc is not None and proc.poll() is not None:
                        log.error("%s pid=%d exited with code %s; stopping the stack", name, proc.pid,
                                  proc.returncode)
                        return 1
            time.sleep(0.2)
        return 0
    except (TimeoutError, RuntimeError) as exc:
        log.error("%s (logs in %s)", exc, tmp.name)
        return 1
    finally:
        if stack is not None:
            stack.stop()
            stack.supercluster.cleanup()
        for name, proc in reversed(children):
            stop_process(proc, grace_s=10.0)
            log.info("stopped %s pid=%d (exit %s)", name, proc.pid, proc.returncode)
        tmp.cleanup()
        log.info("stopped %d regions; bye", count)


def _config_text_keys(config: Path) -> set[str]:
    import tomllib

    try:
        return set(tomllib.loads(config.read_text()))
    except (tomllib.TOMLDecodeError, OSError):
        return set()
