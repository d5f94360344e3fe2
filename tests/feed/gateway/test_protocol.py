"""feed.gateway.protocol against PROTOCOL.md sections 3-5: request parsing, error recovery, reply shapes."""
from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from feed.errors import RemoteError
from feed.gateway import protocol as p
from feed.gateway.protocol import (
    Channel,
    CloseCode,
    ErrorCode,
    GatewayLimits,
    Ping,
    ProtocolError,
    Resync,
    ResyncReason,
    Subscribe,
    Unsubscribe,
    parse_request,
)

LIMITS = GatewayLimits()
BAND = "coinbase:BAND-GBP"
POLY = "polymarket:" + "7" * 70  # a Polymarket token id is a 70-digit decimal string
BAD = ErrorCode.BAD_REQUEST


def _parse(payload: object | str | bytes, limits: GatewayLimits = LIMITS):
    text = payload if isinstance(payload, (str, bytes)) else orjson.dumps(payload)
    return parse_request(text, limits)


def _refusal(payload: object | str | bytes, limits: GatewayLimits = LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        _parse(payload, limits)
    return info.value


# ---------------------------------------------------------------------------------------------------
# Malformed requests: (payload, code, recovered id, fragment of the message). A str/bytes payload is the
# raw frame; anything else is JSON-encoded first.

SUB = {"op": "subscribe", "id": 3, "instruments": [BAND]}


def _sub(**fields: object) -> dict[str, object]:
    return {**SUB, **fields}


MALFORMED = {
    # not JSON
    "empty frame": (b"", BAD, None, "request is not JSON"),
    "truncated": ('{"op":"ping"', BAD, None, "request is not JSON"),
    "trailing garbage": ('{"op":"ping"} x', BAD, None, "request is not JSON"),
    "NaN": ('{"op":"ping","id":NaN}', BAD, None, "request is not JSON"),
    "invalid UTF-8": (b'{"op":"ping","id":"\xff"}', BAD, None, "request is not JSON"),
    "lone surrogate": ('{"op":"ping","id":"\ud800"}', BAD, None, "request is not JSON"),
    "huge number": ('{"op":"ping","id":1e400}', BAD, None, "request is not JSON: number is infinity"),
    # not an object
    "array": ("[1,2]", BAD, None, "must be a JSON object, got an array"),
    "string": ('"str"', BAD, None, "must be a JSON object, got 'str'"),
    "null": ("null", BAD, None, "must be a JSON object, got null"),
    "number": ("42", BAD, None, "must be a JSON object, got 42"),
    "boolean": ("true", BAD, None, "must be a JSON object, got a boolean"),
    # op
    "missing op": ({"id": 7}, BAD, 7, "missing field 'op'"),
    "op null": ({"op": None, "id": "a"}, BAD, "a", "field 'op' must be a string, got null"),
    "op number": ({"op": 1, "id": 1}, BAD, 1, "field 'op' must be a string, got 1"),
    "op list": ({"op": ["ping"], "id": 1}, BAD, 1, "field 'op' must be a string, got an array"),
    "unknown op": ({"op": "subscribe_all", "id": 2}, BAD, 2, "unknown op 'subscribe_all'"),
    "op is case-sensitive": ({"op": "PING", "id": 2}, BAD, 2, "unknown op 'PING'"),
    # id (never recovered when it is itself wrong)
    "id boolean": ({"op": "ping", "id": True}, BAD, None, "field 'id' must be an integer or a string"),
    "id float": ({"op": "ping", "id": 1.5}, BAD, None, "field 'id' must be an integer or a string, got 1.5"),
    "id null": ({"op": "ping", "id": None}, BAD, None, "field 'id' must be an integer or a string, got null"),
    "id array": ({"op": "ping", "id": [1]}, BAD, None, "field 'id'"),
    "id object": ({"op": "ping", "id": {"n": 1}}, BAD, None, "field 'id'"),
    "id bad and op bad": ({"op": "nope", "id": False}, BAD, None, "field 'id'"),
    # instruments
    "instruments missing": ({"op": "subscribe", "id": 3}, BAD, 3, "missing field 'instruments'"),
    "instruments a string": (_sub(instruments=BAND), BAD, 3, "field 'instruments' must be a non-empty list of strings"),
    "instruments null": (_sub(instruments=None), BAD, 3, "field 'instruments' must be a non-empty list"),
    "instruments object": (_sub(instruments={BAND: 1}), BAD, 3, "field 'instruments' must be a non-empty list"),
    "instruments empty": (_sub(instruments=[]), BAD, 3, "field 'instruments' must be a non-empty list"),
    "instruments non-string": (_sub(instruments=[BAND, 5]), BAD, 3, "field 'instruments' must be a non-empty list"),
    "instrument no colon": (_sub(instruments=[BAND, "BAND-GBP"]), BAD, 3, "'instruments' item 1 must look like"),
    "instrument no venue": (_sub(instruments=[":BAND-GBP"]), BAD, 3, "'instruments' item 0 must look like"),
    "instrument no symbol": (_sub(instruments=["coinbase:"]), BAD, 3, "'instruments' item 0 must look like"),
    "instrument empty": (_sub(instruments=[""]), BAD, 3, "'instruments' item 0 must look like"),
    "unsubscribe instruments missing": ({"op": "unsubscribe", "id": "u"}, BAD, "u", "missing field 'instruments'"),
    "unsubscribe instruments a string": (
        {"op": "unsubscribe", "id": "u", "instruments": BAND}, BAD, "u", "field 'instruments' must be a non-empty",
    ),
    "unsubscribe malformed instrument": (
        {"op": "unsubscribe", "instruments": ["nope"]}, BAD, None, "'instruments' item 0 must look like",
    ),
    # resync
    "resync instrument missing": ({"op": "resync", "id": 5}, BAD, 5, "missing field 'instrument'"),
    "resync instrument list": ({"op": "resync", "id": 5, "instrument": [BAND]}, BAD, 5, "field 'instrument' must be"),
    "resync instrument malformed": ({"op": "resync", "id": 5, "instrument": "BAND"}, BAD, 5, "must look like"),
    # channels
    "channels a string": (_sub(channels="book"), BAD, 3, "field 'channels' must be a non-empty list of strings"),
    "channels null": (_sub(channels=None), BAD, 3, "field 'channels' must be a non-empty list"),
    "channels empty": (_sub(channels=[]), BAD, 3, "field 'channels' must be a non-empty list"),
    "channels non-string": (_sub(channels=["book", 1]), BAD, 3, "field 'channels' must be a non-empty list"),
    "channels unknown": (_sub(channels=["book", "quotes"]), BAD, 3, "unknown channel 'quotes'"),
    "channels wrong case": (_sub(channels=["Book"]), BAD, 3, "unknown channel 'Book'"),
    # conflate_ms
    "conflate_ms above 5000": (_sub(conflate_ms=5001), BAD, 3, "field 'conflate_ms' must be an integer 0..5000"),
    "conflate_ms negative": (_sub(conflate_ms=-1), BAD, 3, "field 'conflate_ms' must be an integer 0..5000, got -1"),
    "conflate_ms float": (_sub(conflate_ms=1.5), BAD, 3, "field 'conflate_ms'"),
    "conflate_ms integral float": (_sub(conflate_ms=5.0), BAD, 3, "got 5.0"),
    "conflate_ms boolean": (_sub(conflate_ms=True), BAD, 3, "field 'conflate_ms'"),
    "conflate_ms string": (_sub(conflate_ms="10"), BAD, 3, "got '10'"),
    "conflate_ms null": (_sub(conflate_ms=None), BAD, 3, "got null"),
    # resume
    "resume array": (_sub(resume=[BAND]), BAD, 3, "field 'resume' must be an object"),
    "resume null": (_sub(resume=None), BAD, 3, "field 'resume' must be an object"),
    "resume key not subscribed": (
        _sub(resume={"coinbase:ETH-USD": {"epoch": "e", "seq": 1}}), BAD, 3, "is not one of field 'instruments'",
    ),
    "resume key malformed": (_sub(resume={"nope": {"epoch": "e", "seq": 1}}), BAD, 3, "is not one of"),
    "resume entry not object": (_sub(resume={BAND: ["e", 1]}), BAD, 3, "must be an object {epoch, seq}"),
    "resume epoch missing": (_sub(resume={BAND: {"seq": 1}}), BAD, 3, "field 'epoch' must be a string, got null"),
    "resume epoch number": (_sub(resume={BAND: {"epoch": 7, "seq": 1}}), BAD, 3, "field 'epoch' must be a string"),
    "resume seq missing": (_sub(resume={BAND: {"epoch": "e"}}), BAD, 3, "field 'seq' must be an integer >= 0"),
    "resume seq negative": (_sub(resume={BAND: {"epoch": "e", "seq": -1}}), BAD, 3, "got -1"),
    "resume seq float": (_sub(resume={BAND: {"epoch": "e", "seq": 1.0}}), BAD, 3, "field 'seq'"),
    "resume seq boolean": (_sub(resume={BAND: {"epoch": "e", "seq": True}}), BAD, 3, "field 'seq'"),
    "resume seq string": (_sub(resume={BAND: {"epoch": "e", "seq": "41"}}), BAD, 3, "field 'seq'"),
    # limits
    "too many instruments": (
        _sub(instruments=[f"coinbase:X{i}" for i in range(1001)]), ErrorCode.TOO_MANY_INSTRUMENTS, 3, "1001",
    ),
    "unsubscribe too many": (
        {"op": "unsubscribe", "id": 9, "instruments": [f"coinbase:X{i}" for i in range(1001)]},
        ErrorCode.TOO_MANY_INSTRUMENTS, 9, "limit 1000",
    ),
}


@pytest.mark.parametrize(("payload", "code", "request_id", "fragment"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request_is_refused(payload, code, request_id, fragment):
    e = _refusal(payload)
    assert (e.code, e.request_id) == (code, request_id)
    assert fragment in e.message
    assert isinstance(e, RemoteError)
    reply = orjson.loads(p.error(e.code, e.message, e.request_id))
    assert reply["code"] == code.value and reply.get("id") == request_id


def test_error_message_quotes_long_client_strings_shortened():
    e = _refusal({"op": "x" * 10_000})
    assert len(e.message) < 200
    assert "..." in e.message


# ---------------------------------------------------------------------------------------------------
# Valid requests

VALID = {
    "ping without id": ({"op": "ping"}, Ping(id=None)),
    "ping id 0 is kept": ({"op": "ping", "id": 0}, Ping(id=0)),
    "ping empty string id": ({"op": "ping", "id": ""}, Ping(id="")),
    "ping negative id": ({"op": "ping", "id": -5}, Ping(id=-5)),
    "ping largest u64 id": ({"op": "ping", "id": 2**64 - 1}, Ping(id=2**64 - 1)),
    "unknown fields ignored": ({"op": "ping", "id": "x", "future": {"a": [1]}, "instruments": 5}, Ping(id="x")),
    "subscribe defaults": (
        {"op": "subscribe", "id": 1, "instruments": [BAND]},
        Subscribe(id=1, instruments=(BAND,), channels=frozenset({Channel.BOOK}), conflate_ms=0, resume={}),
    ),
    "subscribe everything": (
        {
            "op": "subscribe",
            "id": "s1",
            "instruments": [POLY, BAND],
            "channels": ["trades", "book"],
            "conflate_ms": 250,
            "resume": {BAND: {"epoch": "e7f3c2", "seq": 43, "later": True}},
        },
        Subscribe(
            id="s1",
            instruments=(POLY, BAND),
            channels=frozenset({Channel.BOOK, Channel.TRADES}),
            conflate_ms=250,
            resume={BAND: ("e7f3c2", 43)},
        ),
    ),
    "subscribe duplicates collapse in order": (
        {"op": "subscribe", "instruments": [BAND, POLY, BAND, POLY], "channels": ["book", "book"]},
        Subscribe(id=None, instruments=(BAND, POLY)),
    ),
    "subscribe trades only": (
        {"op": "subscribe", "instruments": [BAND], "channels": ["trades"]},
        Subscribe(id=None, instruments=(BAND,), channels=frozenset({Channel.TRADES})),
    ),
    "subscribe conflate bounds": (
        {"op": "subscribe", "instruments": [BAND], "conflate_ms": 5000, "resume": {BAND: {"epoch": "", "seq": 0}}},
        Subscribe(id=None, instruments=(BAND,), conflate_ms=5000, resume={BAND: ("", 0)}),
    ),
    "subscribe empty resume": (
        {"op": "subscribe", "instruments": [BAND], "resume": {}},
        Subscribe(id=None, instruments=(BAND,)),
    ),
    "instrument ids may contain colons": (
        {"op": "subscribe", "instruments": ["kalshi:A:B:C"]},
        Subscribe(id=None, instruments=("kalshi:A:B:C",)),
    ),
    "subscribe 1000 instruments (the limit)": (
        {"op": "subscribe", "instruments": [f"coinbase:X{i}" for i in range(1000)] + ["coinbase:X0"]},
        Subscribe(id=None, instruments=tuple(f"coinbase:X{i}" for i in range(1000))),
    ),
    "unsubscribe": (
        {"op": "unsubscribe", "id": 2, "instruments": [BAND, BAND]},
        Unsubscribe(id=2, instruments=(BAND,)),
    ),
    "resync": ({"op": "resync", "id": 6, "instrument": POLY}, Resync(id=6, instrument=POLY)),
}


@pytest.mark.parametrize(("payload", "expected"), VALID.values(), ids=VALID.keys())
def test_valid_request_parses(payload, expected):
    assert _parse(payload) == expected


@pytest.mark.parametrize("frame", [b'{"op":"ping","id":1}', '{"op":"ping","id":1}', ' \n{ "op" : "ping", "id" : 1 } '])
def test_frame_may_be_bytes_or_str(frame):
    assert parse_request(frame, LIMITS) == Ping(id=1)


def test_channels_compare_equal_to_their_wire_strings():
    parsed = _parse({"op": "subscribe", "instruments": [BAND], "channels": ["trades"]})
    assert "trades" in parsed.channels and "book" not in parsed.channels


def test_limits_come_from_the_caller():
    limits = GatewayLimits(max_instruments_per_connection=2, conflate_ms_max=100)
    assert _parse({"op": "subscribe", "instruments": ["a:1", "a:2", "a:1"], "conflate_ms": 100}, limits).instruments == (
        "a:1",
        "a:2",
    )
    assert _refusal({"op": "subscribe", "instruments": ["a:1", "a:2", "a:3"]}, limits).code == (
        ErrorCode.TOO_MANY_INSTRUMENTS
    )
    assert "0..100" in _refusal({"op": "subscribe", "instruments": ["a:1"], "conflate_ms": 101}, limits).message


# ---------------------------------------------------------------------------------------------------
# Properties: parse_request only ever raises ProtocolError, and recovers the id whenever it is valid.

_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # the range orjson reads back as int
_scalars = st.none() | st.booleans() | _ints | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
_keys = st.sampled_from(["op", "id", "instruments", "instrument", "channels", "conflate_ms", "resume", "epoch", "seq"])
json_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys | st.text(max_size=6), children, max_size=5),
    max_leaves=25,
)
_instrumentish = st.sampled_from([BAND, POLY, "a:b", "x:y:z", "nope", ":x", "x:", ""]) | st.text(max_size=8)
_resume_entry = st.fixed_dictionaries({}, optional={"epoch": st.text(max_size=4) | json_values, "seq": _ints | json_values})
request_like = st.fixed_dictionaries(
    {},
    optional={
        "op": st.sampled_from([op.value for op in p.Op]) | json_values,
        "id": _ints | st.text(max_size=6) | json_values,
        "instruments": st.lists(_instrumentish | json_values, max_size=5) | json_values,
        "instrument": _instrumentish | json_values,
        "channels": st.lists(st.sampled_from(["book", "trades", "x"]) | json_values, max_size=3) | json_values,
        "conflate_ms": st.integers(-10, 6000) | json_values,
        "resume": st.dictionaries(_instrumentish, _resume_entry | json_values, max_size=3) | json_values,
    },
)


def _valid_id(payload: object) -> bool:
    if not isinstance(payload, dict) or "id" not in payload:
        return False
    return not isinstance(payload["id"], bool) and isinstance(payload["id"], (int, str))


@given(json_values | request_like)
def test_any_json_parses_or_raises_protocol_error(payload):
    try:
        request = _parse(payload)
    except ProtocolError as e:
        assert e.request_id == (payload["id"] if _valid_id(payload) else None)
        assert orjson.loads(p.error(e.code, e.message, e.request_id))["type"] == "error"
    else:
        assert request.id == payload.get("id")


@given(st.text() | st.binary())
def test_any_frame_parses_or_raises_protocol_error(frame):
    try:
        parse_request(frame, LIMITS)
    except ProtocolError:
        pass


_ids = st.none() | _ints | st.text(max_size=6)
_symbols = st.text(min_size=1, max_size=6)


@given(
    request_id=_ids,
    instruments=st.lists(st.builds("{}:{}".format, st.sampled_from(["coinbase", "polymarket"]), _symbols), min_size=1),
    channels=st.sets(st.sampled_from(Channel), min_size=1),
    conflate_ms=st.integers(0, 5000),
    data=st.data(),
)
def test_valid_subscribe_round_trips(request_id, instruments, channels, conflate_ms, data):
    resumed = data.draw(st.lists(st.sampled_from(instruments), unique=True))
    resume = {i: (data.draw(st.text(max_size=4)), data.draw(st.integers(0, 2**64 - 1))) for i in resumed}
    payload = {
        "op": "subscribe",
        "instruments": instruments,
        "channels": [c.value for c in channels],
        "conflate_ms": conflate_ms,
        "resume": {i: {"epoch": epoch, "seq": seq} for i, (epoch, seq) in resume.items()},
    }
    if request_id is not None:
        payload["id"] = request_id
    assert _parse(payload) == Subscribe(
        id=request_id,
        instruments=tuple(dict.fromkeys(instruments)),
        channels=frozenset(channels),
        conflate_ms=conflate_ms,
        resume=resume,
    )


# ---------------------------------------------------------------------------------------------------
# Replies: exactly the PROTOCOL.md section 4 examples ("..." filled in), key order included.

T = 1_765_450_800_123_456_789

REPLIES = {
    "subscribed": (
        lambda: p.subscribed(1, [BAND], {BAND: False}),
        b'{"type":"subscribed","id":1,"instruments":["coinbase:BAND-GBP"],"recovered":{"coinbase:BAND-GBP":false}}',
    ),
    "heartbeat": (
        lambda: p.heartbeat(T, {BAND: ("e7f3c2", 43)}),
        b'{"type":"heartbeat","ts_send_ns":%d,"seqs":{"coinbase:BAND-GBP":["e7f3c2",43]}}' % T,
    ),
    "resync": (
        lambda: p.resync(BAND, ResyncReason.SLOW_CONSUMER),
        b'{"type":"resync","instrument":"coinbase:BAND-GBP","reason":"slow_consumer"}',
    ),
    "unsubscribed": (
        lambda: p.unsubscribed(2, (BAND, POLY)),
        b'{"type":"unsubscribed","id":2,"instruments":["coinbase:BAND-GBP","%s"]}' % POLY.encode(),
    ),
    "pong": (lambda: p.pong(4, T), b'{"type":"pong","id":4,"ts_send_ns":%d}' % T),
    "error": (
        lambda: p.error(ErrorCode.UNKNOWN_INSTRUMENT, "no instrument 'coinbase:NOPE'", 3),
        b'{"type":"error","id":3,"code":"unknown_instrument","message":"no instrument \'coinbase:NOPE\'"}',
    ),
    "shutdown": (lambda: p.shutdown(500), b'{"type":"shutdown","reconnect_after_ms":500}'),
    # without an id the field is omitted, never null
    "subscribed no id": (
        lambda: p.subscribed(None, [BAND, POLY], {BAND: True, POLY: False}),
        b'{"type":"subscribed","instruments":["coinbase:BAND-GBP","%s"],"recovered":{"coinbase:BAND-GBP":true,"%s":false}}'
        % (POLY.encode(), POLY.encode()),
    ),
    "unsubscribed no id": (lambda: p.unsubscribed(None, [BAND]), b'{"type":"unsubscribed","instruments":["coinbase:BAND-GBP"]}'),
    "pong string id": (lambda: p.pong("p-1", T), b'{"type":"pong","id":"p-1","ts_send_ns":%d}' % T),
    "pong id 0": (lambda: p.pong(0, T), b'{"type":"pong","id":0,"ts_send_ns":%d}' % T),
    "error no id, code as string": (
        lambda: p.error("rate_limited", "over 20 requests/s"),
        b'{"type":"error","code":"rate_limited","message":"over 20 requests/s"}',
    ),
    "heartbeat nothing subscribed": (lambda: p.heartbeat(T, {}), b'{"type":"heartbeat","ts_send_ns":%d,"seqs":{}}' % T),
}


@pytest.mark.parametrize(("build", "expected"), REPLIES.values(), ids=REPLIES.keys())
def test_reply_matches_protocol_example(build, expected):
    encoded = build()
    assert orjson.loads(encoded) == orjson.loads(expected)
    assert encoded == expected


def test_reply_builders_refuse_codes_outside_the_protocol():
    with pytest.raises(ValueError):
        p.error("teapot", "no")
    with pytest.raises(ValueError):
        p.resync(BAND, "bored")


# ---------------------------------------------------------------------------------------------------
# Enums and limits are the PROTOCOL.md section 4/5 vocabulary and defaults.


def test_codes_are_the_protocol_vocabulary():
    assert {c.value for c in ErrorCode} == {
        "bad_request", "unknown_instrument", "too_many_instruments", "rate_limited", "unauthorized", "forbidden",
        "internal",
    }
    assert {c.name: c.value for c in CloseCode} == {
        "GOING_AWAY": 1001, "POLICY_VIOLATION": 1008, "MESSAGE_TOO_BIG": 1009, "UNAUTHORIZED": 4001,
        "SLOW_CONSUMER": 4008, "RATE_LIMITED": 4029,
        "PROTOCOL_ERROR": 1002, "INVALID_PAYLOAD": 1007, "INTERNAL_ERROR": 1011,  # RFC 6455 codes (issue 10)
    }
    assert {r.value for r in ResyncReason} == {"slow_consumer", "upstream_gap", "epoch_change"}


def test_limit_defaults_are_the_protocol_defaults():
    assert LIMITS == GatewayLimits(
        max_frame_bytes=65_536,
        max_instruments_per_connection=1000,
        requests_per_s=20.0,
        request_burst=50,
        max_rate_limited_in_a_row=100,
        max_queue_bytes=4_194_304,
        max_overflows=3,
        overflow_window_s=60.0,
        heartbeat_interval_s=1.0,
        conflate_ms_max=5000,
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"max_frame_bytes": 0},
        {"max_instruments_per_connection": -1},
        {"requests_per_s": 0.0},
        {"request_burst": 0},
        {"max_rate_limited_in_a_row": 0},
        {"overflow_window_s": -1.0},
        {"heartbeat_interval_s": 0},
        {"conflate_ms_max": -1},
    ],
)
def test_limits_refuse_non_positive_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GatewayLimits(**bad)


def test_conflate_ms_max_may_be_zero():
    limits = GatewayLimits(conflate_ms_max=0)
    assert _refusal({"op": "subscribe", "instruments": [BAND], "conflate_ms": 1}, limits).code == BAD
