"""The hop vocabulary: where a data message's latency went, from the stamps it carries. Pure.

Stamps (PROTOCOL.md section 4; integers, ns since the Unix epoch): ``ts_event_ns`` (venue), ``ts_ingest_ns``
(ingest received it), ``ts_publish_ns`` (ingest published it to NATS), ``ts_send_ns`` (gateway queued it
for this client), ``ts_write_ns`` (gateway wrote it to the client's socket; an additive field, see
docs/protocol-notes.md), and the receiver's own ``recv_ns`` (frame taken off the socket) and ``read_ns``
(its own code got to the message).

==============  ==================================  ===========================================
hop             value                               who is slow when it grows
==============  ==================================  ===========================================
upstream        ts_ingest_ns - ts_event_ns          the venue or the provider link (or its clock)
ingest          ts_publish_ns - ts_ingest_ns        the ingest (parse, book, encode)
nats_gateway    ts_send_ns - ts_publish_ns          NATS transit and the gateway's fan-out
gateway_queue   ts_write_ns - ts_send_ns            the client's queue in the gateway (enqueue to
                                                    socket write; only where the gateway stamps it)
network         recv - ts_write_ns                  kernel socket buffers and the network (from
                (recv - ts_send_ns without it)      ts_send_ns, so with the gateway queue, when the
                                                    gateway gives no write stamp)
reader          read - recv                         the reader itself (only when it says when it read)
client          recv - ts_send_ns                   gateway queue + socket + network (the combined
                                                    hop: not a path hop, kept for the SDK and metrics)
e2e             read (or recv) - ts_event_ns        everything (from ts_ingest_ns without a venue time)
==============  ==================================  ===========================================

Upstream is the venue's ("theirs"); ingest, nats_gateway and gateway_queue are bookcast's ("ours");
network is the kernel and the wire between; reader is the consumer's own code.

``HOPS`` is the single table of the rules: each hop is ``(later stamp, earlier stamp)``; a hop is computed
when both of its stamps are present. New, finer hops (e.g. gateway queueing, socket, reader delay) are
added as new ``Hop`` members with a row in ``HOPS`` (and their stamps in ``STAMPS``); every caller that
iterates ``Hop`` picks them up. Used by the SDK (``BookUpdated.hops``), the latency probe and its report.

Clocks of different hosts can disagree, so a hop can come out negative; values are returned signed and the
caller decides (``exporter.latency.skewed``: the probe counts such values apart, never as a latency).
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
    GATEWAY_QUEUE = "gateway_queue"
    NETWORK = "network"
    READER = "reader"
    CLIENT = "client"
    E2E = "e2e"


RECV = "recv_ns"
"""Pseudo-stamp: the receiver's clock when the message arrived (passed to ``hops_of`` as ``recv_ns``)."""
READ = "read_ns"
"""Pseudo-stamp: when the receiver's own code got to the message (``hops_of``'s ``read_ns``; without it, the
receipt: e2e then ends at ``recv_ns`` and there is no reader hop)."""
WRITE_STAMP = "ts_write_ns"

STAMPS: tuple[str, ...] = ("ts_event_ns", "ts_ingest_ns", "ts_publish_ns", "ts_send_ns", WRITE_STAMP)
"""Stamps a data message may carry, in path order."""

HOPS: dict[Hop, tuple[str, tuple[str, ...]]] = {
    # hop: (later stamp, earlier stamps: the first one present is used)
    Hop.UPSTREAM: ("ts_ingest_ns", ("ts_event_ns",)),
    Hop.INGEST: ("ts_publish_ns", ("ts_ingest_ns",)),
    Hop.NATS_GATEWAY: ("ts_send_ns", ("ts_publish_ns",)),
    Hop.GATEWAY_QUEUE: (WRITE_STAMP, ("ts_send_ns",)),
    Hop.NETWORK: (RECV, (WRITE_STAMP, "ts_send_ns")),
    Hop.READER: (READ, (RECV,)),
    Hop.CLIENT: (RECV, ("ts_send_ns",)),
    Hop.E2E: (READ, ("ts_event_ns", "ts_ingest_ns")),
}

PATH_HOPS: tuple[Hop, ...] = (Hop.UPSTREAM, Hop.INGEST, Hop.NATS_GATEWAY, Hop.GATEWAY_QUEUE, Hop.NETWORK, Hop.READER)
"""The hops that add up to ``e2e``, in path order (``client`` is gateway_queue + network, not a path hop)."""


def _stamp(msg: Mapping[str, Any], key: str) -> int | None:
    value = msg.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def hops_of(stamps: Mapping[str, Any], recv_ns: int | None = None, read_ns: int | None = None) -> dict[Hop, int]:
    """Every hop (signed ns) whose stamps are present in ``stamps`` (a message or any mapping of the
    ``ts_*`` keys; a stamp that is not a positive int counts as absent), with ``recv_ns`` as the receive
    time (``None``: no receiver hops) and ``read_ns`` as when the receiver's code got to it (``None``: no
    reader hop, e2e ends at ``recv_ns``). Never raises."""
    pseudo = {RECV: recv_ns, READ: recv_ns if read_ns is None else read_ns}
    out: dict[Hop, int] = {}
    for hop, (later_key, earlier_keys) in HOPS.items():
        if hop is Hop.READER and (read_ns is None or recv_ns is None):
            continue
        later = pseudo[later_key] if later_key in pseudo else _stamp(stamps, later_key)
        if later is None:
            continue
        for key in earlier_keys:
            earlier = pseudo[key] if key in pseudo else _stamp(stamps, key)
            if earlier is not None:
                out[hop] = later - earlier
                break
    return out


def hops_ns(msg: Mapping[str, Any], recv_ns: int, read_ns: int | None = None) -> dict[Hop, int] | None:
    """Signed per-hop latencies (ns) of a data message received at ``recv_ns`` (and reached by the
    receiver's code at ``read_ns``), for a complete path.

    Returns None when the message lacks ``ts_ingest_ns``, ``ts_publish_ns`` or ``ts_send_ns``. Without a
    ``ts_event_ns`` (a venue that gives none) there is no ``upstream`` hop and ``e2e`` starts at ingest.
    """
    if _stamp(msg, "ts_ingest_ns") is None or _stamp(msg, "ts_publish_ns") is None or _stamp(msg, "ts_send_ns") is None:
        return None
    return hops_of(msg, recv_ns, read_ns)
