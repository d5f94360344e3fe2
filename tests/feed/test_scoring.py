"""Table tests of the pure provider scorer: explicit times, no clock, no I/O."""
from __future__ import annotations

import pytest

from feed.providers.scoring import (
    TRANSITIONS,
    Fault,
    Health,
    Scorer,
    ScoringPolicy,
    SwitchReason,
    Transition,
)

S = 1_000_000_000  # ns per second
MS = 1_000_000
POLICY = ScoringPolicy(stale_after_s=0.5, max_lag_s=1.0, probation_s=1.0, resample_interval_s=5.0,
                       switch_margin=0.2, switch_hold_s=3.0, min_dwell_s=2.0, min_samples=5)


def stream(scorer: Scorer, names, t0_ns: int, t1_ns: int, *, step_ns: int = 10 * MS,
           behind_ns: dict[str, int] | None = None, latency_ns: dict[str, int] | None = None,
           silent: set[str] = frozenset(), evaluate: bool = True):
    """Every provider in ``names`` delivers one message per ``step_ns`` from t0 to t1; the venue event time
    is the send time; a provider in ``behind_ns`` serves that far in the past; ``latency_ns`` adds delay."""
    behind_ns = behind_ns or {}
    latency_ns = latency_ns or {}
    decisions = []
    t = t0_ns
    while t < t1_ns:
        for name in names:
            if name in silent:
                continue
            scorer.message(name, t, t - latency_ns.get(name, MS) - behind_ns.get(name, 0))
        if evaluate:
            decisions.append(scorer.evaluate(t))
        t += step_ns
    return decisions


def started(*names: str, weights: dict[str, float] | None = None, policy: ScoringPolicy = POLICY) -> Scorer:
    weights = weights or {}
    sc = Scorer([(n, weights.get(n, 1.0)) for n in names], policy)
    for n in names:
        sc.connected(n, 0)
    return sc


def test_transition_table_is_the_documented_one():
    assert TRANSITIONS[(Health.DOWN, Transition.CONNECTED)] is Health.PROBATION
    assert TRANSITIONS[(Health.PROBATION, Transition.PASSED)] is Health.HEALTHY
    assert TRANSITIONS[(Health.EXCLUDED, Transition.RESAMPLE)] is Health.PROBATION
    assert all(TRANSITIONS[(h, Transition.DISCONNECTED)] is Health.DOWN for h in Health)
    assert (Health.DOWN, Transition.FAULT) not in TRANSITIONS


@pytest.mark.parametrize("names", [("a",), ("a", "b", "c")])
def test_initial_selection_then_probation_passes(names):
    sc = started(*names)
    d = sc.evaluate(0)
    assert d.selected is None and not d.switched  # nobody delivered data yet
    decisions = stream(sc, names, 10 * MS, int(1.5 * S))
    first = next(d for d in decisions if d.switched)
    assert first.selected == "a" and first.reason is SwitchReason.INITIAL
    assert [d for d in decisions if d.switched] == [first]  # no flapping among equals
    assert all(sc.health(n) is Health.HEALTHY for n in names)


# name, fault knob, expected exclusion fault, expected switch reason
CASES = [
    ("stall while alive", dict(silent={"a"}), Fault.STALE, SwitchReason.STALE),
    ("serving 3 s behind", dict(behind_ns={"a": 3 * S}), Fault.LAG, SwitchReason.LAG),
]


@pytest.mark.parametrize("case,knob,fault,reason", CASES, ids=[c[0] for c in CASES])
def test_fault_of_the_selected_provider_switches_with_its_reason(case, knob, fault, reason):
    sc = started("a", "b", "c")
    stream(sc, "abc", 10 * MS, 2 * S)
    assert sc.selected == "a"
    for n in "abc":
        sc.alive(n, 2 * S)
    decisions = stream(sc, "abc", 2 * S, 6 * S, **knob)
    switch = next(d for d in decisions if d.switched)
    assert switch.previous == "a" and switch.selected == "b" and switch.reason is reason
    assert ("a", fault) in switch.new_faults
    assert sc.health("a") is Health.EXCLUDED and switch.providers["a"].score == 0.0


def test_stall_detected_within_stale_bound_plus_one_step():
    sc = started("a", "b")
    stream(sc, "ab", 10 * MS, 2 * S)
    decisions = stream(sc, "ab", 2 * S, 4 * S, silent={"a"})
    switch = next(d for d in decisions if d.switched)
    t_switch = 2 * S + decisions.index(switch) * 10 * MS
    assert t_switch - 2 * S <= int(0.5 * S) + 30 * MS


def test_lag_measured_in_venue_time_and_a_quiet_market_lags_nobody():
    sc = started("a", "b")
    stream(sc, "ab", 10 * MS, S, behind_ns={"b": 400 * MS})
    assert 0.35 <= sc.lag_s("b", S) <= 0.45
    assert sc.lag_s("a", S) == 0.0
    # b never delivered the last 400 ms of events: once the market goes quiet it is stale, a is not
    quiet = sc.evaluate(11 * S)
    assert quiet.providers["a"].health is Health.HEALTHY and quiet.new_faults == (("b", Fault.STALE),)
    # both equal, then nothing at all for 10 s: the frontier does not move, nobody is stale
    sc2 = started("a", "b")
    stream(sc2, "ab", 10 * MS, S)
    quiet = sc2.evaluate(11 * S)
    assert not quiet.new_faults and quiet.providers["b"].health is Health.HEALTHY


