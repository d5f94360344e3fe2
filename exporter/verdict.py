"""Who the latency tail belongs to: upstream, ingest, NATS/gateway or client (pure).

Input: for the slowest messages (those at or above the e2e p99 of the window), the mean of each path hop
(``exporter.latency.PATH_HOPS``, negatives counted as 0). The hop holding the largest share of that tail is
named; if no hop holds at least ``DOMINANT_SHARE`` of it the verdict says the tail is mixed and lists the two
largest. Upstream is the venue's (or its link's) time; the other three are ours (the client hop is the
gateway's queue and socket plus the network to the reader, or the reader itself).

Pure: no I/O, no clock.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from exporter.latency import PATH_HOPS, Hop

DOMINANT_SHARE = 0.5

HOP_NAMES: dict[Hop, str] = {
    Hop.UPSTREAM: "upstream (venue to ingest)",
    Hop.INGEST: "ingest",
    Hop.NATS_GATEWAY: "NATS/gateway",
    Hop.CLIENT: "client (gateway queue, socket, network, reader)",
}


@dataclass(frozen=True, slots=True)
class Verdict:
    """``culprit``: the hop holding the tail, None when mixed or without data; ``shares``: each path hop's
    fraction of the tail (sums to 1 when there is data); ``text``: one line for people."""

    culprit: Hop | None
    shares: dict[Hop, float]
    text: str

    @property
    def ours(self) -> bool | None:
        """True when the tail is ours (not upstream), False when upstream, None when mixed or unknown."""
        return None if self.culprit is None else self.culprit is not Hop.UPSTREAM


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.3g} ms"


def attribute_tail(tail_mean_ns: Mapping[Hop, float], e2e_p99_ns: float, tail_count: int) -> Verdict:
    """Attribute the tail: ``tail_mean_ns`` maps path hops to their mean over the ``tail_count`` messages at
    or above the e2e p99 (``e2e_p99_ns``). Missing hops count as 0; negative means as 0."""
    parts = {hop: max(0.0, float(tail_mean_ns.get(hop, 0.0))) for hop in PATH_HOPS}
    total = sum(parts.values())
    if tail_count <= 0 or total <= 0:
        return Verdict(None, dict.fromkeys(PATH_HOPS, 0.0), "verdict: no data (no latency samples in the window)")
    shares = {hop: v / total for hop, v in parts.items()}
    ranked = sorted(shares, key=lambda h: shares[h], reverse=True)
    top, second = ranked[0], ranked[1]
    head = f"verdict: the tail (e2e p99 {_ms(e2e_p99_ns)}, slowest {tail_count} messages)"
    if shares[top] >= DOMINANT_SHARE:
        whose = "the upstream's, not ours" if top is Hop.UPSTREAM else "ours"
        return Verdict(top, shares, f"{head} is {HOP_NAMES[top]}: {shares[top]:.0%} of it, "
                                    f"mean {_ms(parts[top])} per message; {whose}")
    return Verdict(None, shares, f"{head} is mixed: {HOP_NAMES[top]} {shares[top]:.0%}, "
                                 f"{HOP_NAMES[second]} {shares[second]:.0%}")
