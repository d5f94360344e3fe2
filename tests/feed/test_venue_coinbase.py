"""Coinbase Exchange feed parser: hand-written wire samples, malformed cases, RFC 3339 times, the real capture."""
from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from feed.book import L2Book
from feed.errors import VenueMessageError
from feed.model import AggressorSide, BookDelta, BookSnapshot, LevelChange, ParseResult, Side, Trade
from feed.sequencer import BookEngine, InstrumentAdded, SequencedDelta
from feed.venues import coinbase

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CAPTURE = DATA / "coinbase" / "coinbase-level2-20210417.jsonl"
D = Decimal
T_NS = 1618677817123456000  # 2021-04-17T16:43:37.123456Z
BAND = "coinbase:BAND-GBP"
SKL = "coinbase:SKL-BTC"

SNAPSHOT = {
    "type": "snapshot",
    "product_id": "BAND-GBP",
    "bids": [["14.755", "3.1"], ["14.75", "20"]],
    "asks": [["14.806", "1.2"]],
}
L2UPDATE = {
    "type": "l2update",
    "product_id": "BAND-GBP",
    "time": "2021-04-17T16:43:37.123456Z",
    "changes": [["buy", "14.755", "0"], ["sell", "14.801", "7.5"]],
}
MATCH = {
    "type": "match",
    "trade_id": 280232,
    "maker_order_id": "2a0da34e-61f7-4c36-88e5-c9dd15927b16",
    "taker_order_id": "3c82abaa-c01e-4608-be59-6a1e69742891",
    "side": "sell",
    "size": "985",
    "price": "0.00001305",
    "product_id": "SKL-BTC",
    "sequence": 177100030,
    "time": "2021-04-17T16:43:37.123456Z",
}


def without(msg: dict, field: str) -> dict:
    return {k: v for k, v in msg.items() if k != field}


@pytest.mark.parametrize(
    ("msg", "events"),
    [
        pytest.param(
            SNAPSHOT,
            [BookSnapshot(BAND, ((D("14.755"), D("3.1")), (D("14.75"), D(20))), ((D("14.806"), D("1.2")),))],
            id="snapshot-no-time",
        ),
        pytest.param(
            SNAPSHOT | {"bids": [], "time": "2021-04-17T16:43:37.123456Z"},
            [BookSnapshot(BAND, (), ((D("14.806"), D("1.2")),), T_NS)],
            id="snapshot-with-time",
        ),
        pytest.param(
            L2UPDATE,
            [
                BookDelta(
                    BAND,
                    (LevelChange(Side.BID, D("14.755"), D(0)), LevelChange(Side.ASK, D("14.801"), D("7.5"))),
                    T_NS,
                )
            ],
            id="l2update",
        ),
        # The maker sold, so the taker bought: the aggressor is the opposite of Coinbase's side.
        pytest.param(
            MATCH, [Trade(SKL, D("0.00001305"), D(985), AggressorSide.BUY, T_NS, "280232")], id="match-maker-sell"
        ),
        pytest.param(
            MATCH | {"type": "last_match", "side": "buy", "trade_id": "abc"},
            [Trade(SKL, D("0.00001305"), D(985), AggressorSide.SELL, T_NS, "abc")],
            id="last_match-maker-buy",
        ),
    ],
)
def test_parses_wire_samples(msg, events):
    assert coinbase.parse(msg) == ParseResult(events, None)


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        ({"type": "subscriptions", "channels": [{"name": "level2", "product_ids": ["X"]}]}, "type 'subscriptions'"),
        ({"type": "ticker", "product_id": "BAND-GBP", "price": "14.7"}, "type 'ticker'"),
        ({"type": "heartbeat", "sequence": 90, "last_trade_id": 20, "product_id": "BTC-USD"}, "type 'heartbeat'"),
        ({"type": "received", "order_id": "x"}, "type 'received'"),
        ({"type": "open"}, "type 'open'"),
        ({"type": "done"}, "type 'done'"),
        ({"type": "error", "message": "Failed to subscribe", "reason": "level2 requires auth"},
         "error 'Failed to subscribe' reason='level2 requires auth'"),
        ({"type": "some_future_type"}, "type 'some_future_type'"),
    ],
)
def test_ignores_what_it_does_not_parse(msg, reason):
    assert coinbase.parse(msg) == ParseResult([], reason)


