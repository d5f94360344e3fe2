"""Polymarket market-channel parser: hand-written wire samples, malformed cases, and the real captures."""
from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from feed.book import L2Book
from feed.errors import RemoteError, VenueMessageError
from feed.model import AggressorSide, BookDelta, BookSnapshot, LevelChange, ParseResult, Side, TickSizeChange, Trade
from feed.sequencer import BookEngine, SequencedDelta
from feed.venues import VENUES, UnknownVenue, coinbase, parser_for, polymarket

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CAPTURES = ("polymarket/btc-1h-20251211.jsonl", "polymarket/sol-15m-20251211.jsonl")
TOKEN_A = "65818619657568813474341868652308942079804919287380422192892211131408793125422"
TOKEN_B = "52114319501245915516055106046884209969926127482827954674443846427813813222426"
D = Decimal
TS_MS = "1757908892351"
TS_NS = 1757908892351 * 1_000_000


def capture_lines(name: str) -> list[dict]:
    path = DATA / name
    assert path.is_file(), f"shared recording missing: {path}"
    with path.open("rb") as lines:
        records = [orjson.loads(line) for line in lines]
    assert records, f"empty recording {path}"
    return records


def book_msg(**overrides) -> dict:
    msg = {
        "event_type": "book",
        "asset_id": TOKEN_A,
        "market": "0xbd31dc8a20211944f6b70f31557f1001557b59905b7738480ca09bd4532f84af",
        "bids": [{"price": ".48", "size": "30"}, {"price": ".49", "size": "20"}],
        "asks": [{"price": ".53", "size": "60"}, {"price": ".52", "size": "25"}],
        "timestamp": "1765450842197",
        "hash": "0x0",
    }
    return msg | overrides


def current_price_change(*entries: dict) -> dict:
    return {"event_type": "price_change", "market": "0x5f65", "price_changes": list(entries), "timestamp": TS_MS}


def entry(asset_id: str, price: str, size: str, side: str) -> dict:
    return {"asset_id": asset_id, "price": price, "size": size, "side": side, "hash": "5662", "best_bid": "0.5"}


LEGACY_PRICE_CHANGE = {
    "event_type": "price_change",
    "asset_id": TOKEN_A,
    "market": "0x5f65",
    "changes": [{"price": "0.4", "side": "SELL", "size": "0"}, {"price": "0.39", "side": "BUY", "size": "12.5"}],
    "timestamp": "1729084877448",
}
TRADE = {
    "event_type": "last_trade_price",
    "asset_id": TOKEN_A,
    "market": "0x5f65",
    "price": "0.456",
    "size": "219.22",
    "side": "BUY",
    "fee_rate_bps": "0",
    "timestamp": "1750428146322",
}
TICK = {
    "event_type": "tick_size_change",
    "asset_id": TOKEN_A,
    "market": "0x5f65",
    "old_tick_size": "0.01",
    "new_tick_size": "0.001",
    "timestamp": "100000000",
}
INST_A = f"polymarket:{TOKEN_A}"
INST_B = f"polymarket:{TOKEN_B}"
BOOK_NS = 1765450842197 * 1_000_000
OLD_NS = 1729084877448 * 1_000_000
TRADE_NS = 1750428146322 * 1_000_000
PC = "polymarket price_change"
BOOK = "polymarket book"

PARSED = [
    pytest.param(
        book_msg(),
        [BookSnapshot(INST_A, ((D(".48"), D(30)), (D(".49"), D(20))), ((D(".53"), D(60)), (D(".52"), D(25))), BOOK_NS,
                      venue_hash="0x0")],
        id="book",
    ),
    pytest.param(
        book_msg(bids=[], asks=[], timestamp=1765450842197),
        [BookSnapshot(INST_A, (), (), BOOK_NS, venue_hash="0x0")],
        id="book-empty-int-timestamp",
    ),
    pytest.param(
        LEGACY_PRICE_CHANGE,
        [BookDelta(INST_A, (LevelChange(Side.ASK, D(".4"), D(0)), LevelChange(Side.BID, D(".39"), D("12.5"))), OLD_NS)],
        id="price_change-legacy",
    ),
    pytest.param(
        current_price_change(
            entry(TOKEN_A, "0.5", "200", "BUY"),
            entry(TOKEN_B, "0.5", "200", "SELL"),
            entry(TOKEN_A, "0.51", "0", "SELL"),
        ),
        [
            BookDelta(INST_A, (LevelChange(Side.BID, D("0.5"), D(200)), LevelChange(Side.ASK, D("0.51"), D(0))), TS_NS,
                      venue_hash="5662", venue_best_bid=D("0.5")),
            BookDelta(INST_B, (LevelChange(Side.ASK, D("0.5"), D(200)),), TS_NS, venue_hash="5662",
                      venue_best_bid=D("0.5")),
        ],
        id="price_change-current-two-assets",
    ),
    pytest.param(TRADE, [Trade(INST_A, D("0.456"), D("219.22"), AggressorSide.BUY, TRADE_NS)], id="trade-upper"),
    pytest.param(
        TRADE | {"side": "sell"},
        [Trade(INST_A, D("0.456"), D("219.22"), AggressorSide.SELL, TRADE_NS)],
        id="trade-lower",
    ),
    pytest.param(TICK, [TickSizeChange(INST_A, D("0.001"), 100000000000000)], id="tick_size_change"),
    pytest.param(
        [book_msg(asset_id=TOKEN_B, bids=[], asks=[]), TRADE],
        [BookSnapshot(INST_B, (), (), BOOK_NS, venue_hash="0x0"), Trade(INST_A, D("0.456"), D("219.22"), AggressorSide.BUY, TRADE_NS)],
        id="list-on-subscribe",
    ),
]


