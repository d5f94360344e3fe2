"""The SDK's region policy (feed.client.regions.RegionPolicy) fed with explicit times: where a move goes, how
long it lasted, and the fail-back hysteresis."""
from __future__ import annotations

import pytest

from feed.client.regions import MoveReason, RegionMoved, RegionPolicy

A = ["ws://a1/v1/ws", "ws://a2/v1/ws"]
B = ["ws://b1/v1/ws"]
C = ["ws://c1/v1/ws"]


def arrived(p: RegionPolicy, now_s: float) -> tuple[int, str]:
    target = p.target()
    p.connected(now_s)
    return target


def test_starts_in_the_preferred_region_and_rotates_urls_inside_it() -> None:
    p = RegionPolicy([A, B])
    assert p.target() == (0, A[0])
    p.leave(MoveReason.DISCONNECT, 1.0)
    p.leave(MoveReason.DISCONNECT, 2.0)  # B failed too: back to A, its next URL
    assert p.target() == (0, A[1])


@pytest.mark.parametrize("reason", [r for r in MoveReason if r is not MoveReason.FAILBACK])
def test_every_fault_reason_moves_to_the_next_region_and_reports_reason_and_duration(reason) -> None:
    p = RegionPolicy([A, B, C])
    arrived(p, 0.0)
    p.leave(reason, 10.0)
    assert arrived(p, 10.2) == (1, B[0])
    moved = p.recovered(10.7, {"x": True})
    assert (moved.reason, moved.from_region, moved.to_region, moved.duration_s) == (reason, 0, 1, pytest.approx(0.7))


def test_move_duration_covers_every_failed_connect_and_the_first_reason_stays() -> None:
    p = RegionPolicy([A, B, C])
    arrived(p, 0.0)
    p.leave(MoveReason.STALE, 10.0)
    p.target()
    p.connect_failed(10.5)  # B refused: on to C
    assert arrived(p, 11.0) == (2, C[0])
    moved = p.recovered(11.5, {"x": True, "y": False})
    assert moved == RegionMoved(0, 2, A[0], C[0], MoveReason.STALE, 1.5, {"x": True, "y": False})
    assert moved.resumed == 1 and moved.snapshots == 1
    assert p.recovered(12.0, {}) is None  # one event per move


def test_fail_back_needs_time_away_and_an_unbroken_ready_spell_of_the_preferred_region() -> None:
    p = RegionPolicy([A, B], failback_after_s=5.0)
    arrived(p, 0.0)
    p.leave(MoveReason.NOT_READY, 1.0)
    arrived(p, 2.0)
    p.recovered(2.0, {})
    p.preferred_health(True, 2.0)
    assert not p.should_fail_back(6.9)      # away 4.9 s
    p.preferred_health(False, 5.0)          # A flaps: the ready spell restarts
    p.preferred_health(True, 6.0)
    assert not p.should_fail_back(10.9)
    assert p.should_fail_back(11.0) and p.away
    p.leave(MoveReason.FAILBACK, 11.0)
    assert arrived(p, 11.1) == (0, A[1]) and not p.away
    assert p.recovered(11.3, {}).reason is MoveReason.FAILBACK
    p.preferred_health(True, 12.0)
    assert not p.should_fail_back(100.0)    # home already


def test_one_region_only_rotates_urls() -> None:
    p = RegionPolicy([A])
    arrived(p, 0.0)
    p.leave(MoveReason.SHUTDOWN, 1.0)
    assert p.target() == (0, A[1])


def test_bad_regions_are_refused() -> None:
    for regions in ([], [A, []]):
        with pytest.raises(ValueError):
            RegionPolicy(regions)
    with pytest.raises(ValueError):
        RegionPolicy([A], failback_after_s=-1)
