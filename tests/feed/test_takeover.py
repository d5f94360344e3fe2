"""The takeover decision (feed.takeover.StepTracker) fed with the standby's and the leader's delta streams:
continue the leader's epoch only when the standby's book is provably at the leader's last seq."""
from __future__ import annotations

from feed.takeover import Continue, NewEpoch, StepTracker, WaitFor, delta_key

I = "coinbase:BAND-GBP"


def stream(n: int, start: int = 0) -> list[tuple[list, int]]:
    """``n`` distinct deltas: (wire changes, checksum)."""
    return [([["bid", f"1.{i:04d}", "2"]], 1000 + i) for i in range(start, start + n)]


def feed(t: StepTracker, deltas, *, local_from: int, leader_from: int, epoch: str = "E1", leader_n: int | None = None):
    for k, (changes, checksum) in enumerate(deltas):
        t.local(I, local_from + k, delta_key(changes, checksum), checksum)
    for k, (changes, checksum) in enumerate(deltas[:leader_n]):
        t.leader(I, epoch, leader_from + k, delta_key(changes, checksum), checksum)


def test_in_step_standby_continues_the_leaders_epoch_at_its_seq() -> None:
    t = StepTracker(confirm_after=2)
    feed(t, stream(10), local_from=1, leader_from=101)
    assert t.offset(I) == 100 and t.in_step() == {I: True}
    assert t.plan(I, 10) == Continue("E1", 100, 10)  # nothing to republish


def test_standby_ahead_republishes_what_the_leader_never_sent() -> None:
    t = StepTracker(confirm_after=2)
    feed(t, stream(10), local_from=1, leader_from=101, leader_n=7)  # the leader died after its 7th
    assert t.plan(I, 10) == Continue("E1", 100, 7)  # local 8..10 go out as 108..110


def test_standby_behind_waits_for_the_leaders_last_seq() -> None:
    t = StepTracker(confirm_after=2)
    deltas = stream(10)
    feed(t, deltas[:6], local_from=1, leader_from=101)
    for k, (changes, checksum) in enumerate(deltas[6:], start=7):
        t.leader(I, "E1", 100 + k, delta_key(changes, checksum), checksum)
    assert t.plan(I, 6) == WaitFor(10)


def test_no_confirmed_offset_is_a_new_epoch() -> None:
    t = StepTracker(confirm_after=3)
    feed(t, stream(2), local_from=1, leader_from=101)
    assert isinstance(t.plan(I, 2), NewEpoch) and t.offset(I) is None
    assert t.plan("coinbase:NEVER", 0) == NewEpoch("never seen from the leader")


def test_disagreement_drops_the_offset_and_a_checksum_mismatch_is_a_new_epoch() -> None:
    t = StepTracker(confirm_after=1)
    deltas = stream(5)
    feed(t, deltas, local_from=1, leader_from=11)
    assert t.offset(I) == 10
    other = ([["ask", "9.9", "1"]], 77)
    t.leader(I, "E1", 16, delta_key(*other), 77)   # the leader's seq 16 ...
    t.local(I, 6, delta_key([["bid", "1.0", "1"]], 55), 55)  # ... is not our local 6
    assert t.offset(I) is None
    assert isinstance(t.plan(I, 6), NewEpoch)


def test_a_new_leader_epoch_forgets_what_was_learnt() -> None:
    t = StepTracker(confirm_after=1)
    feed(t, stream(5), local_from=1, leader_from=11)
    assert t.offset(I) == 10
    changes, checksum = stream(1, start=50)[0]
    t.leader(I, "E2", 1, delta_key(changes, checksum), checksum)
    assert t.offset(I) is None


def test_leader_seq_out_of_the_ring_is_a_new_epoch() -> None:
    t = StepTracker(ring=4, confirm_after=1)
    deltas = stream(12)
    feed(t, deltas[:6], local_from=1, leader_from=101)
    for k, (changes, checksum) in enumerate(deltas[6:], start=7):  # the standby runs on, the leader is silent
        t.local(I, k, delta_key(changes, checksum), checksum)
    plan = t.plan(I, 12)
    assert isinstance(plan, NewEpoch) and "ring" in plan.reason, plan


def test_find_in_a_ring_with_holes_and_outside_it() -> None:
    from collections import deque

    ring = deque((s, s * 10, s) for s in (3, 4, 7, 9, 10, 15))
    assert StepTracker._find(ring, 9) == (9, 90, 9) and StepTracker._find(ring, 3) == (3, 30, 3)
    assert StepTracker._find(ring, 15) == (15, 150, 15)
    assert all(StepTracker._find(ring, s) is None for s in (0, 2, 5, 8, 11, 16, 10 ** 9))
    assert StepTracker._find(deque(), 1) is None
