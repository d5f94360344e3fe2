"""Wire messages of PROTOCOL.md section 4, built and encoded once (orjson). Pure: no I/O, no clock.

The ingest publishes data messages to NATS already in client form, lacking only ``ts_send_ns``; the
gateway appends that one field to the encoded bytes (``with_send_ts``) instead of decoding and
re-encoding, so each message is serialized exactly once however many clients receive it.
"""
from __future__ import annotations

from typing import Any

import orjson

from feed.book import L2Book, wire_change
from feed.model import Side, TickSizeChange, Trade, canonical
from feed.sequencer import SequencedDelta

dumps = orjson.dumps
loads = orjson.loads


def _stamp(msg: dict[str, Any], ts_event_ns: int | None, ts_ingest_ns: int, ts_publish_ns: int) -> dict[str, Any]:
    if ts_event_ns is not None:
        msg["ts_event_ns"] = ts_event_ns
    msg["ts_ingest_ns"] = ts_ingest_ns
    msg["ts_publish_ns"] = ts_publish_ns
    return msg


def delta_message(d: SequencedDelta, *, ts_ingest_ns: int, ts_publish_ns: int) -> dict[str, Any]:
    """``{"type":"delta", instrument, epoch, seq, prev_seq, changes, checksum, ts_*}`` without ts_send_ns."""
    msg = {
        "type": "delta",
        "instrument": d.instrument,
        "epoch": d.epoch,
        "seq": d.seq,
        "prev_seq": d.prev_seq,
        "changes": [wire_change(c) for c in d.changes],
        "checksum": d.checksum,
    }
    return _stamp(msg, d.ts_event_ns, ts_ingest_ns, ts_publish_ns)


def snapshot_message(
    instrument: str,
    epoch: str,
    seq: int,
    book: L2Book,
    *,
    ts_event_ns: int | None,
    ts_ingest_ns: int,
    ts_publish_ns: int,
) -> dict[str, Any]:
    """``{"type":"snapshot", instrument, epoch, seq, bids, asks, checksum, ts_*}`` (every level)."""
    msg = {
        "type": "snapshot",
        "instrument": instrument,
        "epoch": epoch,
        "seq": seq,
        "bids": book.wire_levels(Side.BID),
        "asks": book.wire_levels(Side.ASK),
        "checksum": book.checksum(),
    }
    return _stamp(msg, ts_event_ns, ts_ingest_ns, ts_publish_ns)


def trade_message(t: Trade, *, ts_ingest_ns: int, ts_publish_ns: int) -> dict[str, Any]:
    """``{"type":"trade", instrument, price, size, side, ts_*}``; ``trade_id`` when the venue gives one."""
    msg: dict[str, Any] = {
        "type": "trade",
        "instrument": t.instrument,
        "price": canonical(t.price),
        "size": canonical(t.size),
        "side": t.side.value,
    }
    if t.trade_id is not None:
        msg["trade_id"] = t.trade_id
    return _stamp(msg, t.ts_event_ns, ts_ingest_ns, ts_publish_ns)


def tick_size_of(event: TickSizeChange) -> str:
    return canonical(event.tick_size)


def with_send_ts(encoded: bytes, ts_send_ns: int) -> bytes:
    """Append ``"ts_send_ns": N`` to an encoded JSON object (``b'{...}'``), without re-encoding it."""
    if encoded == b"{}":
        return b'{"ts_send_ns":%d}' % ts_send_ns
    return b'%s,"ts_send_ns":%d}' % (encoded[:-1], ts_send_ns)
