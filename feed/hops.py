"""The hop vocabulary: where a data message's latency went, from the stamps it carries. Pure.

Stamps (PROTOCOL.md section 4; integers, ns since the Unix epoch): ``ts_event_ns`` (venue), ``ts_ingest_ns``
(ingest received it), ``ts_publish_ns`` (ingest published it to NATS), ``ts_send_ns`` (gateway queued it
for this client), and the receiver's own ``recv_ns``.

============  ==================================  =============================================
hop           value                               who is slow when it grows
============  ==================================  =============================================
upstream      ts_ingest_ns - ts_event_ns          the venue or the provider link (or its clock)
ingest        ts_publish_ns - ts_ingest_ns        the ingest (parse, book, encode)
nats_gateway  ts_send_ns - ts_publish_ns          NATS transit and the gateway's fan-out
client        recv - ts_send_ns                   gateway queue, socket, network, the reader
e2e           recv - ts_event_ns                  everything (from ts_ingest_ns without a venue time)
============  ==================================  =============================================

``HOPS`` is the single table of the rules: each hop is ``(later stamp, earlier stamp)``; a hop is computed
when both of its stamps are present. New, finer hops (e.g. gateway queueing, socket, reader delay) are
added as new ``Hop`` members with a row in ``HOPS`` (and their stamps in ``STAMPS``); every caller that
iterates ``Hop`` picks them up. Used by the SDK (``BookUpdated.hops``), the latency probe and its report.

Clocks of different hosts can disagree, so a hop can come out negative; values are returned signed and the
caller decides (the probe counts it as clock skew and records 0).
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any


class Hop(enum.StrEnum):
    """One segment of a message's path (the value is the name used in metrics, ClickHouse and reports)."""

    UPSTREAM = "upstream"
    INGEST = "ingest"
    NATS_GATEWAY = "nats_gateway"
    CLIENT = "client"
    E2E = "e2e"


RECV = "recv_ns"
"""Pseudo-stamp: the receiver's clock when the message arrived (passed to ``hops_of`` as ``recv_ns``)."""

STAMPS: tuple[str, ...] = ("ts_event_ns", "ts_ingest_ns", "ts_publish_ns", "ts_send_ns")
"""Stamps a data message may carry, in path order."""

HOPS: dict[Hop, tuple[str, tuple[str, ...]]] = {
    # hop: (later stamp, earlier stamps: the first one present is used)
    Hop.UPSTREAM: ("ts_ingest_ns", ("ts_event_ns",)),
    Hop.INGEST: ("ts_publish_ns", ("ts_ingest_ns",)),
    Hop.NATS_GATEWAY: ("ts_send_ns", ("ts_publish_ns",)),
    Hop.CLIENT: (RECV, ("ts_send_ns",)),
    Hop.E2E: (RECV, ("ts_event_ns", "ts_ingest_ns")),
}

PATH_HOPS: tuple[Hop, ...] = (Hop.UPSTREAM, Hop.INGEST, Hop.NATS_GATEWAY, Hop.CLIENT)
"""The hops that add up to ``e2e``, in path order."""


def _stamp(msg: Mapping[str, Any], key: str) -> int | None:
    value = msg.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def hops_of(stamps: Mapping[str, Any], recv_ns: int | None = None) -> dict[Hop, int]:
    """Every hop (signed ns) whose stamps are present in ``stamps`` (a message or any mapping of the
    ``ts_*`` keys; a stamp that is not a positive int counts as absent), with ``recv_ns`` as the receive
    time (``None``: no receiver hops). Never raises."""
    out: dict[Hop, int] = {}
    for hop, (later_key, earlier_keys) in HOPS.items():
        later = recv_ns if later_key == RECV else _stamp(stamps, later_key)
        if later is None:
            continue
        for key in earlier_keys:
            earlier = _stamp(stamps, key)
            if earlier is not None:
                out[hop] = later - earlier
                break
    return out


def hops_ns(msg: Mapping[str, Any], recv_ns: int) -> dict[Hop, int] | None:
    """Signed per-hop latencies (ns) of a data message received at ``recv_ns``, for a complete path.

    Returns None when the message lacks ``ts_ingest_ns``, ``ts_publish_ns`` or ``ts_send_ns``. Without a
    ``ts_event_ns`` (a venue that gives none) there is no ``upstream`` hop and ``e2e`` starts at ingest.
    """
    if _stamp(msg, "ts_ingest_ns") is None or _stamp(msg, "ts_publish_ns") is None or _stamp(msg, "ts_send_ns") is None:
        return None
    return hops_of(msg, recv_ns)
