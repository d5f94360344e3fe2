"""Run the gateway: one or several worker processes sharing one port (SO_REUSEPORT).

With ``workers > 1`` this process is a supervisor: it points prometheus-client's multiprocess mode at a
temp dir (so ``/metrics`` on any worker shows the sum of all), starts the workers as child processes,
forwards SIGTERM/SIGINT to them and stops them by PID. Each worker is an independent aiohttp server with
its own NATS connection and hubs; the kernel spreads connections across them.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time

from aiohttp import web

from feed.otlp import endpoint_from
from feed.gateway import hardening
from feed.gateway.protocol import GatewayLimits
from feed.procs import StopSignal, free_port, stop_process

log = logging.getLogger("bookcast.gateway")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS URL (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="listen port, 0 = pick a free one (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="worker processes sharing the port (default %(default)s)")
    p.add_argument("--max-queue-bytes", type=int, default=GatewayLimits().max_queue_bytes,
                   help="outbound queue bound per connection (default %(default)s)")
    p.add_argument("--heartbeat-interval-s", type=float, default=GatewayLimits().heartbeat_interval_s,
                   help=argparse.SUPPRESS)
    p.add_argument("--ws-writer-limit-bytes", type=int, default=256 * 1024,
                   help="WebSocket writer buffer per connection before waiting for the socket (default %(default)s)")
    p.add_argument("--socket-sndbuf-bytes", type=int, default=0,
                   help="kernel send buffer per connection, 0 = kernel autotuning (default %(default)s)")
    p.add_argument("--ws-ping-interval-s", type=float, default=10.0,
                   help="WebSocket ping interval; a client not answering within half of it is closed (default %(default)s)")
    p.add_argument("--nats-reconnect-wait-s", type=float, default=0.25,
                   help="delay between NATS reconnect attempts (default %(default)s)")
    p.add_argument("--name", default="gateway", help="name shown to NATS and in logs")
    p.add_argument("--otlp-endpoint", default=endpoint_from(None),
                   help="OTLP/gRPC endpoint for spans of traced deltas, e.g. http://127.0.0.1:4317 "
                        "(default $OTEL_EXPORTER_OTLP_ENDPOINT; unset = off)")
    p.add_argument("--instrumentation", choices=["on", "off"], default="on",
                   help="per-message metrics and traces; 'off' only to measure their cost (default %(default)s)")
    p.add_argument("--test-fanout-delay-ms", type=float, default=0.0,
                   help="test hook: hold every delta this long before fan-out, a slow gateway (default off)")
    hardening.add_arguments(p)


def config_from_args(args: argparse.Namespace):
    from feed.gateway.app import GatewayConfig

    limits = GatewayLimits(max_queue_bytes=args.max_queue_bytes, heartbeat_interval_s=args.heartbeat_interval_s)
    return GatewayConfig(nats_url=args.nats, limits=limits, name=args.name,
                         nats_reconnect_wait_s=args.nats_reconnect_wait_s, ws_ping_interval_s=args.ws_ping_interval_s,
                         ws_writer_limit_bytes=args.ws_writer_limit_bytes,
                         socket_sndbuf_bytes=args.socket_sndbuf_bytes or None,
                         otlp_endpoint=args.otlp_endpoint, instrumented=args.instrumentation == "on",
                         fanout_delay_s=args.test_fanout_delay_ms / 1000,
                         nats_credentials=hardening.natsauth.credentials_from_args(args))


async def run_worker(args: argparse.Namespace, *, reuse_port: bool, ready_line: bool = True) -> int:
    """Serve until SIGTERM/SIGINT, then drain (``shutdown`` to clients, close 1001) and exit 0."""
    from feed.gateway.app import create_app

    secure = hardening.from_args(args)
    app = create_app(config_from_args(args), authenticator=secure.authenticator(None))
    secure.attach(app)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0, **secure.runner_kwargs())
    await runner.setup()
    secure.install(runner)
    site = web.TCPSite(runner, args.host, args.port, reuse_port=reuse_port, backlog=4096,
                       ssl_context=secure.ssl_context)
    await site.start()
    ops = await secure.start_ops(app, reuse_port=reuse_port)
    if ready_line:
        scheme = "https" if secure.ssl_context is not None else "http"
        log.info("gateway worker pid=%d serving %s://%s:%d (WebSocket /v1/ws)", os.getpid(), scheme, args.host, args.port)
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
    return _supervise(args)


def _run(coro) -> int:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def _supervise(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bookcast-prom-") as prom_dir:
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=prom_dir)
        cmd = [sys.executable, "-m", "feed.cli", "gateway", "--worker", "--nats", args.nats, "--host", args.host,
               "--port", str(args.port), "--max-queue-bytes", str(args.max_queue_bytes),
               "--heartbeat-interval-s", str(args.heartbeat_interval_s),
               "--nats-reconnect-wait-s", str(args.nats_reconnect_wait_s),
               "--ws-ping-interval-s", str(args.ws_ping_interval_s),
               "--ws-writer-limit-bytes", str(args.ws_writer_limit_bytes),
               "--socket-sndbuf-bytes", str(args.socket_sndbuf_bytes),
               "--instrumentation", args.instrumentation, "--test-fanout-delay-ms", str(args.test_fanout_delay_ms)]
        if args.otlp_endpoint:
            cmd += ["--otlp-endpoint", args.otlp_endpoint]
        cmd += hardening.worker_argv(args)
        procs = [subprocess.Popen(cmd + ["--name", f"{args.name}-{i}"], env=env) for i in range(args.workers)]
        log.info("gateway supervisor pid=%d started %d workers on port %d: %s", os.getpid(), args.workers,
                 args.port, " ".join(str(p.pid) for p in procs))
        stopping = StopSignal()
        code = 0
        try:
            while not stopping and not code:
                for p in procs:
                    if p.poll() is not None:
                        log.error("gateway worker pid=%d exited with %s; stopping", p.pid, p.returncode)
                        code = 1
                time.sleep(0.2)
        finally:
            for p in procs:
                stop_process(p, grace_s=8.0)
        return code


def worker_main(args: argparse.Namespace) -> int:
    return _run(run_worker(args, reuse_port=True))

