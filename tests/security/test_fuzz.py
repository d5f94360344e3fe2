"""Hypothesis fuzzing of the parsers a hostile peer reaches: the client request parser, the venue parsers.

The property each time: no exception escapes other than the parser's documented one, and every refusal
is the documented error with a bounded message (an attacker's 8 KB string is never echoed whole).
Inputs are built three ways: raw bytes, arbitrary JSON values, and mutations of valid or real messages
(a field deleted, replaced by a value of another type, or a container nested inside out).
"""
from __future__ import annotations

import itertools
import json
from decimal import Decimal

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feed.errors import VenueMessageError
from feed.gateway.protocol import (
    ErrorCode,
    GatewayLimits,
    Ping,
    ProtocolError,
    Resync,
    Subscribe,
    Unsubscribe,
    parse_request,
)
from feed.model import ParseResult
from feed.venues import VENUES
from tests.conftest import SHARED_DATA

LIMITS = GatewayLimits(max_instruments_per_connection=5)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_MESSAGE_CHARS = 400  # an error message never grows with the input beyond this

# JSON values, including the awkward ones: huge and negative ints, floats, deep nesting, long strings,
# non-BMP text, lone surrogates are impossible in JSON text so they are left out.
LONG_STRINGS = st.sampled_from(["x" * 8000, "coinbase:" + "9" * 8000, "\u00e9" * 3000, "\U0001F600" * 2000])
SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False,
           allow_infinity=False) | st.text(max_size=20) | LONG_STRINGS)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                                      max_size=5), max_leaves=12)
INSTRUMENT = st.sampled_from(["coinbase:BAND-GBP", "polymarket:" + "7" * 70, "kalshi:A:B", "x:" + "y" * 8000])
OPS = st.sampled_from(["subscribe", "unsubscribe", "resync", "ping", "Ping", "", "subscribe "])
FIELD_VALUES = JSON | st.lists(INSTRUMENT, min_size=1, max_size=8) | st.just(["book", "trades"])


def _check_request_outcome(text: bytes | str) -> None:
    try:
        req = parse_request(text, LIMITS)
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_MANY_INSTRUMENTS)
        assert len(exc.message) <= MAX_MESSAGE_CHARS, exc.message[:200]
        assert exc.request_id is None or isinstance(exc.request_id, (int, str))
        return
    assert isinstance(req, (Subscribe, Unsubscribe, Resync, Ping))
    if isinstance(req, (Subscribe, Unsubscribe)):
        assert 1 <= len(req.instruments) <= LIMITS.max_instruments_per_connection
        assert len(set(req.instruments)) == len(req.instruments)


@FUZZ
@given(st.binary(max_size=300))
def test_request_parser_on_raw_bytes(data):
    _check_request_outcome(data)


@FUZZ
@given(JSON)
def test_request_parser_on_any_json_value(value):
    _check_request_outcome(orjson.dumps(value))


@FUZZ
@given(op=OPS, fields=st.dictionaries(st.sampled_from(["id", "instruments", "instrument", "channels",
                                                        "conflate_ms", "resume", "extra"]), FIELD_VALUES, max_size=5))
def test_request_parser_on_near_valid_requests(op, fields):
    payload = dict(fields, op=op)
    _check_request_outcome(orjson.dumps(payload))
    try:
        req = parse_request(orjson.dumps(payload), LIMITS)
    except ProtocolError as exc:
        valid_id = "id" in payload and isinstance(payload["id"], (int, str)) and not isinstance(payload["id"], bool)
        if valid_id:
            assert exc.request_id == payload["id"]  # the reply can always be matched to its request
        return
    assert req.id == payload.get("id")


# valid requests of every op, with every optional field: mutated, they reach the checks of each field
REQUEST_SEEDS = [
    {"op": "subscribe", "id": 1, "instruments": ["coinbase:BAND-GBP", "kalshi:A:B"], "channels": ["book", "trades"],
     "conflate_ms": 100, "resume": {"coinbase:BAND-GBP": {"epoch": "e", "seq": 4}}},
    {"op": "unsubscribe", "id": "a", "instruments": ["kalshi:A:B"]},
    {"op": "resync", "id": 2, "instrument": "polymarket:1"},
    {"op": "ping", "id": 3},
]


