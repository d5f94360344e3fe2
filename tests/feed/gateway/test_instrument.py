"""The instrument state machine fed with data and explicit times: every transition of its table."""
from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest

from feed.gateway import instrument as im
from feed.gateway.framing import frame_payload
from feed.gateway.instrument import TRANSITIONS, Input, InstrumentMachine, State
from feed.wire import ResyncReason, Status
from tests.feed.gateway.conftest import INST, Ingest

T0 = 1_700_000_000_000_000_000


def live(ingest: Ingest | None = None) -> tuple[InstrumentMachine, Ingest]:
    ingest = ingest or Ingest()
    m = InstrumentMachine(INST, ring_size=16)
    assert [type(a) for a in m.start()] == [im.RequestSnapshot]
    out = m.on_snapshot_reply(ingest.snapshot(), T0)
    assert m.state is State.LIVE and [type(a) for a in out] == [im.ReleaseParked]
    return m, ingest


def kinds(actions: list) -> list[type]:
    return [type(a) for a in actions]


# -- one driver per (state, input): brings a machine to ``state``, feeds ``input``, checks actions -------


def recovering() -> tuple[InstrumentMachine, Ingest]:
    m, ing = live()
    ing.delta(("bid", "0.51", "1"))  # lost
    out = m.on_message(ing.delta(("bid", "0.52", "1")), T0)
    assert kinds(out) == [im.Resync, im.RequestSnapshot] and m.state is State.RECOVERING
    return m, ing


def suspect() -> tuple[InstrumentMachine, Ingest]:
    m, ing = live()
    assert m.on_directory(ing.epoch, ing.seq + 1, T0) == [] and m.state is State.SUSPECT
    return m, ing


def starting() -> tuple[InstrumentMachine, Ingest]:
    m = InstrumentMachine(INST)
    m.start()
    return m, Ingest()


def start_in(state: State) -> tuple[InstrumentMachine, Ingest]:
    return {State.AWAITING_SNAPSHOT: starting, State.LIVE: live, State.SUSPECT: suspect,
            State.RECOVERING: recovering}[state]()


def feed(m: InstrumentMachine, ing: Ingest, event: Input) -> list:
    if event is Input.DELTA:
        return m.on_message(ing.delta(("ask", "0.56", "3")), T0)
    if event is Input.DUPLICATE:
        payload = ing.delta(("ask", "0.57", "3"))
        m.on_message(payload, T0)
        return m.on_message(payload, T0)
    if event is Input.BREAK:
        ing.delta(("bid", "0.49", "1"))  # lost
        return m.on_message(ing.delta(("bid", "0.48", "1")), T0)
    if event is Input.SNAPSHOT:
        return m.on_snapshot_reply(ing.snapshot(), T0)
    if event is Input.SNAPSHOT_FAILED:
        return m.on_snapshot_failed(T0)
    if event is Input.DIRECTORY_AHEAD:
        if m.state is State.SUSPECT:  # the first announced seq arrived meanwhile: only suspicious again
            m.on_message(ing.delta(("ask", "0.58", "1")), T0)
        return m.on_directory(ing.epoch, ing.seq + 1, T0)
    if event is Input.DIRECTORY_LOSS:
        return m.on_directory(ing.epoch, ing.seq + 2, T0)
    if event is Input.DIRECTORY_CAUGHT_UP:
        return m.on_directory(ing.epoch, ing.seq, T0)
    raise AssertionError(event)


EXPECTED_ACTIONS: dict[Input, Callable[[list], bool]] = {
    Input.DELTA: lambda out: kinds(out) in ([im.FanOut], []),  # buffered while not serving
    Input.DUPLICATE: lambda out: out == [],
    Input.BREAK: lambda out: kinds(out) == [im.Resync, im.RequestSnapshot],
    Input.SNAPSHOT: lambda out: kinds(out)[-1] is im.ReleaseParked,
    Input.SNAPSHOT_FAILED: lambda out: kinds(out) == [im.RequestSnapshot] and out[0].delay_s > 0,
    Input.DIRECTORY_AHEAD: lambda out: out == [],
    Input.DIRECTORY_LOSS: lambda out: kinds(out) == [im.Resync, im.RequestSnapshot],
    Input.DIRECTORY_CAUGHT_UP: lambda out: out == [],
}


