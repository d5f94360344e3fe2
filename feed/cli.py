"""``bookcast`` command line. Run ``bookcast <command> --help`` for each command's options and examples.

Exit codes: 0 success, 1 a runtime failure (a service died, a check failed), 2 bad usage or missing input.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from pathlib import Path

EXAMPLES = {
    "up": """examples:
  bookcast up                              # nats-server + ingest (bundled Coinbase recording, looping) + gateway on :8080
  bookcast up --port 0 --workers 1         # a free port, one gateway worker
  bookcast up --capture ../shared/data/polymarket/btc-1h-20251211.jsonl --speed 10
  bookcast up --regions 2 --port 0 --workers 1   # 2 regions: NATS supercluster, ingest per region (one leads), gateways""",
    "tail": """examples:
  bookcast tail coinbase:SKL-USD                         # live top of book from ws://127.0.0.1:8080/v1/ws
  bookcast tail coinbase:BAND-GBP --depth 10 --url ws://127.0.0.1:8080/v1/ws --url ws://127.0.0.1:8081/v1/ws
  bookcast tail coinbase:SKL-USD --once                  # print one frame and exit""",
    "replay": """examples:
  bookcast replay --nats nats://127.0.0.1:4222 capture.jsonl        # run an ingest replaying a capture in real time
  bookcast replay --speed 10 --loop --nats nats://127.0.0.1:4222 a.jsonl b.jsonl.gz
  bookcast replay --check ../shared/data/coinbase/coinbase-level2-20210417.jsonl   # no NATS: parse, build books, summarise""",
    "record": """examples:
  bookcast record --venue coinbase --symbols BTC-USD,ETH-USD --out cb.jsonl --duration-s 60
  bookcast record --venue polymarket --symbols <token id>,<token id> --out pm.jsonl.gz --max-messages 10000""",
    "gateway": """examples:
  bookcast gateway --nats nats://127.0.0.1:4222 --port 8080 --workers 2""",
}


# Commands that live in other packages: (name, module, one-line help). Each module provides
# ``EXAMPLES: str``, ``add_arguments(parser)`` and ``main(args) -> int`` (an exit code). Modules are
# imported only when the parser is built, so a command's dependencies cost nothing to the others.
EXTENSIONS: list[tuple[str, str, str]] = [
    ("ebpf", "ebpf.cli", "eBPF probes: syscall, run-queue, TCP and socket-queue latency of bookcast's processes"),
    ("probe", "exporter.probe", "latency probe: per-hop latency of every message, per region, into Prometheus, ClickHouse, OTLP"),
    ("latency", "exporter.report", "latency tools: 'report' prints per-hop tail latency and who owns it"),
    ("bench", "loadtest.bench", "benchmarks: open-loop fan-out, bookcast vs nats-server's WebSocket"),
    ("drill", "chaos.cli", "chaos drills (Chaos Toolkit experiments): list, run NAME|FILE|--all, cleanup; reports with proof"),
    ("dashboards", "dashboards.cli", "Grafana dashboards, provisioning and Prometheus SLO rules: build, check against Prometheus"),
    ("why", "exporter.why", "us or the upstream? the current run's latency verdict in one sentence, then the evidence"),
    ("simulate", "feed.simulator.server", "venue simulator: a capture served in Polymarket/Coinbase/Kalshi live protocol, with fault knobs"),
    ("ingest", "feed.providers.run", "run an ingest reading live providers from a config (hot standby, failover)"),
    ("failover-bench", "feed.providers.bench", "benchmark: fault onset to first delta from the healthy provider, "
                                               "ingest CPU per venue message with 1 and 3 providers"),
    ("token", "feed.tokencli", "gateway tokens (PROTOCOL.md section 8): issue, verify, keygen"),
    ("regions-bench", "feed.regionsbench", "benchmark: region failover time per fault at an SDK client "
                                           "(NATS cluster killed, gateway killed/paused, partition), ingest takeover"),
]


def _tail_module():
    # feed.client re-exports a ``tail`` function that shadows the submodule's name.
    return importlib.import_module("feed.client.tail")


# The pyproject extra that installs each third-party module a command needs (`pip install bookcast` alone is
# the SDK: `tail` works, the others say which extra to add instead of a traceback).
_EXTRA_OF = {
    "nats": "server", "prometheus_client": "server", "uvloop": "server", "wsproto": "server", "jwt": "server",
    "cryptography": "server", "opentelemetry": "server", "hdrh": "probe", "chdb": "probe",
    "clickhouse_driver": "probe", "locust": "bench", "matplotlib": "bench",
}
_EXTRA_OF_COMMAND = {  # a command's own extra wins: it brings everything the command needs
    "probe": "probe", "latency": "probe", "why": "probe", "bench": "bench", "failover-bench": "bench",
    "drill": "ops", "dashboards": "ops",
}
_OWN_PACKAGES = ("feed", "exporter", "loadtest", "ebpf", "chaos", "dashboards")


