"""Auth on the gateway's HTTP edge (PROTOCOL.md section 8), around the pure ``feed.auth``.

* ``Authenticator(request)`` is the upgrade path's hook: the request's ``Authorization`` (or ``None``
  with auth off), or an ``HTTPUnauthorized`` (401, RFC 6750 section 3 ``WWW-Authenticate: Bearer``) /
  ``HTTPTooManyRequests`` (429, the token's connection cap) to answer instead of the upgrade.
* The gateway's REST handlers call the same hook: 401 without a valid token, 403 ``forbidden`` for a
  book outside the token's patterns, and ``/v1/instruments`` lists only what the token allows.

Refusals are counted in ``bookcast_gateway_auth_failures_total{reason}`` and summarised in one log line
per interval; the token never appears in a log line, a metric or a reply.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import orjson
from aiohttp import web

from feed.auth import AuthError, Authorization, TokenUsage, TokenVerifier, token_from_request

log = logging.getLogger("bookcast.gateway.auth")

def _error_body(code: str, message: str) -> str:
    return orjson.dumps({"type": "error", "code": code, "message": message}).decode()


def unauthorized(exc: AuthError) -> web.HTTPUnauthorized:
    """401 with ``WWW-Authenticate: Bearer`` and a JSON error naming the rule (never the token)."""
    challenge = 'Bearer realm="bookcast"' if exc.reason == "missing" else \
        f'Bearer realm="bookcast", error="invalid_token", error_description="{exc.reason}"'
    return web.HTTPUnauthorized(text=_error_body("unauthorized", exc.message), content_type="application/json",
                                headers={"WWW-Authenticate": challenge})


def forbidden(instrument: str) -> web.HTTPForbidden:
    shown = instrument if len(instrument) <= 64 else instrument[:61] + "..."
    return web.HTTPForbidden(text=_error_body("forbidden", f"token does not grant {shown!r}"),
                             content_type="application/json")


class Authenticator:
    """Checks each request's token with ``verifier`` and counts connections per token in ``usage``.

    ``clock_ns`` is injectable for tests. ``metric`` is the ``auth_failures`` counter (labels: reason);
    ``rejected`` is called with ``"token_cap"`` when a token is over its connection cap.
    """

    def __init__(self, verifier: TokenVerifier | None, usage: TokenUsage | None = None, *, metric=None,
                 rejected: Callable[[str], None] | None = None, clock_ns: Callable[[], int] = time.time_ns,
                 log_interval_s: float = 10.0) -> None:
        self.verifier = verifier
        self.usage = usage
        self.metric = metric
        self.rejected = rejected
        self.clock_ns = clock_ns
        self.log_interval_s = log_interval_s
        self._pending: Counter = Counter()
        self._last_log_s: float | None = None

    @property
    def enabled(self) -> bool:
        return self.verifier is not None

    def verify(self, request: web.BaseRequest) -> Authorization | None:
        """The request's ``Authorization``; None with auth off.

        Raises:
            web.HTTPUnauthorized: no token, or a token the verifier refuses.
        """
        if self.verifier is None:
            return None
        try:
            token = token_from_request(request.headers, request.query)
            return self.verifier.verify(token, self.clock_ns())
        except AuthError as exc:
            self._count(exc)
            raise unauthorized(exc) from None

    def __call__(self, request: web.BaseRequest) -> Authorization | None:
        """The upgrade hook: ``verify`` plus the token's connection cap (call ``release`` when the
        connection ends).

        Raises:
            web.HTTPUnauthorized: as ``verify``.
            web.HTTPTooManyRequests: the token holds ``max_connections_per_token`` connections already.
        """
        auth = self.verify(request)
        if auth is not None and self.usage is not None and not self.usage.try_connect(auth.token_id):
            if self.rejected is not None:
                self.rejected("token_cap")
            raise web.HTTPTooManyRequests(
                text=_error_body("rate_limited", "this token holds its maximum number of connections"),
                content_type="application/json", headers={"Retry-After": "1"})
        return auth

    def release(self, auth: Authorization | None, subscriptions: int = 0) -> None:
        """A connection admitted by ``__call__`` ended, holding ``subscriptions``."""
        if auth is not None and self.usage is not None:
            self.usage.disconnect(auth.token_id, subscriptions)

    def _count(self, exc: AuthError) -> None:
        if self.metric is not None:
            self.metric.labels(exc.reason.value).inc()
        self._pending[exc.reason.value] += 1
        now_s = time.monotonic()
        if self._last_log_s is None or now_s - self._last_log_s >= self.log_interval_s:
            summary = ", ".join(f"{r}={n}" for r, n in sorted(self._pending.items()))
            log.warning("refused tokens%s: %s", "" if self._last_log_s is None else
                        f" in the last {now_s - self._last_log_s:.0f} s", summary)
            self._pending.clear()
            self._last_log_s = now_s
