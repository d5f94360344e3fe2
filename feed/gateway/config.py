"""Gateway configuration, declared once: dataclass fields whose metadata make the CLI options and the
worker's argv.

``GatewayConfig`` (one worker's settings, with the per-connection ``GatewayLimits`` of PROTOCOL.md
sections 3-7) and ``ServerConfig`` (listen address, port, worker count around a ``GatewayConfig``) are the
only place a default is written. A field with ``cli(...)`` metadata is a ``bookcast gateway`` option:

* ``add_arguments(parser)`` adds one option per such field (type and default from the field);
* ``server_config_from_args(args)`` / ``config_from_args(args)`` build the dataclasses back;
* ``worker_argv(server_config)`` writes a config as the options a worker process parses into the same
  config (so a supervisor never rebuilds a worker's command line flag by flag).

Pure: no I/O; the only environment read is ``$OTEL_EXPORTER_OTLP_ENDPOINT`` as the OTLP option's default,
and only when the parser is built.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from feed.gateway.protocol import GatewayLimits
from feed.natscreds import NatsCredentials


def cli(flag: str, help: str, *, hidden: bool = False, to_cli: Callable[[Any], Any] | None = None,
        from_cli: Callable[[Any], Any] | None = None, choices: list[str] | None = None,
        default_factory: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Field metadata making a config field a CLI option ``flag``.

    ``to_cli``/``from_cli`` convert between the field's value and the option's (e.g. ms on the command
    line, s in the config; ``on``/``off`` for a bool). ``default_factory`` gives the option's default when
    the parser is built (default: the field's own default).
    """
    return {"cli": {"flag": flag, "help": help, "hidden": hidden, "to_cli": to_cli, "from_cli": from_cli,
                    "choices": choices, "default_factory": default_factory}}


TIMER_SLICE = 16  # connections per slice of a timer pass (``Gateway.tick_due``): a delta waits behind at most this many heartbeats (16 over 64: docs/perf/round11-timer-slice.md)
HEARTBEAT_SLOTS = 20  # timer-wheel slots per heartbeat interval: a heartbeat goes out 1 to 1.1 intervals after the last frame (a slot late, its slice paced over one more)
OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"  # the standard variable (feed.otlp.ENDPOINT_ENV)


def _otlp_default() -> str | None:
    return os.environ.get(OTLP_ENDPOINT_ENV) or None


_on_off = {"to_cli": lambda v: "on" if v else "off", "from_cli": lambda v: v == "on", "choices": ["on", "off"]}
_ms = {"to_cli": lambda s: s * 1000, "from_cli": lambda ms: ms / 1000}
_zero_none = {"to_cli": lambda v: v or 0, "from_cli": lambda v: v or None}