@pytest.mark.parametrize(("msg", "events"), PARSED)
def test_parses_wire_samples(msg, events):
    assert polymarket.parse(msg) == ParseResult(events, None)


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        pytest.param({"event_type": "user_trade", "asset_id": TOKEN_A}, "event_type 'user_trade'", id="unknown"),
        pytest.param({"message": "subscribed"}, "no event_type", id="no-event-type"),
        pytest.param("PONG", "text frame 'PONG'", id="keepalive-text"),
        pytest.param([], "empty list", id="empty-list"),
        pytest.param([{"event_type": "x"}, "PONG"], "event_type 'x'; text frame 'PONG'", id="list-of-ignored"),
    ],
)
def test_ignores_what_it_does_not_parse(msg, reason):
    assert polymarket.parse(msg) == ParseResult([], reason)


MALFORMED = [
    (book_msg(asset_id=None), "polymarket book: field 'asset_id' must be a non-empty string"),
    ({k: v for k, v in book_msg().items() if k != "asset_id"}, "polymarket book: missing field 'asset_id'"),
    ({k: v for k, v in book_msg().items() if k != "asks"}, "polymarket book: missing field 'asks'"),
    ({k: v for k, v in book_msg().items() if k != "timestamp"}, "polymarket book: missing field 'timestamp'"),
    (book_msg(timestamp="1765450842.197"), "polymarket book: bad field 'timestamp'"),
    (book_msg(timestamp=True), "polymarket book: bad field 'timestamp'"),
    (book_msg(bids={"price": "0.5", "size": "1"}), "polymarket book: field 'bids' must be a list"),
    (book_msg(bids=[["0.5", "1"]]), "polymarket book: field 'bids[0]' must be an object"),
    (book_msg(bids=[{"price": "0.5"}]), "polymarket book: missing field 'bids[0].size'"),
    (book_msg(asks=[{"price": ".5", "size": "1"}, {"price": "x", "size": "1"}]), f"{BOOK}: bad field 'asks[1].price'"),
    (book_msg(asks=[{"price": "0.5", "size": "-1"}]), "polymarket book: bad field 'asks[0].size'"),
    (book_msg(asks=[{"price": "0", "size": "1"}]), "polymarket book: bad field 'asks[0].price': must be positive"),
    (book_msg(asks=[{"price": 0.5, "size": "1"}]), "polymarket book: bad field 'asks[0].price'"),
    (book_msg(asks=[{"price": "NaN", "size": "1"}]), "polymarket book: bad field 'asks[0].price'"),
    ({"event_type": "price_change", "market": "m", "timestamp": "1"}, f"{PC}: missing field 'changes'"),
    (current_price_change({"price": ".5", "size": "1"}), f"{PC}: missing field 'price_changes[0].asset_id'"),
    (current_price_change(entry(TOKEN_A, "0.5", "1", "HOLD")), f"{PC}: bad field 'price_changes[0].side'"),
    (current_price_change(entry(TOKEN_A, "0.5", "x", "BUY")), f"{PC}: bad field 'price_changes[0].size'"),
    (current_price_change("0.5"), f"{PC}: field 'price_changes[0]' must be an object"),
    (LEGACY_PRICE_CHANGE | {"changes": [{"price": "0.4", "size": "1"}]}, f"{PC}: missing field 'changes[0].side'"),
    (TRADE | {"side": None}, "polymarket last_trade_price: bad field 'side'"),
    (TRADE | {"size": "-3"}, "polymarket last_trade_price: bad field 'size'"),
    ({k: v for k, v in TRADE.items() if k != "price"}, "polymarket last_trade_price: missing field 'price'"),
    (TICK | {"new_tick_size": "0"}, "polymarket tick_size_change: bad field 'new_tick_size': must be positive"),
    ({"event_type": ["book"]}, "polymarket: field 'event_type' must be a string"),
    (42, "polymarket: message must be an object, got int"),
    ([book_msg(), None], "polymarket: message must be an object, got NoneType"),
]