def test_disconnect_switches_at_once_and_reconnect_goes_through_probation():
    sc = started("a", "b")
    stream(sc, "ab", 10 * MS, 2 * S)
    sc.disconnected("a", 2 * S)
    d = sc.evaluate(2 * S)
    assert d.switched and d.selected == "b" and d.reason is SwitchReason.DISCONNECT
    sc.connected("a", 3 * S)
    assert sc.health("a") is Health.PROBATION
    stream(sc, "ab", 3 * S, int(4.5 * S))
    assert sc.health("a") is Health.HEALTHY and sc.selected == "b"  # equal scores: no switch back


def test_all_down_then_reconnect():
    sc = started("a")
    stream(sc, "a", 10 * MS, S)
    sc.disconnected("a", S)
    d = sc.evaluate(S)
    assert d.selected is None and d.reason is SwitchReason.DISCONNECT
    sc.connected("a", 2 * S)
    d = stream(sc, "a", 2 * S, int(2.1 * S))[0]
    assert d.selected == "a" and d.reason is SwitchReason.RECONNECT


@pytest.mark.parametrize("kind", ["error", "throttled"])
def test_error_and_throttled_rates_exclude(kind):
    sc = started("a", "b")
    stream(sc, "ab", 10 * MS, 2 * S)
    t = 2 * S
    for i in range(1000):  # a's replies are now mostly errors / 429s
        getattr(sc, kind)("a", t + i * MS)
    d = sc.evaluate(t + S)
    fault = Fault.ERROR_RATE if kind == "error" else Fault.THROTTLED
    assert ("a", fault) in d.new_faults and d.selected == "b" and d.reason.value == fault.value


def test_too_few_samples_never_exclude():
    sc = started("a", "b")
    stream(sc, "ab", 10 * MS, int(1.5 * S), evaluate=False)
    sc.error("a", int(1.5 * S))
    d = sc.evaluate(2 * S)
    assert sc.health("a") is not Health.EXCLUDED and d.providers["a"].error_rate < 0.5


def test_resampling_readmits_a_recovered_provider_and_keeps_excluding_a_broken_one():
    sc = started("a", "b", "c")
    stream(sc, "abc", 10 * MS, 2 * S)
    stream(sc, "abc", 2 * S, 3 * S, silent={"a", "c"})
    assert sc.health("a") is Health.EXCLUDED and sc.health("c") is Health.EXCLUDED
    # a recovers, c stays silent; resample at exclusion + 5 s, probation 1 s
    stream(sc, "ab", 3 * S, 10 * S, silent=set())
    assert sc.health("a") is Health.HEALTHY
    assert sc.health("c") is Health.EXCLUDED


def test_hysteresis_margin_hold_and_dwell():
    weights = {"a": 1.0, "b": 1.0}
    sc = started("a", "b", weights=weights)
    stream(sc, "ab", 10 * MS, 2 * S, latency_ns={"a": 10 * MS, "b": 10 * MS})
    assert sc.selected == "a"
    # a becomes slower, but only 10%: under the margin, never a switch
    d = stream(sc, "ab", 2 * S, 8 * S, latency_ns={"a": 11 * MS, "b": 10 * MS})
    assert not any(x.switched for x in d)
    # a becomes 3x slower: a switch, but only after the hold time
    start = 8 * S
    d = stream(sc, "ab", start, 20 * S, latency_ns={"a": 30 * MS, "b": 10 * MS})
    switches = [(i, x) for i, x in enumerate(d) if x.switched]
    assert len(switches) == 1
    i, x = switches[0]
    assert x.selected == "b" and x.reason is SwitchReason.BETTER_SCORE
    assert start + i * 10 * MS - start >= 3 * S  # held 3 s (the latency window needed time to move, too)


def test_weight_scales_the_score():
    sc = started("a", "b", weights={"a": 1.0, "b": 2.0})
    d = stream(sc, "ab", 10 * MS, int(1.5 * S))
    assert d[-1].providers["a"].score == pytest.approx(d[-1].providers["b"].score / 2, rel=0.05)


def test_external_integrity_fault_excludes_now():
    sc = started("a", "b")
    stream(sc, "ab", 10 * MS, 2 * S)
    sc.fault("a", Fault.INTEGRITY, 2 * S)
    d = sc.evaluate(2 * S)
    assert d.switched and d.selected == "b" and d.reason is SwitchReason.INTEGRITY


def test_only_provider_excluded_is_kept():
    sc = started("a")
    stream(sc, "a", 10 * MS, 2 * S)
    d = stream(sc, "a", 2 * S, 5 * S, behind_ns={"a": 0})
    sc.fault("a", Fault.INTEGRITY, 5 * S)
    d = sc.evaluate(5 * S)
    assert d.selected == "a" and not d.switched


def test_bad_policy_and_weights_are_refused():
    with pytest.raises(ValueError, match="weight"):
        Scorer([("a", 0)])
    with pytest.raises(ValueError, match="at least one"):
        Scorer([])
    with pytest.raises(ValueError, match="max_lag_s"):
        ScoringPolicy(max_lag_s=0)


def test_a_provider_whose_data_waits_in_our_own_queue_is_not_judged_stale():
    sc = started("a", "b")
    stream(sc, "ab", 10 * MS, 2 * S)
    stream(sc, "ab", 2 * S, 3 * S, silent={"b"}, evaluate=False)
    d = sc.evaluate(3 * S, busy={"b"})
    assert not d.new_faults and sc.health("b") is Health.HEALTHY
    d = sc.evaluate(3 * S)
    assert d.new_faults == (("b", Fault.STALE),)
