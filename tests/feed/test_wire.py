"""The one wire model: decode and encode of every PROTOCOL.md message, errors naming the field."""
from __future__ import annotations

from decimal import Decimal

import orjson
import pytest

from feed import wire
from feed.book import APPLIED, DUPLICATE, EPOCH_CHANGE, GAP, L2Book, SequencedBook, continuity
from feed.errors import ChecksumMismatch, CrossedBook, InvalidDecimal, LocalError, RemoteError, SeqGap, WireError
from feed.gateway import protocol as proto
from feed.gateway.protocol import GatewayLimits
from feed.hops import HOPS, Hop, hops_of, hops_ns
from feed.model import LevelChange, Side

I = "coinbase:BAND-GBP"
SAMPLES = [
    {"type": "snapshot", "instrument": I, "epoch": "e", "seq": 41, "bids": [["14.755", "3.1"]], "asks": [["14.806", "1.2"]],
     "checksum": 3141592653, "ts_event_ns": 1, "ts_ingest_ns": 2, "ts_publish_ns": 3, "ts_send_ns": 4, "status": "ok"},
    {"type": "delta", "instrument": I, "epoch": "e", "seq": 43, "prev_seq": 42,
     "changes": [["bid", "14.755", "0"], ["ask", "14.801", "7.5"]], "checksum": 2718281828,
     "ts_event_ns": 1, "ts_ingest_ns": 2, "ts_publish_ns": 3, "ts_send_ns": 4},
    {"type": "trade", "instrument": I, "price": "0.45", "size": "10", "side": "buy", "trade_id": "t1",
     "ts_event_ns": 1, "ts_ingest_ns": 2, "ts_publish_ns": 3, "ts_send_ns": 4},
    {"type": "heartbeat", "ts_send_ns": 5, "seqs": {I: ["e", 43]}},
    {"type": "resync", "instrument": I, "reason": "slow_consumer"},
    {"type": "subscribed", "id": 1, "instruments": [I], "recovered": {I: False}},
    {"type": "unsubscribed", "id": 2, "instruments": [I]},
    {"type": "pong", "id": 4, "ts_send_ns": 6},
    {"type": "error", "id": 3, "code": "unknown_instrument", "message": "no instrument 'coinbase:NOPE'"},
    {"type": "shutdown", "reconnect_after_ms": 500},
    {"type": "instrument_status", "instrument": I, "status": "stale", "reason": "upstream_silent", "since_ns": 7,
     "ts_send_ns": 8},
    {"type": "write_stamp", "ts_write_ns": 9, "frames": 3},
]


@pytest.mark.parametrize("msg", SAMPLES, ids=[m["type"] for m in SAMPLES])
def test_decode_then_encode_gives_the_same_message(msg):
    decoded = wire.decode(orjson.dumps(msg))
    assert decoded.type == msg["type"] and decoded.raw == msg
    assert orjson.loads(wire.encode(decoded)) == msg


def test_unknown_types_decode_to_unknown():
    assert isinstance(wire.decode(b'{"type":"news","x":1}'), wire.Unknown)
    assert isinstance(wire.decode(b'{"no_type":true}'), wire.Unknown)


@pytest.mark.parametrize("change, field, words", [
    ({"changes": [["bid", "0.5", "1"], ["ask", "x", "1"]]}, "changes", "price"),
    ({"changes": [["mid", "0.5", "1"]]}, "changes", "side"),
    ({"changes": "no"}, "changes", "list"),
    ({"seq": 42}, "seq", "not after prev_seq"),
    ({"epoch": 7}, "epoch", "string"),
    ({"checksum": -1}, "checksum", ">= 0"),
])
def test_bad_delta_fields_are_named(change, field, words):
    msg = SAMPLES[1] | change
    with pytest.raises(WireError) as info:
        wire.decode(orjson.dumps(msg))
    err = info.value
    assert isinstance(err, RemoteError) and isinstance(err, ValueError)
    assert (err.msg_type, err.instrument, err.field) == ("delta", I, field)
    assert f"delta instrument={I} field '{field}'" in str(err) and words in str(err)


@pytest.mark.parametrize("data", [b"nope", b"[]", b'"x"'])
def test_not_an_object_is_a_wire_error(data):
    with pytest.raises(WireError):
        wire.decode(data)


def test_requests_encode_to_what_the_gateway_parses():
    limits = GatewayLimits()
    reqs = [wire.Subscribe(1, (I,), frozenset({wire.Channel.BOOK, wire.Channel.TRADES}), 50, {I: ("e", 41)}),
            wire.Unsubscribe("u", (I,)), wire.ResyncRequest(None, I), wire.Ping(7)]
    for req in reqs:
        assert proto.parse_request(wire.encode_request(req), limits) == req


def test_send_ts_splice():
    assert wire.with_send_ts(b'{"a":1}', 9) == b'{"a":1,"ts_send_ns":9}'
    assert wire.with_send_ts(b"{}", 9) == b'{"ts_send_ns":9}'


