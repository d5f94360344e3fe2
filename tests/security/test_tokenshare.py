"""Per-token counts shared by the gateway's workers (feed.gateway.tokenshare), fed calls directly: two
workers' columns of one table see one cap, a dead worker's counts are released, and the hash table stays
equal to a plain dict model through inserts and backward-shift deletes on a tiny, colliding table."""
from __future__ import annotations

import random

import pytest

from feed.auth import TokenLimits, TokenUsage
from feed.gateway import tokenshare
from feed.gateway.tokenshare import SharedTokenUsage

A, B = "0123456789abcdef", "fedcba9876543210"


@pytest.fixture
def workers(tmp_path):
    path = tokenshare.create(tmp_path / "usage", workers=2, slots=64)
    limits = TokenLimits(max_connections_per_token=3, max_subscriptions_per_token=4)
    w0, w1 = SharedTokenUsage(path, 0, limits), SharedTokenUsage(path, 1, limits)
    yield path, w0, w1
    w0.close()
    w1.close()


def test_one_cap_over_both_workers(workers):
    _, w0, w1 = workers
    assert w0.try_connect(A) and w1.try_connect(A) and w0.try_connect(A)
    assert not w1.try_connect(A) and not w0.try_connect(A)  # 3 held: 2 on worker 0, 1 on worker 1
    assert w1.try_connect(B)  # another token is not affected
    assert w0.try_subscribe(A, 3) and not w1.try_subscribe(A, 2) and w1.try_subscribe(A, 1)
    assert not w0.try_subscribe(A, 1)
    w0.unsubscribe(A, 2)
    assert w1.try_subscribe(A, 2) and w0.totals(A) == (3, 4)
    w1.disconnect(A, subscriptions=3)  # worker 1 gives back its own share only
    assert w0.totals(A) == (2, 1) and w0.try_connect(A)
    assert w0.connections == {A: 3, B: 1}


def test_a_dead_workers_counts_are_released(workers):
    path, w0, w1 = workers
    assert w0.try_connect(A) and w1.try_connect(A) and w1.try_connect(A) and w1.try_subscribe(A, 4)
    assert w1.try_connect(B)
    assert tokenshare.release_worker(path, 1) == 2
    assert w0.totals(A) == (1, 0) and w0.totals(B) == (0, 0) and w0.connections == {A: 1}
    replacement = SharedTokenUsage(path, 1, w0.limits)
    try:
        assert replacement.try_connect(A) and replacement.try_connect(A) and not w0.try_connect(A)
        replacement.disconnect(B)  # a count it never took: nothing below zero
        assert replacement.totals(B) == (0, 0)
    finally:
        replacement.close()


def test_a_full_table_refuses_new_tokens_and_keeps_old_ones(tmp_path):
    path = tokenshare.create(tmp_path / "usage", workers=1, slots=4)
    usage = SharedTokenUsage(path, 0, TokenLimits(2, 0))
    try:
        ids = [f"{i:016x}" for i in range(1, 5)]
        assert all(usage.try_connect(t) for t in ids)
        assert not usage.try_connect(f"{99:016x}") and usage.try_connect(ids[0])
        usage.disconnect(ids[1])
        assert usage.try_connect(f"{99:016x}")
    finally:
        usage.close()


def test_refuses_a_foreign_file_and_a_wrong_column(tmp_path):
    (tmp_path / "junk").write_bytes(b"x" * 64)
    with pytest.raises(ValueError, match="not a token usage table"):
        SharedTokenUsage(tmp_path / "junk", 0, TokenLimits())
    path = tokenshare.create(tmp_path / "usage", workers=2, slots=8)
    with pytest.raises(ValueError, match="not a column"):
        SharedTokenUsage(path, 2, TokenLimits())


@pytest.mark.parametrize("seed", range(3))
def test_same_answers_as_the_in_process_counts_on_a_colliding_table(tmp_path, seed):
    """Random connects, subscribes and releases of 12 tokens whose keys collide in 16 slots: every answer
    and every total equals ``feed.auth.TokenUsage``'s (the model), and a release is exact."""
    rnd = random.Random(seed)
    limits = TokenLimits(max_connections_per_token=3, max_subscriptions_per_token=5)
    path = tokenshare.create(tmp_path / "usage", workers=2, slots=16)
    cols = [SharedTokenUsage(path, 0, limits), SharedTokenUsage(path, 1, limits)]
    model = [TokenUsage(TokenLimits()), TokenUsage(TokenLimits())]  # each worker's share, no caps
    tokens = [f"{(i * 16 + 1 + rnd.randrange(3)):016x}" for i in range(12)]  # same home slot mod 16, mostly

    def total(kind: str, tok: str) -> int:
        return sum(getattr(m, kind).get(tok, 0) for m in model)

    try:
        for _ in range(600):
            w, tok, op = rnd.randrange(2), rnd.choice(tokens), rnd.random()
            if op < 0.35:
                want = total("connections", tok) < 3
                assert cols[w].try_connect(tok) is want
                if want:
                    model[w].try_connect(tok)
            elif op < 0.6:
                n = rnd.randrange(1, 3)
                want = total("subscriptions", tok) + n <= 5
                assert cols[w].try_subscribe(tok, n) is want
                if want:
                    model[w].try_subscribe(tok, n)
            elif op < 0.8:
                n = min(rnd.randrange(0, 3), model[w].subscriptions.get(tok, 0))
                cols[w].unsubscribe(tok, n)
                model[w].unsubscribe(tok, n)
            elif model[w].connections.get(tok):
                n = model[w].subscriptions.get(tok, 0)
                cols[w].disconnect(tok, n)
                model[w].disconnect(tok, n)
            if rnd.random() < 0.01:
                tokenshare.release_worker(path, w)
                model[w] = TokenUsage(TokenLimits())
            for t in tokens:
                assert cols[0].totals(t) == (total("connections", t), total("subscriptions", t))
        assert cols[1].connections == {t: n for t in tokens if (n := total("connections", t))}
    finally:
        for c in cols:
            c.close()