def _guard_build(parser: argparse.ArgumentParser, build) -> None:
    """``build(parser)``; when it needs a third-party module that is not installed, the command still parses
    (any arguments) and ``main`` prints one line naming the module and the extra that brings it."""
    try:
        build(parser)
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".")[0]
        if not root or root in _OWN_PACKAGES:
            raise
        parser.set_defaults(missing_module=(root,))


def _command_of(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (the first word that is not an option or ``--log-level``'s value)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--log-level":
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def _parser(command: str | None = "") -> argparse.ArgumentParser:
    """The CLI's parser. Only ``command``'s options are built (its modules imported), so ``bookcast why``
    does not import the gateway, the benchmarks and the drills; ``""`` builds every command, ``None``
    (no command given: top-level help or a usage error) builds none beyond their one-line help."""
    p = argparse.ArgumentParser(
        prog="bookcast",
        description="bookcast: order books from venue feeds through NATS to WebSocket clients, with measured latency.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  bookcast up\n  bookcast tail coinbase:SKL-USD\n  bookcast replay --check capture.jsonl",
    )
    p.add_argument("--log-level", default=os.environ.get("BOOKCAST_LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO, WARNING, ERROR (default %(default)s)")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=EXAMPLES.get(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def wanted(name: str) -> bool:
        return command == "" or command == name

    def _guarded(parser: argparse.ArgumentParser, build, name: str) -> None:
        if wanted(name):
            _guard_build(parser, build)

    _guarded(cmd("up", "start the whole stack on embedded defaults"),
             lambda up: importlib.import_module("feed.stack").add_arguments(up), "up")
    _guarded(cmd("tail", "show the live top of book of one instrument"),
             lambda tail: _tail_module().add_arguments(tail), "tail")

    r = cmd("replay", "run an ingest that replays capture files as its upstream")
    r.add_argument("captures", nargs="+", type=Path, help="capture files (.jsonl or .jsonl.gz, PROTOCOL.md section 9)")
    r.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS URL (default %(default)s)")
    r.add_argument("--speed", type=float, default=1.0, help="speed factor; 0 = as fast as possible (default %(default)s)")
    r.add_argument("--loop", action="store_true", help="restart from the top at the end, forever")
    r.add_argument("--http-port", type=int, default=0, help="serve /metrics, /healthz, /v1/status on this port")
    r.add_argument("--check", action="store_true", help="no NATS: parse and build books, print a summary, exit")
    r.add_argument("--name", default="ingest", help="name shown to NATS and in logs")
    r.add_argument("--connect-timeout-s", type=float, default=10.0,
                   help="give up (exit 1) when NATS does not answer within this many seconds (default %(default)s)")
    _guarded(r, lambda r: importlib.import_module("feed.ingest").add_arguments(r), "replay")

    rec = cmd("record", "record a live venue WebSocket into a capture file")
    rec.add_argument("--venue", required=True, choices=["coinbase", "polymarket"])
    rec.add_argument("--symbols", required=True, help="comma-separated venue symbols (product ids / token ids)")
    rec.add_argument("--out", required=True, type=Path, help="output .jsonl or .jsonl.gz")
    rec.add_argument("--url", help="venue WebSocket URL (default: the venue's public one)")
    rec.add_argument("--duration-s", type=float, help="stop after this many seconds")
    rec.add_argument("--max-messages", type=int, help="stop after this many messages")

    g = cmd("gateway", "run a gateway (WebSocket + REST) fed from NATS")
    g.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    _guarded(g, lambda g: importlib.import_module("feed.gateway.server").add_arguments(g), "gateway")

    def extension(parser: argparse.ArgumentParser, name: str, module_name: str) -> None:
        module = importlib.import_module(module_name)
        EXAMPLES[name] = module.EXAMPLES
        parser.epilog = module.EXAMPLES
        module.add_arguments(parser)

    for name, module_name, help in EXTENSIONS:
        _guarded(cmd(name, help), lambda parser, n=name, m=module_name: extension(parser, n, m), name)
    return p


def _missing_module(command: str, module: str) -> int:
    extra = _EXTRA_OF_COMMAND.get(command) or _EXTRA_OF.get(module, "ops")
    print(f"bookcast {command}: needs the Python package {module!r}, which is not installed; "
          f"install it with: pip install 'bookcast[{extra}]' (./dev up installs everything)", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser(_command_of(argv))
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "missing_module", None):
        return _missing_module(args.command, args.missing_module[0])
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return _run(args)
    except ModuleNotFoundError as exc:  # a command's lazily imported dependency (an SDK-only install)
        root = (exc.name or "").split(".")[0]
        if not root or root in _OWN_PACKAGES:
            raise
        return _missing_module(args.command, root)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if args.command == "up":
        from feed import stack

        return stack.up(args)
    if args.command == "tail":
        if not args.url:
            args.url = _state_ws_url()
        return _run_async(_tail_module().main_async(args))
    if args.command == "replay":
        return _replay(args)
    if args.command == "record":
        return _record(args)
    if args.command == "gateway":
        from feed.gateway import server

        return server.worker_main(args) if args.worker else server.serve(args)
    for name, module_name, _ in EXTENSIONS:
        if args.command == name:
            return importlib.import_module(module_name).main(args)
    return 2


def _state_ws_url() -> list[str] | None:
    """The running stack's WebSocket URL from the state file ``bookcast up`` wrote (None: no running stack)."""
    from feed.runstate import RunStateError, current_run

    try:
        return [current_run().ws_url]
    except RunStateError:
        return None


def _run_async(coro) -> int:
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        return 0


def _replay(args: argparse.Namespace) -> int:
    missing = [str(c) for c in args.captures if not c.is_file()]
    if missing:
        print(f"bookcast replay: capture file not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    from feed.natsauth import NatsAuthError, credentials_from_args

    try:
        credentials_from_args(args)
    except NatsAuthError as exc:
        print(f"bookcast replay: {exc}", file=sys.stderr)
        return 2
    if args.check:
        from feed.capture import CaptureError
        from feed.replaycheck import check_captures

        try:
            return check_captures(args.captures)
        except CaptureError as exc:  # the message names the file and line
            print(f"bookcast replay --check: {exc}", file=sys.stderr)
            return 1
        except (OSError, EOFError) as exc:
            print(f"bookcast replay --check: cannot read the capture: {exc}", file=sys.stderr)
            return 1
    return _run_async(_run_ingest(args))


async def _run_ingest(args: argparse.Namespace) -> int:
    from aiohttp import web

    from feed.errors import describe_exception
    from feed.ingest import Ingest, config_from_args

    ingest = Ingest(config_from_args(args))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = None
    # The first connection is bounded and interruptible: nats.py retries an unreachable server forever.
    connecting = loop.create_task(ingest.connect())
    stopped = loop.create_task(stop.wait())
    done, _ = await asyncio.wait({connecting, stopped}, timeout=args.connect_timeout_s,
                                 return_when=asyncio.FIRST_COMPLETED)
    if connecting not in done or connecting.exception() is not None:
        connecting.cancel()
        stopped.cancel()
        await asyncio.gather(connecting, stopped, return_exceptions=True)
        await ingest.stop()
        if stop.is_set():
            print("bookcast replay: interrupted while connecting to NATS", file=sys.stderr)
            return 1
        why = (f"no answer within {args.connect_timeout_s:g} s" if connecting not in done
               else f"{type(connecting.exception()).__name__}: {connecting.exception()}")
        from feed.natsauth import redacted_url

        print(f"bookcast replay: cannot connect to NATS at {redacted_url(args.nats)} ({why}); is nats-server running? "
              f"(--connect-timeout-s sets the wait)", file=sys.stderr)
        return 1
    # Then HA (the lease and KV books buckets): bounded by its own waits for JetStream (--jetstream-wait-s),
    # not by --connect-timeout-s, and interruptible too
    ha_start = loop.create_task(ingest.start_ha())
    await asyncio.wait({ha_start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not ha_start.done() or ha_start.exception() is not None:
        ha_start.cancel()
        stopped.cancel()
        await asyncio.gather(ha_start, stopped, return_exceptions=True)
        await ingest.stop()
        if stop.is_set():
            print("bookcast replay: interrupted while joining the publishing lease", file=sys.stderr)
            return 1
        exc = ha_start.exception()
        print(f"bookcast replay: cannot join the publishing lease or bind the KV books ({describe_exception(exc)}); "
              "is JetStream up in the lease cluster?", file=sys.stderr)
        return 1
    stopped.cancel()
    if args.http_port:
        runner = web.AppRunner(ingest.http_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.http_port).start()
    replay_task = loop.create_task(ingest.run())
    stop_task = loop.create_task(stop.wait())
    await asyncio.wait({replay_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if replay_task.done() and replay_task.exception() is not None:
        logging.getLogger("bookcast.ingest").error("replay failed: %s", replay_task.exception())
        code = 1
    elif replay_task.done():
        await stop.wait()  # replay over: keep serving snapshots until stopped
    replay_task.cancel()
    stop_task.cancel()
    if runner is not None:
        await runner.cleanup()
    await ingest.stop()
    return code


def _record(args: argparse.Namespace) -> int:
    import aiohttp

    from feed.capture import DEFAULT_URLS, default_subscribe, record

    symbols = [s for s in args.symbols.split(",") if s]
    url = args.url or DEFAULT_URLS[args.venue]
    if args.duration_s is None and args.max_messages is None:
        print("bookcast record: give --duration-s or --max-messages (or stop with Ctrl-C)", file=sys.stderr)
    try:
        count = asyncio.run(record(url, args.venue, default_subscribe(args.venue, symbols), args.out,
                                   duration_s=args.duration_s, max_messages=args.max_messages))
    except KeyboardInterrupt:
        print(f"stopped; {args.out} holds what was received", file=sys.stderr)
        return 0
    except (OSError, aiohttp.ClientError) as exc:
        print(f"bookcast record: cannot record from {url}: {exc}", file=sys.stderr)
        return 1
    print(f"recorded {count} messages to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