@pytest.mark.parametrize(("msg", "error"), MALFORMED)
def test_malformed_raises_naming_type_and_field(msg, error):
    with pytest.raises(VenueMessageError) as caught:
        polymarket.parse(msg)
    assert str(caught.value).startswith(error), str(caught.value)


decimals = st.decimals(min_value=D("0.0001"), max_value=D("1000000"), places=4).map(lambda d: (d, format(d, "f")))


@given(
    bids=st.lists(st.tuples(decimals, decimals), max_size=20),
    asks=st.lists(st.tuples(decimals, decimals), max_size=20),
)
def test_book_levels_parse_exactly_in_wire_order(bids, asks):
    msg = book_msg(
        bids=[{"price": p[1], "size": s[1]} for p, s in bids],
        asks=[{"price": p[1], "size": s[1]} for p, s in asks],
    )
    (snapshot,) = polymarket.parse(msg).events
    assert snapshot.bids == tuple((p[0], s[0]) for p, s in bids)
    assert snapshot.asks == tuple((p[0], s[0]) for p, s in asks)


@given(
    st.lists(
        st.tuples(st.sampled_from([TOKEN_A, TOKEN_B, "btc-up"]), st.sampled_from(["BUY", "SELL"]), decimals), min_size=1
    )
)
def test_current_price_change_groups_by_asset_keeping_order(changes):
    msg = current_price_change(*(entry(asset, "0.5", size[1], side) for asset, side, size in changes))
    deltas = polymarket.parse(msg).events
    first_seen = list(dict.fromkeys(asset for asset, _, _ in changes))
    assert [d.instrument for d in deltas] == [f"polymarket:{asset}" for asset in first_seen]
    for asset, delta in zip(first_seen, deltas, strict=True):
        expected = [(Side.BID if side == "BUY" else Side.ASK, size[0]) for a, side, size in changes if a == asset]
        assert [(c.side, c.size) for c in delta.changes] == expected


def test_registry():
    assert parser_for("polymarket") is polymarket.parse
    assert parser_for("coinbase") is coinbase.parse
    assert set(VENUES) == {"polymarket", "coinbase", "kalshi"}
    with pytest.raises(UnknownVenue, match=r"unknown venue 'binance'; known venues: coinbase, kalshi, polymarket") as caught:
        parser_for("binance")
    assert isinstance(caught.value, RemoteError) and isinstance(caught.value, ValueError)


# -- the real recordings -------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "books", "trades"), [(CAPTURES[0], 600, 300), (CAPTURES[1], 496, 247)])
def test_every_real_line_parses(name, books, trades):
    kinds: dict[type, int] = defaultdict(int)
    for record in capture_lines(name):
        result = polymarket.parse(record["msg"])
        assert result.ignored is None and len(result.events) == 1
        event = result.events[0]
        kinds[type(event)] += 1
        assert event.instrument == f"polymarket:{record['msg']['asset_id']}"
        # The venue stamps before we receive: 118 ms .. 6 s in these files.
        assert 0 < record["recv_ts_ns"] - event.ts_event_ns < 10_000_000_000
    assert kinds == {BookSnapshot: books, Trade: trades}  # the counts data/README.md gives


@pytest.mark.parametrize("name", CAPTURES)
def test_up_and_down_books_mirror(name):
    books_by_ts: dict[int, dict[str, BookSnapshot]] = defaultdict(dict)
    for record in capture_lines(name):
        (event,) = polymarket.parse(record["msg"]).events
        if isinstance(event, BookSnapshot):
            books_by_ts[event.ts_event_ns][event.instrument.rsplit("-", 1)[1]] = event
    assert books_by_ts
    for pair in books_by_ts.values():
        up, down = pair["up"], pair["down"]
        assert sorted((1 - p, s) for p, s in up.asks) == sorted(down.bids)
        assert sorted((1 - p, s) for p, s in up.bids) == sorted(down.asks)


@pytest.mark.parametrize("name", CAPTURES)
def test_engine_on_real_books_is_contiguous_and_uncrossed(name):
    engine = BookEngine("test")
    last_books: dict[str, BookSnapshot] = {}
    seqs: dict[str, list[SequencedDelta]] = defaultdict(list)
    for record in capture_lines(name):
        for event in polymarket.parse(record["msg"]).events:
            if isinstance(event, BookSnapshot):
                last_books[event.instrument] = event
            for out in engine.apply(event):
                if isinstance(out, SequencedDelta):
                    seqs[out.instrument].append(out)
    assert len(last_books) == 2 and set(seqs) == set(last_books)
    for instrument, deltas in seqs.items():
        assert [(d.prev_seq, d.seq) for d in deltas] == [(n - 1, n) for n in range(1, len(deltas) + 1)]
        expected = L2Book(instrument)
        expected.apply_snapshot(last_books[instrument].bids, last_books[instrument].asks)
        assert engine.instruments[instrument].book == expected
        assert deltas[-1].checksum == expected.checksum()
    # Found on these recordings: the venue never sent a crossed book.
    assert engine.crossed == 0
