"""``bookcast ingest --config FILE``: an ingest whose upstream is a pool of live providers per venue.

Every provider in the config stays connected (hot standby); the pool reads each venue from its best provider
and fails over (``feed.providers.pool``). Serves ``/metrics``, ``/healthz``, ``/readyz`` and ``/v1/status``
(providers with their scores) on ``--http-port``. Exit codes: 0 stopped by a signal, 1 runtime failure (NATS
unreachable), 2 a bad or missing config.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

EXAMPLES = """examples:
  bookcast ingest --config providers.toml --nats nats://127.0.0.1:4222 --http-port 9101
  bookcast ingest --config providers.toml --check     # validate the config, print the providers, exit
  curl -s http://127.0.0.1:9101/v1/status | jq .providers   # which provider each venue reads, with scores"""

log = logging.getLogger("bookcast.ingest")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from feed import ingest

    p.add_argument("--config", type=Path, required=True, help="provider pool config (TOML, see feed.providers.config)")
    p.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS URL (default %(default)s)")
    p.add_argument("--http-port", type=int, default=0, help="serve /metrics, /healthz, /readyz, /v1/status here")
    p.add_argument("--name", default="ingest", help="name shown to NATS and in logs")
    p.add_argument("--check", action="store_true", help="validate the config, print the providers (never auth), exit")
    ingest.add_arguments(p)


def main(args: argparse.Namespace) -> int:
    from feed.providers.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"bookcast ingest: {exc}", file=sys.stderr)
        return 2
    if args.check:
        for v in config.venues:
            print(f"{v.venue}: {len(v.symbols)} symbols, stale after {v.stale_after_s:g} s")
            for p in v.providers:
                print(f"  {p.name:<20} weight={p.weight:g} ws={p.ws_url} rest={p.rest_url or '-'}"
                      f"{' auth=<hidden>' if p.auth else ''}")
        return 0
    try:
        return asyncio.run(_run(args, config))
    except KeyboardInterrupt:
        return 0


async def _run(args: argparse.Namespace, config) -> int:
    from aiohttp import web

    from feed.errors import describe_exception
    from feed.ingest import Ingest, IngestConfig
    from feed.procs import run_until_signalled

    from feed import ha, natsauth

    ingest = Ingest(IngestConfig(nats_url=args.nats, name=args.name, providers=config,
                                 otlp_endpoint=args.otlp_endpoint, trace_sample_every=max(1, args.trace_sample_every),
                                 ha=ha.config_from_args(args)))  # --region: join the publishing lease (issue 9)
    try:
        await ingest.connect()
    except Exception as exc:  # noqa: BLE001 - a clear reason and a non-zero code
        log.error("cannot connect to NATS at %s: %s", natsauth.redacted_url(args.nats), exc)
        return 1
    try:
        await ingest.start_ha()  # the lease and KV books (waits for JetStream: --jetstream-wait-s)
    except Exception as exc:  # noqa: BLE001 - a clear reason and a non-zero code
        log.error("cannot join the publishing lease or bind the KV books (%s); is JetStream up in the "
                  "lease cluster?", describe_exception(exc))
        await ingest.stop()
        return 1
    runner = None
    if args.http_port:
        runner = web.AppRunner(ingest.http_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.http_port).start()
    log.info("ingest %s reading providers from %s", args.name, args.config)
    code = await run_until_signalled(ingest.run(), "provider pool", log)
    if runner is not None:
        await runner.cleanup()
    await ingest.stop()
    return code
