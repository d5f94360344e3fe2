"""The pure side of the live connections: subscribe frames, REST book requests and conversions, backoff,
Kalshi RSA-PSS signing (round trip through ``cryptography``), and ``ProviderSpec`` never showing auth."""
from __future__ import annotations

import base64
from decimal import Decimal as D

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from feed.model import BookSnapshot
from feed.upstream import ProviderSpec, open_link
from feed.upstream import venue_protocol as vp
from feed.venues import parser_for


def test_subscribe_frames():
    assert vp.subscribe_frames("polymarket", ["1", "2"]) == [
        {"assets_ids": ["1", "2"], "type": "market", "initial_dump": True, "custom_feature_enabled": True}]
    assert [f["channel"] for f in vp.subscribe_frames("coinbase", ["BTC-USD"])] == ["level2", "market_trades", "heartbeats"]
    assert vp.subscribe_frames("kalshi", ["K"]) == [
        {"id": 1, "cmd": "subscribe", "params": {"channels": ["orderbook_delta"], "market_tickers": ["K"]}},
        {"id": 2, "cmd": "subscribe", "params": {"channels": ["trade"], "market_tickers": ["K"]}}]
    with pytest.raises(ValueError, match="unknown venue"):
        vp.subscribe_frames("binance", [])


def test_book_requests():
    assert vp.book_request("polymarket", "https://clob.polymarket.com/", "123") == (
        "https://clob.polymarket.com/book?token_id=123", "/book")
    assert vp.book_request("coinbase", "https://api.coinbase.com", "BTC-USD") == (
        "https://api.coinbase.com/api/v3/brokerage/market/product_book?product_id=BTC-USD",
        "/api/v3/brokerage/market/product_book")
    assert vp.book_request("kalshi", "https://api.elections.kalshi.com", "KX-1") == (
        "https://api.elections.kalshi.com/trade-api/v2/markets/KX-1/orderbook", "/trade-api/v2/markets/KX-1/orderbook")


@pytest.mark.parametrize(("venue", "symbol", "body", "bids", "asks"), [
    ("polymarket", "123", {"market": "0x1", "asset_id": "123", "timestamp": "1700000000000", "hash": "ab",
                           "bids": [{"price": "0.4", "size": "10"}], "asks": [{"price": "0.6", "size": "5"}]},
     (("0.4", "10"),), (("0.6", "5"),)),
    ("coinbase", "BTC-USD", {"pricebook": {"product_id": "BTC-USD", "bids": [{"price": "100.5", "size": "1.25"}],
                                           "asks": [{"price": "101", "size": "2"}], "time": "2026-08-09T21:05:48.1Z"}},
     (("100.5", "1.25"),), (("101", "2"),)),
    ("kalshi", "KX-1", {"orderbook_fp": {"yes_dollars": [["0.4200", "13.00"]], "no_dollars": [["0.5500", "7.50"]]}},
     (("0.42", "13"),), (("0.45", "7.5"),)),
    ("kalshi", "KX-1", {"orderbook": {"yes": [[42, 13]], "no": [[55, 7]]}}, (("0.42", "13"),), (("0.45", "7"),)),
])
def test_rest_books_become_parseable_snapshots(venue, symbol, body, bids, asks):
    (snap,) = parser_for(venue)(vp.snapshot_message(venue, symbol, body)).events
    assert isinstance(snap, BookSnapshot) and snap.venue_seq is None
    assert snap.instrument == f"{venue}:{symbol}"
    assert snap.bids == tuple((D(p), D(s)) for p, s in bids)
    assert snap.asks == tuple((D(p), D(s)) for p, s in asks)


@pytest.mark.parametrize(("venue", "body", "error"), [
    ("polymarket", {"bids": "x", "asks": []}, "field 'bids' must be a list"),
    ("coinbase", {"pricebook": None}, "missing object 'pricebook'"),
    ("kalshi", {"book": {}}, "missing object 'orderbook_fp' or 'orderbook'"),
    ("kalshi", [], "expected a JSON object"),
])
def test_rest_book_bad_shapes(venue, body, error):
    with pytest.raises(vp.SnapshotFormatError, match=error):
        vp.snapshot_message(venue, "X", body)


def test_backoff_is_exponential_with_full_jitter_and_capped():
    b = vp.Backoff(base_s=0.1, max_s=2.0, floor_s=0.01)
    assert [b.delay_s(n, 0.999999) for n in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0], rel=1e-5)
    assert b.delay_s(50, 0.5) == 1.0
    assert b.delay_s(3, 0.0) == 0.01


def test_kalshi_signature_round_trip():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    headers = vp.kalshi_auth_headers(key, "key-1", 1703123456789, "get", "/trade-api/ws/v2?x=1")
    assert headers["KALSHI-ACCESS-KEY"] == "key-1" and headers["KALSHI-ACCESS-TIMESTAMP"] == "1703123456789"
    assert len(base64.b64decode(headers["KALSHI-ACCESS-SIGNATURE"])) == 256
    assert vp.kalshi_sign_message(1703123456789, "get", "/trade-api/ws/v2?x=1") == b"1703123456789GET/trade-api/ws/v2"
    public = key.public_key()
    assert vp.kalshi_verify(public, headers, "GET", "/trade-api/ws/v2") is None
    assert vp.kalshi_verify(public, headers, "GET", "/trade-api/v2/other") == "bad KALSHI-ACCESS-SIGNATURE"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    assert vp.kalshi_verify(other, headers, "GET", "/trade-api/ws/v2") == "bad KALSHI-ACCESS-SIGNATURE"
    assert "missing" in vp.kalshi_verify(public, {}, "GET", "/trade-api/ws/v2")


def test_provider_spec_hides_auth_and_open_link_checks_venue():
    spec = ProviderSpec("k1", "kalshi", "ws://127.0.0.1:1/trade-api/ws/v2",
                        auth={"key_id": "secret-id", "private_key_path": "/secret/path.pem"})
    assert "secret" not in repr(spec) and "<hidden>" in repr(spec)
    assert open_link(spec).spec is spec
    with pytest.raises(ValueError, match="unknown venue 'binance' for provider 'b'"):
        open_link(ProviderSpec("b", "binance", "ws://127.0.0.1:1"))
