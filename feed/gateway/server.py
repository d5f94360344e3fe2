"""Run the gateway: one or several worker processes sharing one port (SO_REUSEPORT).

Options come from ``feed.gateway.config`` (declared once, as dataclass fields). With ``workers > 1`` this
process is a supervisor: it points prometheus-client's multiprocess mode at a temp dir (so ``/metrics``
on any worker shows the sum of all), starts the workers as child processes with ``worker_argv`` of its
own config, forwards SIGTERM/SIGINT to them and stops them by PID. A worker that dies is restarted after
a backoff (``RestartBackoff``: doubling from 0.5 s to 30 s while workers keep dying young), and the other
workers keep serving meanwhile; the kernel only spreads new connections over the live ones.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from aiohttp import web

from feed.gateway import config as cfg
from feed.gateway import hardening, tokenshare
from feed.gateway.config import GatewayConfig, ServerConfig
from feed.procs import StopSignal, free_port, stop_process

log = logging.getLogger("bookcast.gateway")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bookcast gateway`` options: one per ``cli`` field of ``feed.gateway.config``, then the hardening
    options of ``feed.gateway.hardening`` (auth keys, NATS login, ops listener, TLS, hygiene)."""
    cfg.add_arguments(p)
    hardening.add_arguments(p)


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """One worker's ``GatewayConfig`` from the parsed options (with its NATS login, when given)."""
    config = cfg.config_from_args(args)
    logins = ("nats_user", "nats_password_file", "nats_nkey_seed_file")
    if any(getattr(args, name, None) is not None for name in logins):
        config.nats_credentials = hardening.natsauth.credentials_from_args(args)
    return config


def runner_timer_kwargs(config: GatewayConfig) -> dict[str, float]:
    """``web.AppRunner`` arguments for the WebSocket ping timers: each connection pings at its own phase.

    aiohttp rounds every timer longer than ``timeout_ceil_threshold`` (5 s by default) up to a whole
    second of the loop's clock, so with the 10 s ping interval every connection that opened (or last
    heard its client) within one second pinged in one loop iteration: 1,000 pings a second as one burst
    with 10,000 connections, ~60 ms of a worker's loop each time (pings alone, no heartbeats: a healthy
    client's p99 82 ms against 17 ms). Timers longer than the ping interval stay rounded.

    Since issue 13's round 6 the pings are the timer pass's (``feed.gateway.liveness``), not aiohttp's; the
    threshold is kept as it was, so aiohttp's other timers up to the ping interval (keep-alive, the guard's
    handshake and idle timers) still fire at their own phase rather than in whole-second bursts."""
    return {"timeout_ceil_threshold": max(5.0, config.ws_ping_interval_s)}


GC_GEN1_THRESHOLD = 2  # gen0 collections between gen1 collections (CPython's default: 10); see GatewayConfig.gc_gen2_threshold


def tune_gc(config: GatewayConfig) -> None:
    """Once the worker is serving: freeze what start-up made (imports, the app: never garbage, so no full
    collection visits it again), collect gen1 more often, each time smaller (``GC_GEN1_THRESHOLD``), and make
    full collections rare (``GatewayConfig.gc_gen2_threshold``). Measured with ``python -m
    loadtest.bench.idlemem --connections 5000 --no-trace --hold-s 10`` (docs/perf/round4-idle.md)."""
    gen0, _, _ = gc.get_threshold()
    gc.set_threshold(gen0, GC_GEN1_THRESHOLD, config.gc_gen2_threshold)
    gc.collect()
    gc.freeze()


