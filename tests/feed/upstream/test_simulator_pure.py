"""The simulator's pure parts: the Kalshi mapping from a real Polymarket recording (exact), the fault knobs'
validation, and the command line's usage errors (exit 2)."""
from __future__ import annotations

from decimal import Decimal as D

import pytest

from feed.capture import read_capture
from feed.cli import main
from feed.model import Side
from feed.sequencer import BookEngine
from feed.simulator.server import simulate_command
from feed.simulator.world import Faults, KalshiRenderer, PolymarketRenderer, World, WorldError, fixed, rfc3339_ns
from feed.venues import kalshi, polymarket

BTC = "polymarket/btc-1h-20251211.jsonl"


def run_world(venue, records, renderer_cls, symbols):
    world = World(venue)
    renderer = renderer_cls(world)
    engine = BookEngine("t")
    parse = kalshi.parse if venue == "kalshi" else polymarket.parse
    frame = ({"id": 1, "cmd": "subscribe", "params": {"channels": ["orderbook_delta", "trade"], "market_tickers": symbols}}
             if venue == "kalshi" else {"assets_ids": symbols, "type": "market", "custom_feature_enabled": True})
    for msg in renderer.subscribe(frame, 1):
        for e in parse(msg).events:
            engine.apply(e)
    for record in records:
        for msg in renderer.render(world.apply(record, 0), 1):
            for e in parse(msg).events:
                engine.apply(e)
    return world, engine


def test_kalshi_world_from_polymarket_is_exact(shared_data):
    records = list(read_capture(shared_data / BTC))
    symbols = ["BTC-1H-1765450800-UP", "BTC-1H-1765450800-DOWN"]
    world, engine = run_world("kalshi", records, KalshiRenderer, symbols)
    assert sorted(world.books) == sorted(symbols)
    for symbol in symbols:
        ours = engine.instruments[f"kalshi:{symbol}"].book
        source = world.books[symbol]
        assert ours.wire_levels(Side.BID) == source.wire_levels(Side.BID)
        assert ours.wire_levels(Side.ASK) == source.wire_levels(Side.ASK)  # 1 - (1 - p) == p, exactly


def test_polymarket_world_carries_hash_and_best_prices(shared_data):
    records = list(read_capture(shared_data / BTC))[:40]
    world = World("polymarket")
    renderer = PolymarketRenderer(world)
    renderer.subscribe({"assets_ids": ["btc-1h-1765450800-up"], "type": "market"}, 1)
    seen = 0
    for record in records:
        for msg in renderer.render(world.apply(record, 0), 1):
            if msg["event_type"] != "price_change":
                continue
            for delta in polymarket.parse(msg).events:
                symbol = delta.instrument.split(":", 1)[1]
                book = world.books[symbol]
                assert delta.venue_hash == world.book_hash(symbol)
                assert delta.venue_best_bid == book.best_bid()[0] and delta.venue_best_ask == book.best_ask()[0]
                seen += 1
    assert seen > 10


def test_kalshi_world_refuses_prices_outside_unit_interval(shared_data):
    world = World("kalshi")
    record = next(iter(read_capture(shared_data / "coinbase/coinbase-level2-20210417.jsonl")))
    for record in read_capture(shared_data / "coinbase/coinbase-level2-20210417.jsonl"):
        if record.msg.get("type") == "snapshot":
            break
    with pytest.raises(WorldError, match=r"needs prices in \(0, 1\)"):
        world.parse(record)
    with pytest.raises(WorldError, match="needs a Polymarket capture"):
        World("polymarket").parse(record)


def test_fault_knobs_validate():
    f = Faults()
    f.update({"latency_ms": 50, "stall": "true", "drop_next": "2"})
    assert (f.latency_ms, f.stall, f.drop_next) == (50.0, True, 2)
    for bad, error in (({"nope": 1}, "unknown fault knob 'nope'"), ({"error_rate": 2}, "between 0 and 1"),
                       ({"lag_s": -1}, "non-negative"), ({"stall": "maybe"}, "true or false"),
                       ({"latency_ms": "x"}, "must be a number")):
        with pytest.raises(ValueError, match=error):
            f.update(bad)
    assert f.latency_ms == 50.0  # a rejected update changes nothing


def test_formatting():
    assert fixed(D("0.77"), 4) == "0.7700" and fixed(D("0.123456"), 4) == "0.123456" and fixed(D(75), 2) == "75.00"
    assert rfc3339_ns(1786309548228568804) == "2026-08-09T21:05:48.228568804Z"


def test_cli_usage_errors(shared_data, tmp_path, capsys):
    assert main(["simulate", "--venue", "kalshi", "--capture", str(tmp_path / "missing.jsonl")]) == 2
    assert "capture file not found" in capsys.readouterr().err
    assert main(["simulate", "--venue", "polymarket", "--capture", str(shared_data / BTC), "--fault", "bogus=1"]) == 2
    assert "unknown fault knob 'bogus'" in capsys.readouterr().err
    assert main(["simulate", "--venue", "kalshi", "--capture",
                 str(shared_data / "coinbase/coinbase-level2-20210417.jsonl")]) == 2
    assert "needs prices in (0, 1)" in capsys.readouterr().err


def test_simulate_command():
    cmd = simulate_command("kalshi", ["a.jsonl"], 9000, start_at_ns=5, faults={"stall": True, "lag_s": 1.5},
                           python="py")
    assert cmd == ["py", "-m", "feed.cli", "simulate", "--venue", "kalshi", "--port", "9000", "--speed", "1.0",
                   "--capture", "a.jsonl", "--start-at-ns", "5", "--fault", "stall=true", "--fault", "lag_s=1.5"]