@pytest.mark.parametrize("state, event", sorted(TRANSITIONS, key=lambda k: (k[0].value, k[1].value)),
                         ids=lambda v: v.value)
def test_every_transition_in_the_table(state: State, event: Input) -> None:
    m, ing = start_in(state)
    assert m.state is state
    out = feed(m, ing, event)
    assert m.state is TRANSITIONS[(state, event)], out
    assert EXPECTED_ACTIONS[event](out), (state, event, out)
    if event is Input.DELTA and m.serving:
        assert kinds(out) == [im.FanOut] and m.seq == ing.seq and m.book.checksum() == ing.book.checksum()


# -- the rows of the module's table outside TRANSITIONS: same state (or a BREAK), named actions ----------


@pytest.mark.parametrize("state", [State.LIVE, State.SUSPECT], ids=lambda s: s.value)
def test_conflicting_duplicate_resyncs_and_clears_the_ring(state: State) -> None:
    m, ing = start_in(state)
    real = ing.delta_dict(("ask", "0.57", "3"))
    assert kinds(m.on_message(orjson.dumps(real), T0)) == [im.FanOut]
    forged = real | {"changes": [["ask", "0.57", "9"]]}  # same (epoch, seq), other content
    out = m.on_message(orjson.dumps(forged), T0 + 1)
    assert kinds(out) == [im.Resync, im.RequestSnapshot] and m.state is State.RECOVERING
    assert out[0].cause is im.BreakCause.CONFLICTING_DUPLICATE and out[0].reason is ResyncReason.UPSTREAM_GAP
    assert f"instrument={INST}" in out[0].detail and f"seq={real['seq']}" in out[0].detail
    assert not m.ring and m.ring_since(ing.epoch, real["seq"] - 1) is None  # resume falls back to a snapshot


@pytest.mark.parametrize("state", [State.LIVE, State.SUSPECT], ids=lambda s: s.value)
@pytest.mark.parametrize("late", ["reply", "failure"])
def test_late_snapshot_answer_while_serving_is_ignored(state: State, late: str) -> None:
    m, ing = start_in(state)
    ing.delta(("bid", "0.49", "5"))  # the ingest moved on: the late reply is not the book the machine holds
    before = (m.seq, m.book.checksum(), len(m.ring))
    out = m.on_snapshot_reply(ing.snapshot(), T0) if late == "reply" else m.on_snapshot_failed(T0)
    assert out == [] and m.state is state and (m.seq, m.book.checksum(), len(m.ring)) == before


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
def test_status_malformed_and_unknown_inputs_keep_every_state(state: State) -> None:
    m, ing = start_in(state)
    seq, checksum = m.seq, m.book.checksum()
    status = {"type": "instrument_status", "instrument": INST, "status": "halted", "reason": "venue", "since_ns": 5}
    out = m.on_message(orjson.dumps(status), T0)
    assert kinds(out) == [im.StatusChanged] and m.state is state and m.status is Status.HALTED
    assert m.on_message(orjson.dumps(status), T0) == []  # unchanged: nothing
    out = m.on_message(b'{"type":"delta","instrument":"test:x","epoch":"e1"}', T0)
    assert kinds(out) == [im.Rejected] and out[0].error.msg_type == "delta" and m.state is state
    out = m.on_message(b'{"type":"venue_news"}', T0)
    assert kinds(out) == [im.Ignored] and m.state is state
    assert (m.seq, m.book.checksum()) == (seq, checksum)


def test_delta_while_awaiting_is_buffered_then_replayed_after_the_snapshot() -> None:
    ing = Ingest()
    m = InstrumentMachine(INST)
    m.start()
    snap = ing.snapshot()  # the ingest answers at seq 0 ...
    early = [ing.delta(("bid", "0.51", "3")), ing.delta(("ask", "0.56", "1"))]  # ... deltas overtake it
    assert all(m.on_message(p, T0) == [] for p in early)
    out = m.on_snapshot_reply(snap, T0 + 1)
    assert kinds(out) == [im.FanOut, im.FanOut, im.ReleaseParked]
    assert (m.seq, m.book.checksum()) == (2, ing.book.checksum())
    assert [a.item.seq for a in out[:2]] == [1, 2]