MALFORMED = [
    ("text", "coinbase: message must be an object, got str"),
    ([SNAPSHOT], "coinbase: message must be an object, got list"),
    (without(SNAPSHOT, "type"), "coinbase: missing field 'type'"),
    (SNAPSHOT | {"type": 3}, "coinbase: field 'type' must be a string"),
    (without(SNAPSHOT, "product_id"), "coinbase snapshot: missing field 'product_id'"),
    (SNAPSHOT | {"product_id": ""}, "coinbase snapshot: field 'product_id' must be a non-empty string"),
    (without(SNAPSHOT, "asks"), "coinbase snapshot: missing field 'asks'"),
    (SNAPSHOT | {"bids": "14.7"}, "coinbase snapshot: field 'bids' must be a list"),
    (SNAPSHOT | {"bids": [["14.7", "1", "order-id"]]}, "coinbase snapshot: field 'bids[0]' must be a list of 2"),
    (SNAPSHOT | {"asks": [["14.8", "-1"]]}, "coinbase snapshot: bad field 'asks[0][1]'"),
    (SNAPSHOT | {"asks": [["1e", "1"]]}, "coinbase snapshot: bad field 'asks[0][0]'"),
    (SNAPSHOT | {"asks": [[14.8, "1"]]}, "coinbase snapshot: bad field 'asks[0][0]'"),
    (SNAPSHOT | {"time": "yesterday"}, "coinbase snapshot: bad field 'time'"),
    (without(L2UPDATE, "time"), "coinbase l2update: missing field 'time'"),
    (L2UPDATE | {"time": 1618677817}, "coinbase l2update: bad field 'time'"),
    (L2UPDATE | {"time": "2021-02-30T16:43:37.123Z"}, "coinbase l2update: bad field 'time'"),
    (without(L2UPDATE, "changes"), "coinbase l2update: missing field 'changes'"),
    (L2UPDATE | {"changes": [["buy", "14.7"]]}, "coinbase l2update: field 'changes[0]' must be a list of 3"),
    (L2UPDATE | {"changes": [["bid", "14.7", "1"]]}, "coinbase l2update: bad field 'changes[0][0]'"),
    (L2UPDATE | {"changes": [["buy", "0", "1"]]}, "coinbase l2update: bad field 'changes[0][1]': must be positive"),
    (L2UPDATE | {"changes": [["sell", "14.7", "-0.5"]]}, "coinbase l2update: bad field 'changes[0][2]'"),
    (L2UPDATE | {"changes": [["sell", "14.7", "Infinity"]]}, "coinbase l2update: bad field 'changes[0][2]'"),
    (MATCH | {"side": "BUY"}, "coinbase match: bad field 'side'"),
    (without(MATCH, "trade_id"), "coinbase match: missing field 'trade_id'"),
    (MATCH | {"trade_id": True}, "coinbase match: bad field 'trade_id'"),
    (MATCH | {"size": None}, "coinbase match: bad field 'size'"),
    (without(MATCH, "price") | {"type": "last_match"}, "coinbase last_match: missing field 'price'"),
]


@pytest.mark.parametrize(("msg", "error"), MALFORMED)
def test_malformed_raises_naming_type_and_field(msg, error):
    with pytest.raises(VenueMessageError) as caught:
        coinbase.parse(msg)
    assert str(caught.value).startswith(error), str(caught.value)


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("1970-01-01T00:00:00Z", 0),
        ("2021-04-17T16:43:37Z", 1618677817_000000000),
        ("2021-04-17T16:43:37.123456Z", T_NS),
        ("2021-04-17T16:43:37.1Z", 1618677817_100000000),
        ("2021-04-17T16:43:37.123456789Z", 1618677817_123456789),
        ("2021-04-17T18:43:37.123456+02:00", T_NS),
        ("2021-04-17T16:13:37.123456-00:30", T_NS),
        ("1969-12-31T23:59:59.5Z", -500_000_000),
    ],
)
def test_parse_time_ns(text, ns):
    assert coinbase.parse_time_ns(text) == ns