@dataclass
class GatewayConfig:
    """One gateway worker's settings (``feed.gateway.app.create_app``)."""

    nats_url: str = field(default="nats://127.0.0.1:4222", metadata=cli("--nats", "NATS URL"))
    limits: GatewayLimits = field(default_factory=GatewayLimits)
    ring_size: int = field(default=4096, metadata=cli(
        "--ring-size", "recent deltas kept per instrument to serve resume"))
    ws_ping_interval_s: float = field(default=10.0, metadata=cli(
        "--ws-ping-interval-s", "WebSocket ping after this long without a frame from the client (0: no pings); a "
        "client that sends nothing within half of it after the ping is dropped (feed.gateway.liveness)"))
    snapshot_timeout_s: float = field(default=2.0, metadata=cli(
        "--snapshot-timeout-s", "limit on one snapshot request to the ingest (retried with backoff)"))
    shutdown_reconnect_after_ms: int = 500
    drain_timeout_s: float = field(default=2.0, metadata=cli(
        "--drain-timeout-s", "on SIGTERM, how long clients get to receive what is queued before close 1001"))
    nats_reconnect_wait_s: float = field(default=0.25, metadata=cli(
        "--nats-reconnect-wait-s", "delay between NATS reconnect attempts"))
    # Bytes a connection may hold below its queue: the socket's user-space write buffer before the writer
    # waits for it to drain, and the kernel send buffer (None: kernel autotuning, up to tcp_wmem max).
    ws_writer_limit_bytes: int = field(default=256 * 1024, metadata=cli(
        "--ws-writer-limit-bytes", "bytes written to a connection's socket before waiting for it to drain"))
    socket_sndbuf_bytes: int | None = field(default=None, metadata=cli(
        "--socket-sndbuf-bytes", "kernel send buffer per connection, 0 = kernel autotuning", **_zero_none))
    write_through: bool = field(default=True, metadata=cli(
        "--write-through", "fan-out writes straight to a socket with nothing queued ('off' only to measure it)",
        **_on_off))
    name: str = field(default="gateway", metadata=cli("--name", "name shown to NATS and in logs"))
    instrumented: bool = field(default=True, metadata=cli(
        "--instrumentation", "per-message metrics and traces; 'off' only to measure their cost", **_on_off))
    otlp_endpoint: str | None = field(default=None, metadata=cli(
        "--otlp-endpoint", "OTLP/gRPC endpoint for spans of traced deltas, e.g. http://127.0.0.1:4317 "
        "($OTEL_EXPORTER_OTLP_ENDPOINT when set; unset = off)", default_factory=_otlp_default))
    queue_sample_interval_s: float = 1.0
    # perf (issue 13): CPython runs a full garbage collection once gen1 has been collected this many times
    # and the heap grew by a quarter since the last one. A full collection visits every tracked object:
    # ~70 per connection, 0.4-0.8 s of a worker's loop with 5,000 connections each, a stall every client
    # sees. CPython's default of 10 (gen1 every 10 gen0 collections) ran seven of them while 10,000
    # connections arrived and one in the seconds after. The worker collects gen1 every 2 gen0 collections
    # (``feed.gateway.server.GC_GEN1_THRESHOLD``: each gen1 collection is smaller, its longest stall 42-46 ->
    # 18-22 ms CPU with 5,000 idle connections) and gen2 every 5000 gen1 collections: about as rare as
    # 1000 x 10, minutes apart. Cyclic garbage that outlived the young generations (a closed connection's
    # objects) waits that long to be freed.
    gc_gen2_threshold: int = field(default=5000, metadata=cli(
        "--gc-gen2-threshold", "gen1 collections between full garbage collections (CPython's default: 10)",
        hidden=True))
    # perf (issue 13, round 5): the timer pass (``feed.gateway.app.Gateway.tick_due``), for A/B runs of
    # ``bookcast bench fanout --idle 10000 --gateway-args ...`` (docs/perf/round5-idle.md)
    timer_slice: int = field(default=TIMER_SLICE, metadata=cli(
        "--timer-slice", "connections per slice of a timer pass; the loop runs between slices", hidden=True))
    heartbeat_slots: int = field(default=HEARTBEAT_SLOTS, metadata=cli(
        "--heartbeat-slots", "timer-wheel slots per heartbeat interval", hidden=True))
    instrument_linger_s: float = field(default=30.0, metadata=cli(
        "--instrument-linger-s", "an instrument nobody subscribes to keeps its NATS subscription this long"))
    fanout_delay_s: float = field(default=0.0, metadata=cli(
        "--test-fanout-delay-ms", "test hook: hold every delta this long before fan-out, a slow gateway", **_ms))
    # regions (issue 9): its client count is labelled by region; with it set, a gateway that heard of no
    # venue for --ingest-silent-s since its subscription is not ready either (a region with no ingest at all)
    region: str | None = field(default=None, metadata=cli(
        "--region", "this gateway's region: its client count is also bookcast_gateway_region_clients{region}",
        to_cli=lambda v: v or "", from_cli=lambda v: v or None))
    # regions (issue 9): the gateway probes the publishing lease's bucket (JetStream KV in the lease cluster,
    # reached through this region's NATS gateway links); unanswered this long, the region is cut off from
    # whoever may publish: every instrument stale (reason region_cut_off) and /readyz 503 until it answers
    lease_unreachable_s: float = field(default=0.0, metadata=cli(
        "--lease-unreachable-s", "every instrument stale (reason region_cut_off) and /readyz 503 when the "
        "publishing lease's KV bucket does not answer from this region's NATS for this long; 0 = off"))
    carry_directory: bool = field(default=False, metadata=cli(
        "--carry-directory", "subscribe to every instrument of the ingest directory, not only those a client "
        "wants, so a client arriving from another region resumes from this gateway's ring", **_on_off))
    # providers (issue 16): the ingest announces each venue's directory every second while it lives; when a
    # venue's announcements stop this long, its instruments are ``stale`` (reason ``ingest_silent``) and
    # /readyz is 503 until they resume
    ingest_silent_s: float = field(default=5.0, metadata=cli(
        "--ingest-silent-s", "a venue whose ingest directory announcements stop this long has its instruments "
        "marked stale (reason ingest_silent) and /readyz 503; 0 = off"))
    # NATS login (feed.natsauth); its options are declared with the other hardening options in
    # feed.gateway.hardening, which fills this field in
    nats_credentials: NatsCredentials = field(default_factory=NatsCredentials)


