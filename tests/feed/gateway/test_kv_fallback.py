"""``InstrumentMachine.judge_fallback``: when a region's KV book may stand in for the ingest's snapshot answer
(issue 9). Pure: the machine fed with data, the KV books made by the simulated ingest at chosen points."""
from __future__ import annotations

from feed.gateway.instrument import Fallback, InstrumentMachine, State
from tests.feed.gateway.conftest import INST, Ingest

T0 = 1_700_000_000_000_000_000


def live() -> tuple[InstrumentMachine, Ingest]:
    ingest = Ingest()
    m = InstrumentMachine(INST, ring_size=16)
    m.start()
    m.on_snapshot_reply(ingest.snapshot(), T0)
    assert m.state is State.LIVE
    return m, ingest


def test_a_machine_holding_nothing_finds_any_kv_book_plausible_unless_the_directory_names_another_epoch():
    m = InstrumentMachine(INST)
    m.start()
    assert m.judge_fallback("e1", 40) is Fallback.PLAUSIBLE
    assert m.judge_fallback("e1", 40, announced_epoch="e1") is Fallback.PLAUSIBLE
    assert m.judge_fallback("e1", 40, announced_epoch="e2") is Fallback.STALE  # a lossy takeover announced


def test_after_a_gap_only_a_kv_book_the_held_deltas_chain_onto_is_current():
    m, ing = live()
    for size in ("1", "2"):
        m.on_message(ing.delta(("bid", "0.51", size)), T0)
    assert (m.state, m.seq) == (State.LIVE, 2)
    ing.delta(("bid", "0.52", "1"))  # 3: lost
    at_3 = ing.seq
    ing.delta(("bid", "0.52", "2"))  # 4: lost
    at_4 = ing.seq
    m.on_message(ing.delta(("ask", "0.56", "3")), T0)  # 5: the gap is seen, 5 is buffered
    m.on_message(ing.delta(("ask", "0.56", "4")), T0)  # 6: buffered
    assert m.state is State.RECOVERING
    assert m.judge_fallback(ing.epoch, at_4) is Fallback.CURRENT  # 5 and 6 apply on it
    assert m.judge_fallback(ing.epoch, 6) is Fallback.CURRENT  # already holds them
    assert m.judge_fallback(ing.epoch, at_3) is Fallback.STALE  # 4 is missing between it and 5
    assert m.judge_fallback(ing.epoch, 1) is Fallback.STALE  # behind the machine's own book
    assert m.judge_fallback("e0", 90) is Fallback.STALE  # another epoch than the live deltas


def test_after_a_lossy_takeover_the_old_epochs_kv_book_is_stale_whatever_its_seq():
    m, ing = live()
    for size in ("1", "2", "3"):
        m.on_message(ing.delta(("bid", "0.51", size)), T0)
    old_epoch = ing.epoch
    ing.restart("e2")  # the standby took over with a new epoch from seq 0
    m.on_message(ing.delta(("bid", "0.51", "9")), T0)  # e2 seq 1: epoch change, buffered
    assert m.state is State.RECOVERING
    # the KV books still hold the old leader's last book (written before it died), even far ahead in seq
    assert m.judge_fallback(old_epoch, 3) is Fallback.STALE
    assert m.judge_fallback(old_epoch, 500) is Fallback.STALE
    assert m.judge_fallback("e2", 0) is Fallback.CURRENT  # the new leader's book, once it rewrote KV
    assert m.judge_fallback("e2", 0, announced_epoch=old_epoch) is Fallback.STALE  # the directory disagrees


def test_a_machine_of_one_epoch_with_nothing_buffered_cannot_tell_another_epoch_newer():
    m, ing = live()
    ing.delta(("bid", "0.51", "1"))  # lost, and nothing follows: the directory reveals the tail loss
    m.on_directory(ing.epoch, ing.seq, T0)
    m.on_directory(ing.epoch, ing.seq, T0)
    assert m.state is State.RECOVERING and not m.buffer
    assert m.judge_fallback("other", 10) is Fallback.STALE
    assert m.judge_fallback(ing.epoch, ing.seq) is Fallback.PLAUSIBLE  # same epoch, not behind its book
    assert m.judge_fallback(ing.epoch, -1) is Fallback.STALE
