"""The publishing lease machine (feed.lease) fed with reads, write results and explicit times: every row of
its transition table, the expiry and fence rules, and the safety property (two leaders never may publish at
once) against a simulated KV with delayed, lost and reordered replies."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feed.lease import TRANSITIONS, Acquire, BecameLeader, Input, LeaseMachine, LostLease, Renew, Role

TTL = 2.0


def leader(holder: str = "a", revision: int = 5, at_s: float = 0.0) -> LeaseMachine:
    m = LeaseMachine(holder, TTL)
    m.observe(None, None, at_s)
    assert m.next_action(at_s) == Acquire(None)
    m.write_sent()
    assert m.write_ok(revision, at_s) == [BecameLeader(revision)]
    return m


def test_every_role_input_pair_has_a_row() -> None:
    assert set(TRANSITIONS) == {(r, i) for r in Role for i in Input}


@pytest.mark.parametrize("role, event", sorted(TRANSITIONS, key=lambda k: (k[0].value, k[1].value)),
                         ids=lambda v: v.value)
def test_each_transition_reaches_its_row(role: Role, event: Input) -> None:
    m = leader() if role is Role.LEADER else LeaseMachine("a", TTL)
    if role is Role.STANDBY:
        m.observe(3, "b", 0.0)
    events = {
        Input.OBSERVE: lambda: m.observe(m.revision, m.entry_holder, 0.5),
        Input.OBSERVE_TAKEN: lambda: m.observe((m.revision or 0) + 1, "b", 0.5),
        Input.WRITE_OK: lambda: m.write_ok((m.revision or 0) + 1, 0.5),
        Input.WRITE_CONFLICT: lambda: m.write_failed(True, 0.5),
        Input.WRITE_UNREACHABLE: lambda: m.write_failed(False, 0.5),
        Input.RELEASE: m.release,
    }[event]()
    assert m.role is TRANSITIONS[(role, event)]
    changed = m.role is not role
    assert bool(events) == changed, events


def test_standby_takes_over_only_after_the_revision_is_unchanged_for_ttl_on_its_own_clock() -> None:
    m = LeaseMachine("b", TTL)
    assert m.next_action(0.0) is None  # nothing read yet: never write blind
    m.observe(7, "a", 10.0)
    assert m.next_action(10.0 + TTL - 0.01) is None
    m.observe(8, "a", 11.0)  # renewed: the expiry clock restarts from when we saw it
    assert m.next_action(10.0 + TTL) is None
    assert m.next_action(11.0 + TTL) == Acquire(8)
    m.write_sent()
    assert m.next_action(11.0 + TTL) is None  # one write in flight at most
    assert m.write_ok(9, 13.1) == [BecameLeader(9)] and m.role is Role.LEADER


def test_released_or_missing_entry_is_taken_at_once() -> None:
    m = LeaseMachine("b", TTL)
    m.observe(None, None, 0.0)
    assert m.next_action(0.0) == Acquire(None)
    m2 = LeaseMachine("b", TTL)
    m2.observe(4, None, 0.0)  # a delete marker: released by its holder
    assert m2.next_action(0.0) == Acquire(4)


def test_leader_renews_against_its_own_revision_and_fences_itself_when_renewals_fail() -> None:
    m = leader(revision=5, at_s=0.0)
    assert m.may_publish(0.0) and m.next_action(TTL / 4 - 0.01) is None
    assert m.next_action(TTL / 4) == Renew(5)
    m.write_sent()
    m.write_failed(False, TTL / 4 + 0.1)  # unreachable: still leader, the fence runs on
    assert m.role is Role.LEADER and m.may_publish(TTL * 0.75 - 0.01)
    assert not m.may_publish(TTL * 0.75)  # sent_at + ttl * safety
    m.write_sent()
    m.write_ok(6, TTL)  # a renewal that lands restores it
    assert m.may_publish(TTL + 0.1) and m.next_action(TTL + TTL / 4) == Renew(6)


def test_leader_steps_down_on_conflict_or_another_holder_and_ignores_stale_reads() -> None:
    m = leader(revision=5)
    assert m.observe(4, "b", 0.1) == [] and m.role is Role.LEADER and m.revision == 5  # stale read
    assert m.observe(6, "b", 0.2) == [LostLease("taken")] and not m.may_publish(0.2)
    m2 = leader(revision=5)
    m2.write_sent()
    assert m2.write_failed(True, 0.6) == [LostLease("conflict")] and m2.role is Role.STANDBY


def test_bad_parameters_are_refused() -> None:
    for kwargs in ({"ttl_s": 0}, {"ttl_s": 1, "renew_every_s": 1}, {"ttl_s": 1, "safety": 1.0}):
        with pytest.raises(ValueError):
            LeaseMachine("a", **kwargs)


class SimKv:
    """One KV key with conditional writes, as JetStream applies them: create (only when absent) and update
    against the last revision."""

    def __init__(self) -> None:
        self.revision = 0
        self.holder: str | None = None

    def write(self, holder: str, expected: int | None) -> int | None:
        if (expected is None and self.holder is None and self.revision == 0) or expected == self.revision != 0:
            self.revision += 1
            self.holder = holder
            return self.revision
        return None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ab"), st.sampled_from(["read", "write"]),
                          st.floats(0.0, 0.6), st.floats(0.0, 1.5), st.booleans()), min_size=5, max_size=120))
def test_two_contenders_never_both_may_publish(schedule) -> None:
    """Random interleavings: every read and write reply is delayed (up to 1.5 s, i.e. beyond the TTL's
    fence), some write replies are lost after the write landed; the clock only moves forward."""
    kv = SimKv()
    machines = {h: LeaseMachine(h, TTL) for h in "ab"}
    pending: list[tuple[float, str, object]] = []  # (deliver_at, holder, reply)
    now = 0.0

    def check(t: float) -> None:
        assert sum(m.may_publish(t) for m in machines.values()) <= 1, (t, {h: vars(m) for h, m in machines.items()})

    for holder, op, advance, delay, lose in schedule:
        now += advance
        for item in sorted(p for p in pending if p[0] <= now):
            pending.remove(item)
            at, h, reply = item
            kind, *rest = reply
            if kind == "read":
                machines[h].observe(rest[0], rest[1], at)
            elif kind == "ok":
                machines[h].write_ok(rest[0], rest[1])
            else:
                machines[h].write_failed(kind == "conflict", at)
            check(at)
        m = machines[holder]
        if op == "read":
            pending.append((now + delay, holder, ("read", kv.revision or None, kv.holder)))
        else:
            action = m.next_action(now)
            if action is None:
                continue
            m.write_sent()
            rev = kv.write(holder, action.expected_revision)  # lands now, the reply comes later
            reply = ("lost",) if lose else (("ok", rev, now) if rev is not None else ("conflict",))
            pending.append((now + delay, holder, reply))
        check(now)
