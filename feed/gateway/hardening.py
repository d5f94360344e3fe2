"""The gateway's security options in one place: tokens, per-token limits, NATS login, ops listener, TLS,
connection hygiene. ``feed.gateway.server`` calls four things from here, and nothing else changes:

    add_arguments(parser)               # the options below, for ``bookcast gateway``
    worker_argv(args)                   # the same options again for each worker process
    h = from_args(args)                 # validated (KeyConfigError, TlsConfigError, NatsAuthError: exit 2)
    app = create_app(config, authenticator=h.authenticator(registry)); h.attach(app)   # before setup
    await runner.setup(); h.install(runner); site = TCPSite(..., ssl_context=h.ssl_context)
    ops = await h.start_ops(app, host, reuse_port)   # when --ops-port is given

Every option is off or permissive by default except connection hygiene, which is on with the limits of
``HygieneLimits`` (docs/security.md lists them all).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from feed import natsauth
from feed.auth import Authorization, TokenLimits, TokenUsage, TokenVerifier
from feed.gateway.hygiene import Guard, GuardMetrics, HygieneLimits, RejectReason, install, middleware
from feed.gateway.security import Authenticator
from feed.gateway.tokenshare import SharedTokenUsage
from feed.tokencli import add_key_arguments, verifier_from_args

log = logging.getLogger("bookcast.gateway")

_DEFAULTS = HygieneLimits()


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("auth (PROTOCOL.md section 8; off unless a key is given)")
    add_key_arguments(g)
    g.add_argument("--max-connections-per-token", type=int, default=0,
                   help="across all workers, 0 = no cap (default 0)")
    g.add_argument("--max-subscriptions-per-token", type=int, default=0,
                   help="across all workers, 0 = no cap (default 0)")
    # set by the supervisor for each worker: the shared per-token counts (feed.gateway.tokenshare)
    g.add_argument("--token-usage-file", type=Path, default=None, help=argparse.SUPPRESS)
    g.add_argument("--token-usage-worker", type=int, default=0, help=argparse.SUPPRESS)
    n = p.add_argument_group("NATS login")
    natsauth.add_arguments(n)
    o = p.add_argument_group("ops listener (/metrics, /v1/status)")
    o.add_argument("--ops-host", default="127.0.0.1", help="ops listen address (default %(default)s)")
    o.add_argument("--ops-port", type=int, default=None,
                   help="ops port; given: /metrics leaves the public port (default: off, /metrics on the public port)")
    t = p.add_argument_group("TLS (or terminate it at a proxy: docs/security.md)")
    t.add_argument("--tls-cert-file", type=Path, help="PEM certificate chain (leaf first)")
    t.add_argument("--tls-key-file", type=Path, help="PEM private key (unencrypted)")
    t.add_argument("--tls-client-ca-file", type=Path, help="require client certificates signed by this CA")
    h = p.add_argument_group("connection hygiene")
    h.add_argument("--handshake-timeout-s", type=float, default=_DEFAULTS.handshake_timeout_s,
                   help="a request head must be complete this long after its first byte (default %(default)s)")
    h.add_argument("--idle-timeout-s", type=float, default=_DEFAULTS.idle_timeout_s,
                   help="a connection that sends no request for this long is closed (default %(default)s)")
    h.add_argument("--max-connections-per-source", type=int, default=_DEFAULTS.max_connections_per_source,
                   help="per client address, 0 = no cap (behind a proxy: 0) (default %(default)s)")
    h.add_argument("--max-connections", type=int, default=0,
                   help="total per worker, 0 = the fd limit minus %d (default 0)" % _DEFAULTS.fd_reserve)
    h.add_argument("--rest-headroom", type=int, default=_DEFAULTS.rest_headroom,
                   help="connections kept for REST and health checks when WebSockets fill the rest (default %(default)s)")
    h.add_argument("--rest-requests-per-s", type=float, default=_DEFAULTS.rest_requests_per_s,
                   help="REST requests per second per address, 0 = no limit (default %(default)s)")
    h.add_argument("--rest-burst", type=int, default=_DEFAULTS.rest_burst, help="REST burst (default %(default)s)")
    h.add_argument("--exempt-source", action="append", default=None, metavar="ADDR",
                   help="address exempt from the per-source cap and REST rate limit (repeatable; default "
                        "127.0.0.1 and ::1, local tools; 'none' exempts nobody)")
    h.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="browser Origin allowed to open WebSockets, e.g. https://viewer.example (repeatable; "
                        "none given: no Origin check)")


def worker_argv(args: argparse.Namespace) -> list[str]:
    """These options as command-line arguments again (the supervisor starts each worker with them)."""
    out: list[str] = []

    def opt(flag: str, value: Any) -> None:
        if value is not None:
            out.extend([flag, str(value)])

    for path in args.auth_jwks:
        opt("--auth-jwks", path)
    for spec in args.auth_hs256_secret_file:
        opt("--auth-hs256-secret-file", spec)
    for spec in args.auth_rs256_public_key_file:
        opt("--auth-rs256-public-key-file", spec)
    opt("--auth-leeway-s", args.auth_leeway_s)
    opt("--auth-issuer", args.auth_issuer)
    opt("--auth-audience", args.auth_audience)
    opt("--max-connections-per-token", args.max_connections_per_token)
    opt("--max-subscriptions-per-token", args.max_subscriptions_per_token)
    opt("--nats-user", args.nats_user)
    opt("--nats-password-file", args.nats_password_file)
    opt("--nats-nkey-seed-file", args.nats_nkey_seed_file)
    opt("--ops-host", args.ops_host)
    opt("--ops-port", args.ops_port)
    opt("--tls-cert-file", args.tls_cert_file)
    opt("--tls-key-file", args.tls_key_file)
    opt("--tls-client-ca-file", args.tls_client_ca_file)
    for flag in ("handshake_timeout_s", "idle_timeout_s", "max_connections_per_source", "max_connections",
                 "rest_headroom", "rest_requests_per_s", "rest_burst"):
        opt("--" + flag.replace("_", "-"), getattr(args, flag))
    for origin in args.allowed_origin:
        opt("--allowed-origin", origin)
    for source in args.exempt_source or ():
        opt("--exempt-source", source)
    return out


@dataclass
class TokenGrant:
    """One connection's ``Authorization`` plus its share of the token's limits.

    Satisfies the session's authorization hook (``allows``, ``expires_at_ns``) and adds
    ``try_subscribe``/``unsubscribed`` for the per-token subscription cap; ``release`` (idempotent) gives
    the connection and its subscriptions back when the connection ends.
    """

    auth: Authorization
    usage: TokenUsage
    subscriptions: int = 0
    released: bool = False

    @property
    def expires_at_ns(self) -> int | None:
        return self.auth.expires_at_ns

    @property
    def subject(self) -> str:
        return self.auth.subject

    def allows(self, instrument: str) -> bool:
        return self.auth.allows(instrument)

    def try_subscribe(self, n: int) -> bool:
        if self.released or not self.usage.try_subscribe(self.auth.token_id, n):
            return False
        self.subscriptions += n
        return True

    def unsubscribed(self, n: int) -> None:
        n = min(n, self.subscriptions)
        self.subscriptions -= n
        self.usage.unsubscribe(self.auth.token_id, n)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.usage.disconnect(self.auth.token_id, self.subscriptions)
            self.subscriptions = 0


class GatewayAuthenticator(Authenticator):
    """The gateway's upgrade and REST hook: verifies the token; for a WebSocket upgrade also takes one of
    the token's connections (429 over the cap) and returns a ``TokenGrant`` released when the request's
    task (the whole WebSocket connection) ends."""

    def __call__(self, request: web.BaseRequest):
        auth = self.verify(request)
        if auth is None or request.headers.get("Upgrade", "").lower() != "websocket":
            return auth
        auth = super().__call__(request)  # the connection cap (raises 429)
        grant = TokenGrant(auth, self.usage)
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(lambda _: grant.release())
        return grant

    def verify(self, request: web.BaseRequest) -> Authorization | None:
        cached = request.get("_bookcast_auth")
        if cached is not None:
            return cached
        auth = super().verify(request)
        if auth is not None:
            request["_bookcast_auth"] = auth
        return auth


@dataclass
class Hardening:
    limits: HygieneLimits
    verifier: TokenVerifier | None
    token_limits: TokenLimits
    nats_credentials: natsauth.NatsCredentials
    ops_host: str
    ops_port: int | None
    ssl_context: ssl.SSLContext | None
    token_usage_file: Path | None = None
    token_usage_worker: int = 0
    guard: Guard | None = None
    _authenticator: GatewayAuthenticator | None = field(default=None, repr=False)

    @property
    def ops_on(self) -> bool:
        return self.ops_port is not None

    def authenticator(self, registry) -> GatewayAuthenticator | None:
        """The upgrade/REST hook for ``create_app`` (None with auth off). Builds the guard too."""
        self._ensure_guard(registry)
        if self.verifier is None:
            return None
        from feed import metrics as prom

        guard = self.guard
        self._authenticator = GatewayAuthenticator(
            self.verifier, self.token_usage(),
            metric=prom.build("bookcast_gateway_auth_failures_total", registry),
            rejected=lambda reason: guard.rejected(RejectReason(reason), "token"))
        return self._authenticator

    def token_usage(self) -> TokenUsage | SharedTokenUsage:
        """This worker's per-token counts: the supervisor's shared table when it made one (``--workers N``
        with a per-token cap), else this process's own."""
        if self.token_usage_file is None:
            return TokenUsage(self.token_limits)
        return SharedTokenUsage(self.token_usage_file, self.token_usage_worker, self.token_limits)

    def _ensure_guard(self, registry) -> Guard:
        if self.guard is None:
            self.guard = Guard(self.limits, GuardMetrics(registry))
        return self.guard

    def attach(self, app: web.Application, registry=None) -> None:
        """Put the per-request guard in front of every route (before ``runner.setup()``). With the ops
        listener on, the public app answers 404 for ``/metrics``."""
        guard = self._ensure_guard(registry)
        public = (lambda path: path != "/metrics") if self.ops_on else None
        app.middlewares.insert(0, middleware(guard, public_paths=public))
        from feed.gateway.app import GATEWAY_KEY

        gw = app.get(GATEWAY_KEY)
        if gw is not None:  # 1002 closes made by the guard count in the gateway's close counter
            guard.metrics.bind_closes(_ClosesByCode(gw.metrics.closes))

    def runner_kwargs(self) -> dict[str, Any]:
        """Arguments for ``web.AppRunner``: bounded request heads and the keep-alive backstop."""
        return self.limits.handler_args()

    def install(self, runner: web.BaseRunner) -> None:
        """Put the connection-level guard around a set-up runner (before the sites start)."""
        install(runner, self._ensure_guard(None))

    async def start_ops(self, gateway_app: web.Application, *, reuse_port: bool) -> web.AppRunner | None:
        """Start the ops listener for ``gateway_app``'s gateway (None when ``--ops-port`` is not given)."""
        if not self.ops_on:
            if self.verifier is not None:
                log.warning("auth is on but /metrics is on the public port: give --ops-port to move it")
            return None
        from feed.gateway.app import GATEWAY_KEY
        from feed.gateway.ops import create_ops_app, start_ops_listener

        gw = gateway_app[GATEWAY_KEY]
        guard = self.guard

        def status() -> dict[str, Any]:
            table = guard.table if guard is not None else None
            out: dict[str, Any] = {"name": gw.config.name, "ready": gw.ready, "draining": gw.draining,
                                   "websockets": len(gw.connections), "instruments": len(gw.machines),
                                   "time_ns": time.time_ns()}
            if table is not None:
                out["connections"] = {"total": table.total, "cap": table.total_cap,
                                      "websocket_cap": table.websocket_cap, "sources": len(table.per_source)}
                out["refused"] = dict(guard.reject_log.counts)
            if self._authenticator is not None and self._authenticator.usage is not None:
                out["tokens_connected"] = len(self._authenticator.usage.connections)
            return out

        app = create_ops_app(gw.registry, status, lambda: gw.ready)
        return await start_ops_listener(app, self.ops_host, self.ops_port, reuse_port=reuse_port)


