"""feed.gateway.ratelimit against PROTOCOL.md section 5: 20/s sustained, burst 50, 100 in a row -> 4029."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from feed.gateway.protocol import GatewayLimits
from feed.gateway.ratelimit import RequestLimiter, TokenBucket, Verdict

ALLOW, REJECT, CLOSE = Verdict.ALLOW, Verdict.REJECT, Verdict.CLOSE


def _allowed(bucket: TokenBucket, times_s) -> int:
    return sum(bucket.try_acquire(t) for t in times_s)


def test_starts_full_then_refuses():
    bucket = TokenBucket(20.0, 50)
    assert _allowed(bucket, [100.0] * 60) == 50
    assert not bucket.try_acquire(100.0)


# (rate_per_s, burst, times_s, allowed): the bucket is drained by the burst at t=0, then refills.
SUSTAINED = {
    "20/s for 10 s, polled every 1 ms": (20.0, 50, [i / 1000 for i in range(1, 10_001)], 200),
    "20/s for 10 s, polled every 50 ms": (20.0, 50, [i * 0.05 for i in range(1, 201)], 200),
    "20/s polled every 70 ms": (20.0, 50, [i * 0.07 for i in range(1, 1001)], 1000),  # slower than the rate
    "20/s, 100 at once every second": (20.0, 50, [float(s) for s in range(1, 11) for _ in range(100)], 200),
    "3/s for 1 s, polled every 0.1 s": (3.0, 5, [i / 10 for i in range(1, 11)], 3),
    "0.5/s for 10 s": (0.5, 1, [i / 4 for i in range(1, 41)], 5),
    "idle an hour refills only to the burst": (20.0, 50, [3600.0] * 80, 50),
}


@pytest.mark.parametrize(("rate_per_s", "burst", "times_s", "allowed"), SUSTAINED.values(), ids=SUSTAINED.keys())
def test_sustained_rate_after_the_burst(rate_per_s, burst, times_s, allowed):
    bucket = TokenBucket(rate_per_s, burst)
    assert _allowed(bucket, [0.0] * burst) == burst
    assert not bucket.try_acquire(0.0)
    assert _allowed(bucket, times_s) == allowed


def test_exactly_one_token_per_interval():
    bucket = TokenBucket(20.0, 50)
    _allowed(bucket, [0.0] * 50)
    assert not bucket.try_acquire(0.049)
    assert bucket.try_acquire(0.05)
    assert not bucket.try_acquire(0.05)


def test_time_going_backwards_refills_nothing():
    bucket = TokenBucket(20.0, 2)
    assert _allowed(bucket, [10.0, 10.0]) == 2
    assert not bucket.try_acquire(5.0)
    assert not bucket.try_acquire(10.04)  # measured from 10.0, not from 5.0
    assert bucket.try_acquire(10.05)


@pytest.mark.parametrize(("rate_per_s", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_bucket_refuses_bad_parameters(rate_per_s, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate_per_s, burst)


@given(
    rate_per_s=st.floats(0.1, 1000.0),
    burst=st.integers(1, 100),
    gaps_s=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=300),
)
def test_never_more_than_burst_plus_rate_times_elapsed(rate_per_s, burst, gaps_s):
    bucket = TokenBucket(rate_per_s, burst)
    now_s, allowed = 0.0, 0
    for gap_s in gaps_s:
        now_s += gap_s
        allowed += bucket.try_acquire(now_s)
    assert allowed <= burst + rate_per_s * now_s + 1e-6


# ---------------------------------------------------------------------------------------------------
# RequestLimiter: the default limits, then the streak rules with small ones.


def test_default_limiter_rejects_then_closes_on_the_100th_in_a_row():
    limiter = RequestLimiter(GatewayLimits())
    assert [limiter.check(0.0) for _ in range(50)] == [ALLOW] * 50
    assert [limiter.check(0.0) for _ in range(99)] == [REJECT] * 99
    assert limiter.rejected_in_a_row == 99
    assert limiter.check(0.0) is CLOSE


def test_close_is_final():
    limiter = RequestLimiter(GatewayLimits(request_burst=1, max_rate_limited_in_a_row=2))
    assert [limiter.check(0.0) for _ in range(3)] == [ALLOW, REJECT, CLOSE]
    assert limiter.check(3600.0) is CLOSE  # a full bucket does not reopen a closed connection


def test_an_allowed_request_ends_the_streak():
    limiter = RequestLimiter(GatewayLimits(requests_per_s=20.0, request_burst=50))
    assert [limiter.check(0.0) for _ in range(50 + 99)] == [ALLOW] * 50 + [REJECT] * 99
    assert limiter.check(0.05) is ALLOW
    assert limiter.rejected_in_a_row == 0
    assert [limiter.check(0.05) for _ in range(100)] == [REJECT] * 99 + [CLOSE]


def test_a_client_at_the_sustained_rate_is_never_rejected():
    limiter = RequestLimiter(GatewayLimits())
    assert {limiter.check(i * 0.05) for i in range(10_000)} == {ALLOW}


VERDICTS = {
    # (requests_per_s, request_burst, max_rate_limited_in_a_row, times_s, verdicts)
    "burst 1, close on 3rd": (1.0, 1, 3, [0, 0, 0, 0], [ALLOW, REJECT, REJECT, CLOSE]),
    "refill interrupts the streak": (
        1.0, 1, 3, [0, 0, 0, 1, 1, 1, 1], [ALLOW, REJECT, REJECT, ALLOW, REJECT, REJECT, CLOSE],
    ),
    "close on the first rejection": (1.0, 2, 1, [0, 0, 0], [ALLOW, ALLOW, CLOSE]),
    "spaced requests never rejected": (2.0, 1, 1, [0, 0.5, 1.0, 1.5], [ALLOW] * 4),
}


@pytest.mark.parametrize(("rate", "burst", "in_a_row", "times_s", "verdicts"), VERDICTS.values(), ids=VERDICTS.keys())
def test_verdict_sequences(rate, burst, in_a_row, times_s, verdicts):
    limits = GatewayLimits(requests_per_s=rate, request_burst=burst, max_rate_limited_in_a_row=in_a_row)
    limiter = RequestLimiter(limits)
    assert [limiter.check(float(t)) for t in times_s] == verdicts
