"""The gateway's timer wheel (``feed.gateway.timers``): a timer comes back once, never early, at most one
slot late; and the gateway files every connection's next heartbeat at its own phase (``Gateway.arm``)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from feed.gateway.app import HEARTBEAT_SLOTS, Gateway
from feed.gateway.config import GatewayConfig
from feed.gateway.session import Session
from feed.gateway.timers import TimerWheel, slice_gap_ns

SLOT = 50


def test_a_timer_comes_back_once_at_the_first_slot_at_or_after_its_due_time():
    w = TimerWheel(SLOT, 1000)
    w.add("a", 1010)
    w.add("b", 1050)
    w.add("past", 10)  # due before the wheel's time: the current slot
    assert len(w) == 3
    assert w.due(1000) == ["past"]
    assert w.due(1049) == []
    assert w.due(1050) == ["a", "b"]
    assert w.due(10_000) == [] and len(w) == 0


def test_a_slot_of_timers_too_many_for_one_slice_is_spread_over_the_slot():
    assert slice_gap_ns(250, 64, 50_000_000) == 12_500_000  # 4 slices: one every quarter slot
    assert slice_gap_ns(65, 64, 50_000_000) == 25_000_000
    assert slice_gap_ns(64, 64, 50_000_000) == 0  # one slice: nothing to spread
    assert slice_gap_ns(0, 64, 50_000_000) == 0
    with pytest.raises(ValueError, match="slice_size"):
        slice_gap_ns(10, 0, 50_000_000)
    with pytest.raises(ValueError, match="slot_ns"):
        slice_gap_ns(10, 8, 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=40), st.lists(st.integers(1, 400), min_size=1, max_size=60))
def test_every_timer_comes_back_exactly_once_never_early_at_most_one_slot_late(dues, steps):
    w = TimerWheel(SLOT, 0)
    for i, due in enumerate(dues):
        w.add(i, due)
    now, seen = 0, {}
    for step in steps + [6000]:
        now += step
        for i in w.due(now):
            assert i not in seen
            seen[i] = now
    assert sorted(seen) == list(range(len(dues))) and len(w) == 0
    calls = [0]
    for step in steps + [6000]:
        calls.append(calls[-1] + step)
    for i, due in enumerate(dues):
        assert seen[i] >= due  # never early
        slot_start = -(-due // SLOT) * SLOT
        assert seen[i] == min(t for t in calls[1:] if t >= slot_start)  # the first call once its slot began


def test_a_long_stall_hands_back_every_filled_slot_in_order():
    w = TimerWheel(SLOT, 0)
    for due in (10_000_000, 75, 5_000, 120):
        w.add(due, due)
    assert w.due(20_000_000) == [75, 120, 5_000, 10_000_000]


def test_slot_width_must_be_positive():
    with pytest.raises(ValueError):
        TimerWheel(0, 0)


class _Conn:
    def __init__(self, session):
        self.session = session
        self._gone = False


class _Token:
    def __init__(self, expires_at_ns):
        self.expires_at_ns = expires_at_ns

    def allows(self, instrument):
        return True


def test_each_connection_is_due_one_interval_after_its_own_last_frame_or_at_its_token_expiry():
    gw = Gateway(GatewayConfig(), CollectorRegistry())
    interval = gw._heartbeat_ns
    slot = gw.timers.slot_ns
    assert slot * HEARTBEAT_SLOTS == interval
    t0 = gw.timers.cursor * slot + slot
    conns = [_Conn(Session(gw, gw.limits, t0 + k * interval // 10)) for k in range(10)]  # ten phases
    for c in conns:
        gw.arm(c, c.session.last_send_ns)
    expiring = _Conn(Session(gw, gw.limits, t0, authorization=_Token(t0 + interval // 2)))
    gw.arm(expiring, t0)
    assert gw.timers.due(t0 + interval // 2 + slot) == [expiring]
    fired = []
    for k in range(10):  # each phase's heartbeat comes due in its own slot, not with the others
        fired.append(gw.timers.due(t0 + interval + k * interval // 10))
    assert fired == [[c] for c in conns]
    # a heartbeat due but waiting behind its writer: looked at again a quarter interval later
    late = conns[0]
    gw.arm(late, t0 + 3 * interval)
    assert gw.timers.due(t0 + 3 * interval + interval // 4 - slot) == []
    assert gw.timers.due(t0 + 3 * interval + interval // 4 + slot) == [late]
    late.session.closed()
    gw.arm(late, t0 + 4 * interval)  # a closed session has no more timers
    assert len(gw.timers) == 0