@pytest.mark.parametrize(
    "text",
    ["2021-04-17T16:43:37", "2021-04-17 16:43:37Z", "2021-04-17T16:43:37.1234567891Z", "2021-04-17T16:43:60Z",
     "2021-13-01T00:00:00Z", "2021-04-17T16:43:37.Z", " 2021-04-17T16:43:37Z", "2021-04-17T16:43:37+2:00"],
)
def test_parse_time_ns_rejects(text):
    with pytest.raises(ValueError):
        coinbase.parse_time_ns(text)


@given(
    moment=st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1)),
    extra_ns=st.integers(0, 999),
    offset_min=st.integers(-23 * 60, 23 * 60),
)
def test_parse_time_ns_is_exact(moment, extra_ns, offset_min):
    utc = moment.replace(tzinfo=timezone.utc)
    expected = (utc - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1) * 1000 + extra_ns
    offset = timedelta(minutes=offset_min)
    local = utc.astimezone(timezone(offset))
    sign = "-" if offset_min < 0 else "+"
    zone = f"{sign}{abs(offset_min) // 60:02d}:{abs(offset_min) % 60:02d}"
    text = f"{local:%Y-%m-%dT%H:%M:%S}.{local.microsecond:06d}{extra_ns:03d}{zone}"
    assert coinbase.parse_time_ns(text) == expected


# -- the real recording ----------------------------------------------------------------------------------
def capture_records() -> list[dict]:
    assert CAPTURE.is_file(), f"shared recording missing: {CAPTURE}"
    with CAPTURE.open("rb") as lines:
        return [orjson.loads(line) for line in lines]


def test_every_real_line_parses():
    outcomes: Counter[str] = Counter()
    for record in capture_records():
        result = coinbase.parse(record["msg"])
        if result.ignored:
            outcomes[result.ignored] += 1
            assert not result.events
            continue
        (event,) = result.events
        outcomes[type(event).__name__] += 1
        assert event.instrument == f"coinbase:{record['msg']['product_id']}"
        if isinstance(event, BookDelta):
            # The recorder's clock ran ~13 ms behind Coinbase's (latency -18 ms .. +103 ms); a wrong zone
            # or unit in the time parse would be off by hours or orders of magnitude.
            assert abs(record["recv_ts_ns"] - event.ts_event_ns) < 1_000_000_000
    assert outcomes == {
        "BookDelta": 9719,
        "BookSnapshot": 10,
        "Trade": 107,  # 97 match + 10 last_match
        "type 'ticker'": 107,
        "type 'subscriptions'": 3,
    }


def test_engine_on_real_capture_is_contiguous_and_uncrossed():
    engine = BookEngine("test")
    client_books: dict[str, L2Book] = {}  # what a consumer of the sequenced deltas would hold
    deltas: dict[str, list[SequencedDelta]] = defaultdict(list)
    for record in capture_records():
        for event in coinbase.parse(record["msg"]).events:
            for out in engine.apply(event):
                if isinstance(out, InstrumentAdded):
                    client_books[out.instrument] = book = L2Book(out.instrument)
                    book.apply_snapshot(event.bids, event.asks)
                elif isinstance(out, SequencedDelta):
                    deltas[out.instrument].append(out)
                    client_books[out.instrument].apply_changes(out.changes)
                    assert client_books[out.instrument].checksum() == out.checksum
    assert len(client_books) == 10 and set(deltas) == set(client_books)
    for instrument, book in client_books.items():
        assert book == engine.instruments[instrument].book
    for ds in deltas.values():
        assert [(d.prev_seq, d.seq) for d in ds] == [(n - 1, n) for n in range(1, len(ds) + 1)]
    # Found on this recording: every l2update changed its book, and no book was ever crossed.
    assert sum(map(len, deltas.values())) == 9719
    assert engine.crossed == 0