def test_write_stamp_notice_and_splice():
    notice = wire.write_stamp_notice(1_700_000_000_000_000_123, 2)
    assert notice.startswith(wire.WRITE_STAMP_PREFIX)
    decoded = wire.decode(notice)
    assert isinstance(decoded, wire.WriteStamp) and (decoded.ts_write_ns, decoded.frames) == (1_700_000_000_000_000_123, 2)
    assert wire.encode(decoded) == notice
    for bad, field in ((b'{"type":"write_stamp","ts_write_ns":5,"frames":0}', "frames"),
                       (b'{"type":"write_stamp","ts_write_ns":"5","frames":1}', "ts_write_ns")):
        with pytest.raises(WireError) as info:
            wire.decode(bad)
        assert info.value.field == field and f"field '{field}'" in str(info.value)
    spliced = wire.with_write_ts(wire.with_send_ts(b'{"type":"delta"}', 4), 5)
    assert orjson.loads(spliced) == {"type": "delta", "ts_send_ns": 4, "ts_write_ns": 5}
    assert wire.with_write_ts(b"not json", 5) == b"not json"


# -- the sequenced book ------------------------------------------------------------------------------

@pytest.mark.parametrize("held, update, kw, verdict", [
    (("e", 5), ("e", 6, 5), {}, APPLIED),
    (("e", 5), ("e", 5, 4), {}, DUPLICATE),
    (("e", 5), ("e", 5, 4), {"strict": True}, GAP),
    (("e", 5), ("e", 8, 6), {}, GAP),
    (("e", 5), ("f", 6, 5), {}, EPOCH_CHANGE),
    (("e", 5), ("e", 9, 3), {}, GAP),
    (("e", 5), ("e", 9, 3), {"spanning": True}, APPLIED),
])
def test_continuity_table(held, update, kw, verdict):
    assert continuity(*held, *update, **kw) is verdict


def test_sequenced_book_applies_only_what_continues():
    sb = SequencedBook(I, "e", 0)
    delta = wire.decode(orjson.dumps(SAMPLES[1] | {"seq": 1, "prev_seq": 0}))
    assert sb.apply(delta) is APPLIED and sb.seq == 1 and sb.ts_publish_ns == 3
    before = sb.checksum()
    assert sb.apply(delta) is DUPLICATE and sb.checksum() == before
    gap = wire.decode(orjson.dumps(SAMPLES[1] | {"seq": 5, "prev_seq": 4, "changes": [["bid", "1", "1"]]}))
    assert sb.apply(gap) is GAP and sb.checksum() == before and sb.seq == 1


def test_apply_wire_changes_is_all_or_nothing():
    book = L2Book(I)
    book.apply_snapshot([(Decimal("0.5"), Decimal(1))], [])
    with pytest.raises(InvalidDecimal):
        book.apply_wire_changes([["bid", "0.4", "2"], ["ask", "x", "1"]])
    assert book.depth(Side.BID) == [(Decimal("0.5"), Decimal(1))]
    with pytest.raises(InvalidDecimal):
        book.apply_wire_changes([["bid", "0.4", "NaN"]])


def test_errors_name_local_expected_and_remote_got():
    gap = SeqGap(I, 43, 45)
    assert (gap.expected, gap.got) == (43, 45) and str(gap) == f"seq gap instrument={I} expected=43 got=45"
    mismatch = ChecksumMismatch(I, 7, 111, 222)
    assert (mismatch.computed, mismatch.sent) == (111, 222)
    assert str(mismatch) == f"checksum mismatch instrument={I} seq=7 expected=111 got=222"


def test_crossed_book_from_our_engine_raises_local_error():
    book = L2Book(I)
    book.apply_changes([LevelChange(Side.BID, Decimal("0.6"), Decimal(1)), LevelChange(Side.ASK, Decimal("0.5"), Decimal(1))])
    with pytest.raises(CrossedBook) as info:
        book.check_uncrossed("test")
    assert isinstance(info.value, LocalError) and "best_bid=0.6 best_ask=0.5" in str(info.value)


# -- the hop vocabulary --------------------------------------------------------------------------------

def test_every_hop_has_a_rule_and_hops_add_up():
    assert set(HOPS) == set(Hop)
    msg = {"ts_event_ns": 100, "ts_ingest_ns": 110, "ts_publish_ns": 111, "ts_send_ns": 115}
    hops = hops_of(msg, 117)
    assert hops == {Hop.UPSTREAM: 10, Hop.INGEST: 1, Hop.NATS_GATEWAY: 4, Hop.NETWORK: 2, Hop.CLIENT: 2, Hop.E2E: 17}
    assert hops_ns(msg, 117) == hops
    no_event = hops_of({"ts_ingest_ns": 110, "ts_send_ns": 115}, 117)
    assert no_event == {Hop.NETWORK: 2, Hop.CLIENT: 2, Hop.E2E: 7}
    assert hops_ns({"ts_ingest_ns": 110}, 117) is None