class _ClosesByCode:
    """The gateway's per-code close counters seen as one labelled counter (``labels(code).inc()``)."""

    def __init__(self, children: dict[int, Any]) -> None:
        self._children = children

    def labels(self, code: str):
        return self._children[int(code)]


def from_args(args: argparse.Namespace) -> Hardening:
    """The validated options.

    Raises:
        feed.auth.KeyConfigError, feed.gateway.tls.TlsConfigError, feed.natsauth.NatsAuthError: a key,
            certificate or password file is missing or unusable (the message says which).
    """
    from feed.gateway.tls import TlsConfigError, server_ssl_context

    limits = HygieneLimits(
        handshake_timeout_s=args.handshake_timeout_s, idle_timeout_s=args.idle_timeout_s,
        max_connections_per_source=args.max_connections_per_source, max_connections=args.max_connections,
        rest_headroom=args.rest_headroom, rest_requests_per_s=args.rest_requests_per_s, rest_burst=args.rest_burst,
        allowed_origins=tuple(args.allowed_origin),
        exempt_sources=_DEFAULTS.exempt_sources if args.exempt_source is None else
        tuple(s for s in args.exempt_source if s.lower() != "none"))
    ssl_context = None
    if args.tls_cert_file or args.tls_key_file:
        if not (args.tls_cert_file and args.tls_key_file):
            raise TlsConfigError("give both --tls-cert-file and --tls-key-file")
        ssl_context = server_ssl_context(args.tls_cert_file, args.tls_key_file,
                                         client_ca_file=args.tls_client_ca_file)
    return Hardening(
        limits=limits, verifier=verifier_from_args(args),
        token_limits=TokenLimits(args.max_connections_per_token, args.max_subscriptions_per_token),
        nats_credentials=natsauth.credentials_from_args(args), ops_host=args.ops_host, ops_port=args.ops_port,
        ssl_context=ssl_context, token_usage_file=args.token_usage_file, token_usage_worker=args.token_usage_worker)


def token_caps_on(args: argparse.Namespace) -> bool:
    """Whether a per-token cap is set (the supervisor then shares the counts between its workers)."""
    return bool(args.max_connections_per_token or args.max_subscriptions_per_token)
