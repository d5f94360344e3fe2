"""Per-connection request rate limiting (PROTOCOL.md section 5). Pure: the caller passes the time in.

PROTOCOL.md section 5: "requests per connection: 20/s sustained, burst 50 (over it: ``rate_limited``;
100 rate-limited requests in a row: close 4029)". ``RequestLimiter`` is that rule for one connection.
"""
from __future__ import annotations

import enum

from feed.gateway.protocol import GatewayLimits

# Timestamps are floats, so refills summed over many small steps can land a hair under a whole token.
# This slack keeps a client sending at exactly the allowed rate allowed. A token taken early is still
# paid in full (the balance may dip to -slack), so the long-run rate is exact.
_TOKEN_SLACK = 1e-9


class TokenBucket:
    """A token bucket holding at most ``burst`` tokens, refilled at ``rate_per_s`` tokens per second.

    It starts full: ``burst`` acquisitions succeed at once, then one per ``1 / rate_per_s`` seconds.
    ``now_s`` is any monotonic clock in seconds; a time earlier than one already seen refills nothing
    (the bucket never goes back in time).

    Raises:
        ValueError: ``rate_per_s`` not positive or ``burst`` below 1.
    """

    __slots__ = ("rate_per_s", "burst", "_tokens", "_last_s")

    def __init__(self, rate_per_s: float, burst: int) -> None:
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s must be positive, got {rate_per_s!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._last_s: float | None = None

    def try_acquire(self, now_s: float) -> bool:
        """Take one token if there is one at ``now_s``; ``False`` (and take nothing) if there is not."""
        if self._last_s is None or now_s > self._last_s:
            if self._last_s is not None:
                refill = (now_s - self._last_s) * self.rate_per_s
                self._tokens = min(float(self.burst), self._tokens + refill)
            self._last_s = now_s
        if self._tokens < 1.0 - _TOKEN_SLACK:
            return False
        self._tokens -= 1.0
        return True


class Verdict(enum.StrEnum):
    """What to do with one inbound request (PROTOCOL.md section 5)."""

    ALLOW = "allow"  # handle it
    REJECT = "reject"  # do not handle it; reply error ``rate_limited`` (echoing its id when it has one)
    CLOSE = "close"  # do not handle it; close the connection with 4029 (``CloseCode.RATE_LIMITED``)


class RequestLimiter:
    """One connection's request limit: a ``TokenBucket(limits.requests_per_s, limits.request_burst)`` plus
    the close rule.

    Call ``check(now_s)`` once per inbound text frame, before parsing it, so malformed requests count too.
    Over the rate a request is ``REJECT``; the ``limits.max_rate_limited_in_a_row``-th rejection in a row
    is ``CLOSE`` instead, and every ``check`` after a ``CLOSE`` is ``CLOSE`` as well. An allowed request
    ends the streak.
    """

    __slots__ = ("_bucket", "_max_in_a_row", "rejected_in_a_row")

    def __init__(self, limits: GatewayLimits) -> None:
        self._bucket = TokenBucket(limits.requests_per_s, limits.request_burst)
        self._max_in_a_row = limits.max_rate_limited_in_a_row
        self.rejected_in_a_row = 0  # read-only for callers (e.g. a metric)

    def check(self, now_s: float) -> Verdict:
        """The verdict on one request arriving at ``now_s`` (seconds, monotonic clock)."""
        if self.rejected_in_a_row >= self._max_in_a_row:
            return Verdict.CLOSE
        if self._bucket.try_acquire(now_s):
            self.rejected_in_a_row = 0
            return Verdict.ALLOW
        self.rejected_in_a_row += 1
        return Verdict.CLOSE if self.rejected_in_a_row >= self._max_in_a_row else Verdict.REJECT
