from __future__ import annotations

import random
from collections import Counter

import pytest

from loadtest.mix import Mix, MixError, split_list


def test_draws_are_distinct_and_follow_the_weights():
    mix = Mix.parse(["a:1", "a:2", "a:3"], "8,1,1")
    rng = random.Random(7)
    firsts = Counter()
    for _ in range(2000):
        drawn = mix.draw(2, rng)
        assert len(set(drawn)) == 2 and set(drawn) <= set(mix.instruments)
        firsts[drawn[0]] += 1
    assert 0.75 < firsts["a:1"] / 2000 < 0.85  # weight 8 of 10
    assert sorted(mix.draw(9, rng)) == ["a:1", "a:2", "a:3"]


@pytest.mark.parametrize("instruments, weights", [([], ""), (["a:1"], "1,2"), (["a:1"], "0"), (["a:1"], "x")])
def test_bad_mixes_name_the_option(instruments, weights):
    with pytest.raises(MixError, match="--bc-"):
        Mix.parse(instruments, weights)


def test_equal_weights_by_default_and_list_splitting():
    assert Mix.parse(split_list(" a:1, a:2 ,,"), "").weights == (1.0, 1.0)