async def run_worker(args: argparse.Namespace, *, reuse_port: bool, ready_line: bool = True) -> int:
    """Serve until SIGTERM/SIGINT, then drain (``shutdown`` to clients, close 1001) and exit 0."""
    from feed.gateway.app import create_app

    server = cfg.server_config_from_args(args)
    server.gateway = config_from_args(args)
    secure = hardening.from_args(args)
    app = create_app(server.gateway, authenticator=secure.authenticator(None))
    secure.attach(app)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0, **secure.runner_kwargs(),
                           **runner_timer_kwargs(server.gateway))
    await runner.setup()
    secure.install(runner)
    site = web.TCPSite(runner, server.host, server.port, reuse_port=reuse_port, backlog=4096,
                       ssl_context=secure.ssl_context)
    await site.start()
    ops = await secure.start_ops(app, reuse_port=reuse_port)
    tune_gc(server.gateway)
    if ready_line:
        scheme = "https" if secure.ssl_context is not None else "http"
        log.info("gateway worker pid=%d serving %s://%s:%d (WebSocket /v1/ws)", os.getpid(), scheme, server.host,
                 server.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("gateway worker pid=%d draining", os.getpid())
    await runner.cleanup()
    if ops is not None:
        await ops.cleanup()
    return 0


def serve(args: argparse.Namespace) -> int:
    """Entry point of ``bookcast gateway``."""
    if args.port == 0:
        args.port = free_port(args.host)
    if args.ops_port == 0:
        args.ops_port = free_port(args.ops_host)
    try:
        hardening.from_args(args)  # refuse unusable keys, certificates or passwords before any worker starts
    except (ValueError, OSError) as exc:
        print(f"bookcast gateway: {exc}", file=sys.stderr)
        return 2
    if args.workers <= 1:
        return _run(run_worker(args, reuse_port=False))
    return _supervise(cfg.server_config_from_args(args), hardening.worker_argv(args),
                      share_token_counts=hardening.token_caps_on(args))


def _run(coro) -> int:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


@dataclass
class RestartBackoff:
    """Delay before restarting a dead worker (pure: times passed in).

    The first restart waits ``initial_s``; each further one doubles, up to ``max_s``, while workers keep
    dying within ``healthy_after_s`` of their start; a worker that lived longer resets the delay.
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    healthy_after_s: float = 10.0
    _delay_s: float = 0.0

    def next_delay_s(self, uptime_s: float) -> float:
        """The delay before restarting a worker that ran for ``uptime_s``."""
        if uptime_s >= self.healthy_after_s or not self._delay_s:
            self._delay_s = self.initial_s
        else:
            self._delay_s = min(self._delay_s * 2, self.max_s)
        return self._delay_s


@dataclass
class _Slot:
    name: str
    proc: subprocess.Popen | None = None
    started_s: float = 0.0
    restart_at_s: float | None = None


def _supervise(server: ServerConfig, extra_argv: list[str] = (), *, share_token_counts: bool = False) -> int:
    """Run ``server.workers`` workers until SIGTERM/SIGINT. With ``share_token_counts`` (a per-token cap
    is set) the per-token counts live in one table all workers share (``feed.gateway.tokenshare``); a dead
    worker's counts are released before its replacement starts."""
    with tempfile.TemporaryDirectory(prefix="bookcast-prom-") as prom_dir, \
            tempfile.TemporaryDirectory(prefix="bookcast-tokens-") as token_dir:
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=prom_dir)
        base = [sys.executable, "-m", "feed.cli", "gateway", "--worker"]
        slots = [_Slot(f"{server.gateway.name}-{i}") for i in range(server.workers)]
        backoff = RestartBackoff(*server.restart_backoff_s)
        token_table = tokenshare.create(os.path.join(token_dir, "usage"), server.workers) \
            if share_token_counts else None

        def start(slot: _Slot) -> None:
            argv = base + cfg.worker_argv(server, name=slot.name) + list(extra_argv)
            if token_table is not None:
                argv += ["--token-usage-file", str(token_table), "--token-usage-worker", str(slots.index(slot))]
            slot.proc = subprocess.Popen(argv, env=env)
            slot.started_s, slot.restart_at_s = time.monotonic(), None

        for slot in slots:
            start(slot)
        log.info("gateway supervisor pid=%d started %d workers on port %d: %s", os.getpid(), server.workers,
                 server.port, " ".join(str(s.proc.pid) for s in slots if s.proc))
        stopping = StopSignal()
        try:
            while not stopping:
                now_s = time.monotonic()
                for slot in slots:
                    proc = slot.proc
                    if proc is not None and proc.poll() is not None:
                        delay_s = backoff.next_delay_s(now_s - slot.started_s)
                        log.error("gateway worker %s pid=%d exited with %s; restarting in %.1f s (the other "
                                  "workers keep serving)", slot.name, proc.pid, proc.returncode, delay_s)
                        _mark_dead(proc.pid, prom_dir)
                        if token_table is not None:
                            held = tokenshare.release_worker(token_table, slots.index(slot))
                            log.info("released the per-token counts of worker %s (%d tokens)", slot.name, held)
                        slot.proc, slot.restart_at_s = None, now_s + delay_s
                    elif proc is None and slot.restart_at_s is not None and now_s >= slot.restart_at_s and not stopping:
                        start(slot)
                        log.info("gateway worker %s restarted pid=%d", slot.name, slot.proc.pid)
                time.sleep(0.1)
        finally:
            for slot in slots:
                if slot.proc is not None:
                    stop_process(slot.proc, grace_s=8.0)
        return 0


def _mark_dead(pid: int, prom_dir: str) -> None:
    """Drop a dead worker's live gauges from the multiprocess metrics (its counters stay counted)."""
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, prom_dir)
    except Exception:  # noqa: BLE001 - metrics housekeeping never stops the supervisor
        log.debug("could not mark worker pid=%d dead in %s", pid, prom_dir, exc_info=True)


def worker_main(args: argparse.Namespace) -> int:
    return _run(run_worker(args, reuse_port=True))