@dataclass
class ServerConfig:
    """``bookcast gateway``: where to listen and how many worker processes share the port."""

    host: str = field(default="127.0.0.1", metadata=cli("--host", "listen address"))
    port: int = field(default=8080, metadata=cli("--port", "listen port, 0 = pick a free one"))
    workers: int = field(default=1, metadata=cli("--workers", "worker processes sharing the port"))
    restart_backoff_s: tuple[float, float] = (0.5, 30.0)  # supervisor: first and longest restart delay
    gateway: GatewayConfig = field(default_factory=GatewayConfig)


@dataclass(frozen=True)
class _Option:
    path: tuple[str, ...]  # attribute path from ServerConfig, e.g. ("gateway", "limits", "max_queue_bytes")
    dest: str
    flag: str
    spec: dict[str, Any]
    default: Any  # the field's default (config side)
    type: Callable[[str], Any]


def _options() -> list[_Option]:
    out: list[_Option] = []

    def walk(cls: type, path: tuple[str, ...]) -> None:
        for f in dataclasses.fields(cls):
            nested = {"limits": GatewayLimits, "gateway": GatewayConfig}.get(f.name)
            if nested is not None:
                walk(nested, path + (f.name,))
                continue
            spec = f.metadata.get("cli")
            if spec is None:
                continue
            spec = {"hidden": False, "to_cli": None, "from_cli": None, "choices": None, "default_factory": None} | spec
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            to_cli = spec["to_cli"] or (lambda v: v)
            cli_default = to_cli(default)
            kind = type(cli_default) if cli_default is not None else str
            out.append(_Option(path + (f.name,), spec["flag"].lstrip("-").replace("-", "_"), spec["flag"], spec,
                               default, kind))

    walk(ServerConfig, ())
    return out


OPTIONS: list[_Option] = _options()
"""Every CLI option, in declaration order."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add one option per ``cli`` field of ``ServerConfig``, ``GatewayConfig`` and ``GatewayLimits``."""
    for opt in OPTIONS:
        spec = opt.spec
        to_cli = spec["to_cli"] or (lambda v: v)
        default = spec["default_factory"]() if spec["default_factory"] else to_cli(opt.default)
        help = argparse.SUPPRESS if spec["hidden"] else f"{spec['help']} (default %(default)s)"
        kwargs: dict[str, Any] = {"dest": opt.dest, "default": default, "help": help}
        if spec["choices"]:
            kwargs["choices"] = spec["choices"]
        else:
            kwargs["type"] = opt.type
        p.add_argument(opt.flag, **kwargs)


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ``ServerConfig`` an ``add_arguments`` parser's result describes.

    Raises:
        ValueError: a limit out of range (``GatewayLimits``).
    """
    values: dict[tuple[str, ...], Any] = {}
    for opt in OPTIONS:
        value = getattr(args, opt.dest)
        from_cli = opt.spec["from_cli"]
        values[opt.path] = from_cli(value) if from_cli is not None else value

    def build(cls: type, path: tuple[str, ...]) -> Any:
        kwargs = {}
        for f in dataclasses.fields(cls):
            nested = {"limits": GatewayLimits, "gateway": GatewayConfig}.get(f.name)
            if nested is not None:
                kwargs[f.name] = build(nested, path + (f.name,))
            elif path + (f.name,) in values:
                kwargs[f.name] = values[path + (f.name,)]
        return cls(**kwargs)

    return build(ServerConfig, ())


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The ``GatewayConfig`` of one worker from an ``add_arguments`` parser's result."""
    return server_config_from_args(args).gateway


def _get(config: ServerConfig, path: tuple[str, ...]) -> Any:
    value: Any = config
    for name in path:
        value = getattr(value, name)
    return value


def worker_argv(config: ServerConfig, **overrides: Any) -> list[str]:
    """The options that make a worker parse ``config`` back (``None`` values are left out, so they keep
    their default). ``overrides`` replace fields of ``config.gateway`` first (e.g. ``name=...``)."""
    if overrides:
        config = dataclasses.replace(config, gateway=dataclasses.replace(config.gateway, **overrides))
    argv: list[str] = []
    for opt in OPTIONS:
        value = _get(config, opt.path)
        to_cli = opt.spec["to_cli"]
        value = to_cli(value) if to_cli is not None else value
        if value is None:
            continue
        argv += [opt.flag, str(value)]
    return argv
