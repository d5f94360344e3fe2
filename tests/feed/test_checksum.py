"""PROTOCOL.md section 6: canonical decimals and the checksum test vectors."""
from __future__ import annotations

from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from feed.book import L2Book
from feed.checksum import checksum, checksum_string
from feed.errors import InvalidDecimal
from feed.model import canonical, canonical_str, parse_decimal


@pytest.mark.parametrize(
    "text, expected",
    [("0.50", "0.5"), ("1.000E2", "100"), ("0120.50", "120.5"), ("0", "0"), ("0.000", "0"), ("7612", "7612"),
     ("1E-8", "0.00000001"), ("100", "100"), ("12.340", "12.34"), ("0E+3", "0"), ("5E+1", "50")],
)
def test_canonical_decimal(text, expected):
    assert canonical_str(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "NaN", "Infinity", "-1", "1e", None, 1.5, True, [], "0x10"])
def test_parse_decimal_rejects(bad):
    with pytest.raises(InvalidDecimal):
        parse_decimal(bad, what="price")


@given(st.decimals(min_value=0, max_value=10**12, allow_nan=False, allow_infinity=False, places=None))
def test_canonical_is_exact_and_idempotent(value):
    text = canonical(value)
    assert D(text) == value
    assert canonical_str(text) == text
    assert "E" not in text and "e" not in text
    if "." in text:
        assert not text.endswith("0") and not text.endswith(".")


@given(st.decimals(allow_nan=False, allow_infinity=False, places=None)
       | st.builds(lambda i, e: D(i).scaleb(e), st.integers(-10**30, 10**30), st.integers(-40, 40)))
def test_canonical_fast_path_equals_the_normalized_form(value):
    """The str() fast path gives exactly the normalize-and-format form, for any sign and exponent."""
    from decimal import Context

    expected = "0" if not value else format(value.normalize(Context(prec=max(len(value.as_tuple().digits), 1))), "f")
    assert canonical(value) == expected


def _book(bids, asks) -> L2Book:
    b = L2Book("t:x")
    b.apply_snapshot([(D(p), D(s)) for p, s in bids], [(D(p), D(s)) for p, s in asks])
    return b


VECTORS = [
    ([], [], "|", 2343686810),
    ([("0.52", "100")], [("0.55", "120.50")], "0.55:120.5|0.52:100", 2581317190),
    ([("0.520", "1.000E2"), ("0.5", "7612")], [("0.55", "0120.50"), ("0.6", "10")],
     "0.55:120.5,0.6:10|0.52:100,0.5:7612", 18113738),
]


@pytest.mark.parametrize("bids, asks, string, expected", VECTORS)
def test_protocol_vectors(bids, asks, string, expected):
    book = _book(bids, asks)
    bid_levels = [tuple(level) for level in book.wire_levels(__import__("feed.model").model.Side.BID)]
    ask_levels = [tuple(level) for level in book.wire_levels(__import__("feed.model").model.Side.ASK)]
    assert checksum_string(bid_levels, ask_levels) == string
    assert checksum(bid_levels, ask_levels) == expected
    assert book.checksum() == expected


def test_protocol_vector_twelve_levels_uses_top_ten():
    bids = [(f"{D('0.40') - D('0.01') * i}", str(100 + i)) for i in range(12)]
    asks = [(f"{D('0.41') + D('0.01') * i}", str(200 + i)) for i in range(12)]
    book = _book(bids, asks)
    assert book.checksum() == 2246303379
    # Levels beyond the tenth do not count.
    book.apply_changes([])
    deeper = _book(bids + [("0.01", "5")], asks + [("0.99", "5")])
    assert deeper.checksum() == 2246303379
