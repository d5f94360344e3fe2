from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from feed.subjects import delta_subject, snapshot_subject, subject_token, trade_subject, unescape_token


@pytest.mark.parametrize("text, token", [("BAND-GBP", "BAND-GBP"), ("a.b", "a%2Eb"), ("x*y>z", "x%2Ay%3Ez"),
                                         ("sp ace", "sp%20ace"), ("100%", "100%25")])
def test_token_escaping(text, token):
    assert subject_token(text) == token
    assert unescape_token(token) == text


@given(st.text(min_size=1))
def test_tokens_are_valid_and_reversible(text):
    token = subject_token(text)
    assert token and not any(c in token for c in ".*> \t\r\n")
    assert unescape_token(token) == text


def test_subjects_per_instrument():
    poly = "polymarket:" + "1" * 70
    assert delta_subject("coinbase:BAND-GBP") == "md.v1.coinbase.BAND-GBP"
    assert snapshot_subject("coinbase:BAND-GBP") == "md.v1.snap.coinbase.BAND-GBP"
    assert trade_subject(poly) == "md.v1.trade.polymarket." + "1" * 70
    # ids containing ':' and '.' stay one token
    assert delta_subject("x:a:b.c") == "md.v1.x.a%3Ab%2Ec"