def test_snapshot_replay_that_gaps_again_stays_recovering_and_keeps_the_rest() -> None:
    m, ing = recovering()
    snap = ing.snapshot()
    ing.delta(("bid", "0.40", "1"))  # lost after the snapshot
    m.on_message(ing.delta(("bid", "0.41", "1")), T0)
    m.on_message(ing.delta(("bid", "0.42", "1")), T0)
    out = m.on_snapshot_reply(snap, T0)
    assert kinds(out) == [im.Resync, im.RequestSnapshot] and m.state is State.RECOVERING
    assert len(m.buffer) == 2  # both kept for the next snapshot
    out = m.on_snapshot_reply(ing.snapshot(), T0)
    assert m.state is State.LIVE and (m.seq, m.book.checksum()) == (ing.seq, ing.book.checksum())


def test_fan_out_item_is_one_frame_stamped_once() -> None:
    m, ing = live()
    out = m.on_message(ing.delta(("bid", "0.51", "3")), T0 + 5)
    (fan,) = out
    msg = orjson.loads(frame_payload(fan.item.payload))
    assert msg["ts_send_ns"] == T0 + 5 and msg["seq"] == 1 and msg["checksum"] == ing.book.checksum()
    assert (fan.item.epoch, fan.item.seq, fan.item.prev_seq) == ("e1", 1, 0)


def test_bad_price_from_nats_is_rejected_without_changing_the_book() -> None:
    """Regression: ``Decimal("x")`` raised InvalidOperation after part of the delta was applied."""
    m, ing = live()
    m.on_message(ing.delta(("bid", "0.51", "3")), T0)
    before = (m.seq, m.book.checksum(), m.book.book.wire_levels("bid"), m.book.book.wire_levels("ask"))
    bad = ing.delta_dict(("bid", "0.52", "4"))
    bad["changes"] = [["bid", "0.52", "4"], ["ask", "x", "1"]]  # the first change is fine, the second is not
    out = m.on_message(orjson.dumps(bad), T0)
    assert kinds(out) == [im.Rejected] and "price" in str(out[0].error) and "'x'" in str(out[0].error)
    assert (m.seq, m.book.checksum(), m.book.book.wire_levels("bid"), m.book.book.wire_levels("ask")) == before
    assert m.state is State.LIVE
    ing.seq -= 1  # the ingest never published its bad delta: the next real one follows seq 1
    ing.book.apply_wire_changes([("bid", "0.52", "0")])
    assert kinds(m.on_message(ing.delta(("ask", "0.60", "2")), T0)) == [im.FanOut]


@pytest.mark.parametrize("payload", [b"not json", b"[1]", b'{"type":"delta","instrument":"test:x"}',
                                     b'{"type":"delta","instrument":"test:x","epoch":"e1","seq":1,"prev_seq":1,'
                                     b'"changes":[],"checksum":0}',
                                     b'{"type":"delta","instrument":"test:x","epoch":"e1","seq":2,"prev_seq":1,'
                                     b'"changes":[["mid","1","1"]],"checksum":0}'])
def test_malformed_messages_are_rejected_not_fatal(payload: bytes) -> None:
    m, ing = live()
    out = m.on_message(payload, T0)
    assert kinds(out) == [im.Rejected] and m.state is State.LIVE and m.seq == 0


def test_checksum_mismatch_resyncs_as_upstream_gap() -> None:
    m, ing = live()
    bad = ing.delta_dict(("bid", "0.51", "3"))
    bad["checksum"] ^= 1
    out = m.on_message(orjson.dumps(bad), T0)
    assert kinds(out) == [im.Resync, im.RequestSnapshot]
    assert out[0].cause is im.BreakCause.CHECKSUM_MISMATCH and out[0].reason is ResyncReason.UPSTREAM_GAP


def test_epoch_change_resyncs_with_its_reason_and_clears_the_ring() -> None:
    m, ing = live()
    m.on_message(ing.delta(("bid", "0.51", "3")), T0)
    assert m.ring_since("e1", 0) is not None
    ing.restart("e2")
    out = m.on_message(ing.delta(("bid", "0.52", "3")), T0)
    assert out[0].reason is ResyncReason.EPOCH_CHANGE and out[0].cause is im.BreakCause.EPOCH_CHANGE
    m.on_snapshot_reply(ing.snapshot(), T0)
    assert m.epoch == "e2" and m.ring_since("e1", 0) is None and list(m.ring) == []