@FUZZ
@given(data=st.data())
def test_request_parser_on_mutated_valid_requests(data):
    seed = data.draw(st.sampled_from(REQUEST_SEEDS))
    path = data.draw(st.lists(st.integers(0, 20), min_size=1, max_size=4))
    replacement = data.draw(st.just(_DELETE) | NUMBERISH | JSON | INSTRUMENT)
    _check_request_outcome(orjson.dumps(_mutate(seed, path, replacement)))


def test_request_parser_accepts_the_seeds():
    for seed in REQUEST_SEEDS:
        assert parse_request(orjson.dumps(seed), LIMITS).id == seed["id"]


@pytest.mark.parametrize("text,code,needle", [
    (b"\xff\xfe{", ErrorCode.BAD_REQUEST, None),  # invalid UTF-8
    (b'{"op":"ping","id":' + b"9" * 40 + b"}", ErrorCode.BAD_REQUEST, None),  # a number JSON allows, orjson can't
    (b"[" * 2000 + b"]" * 2000, ErrorCode.BAD_REQUEST, None),  # nesting deeper than the decoder's limit
    (orjson.dumps({"op": "subscribe", "instruments": ["nocolon" + "x" * 8000]}), ErrorCode.BAD_REQUEST, "..."),
    (orjson.dumps({"op": "subscribe", "instruments": [f"a:{i}" for i in range(6)]}),
     ErrorCode.TOO_MANY_INSTRUMENTS, None),
])
def test_request_parser_documented_answers(text, code, needle):
    with pytest.raises(ProtocolError) as info:
        parse_request(text, LIMITS)
    assert info.value.code is code
    assert len(info.value.message) <= MAX_MESSAGE_CHARS
    if needle:
        assert needle in info.value.message


# -- venue parsers ---------------------------------------------------------------------------------

def _real_messages(venue: str, path, n: int) -> list:
    with open(path) as f:
        return [json.loads(line)["msg"] for line in itertools.islice(f, n)]


REAL = {
    "coinbase": _real_messages("coinbase", SHARED_DATA / "coinbase" / "coinbase-level2-20210417.jsonl", 400),
    "polymarket": _real_messages("polymarket", SHARED_DATA / "polymarket" / "btc-1h-20251211.jsonl", 60),
}
for _line in open(SHARED_DATA / "polymarket" / "ws-book-with-hash-20260212.jsonl"):
    REAL["polymarket"].append(json.loads(_line))
REAL["kalshi"] = [json.loads(_line) for _name in ("ws-trade-20260212.jsonl", "ws-ticker-20260212.jsonl")
                  for _line in itertools.islice(open(SHARED_DATA / "kalshi" / _name), 100)]
# one real message of each type the parsers handle, so mutations reach every handler
SEEDS = {venue: list({(m.get("type") or m.get("event_type")) if isinstance(m, dict) else "list": m
                      for m in msgs}.values()) for venue, msgs in REAL.items()}


def _check_venue_outcome(venue: str, msg) -> None:
    try:
        result = VENUES[venue](msg)
    except VenueMessageError:
        return  # the documented refusal (bounded: test_venue_refusals_quote_values_truncated)
    assert isinstance(result, ParseResult)
    for event in result.events:
        for value in _decimals(event):
            assert value.is_finite() and value >= 0


def _decimals(event):
    for name in ("price", "size", "tick_size"):
        v = getattr(event, name, None)
        if isinstance(v, Decimal):
            yield v
    for side in ("bids", "asks"):
        for level in getattr(event, side, ()) or ():
            yield from level
    for change in getattr(event, "changes", ()) or ():
        yield change.price
        yield change.size


def _mutate(value, draw_path, replacement):
    """``value`` with the node at ``draw_path`` (indices into containers) replaced, or deleted if None."""
    if not draw_path or not isinstance(value, (dict, list)) or not value:
        return value if replacement is _DELETE else replacement
    step, rest = draw_path[0], draw_path[1:]
    if isinstance(value, dict):
        key = sorted(value)[step % len(value)]
        out = dict(value)
        if not rest and replacement is _DELETE:
            del out[key]
        else:
            out[key] = _mutate(value[key], rest, replacement)
        return out
    i = step % len(value)
    out = list(value)
    if not rest and replacement is _DELETE:
        del out[i]
    else:
        out[i] = _mutate(value[i], rest, replacement)
    return out


_DELETE = object()
NUMBERISH = st.sampled_from(["0", "-1", "1e999999", "NaN", "Infinity", "0x10", "", " 1", "1_000", "٣",
                             "0.1.2", "1E+5", "9" * 60, "-0"])


