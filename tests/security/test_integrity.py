"""The gateway's own integrity checks on NATS deltas (pure instrument machine): a forged delta is caught
whether its checksum is wrong or right, and the book served afterwards is the ingest's, not the forger's."""
from __future__ import annotations

from decimal import Decimal

import orjson

from feed.book import L2Book
from feed.gateway import instrument as im
from feed.gateway.instrument import InstrumentMachine, State
from feed.model import Side
from tests.feed.gateway.conftest import INST, Ingest

T0 = 1_700_000_000_000_000_000


def deep_ingest() -> Ingest:
    """An ingest whose book has 15 bids and 15 asks, so a level can hide below the checksummed top 10."""
    ing = Ingest()
    bids = [(Decimal("0.50") - Decimal("0.01") * i, Decimal(10 + i)) for i in range(15)]
    asks = [(Decimal("0.55") + Decimal("0.01") * i, Decimal(20 + i)) for i in range(15)]
    ing.book = L2Book(INST)
    ing.book.apply_snapshot(bids, asks)
    return ing


def live(ing: Ingest) -> InstrumentMachine:
    m = InstrumentMachine(INST)
    m.start()
    m.on_snapshot_reply(ing.snapshot(), T0)
    assert m.state is State.LIVE
    return m


def _levels(book: L2Book, side: Side) -> list[tuple[Decimal, Decimal]]:
    return [(Decimal(p), Decimal(q)) for p, q in book.wire_levels(side)]


def forged_after(ing: Ingest, changes: list[list[str]], *, right_checksum: bool) -> bytes:
    """What an attacker publishes as the next seq: ``changes`` on a copy of the real book."""
    copy = L2Book(INST)
    copy.apply_snapshot(_levels(ing.book, Side.BID), _levels(ing.book, Side.ASK))
    copy.apply_wire_changes(changes)
    msg = {"type": "delta", "instrument": INST, "epoch": ing.epoch, "seq": ing.seq + 1, "prev_seq": ing.seq,
           "changes": changes, "checksum": copy.checksum() if right_checksum else copy.checksum() ^ 1,
           "ts_ingest_ns": 1, "ts_publish_ns": 2}
    return orjson.dumps(msg)


def test_forged_delta_with_a_wrong_checksum_is_caught_at_once():
    ing = deep_ingest()
    m = live(ing)
    out = m.on_message(forged_after(ing, [["bid", "0.45", "999"]], right_checksum=False), T0)
    assert [type(a) for a in out] == [im.Resync, im.RequestSnapshot]
    assert out[0].cause is im.BreakCause.CHECKSUM_MISMATCH


def test_forged_level_below_the_top_10_is_caught_when_the_real_delta_arrives():
    """The adversarial run of issue 10: a fake level deep in the book keeps the top-10 checksum, so it
    applies; the real delta with the same seq then arrives. Two different deltas for one seq: resync, and
    after the ingest's snapshot the fake level is gone from what the gateway serves."""
    ing = deep_ingest()
    m = live(ing)
    fake = [["bid", "0.3701", "5000"]]  # below the 10th bid (0.41): the checksum does not see it
    out = m.on_message(forged_after(ing, fake, right_checksum=True), T0)
    assert [type(a) for a in out] == [im.FanOut]  # it passed every check it could pass
    assert ["0.3701", "5000"] in orjson.loads(m.snapshot_bytes())["bids"]  # it is in the book for now
    real = ing.delta(("ask", "0.55", "21"))  # the ingest's delta for that seq
    out = m.on_message(real, T0)
    assert [type(a) for a in out] == [im.Resync, im.RequestSnapshot]
    assert out[0].cause is im.BreakCause.CONFLICTING_DUPLICATE
    m.on_snapshot_reply(ing.snapshot(), T0)
    assert m.state is State.LIVE
    served = orjson.loads(m.snapshot_bytes())
    assert ["0.3701", "5000"] not in served["bids"]
    assert served["seq"] == ing.seq and served["checksum"] == ing.book.checksum()
    assert served["asks"][0] == ["0.55", "21"]


def test_an_identical_redelivery_is_still_a_plain_duplicate():
    ing = deep_ingest()
    m = live(ing)
    delta = ing.delta(("bid", "0.50", "11"))
    assert [type(a) for a in m.on_message(delta, T0)] == [im.FanOut]
    assert m.on_message(delta, T0) == []  # NATS redelivered the same bytes: nothing to do
    assert m.state is State.LIVE


def test_resume_never_replays_the_forged_delta():
    ing = deep_ingest()
    m = live(ing)
    m.on_message(forged_after(ing, [["bid", "0.3701", "5000"]], right_checksum=True), T0)
    m.on_message(ing.delta(("ask", "0.55", "21")), T0)
    m.on_snapshot_reply(ing.snapshot(), T0)
    assert m.ring_since(ing.epoch, 0) is None  # a resume from before the conflict gets a fresh snapshot