def test_snapshot_reply_with_bad_checksum_or_shape_is_a_failure() -> None:
    m, ing = starting()
    out = m.on_snapshot_reply(ing.snapshot(checksum=1), T0)
    assert kinds(out) == [im.Rejected, im.RequestSnapshot] and m.state is State.AWAITING_SNAPSHOT
    out = m.on_snapshot_reply(b'{"type":"error"}', T0)
    assert kinds(out) == [im.Rejected, im.RequestSnapshot] and out[1].delay_s == 2 * out[1].delay_s / 2
    delays = [m.on_snapshot_failed(T0)[0].delay_s for _ in range(10)]
    assert delays == sorted(delays) and delays[-1] == im.SNAPSHOT_RETRY_S[1]


def test_ring_serves_resume_only_when_it_holds_everything() -> None:
    m, ing = live()
    for i in range(20):  # ring of 16
        m.on_message(ing.delta(("bid", f"0.{10 + i}", "1")), T0)
    assert m.ring_since("e1", 20) == []
    assert [e[1] for e in m.ring_since("e1", 10)] == list(range(11, 21))
    assert m.ring_since("e1", 2) is None  # fell out of the ring
    assert m.ring_since("other", 10) is None and m.ring_since("e1", 21) is None


def test_status_changes_fan_out_once_and_land_on_snapshots() -> None:
    m, ing = live()
    status = {"type": "instrument_status", "instrument": INST, "status": "stale", "reason": "upstream_silent",
              "since_ns": T0 - 5, "ts_publish_ns": T0}
    out = m.on_message(orjson.dumps(status), T0 + 1)
    assert kinds(out) == [im.StatusChanged] and out[0].status is Status.STALE
    msg = orjson.loads(frame_payload(out[0].item.payload))
    assert msg == {"type": "instrument_status", "instrument": INST, "status": "stale", "reason": "upstream_silent",
                   "since_ns": T0 - 5, "ts_send_ns": T0 + 1}
    assert m.on_message(orjson.dumps(status), T0 + 2) == []  # unchanged: nothing to send
    assert m.gaps == 0 and m.seq == 0  # not a delta, not a gap
    assert orjson.loads(m.snapshot_bytes())["status"] == "stale"
    assert kinds(m.on_directory(ing.epoch, ing.seq, T0, status=Status.OK)) == [im.StatusChanged]
    assert orjson.loads(m.snapshot_bytes())["status"] == "ok"
    assert m.on_snapshot_reply(ing.snapshot(status="halted"), T0) == []  # late reply while live: ignored
    m.on_message(ing.delta(("bid", "0.30", "1")), T0)
    ing.delta(("bid", "0.31", "1"))  # lost
    m.on_message(ing.delta(("bid", "0.32", "1")), T0)
    assert m.state is State.RECOVERING
    assert kinds(m.on_snapshot_reply(ing.snapshot(status="halted"), T0)) == [im.StatusChanged, im.ReleaseParked]
    assert m.status is Status.HALTED


def test_unknown_message_types_are_ignored() -> None:
    m, ing = live()
    out = m.on_message(b'{"type":"venue_news","instrument":"test:x"}', T0)
    assert kinds(out) == [im.Ignored] and out[0].msg_type == "venue_news" and m.state is State.LIVE


def test_directory_with_a_backlog_concludes_nothing() -> None:
    m, ing = suspect()
    assert m.on_directory(ing.epoch, ing.seq + 5, T0, backlog=3) == [] and m.state is State.SUSPECT


def test_buffer_is_bounded_and_a_replay_across_a_dropped_delta_recovers_again() -> None:
    ing = Ingest()
    m = InstrumentMachine(INST, max_buffered=2)
    m.start()
    snap = ing.snapshot()
    for i in range(4):  # the first two fall out of the buffer
        m.on_message(ing.delta(("bid", f"0.3{i}", "1")), T0)
    assert len(m.buffer) == 2
    out = m.on_snapshot_reply(snap, T0)  # at seq 0: deltas 1-2 are gone, so 3 does not chain on
    assert kinds(out) == [im.Resync, im.RequestSnapshot] and m.state is State.RECOVERING
    out = m.on_snapshot_reply(ing.snapshot(), T0)
    assert m.state is State.LIVE and (m.seq, m.book.checksum()) == (4, ing.book.checksum())