@pytest.mark.parametrize("venue", sorted(VENUES))
@FUZZ
@given(data=st.data())
def test_venue_parsers_on_mutated_real_messages(venue, data):
    seed = data.draw(st.sampled_from(SEEDS[venue]))
    path = data.draw(st.lists(st.integers(0, 50), min_size=1, max_size=4))
    replacement = data.draw(st.just(_DELETE) | NUMBERISH | JSON)
    _check_venue_outcome(venue, _mutate(seed, path, replacement))


@pytest.mark.parametrize("venue", sorted(VENUES))
@FUZZ
@given(JSON)
def test_venue_parsers_on_any_json_value(venue, value):
    _check_venue_outcome(venue, value)


@pytest.mark.parametrize("venue", sorted(VENUES))
def test_venue_parsers_accept_every_real_message(venue):
    for msg in REAL[venue]:
        assert isinstance(VENUES[venue](msg), ParseResult)


@pytest.mark.parametrize("venue,msg", [
    ("coinbase", {"type": "snapshot", "product_id": "X-Y", "bids": [["1", "1e999999999"]], "asks": []}),
])
def test_venue_parsers_refuse_numbers_whose_canonical_form_is_huge(venue, msg):
    with pytest.raises(VenueMessageError):
        VENUES[venue](msg)


# -- the wire decoder (what the gateway reads from NATS and the SDK from a gateway) -------------------

WIRE_SEEDS = [
    {"type": "snapshot", "instrument": "coinbase:BAND-GBP", "epoch": "e", "seq": 4, "bids": [["14.75", "3.1"]],
     "asks": [["14.8", "1.2"]], "checksum": 1, "ts_ingest_ns": 1, "ts_publish_ns": 2, "status": "ok"},
    {"type": "delta", "instrument": "coinbase:BAND-GBP", "epoch": "e", "seq": 5, "prev_seq": 4,
     "changes": [["bid", "14.755", "0"], ["ask", "14.801", "7.5"]], "checksum": 2, "ts_ingest_ns": 1,
     "ts_publish_ns": 2},
    {"type": "trade", "instrument": "polymarket:1", "price": "0.45", "size": "10", "side": "buy", "ts_ingest_ns": 1},
    {"type": "heartbeat", "ts_send_ns": 1, "seqs": {"coinbase:BAND-GBP": ["e", 43]}},
    {"type": "instrument_status", "instrument": "polymarket:1", "status": "stale", "reason": "upstream_silent",
     "since_ns": 1, "ts_publish_ns": 2},
    {"type": "error", "id": 3, "code": "unknown_instrument", "message": "no"},
    {"type": "resync", "instrument": "x:y", "reason": "slow_consumer"},
    {"type": "shutdown", "reconnect_after_ms": 500},
    {"type": "subscribed", "id": 1, "instruments": ["x:y"], "recovered": {"x:y": False}},
]


def _check_wire_outcome(data) -> None:
    from feed import wire
    from feed.errors import WireError

    try:
        msg = wire.decode(data)
    except WireError:
        return  # the documented refusal (its length: the same finding as the venue parsers')
    assert msg is not None


@FUZZ
@given(st.binary(max_size=300))
def test_wire_decoder_on_raw_bytes(data):
    _check_wire_outcome(data)


@FUZZ
@given(data=st.data())
def test_wire_decoder_on_mutated_messages(data):
    seed = data.draw(st.sampled_from(WIRE_SEEDS))
    path = data.draw(st.lists(st.integers(0, 20), min_size=1, max_size=3))
    replacement = data.draw(st.just(_DELETE) | NUMBERISH | JSON)
    _check_wire_outcome(orjson.dumps(_mutate(seed, path, replacement)))


def test_wire_decoder_accepts_the_seeds():
    from feed import wire

    for seed in WIRE_SEEDS:
        assert type(wire.decode(orjson.dumps(seed))).__name__ != "Unknown"


def test_venue_refusals_quote_values_truncated():
    msg = {"type": ["x" * 8000] * 3, "product_id": "X-Y"}
    with pytest.raises(VenueMessageError) as info:
        VENUES["coinbase"](msg)
    assert len(str(info.value)) <= MAX_MESSAGE_CHARS


def test_wire_refusals_quote_values_truncated():
    from feed import wire
    from feed.errors import WireError

    with pytest.raises(WireError) as info:
        wire.decode(orjson.dumps(dict(WIRE_SEEDS[0], epoch=["x" * 8000])))
    assert len(str(info.value)) <= MAX_MESSAGE_CHARS
