"""The instrument mix of the locust users: which instruments a user subscribes to. Pure (the random source
is passed in), so it is tested without importing locust.

A mix is a list of instrument ids with positive weights; each user draws ``per_user`` distinct
instruments, each draw proportional to the weights of those not yet drawn.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


class MixError(ValueError):
    """The mix options do not make a mix (the message names the option)."""


@dataclass(frozen=True)
class Mix:
    instruments: tuple[str, ...]
    weights: tuple[float, ...]

    @classmethod
    def parse(cls, instruments: list[str], weights_text: str) -> Mix:
        """``instruments`` with ``weights_text`` (comma-separated numbers, one per instrument; "" = all equal).

        Raises:
            MixError: no instruments, a count mismatch, or a weight that is not a number > 0.
        """
        if not instruments:
            raise MixError("--bc-instruments: no instruments to subscribe to")
        if not weights_text.strip():
            return cls(tuple(instruments), (1.0,) * len(instruments))
        try:
            weights = tuple(float(w) for w in weights_text.split(","))
        except ValueError:
            raise MixError(f"--bc-weights: not numbers: {weights_text!r}") from None
        if len(weights) != len(instruments) or any(w <= 0 for w in weights):
            raise MixError(f"--bc-weights: need {len(instruments)} numbers > 0 (one per instrument), got {weights_text!r}")
        return cls(tuple(instruments), weights)

    def draw(self, per_user: int, rng: random.Random) -> list[str]:
        """``min(per_user, len(instruments))`` distinct instruments, drawn by weight."""
        pool = list(zip(self.instruments, self.weights))
        chosen = []
        for _ in range(min(per_user, len(pool))):
            i = rng.choices(range(len(pool)), weights=[w for _, w in pool])[0]
            chosen.append(pool.pop(i)[0])
        return chosen


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]
