"""``feed.gateway.liveness``: the gateway's WebSocket ping rule, fed times (no socket, no clock)."""
from __future__ import annotations

import pytest

from feed.gateway.liveness import NEVER_NS, PING_FRAME, TRANSITIONS, Liveness, LivenessInput, PeerLiveness

S = 1_000_000_000


def test_the_ping_frame_is_an_empty_unmasked_final_ping():
    assert PING_FRAME[0] == 0x80 | 0x9 and PING_FRAME[1] == 0 and len(PING_FRAME) == 2


def test_the_table_covers_every_state_and_input():
    assert set(TRANSITIONS) == {(s, i) for s in Liveness for i in LivenessInput}


def test_a_ping_is_due_one_interval_after_the_peer_was_last_heard():
    live = PeerLiveness(10.0, 0)
    assert live.on_timer(10 * S - 1) is None
    live.heard(3 * S)  # a request in between moves the ping
    assert live.on_timer(10 * S) is None and live.on_timer(13 * S - 1) is None
    assert live.on_timer(13 * S) is Liveness.PINGED
    assert live.on_timer(13 * S + 1) is None  # one ping out at a time


def test_an_answer_within_half_the_interval_keeps_the_peer():
    live = PeerLiveness(10.0, 0)
    assert live.on_timer(10 * S) is Liveness.PINGED
    live.heard(15 * S - 1)
    assert live.state is Liveness.HEARD
    assert live.on_timer(20 * S) is None
    assert live.on_timer(25 * S - 1) is Liveness.PINGED  # next ping one interval after the answer


def test_no_answer_within_half_the_interval_is_dead_once_and_stays_dead():
    live = PeerLiveness(10.0, 0)
    assert live.on_timer(10 * S) is Liveness.PINGED
    assert live.on_timer(15 * S - 1) is None
    assert live.on_timer(15 * S) is Liveness.DEAD
    assert live.on_timer(100 * S) is None  # reported once: the adapter drops it once
    live.heard(101 * S)  # a frame read after the drop revives nothing
    assert live.state is Liveness.DEAD and live.on_timer(200 * S) is None


@pytest.mark.parametrize("interval_s", [0.0, -1.0])
def test_an_interval_of_zero_turns_pings_off(interval_s):
    live = PeerLiveness(interval_s, 0)
    assert live.due_ns == NEVER_NS
    live.heard(5 * S)
    assert live.due_ns == NEVER_NS and live.on_timer(10**6 * S) is None
