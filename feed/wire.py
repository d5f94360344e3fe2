"""The one typed wire model of PROTOCOL.md v1 (sections 3, 4, 5 and 11): one decode, one encode. Pure.

* **Server to client** (and ingest to gateway over NATS, which uses the same shapes): ``Snapshot``,
  ``Delta``, ``TradeMsg``, ``Heartbeat``, ``ResyncMsg``, ``Subscribed``, ``Unsubscribed``, ``Pong``,
  ``ErrorMsg``, ``ShutdownMsg``, ``InstrumentStatus``; anything else decodes to ``Unknown`` (clients
  ignore unknown types, section 10). ``decode(data)`` validates and returns one of them, raising
  ``WireError`` (naming type, instrument and field) for a malformed one; ``encode(msg)`` gives the bytes.
* **Client to server**: ``Subscribe``, ``Unsubscribe``, ``ResyncRequest``, ``Ping`` and
  ``encode_request``; the gateway's strict parser of them is ``feed.gateway.protocol.parse_request``.
* **Vocabulary**: ``MsgType``, ``Op``, ``Channel``, ``ErrorCode``, ``CloseCode``, ``ResyncReason``,
  ``Status`` (section 11).

Every decoded message keeps the decoded JSON object as ``raw`` (unknown fields included, section 10), and
prices and sizes are exact ``Decimal`` s. The ingest publishes data messages to NATS already in client
form, lacking only ``ts_send_ns``; the gateway appends that field to the encoded bytes (``with_send_ts``)
instead of decoding and re-encoding, so each message is serialized once however many clients get it.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

from feed.book import L2Book, parse_wire_changes, wire_change
from feed.errors import InvalidDecimal, WireError
from feed.model import AggressorSide, LevelChange, Side, TickSizeChange, Trade, canonical, parse_decimal
from feed.sequencer import SequencedDelta

dumps = orjson.dumps
loads = orjson.loads

RequestId = int | str
"""A client-chosen request id (section 3); ``None`` in a field typed ``RequestId | None`` means "none"."""


# ---------------------------------------------------------------------------------------------------
# Vocabulary


class MsgType(enum.StrEnum):
    """``type`` of a server message (sections 4 and 11)."""

    SNAPSHOT = "snapshot"
    DELTA = "delta"
    TRADE = "trade"
    HEARTBEAT = "heartbeat"
    RESYNC = "resync"
    SUBSCRIBED = "subscribed"
    UNSUBSCRIBED = "unsubscribed"
    PONG = "pong"
    ERROR = "error"
    SHUTDOWN = "shutdown"
    INSTRUMENT_STATUS = "instrument_status"
    WRITE_STAMP = "write_stamp"  # additive, only on ``?write_stamps=1`` (docs/protocol-notes.md)


class Op(enum.StrEnum):
    """``op`` of a client request (section 3)."""

    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    RESYNC = "resync"
    PING = "ping"


class Channel(enum.StrEnum):
    """A ``subscribe`` channel (section 3): the book (snapshot + deltas) and trade prints."""

    BOOK = "book"
    TRADES = "trades"


DEFAULT_CHANNELS: frozenset[Channel] = frozenset({Channel.BOOK})


class ErrorCode(enum.StrEnum):
    """``code`` of an ``error`` reply (section 5)."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_INSTRUMENT = "unknown_instrument"
    TOO_MANY_INSTRUMENTS = "too_many_instruments"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    INTERNAL = "internal"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the gateway uses (section 5)."""

    GOING_AWAY = 1001  # after ``shutdown``
    PROTOCOL_ERROR = 1002  # RFC 6455 framing violation (e.g. an unmasked client frame)
    INVALID_PAYLOAD = 1007  # a text frame that is not valid UTF-8 (RFC 6455 section 8.1)
    POLICY_VIOLATION = 1008  # e.g. a binary frame from the client
    MESSAGE_TOO_BIG = 1009  # inbound frame over ``max_frame_bytes``
    UNAUTHORIZED = 4001  # token missing, invalid or expired
    SLOW_CONSUMER = 4008  # ``max_overflows`` within ``overflow_window_s``
    RATE_LIMITED = 4029  # ``max_rate_limited_in_a_row`` rate-limited requests in a row
    INTERNAL_ERROR = 1011  # the gateway failed handling the connection (a bug)


class ResyncReason(enum.StrEnum):
    """``reason`` of a ``resync`` message (section 4)."""

    SLOW_CONSUMER = "slow_consumer"
    UPSTREAM_GAP = "upstream_gap"
    EPOCH_CHANGE = "epoch_change"


class Status(enum.StrEnum):
    """An instrument's ``status`` (section 11)."""

    OK = "ok"
    STALE = "stale"
    CROSSED = "crossed"
    RESYNCING = "resyncing"
    HALTED = "halted"
    RESOLVED = "resolved"


# ---------------------------------------------------------------------------------------------------
# Server messages


@dataclass(slots=True)
class Snapshot:
    """``snapshot``: the whole book at ``(epoch, seq)``; levels ``(price, size)`` best first."""

    instrument: str
    epoch: str
    seq: int
    bids: list[tuple[Decimal, Decimal]]
    asks: list[tuple[Decimal, Decimal]]
    checksum: int
    ts_event_ns: int | None = None
    ts_ingest_ns: int | None = None
    ts_publish_ns: int | None = None
    ts_send_ns: int | None = None
    status: Status | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    type = MsgType.SNAPSHOT


@dataclass(slots=True)
class Delta:
    """``delta``: level changes ``prev_seq -> seq`` (``seq > prev_seq``), ``checksum`` after applying."""

    instrument: str
    epoch: str
    seq: int
    prev_seq: int
    changes: list[LevelChange]
    checksum: int
    ts_event_ns: int | None = None
    ts_ingest_ns: int | None = None
    ts_publish_ns: int | None = None
    ts_send_ns: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    type = MsgType.DELTA


@dataclass(slots=True)
class TradeMsg:
    """``trade``: a print; ``side`` is the aggressor's; ``trade_id`` when the venue gives one."""

    instrument: str
    price: Decimal
    size: Decimal
    side: AggressorSide
    trade_id: str | None = None
    ts_event_ns: int | None = None
    ts_ingest_ns: int | None = None
    ts_publish_ns: int | None = None
    ts_send_ns: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    type = MsgType.TRADE


@dataclass(slots=True)
class Heartbeat:
    """``heartbeat``: ``seqs`` maps instrument -> ``(epoch, last seq)`` sent on this connection."""

    ts_send_ns: int | None
    seqs: dict[str, tuple[str, int]]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    type = MsgType.HEARTBEAT


@dataclass(slots=True)
class ResyncMsg:
    """``resync``: the client drops its book; a snapshot follows. ``reason`` as sent (may be new)."""

    instrument: str
    reason: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    type = MsgType.RESYNC


@dataclass(slots=True)
class Subscribed:
    id: RequestId | None
    instruments: list[str]
    recovered: dict[str, bool]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    type = MsgType.SUBSCRIBED


@dataclass(slots=True)
class Unsubscribed:
    id: RequestId | None
    instruments: list[str]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    type = MsgType.UNSUBSCRIBED


@dataclass(slots=True)
class Pong:
    id: RequestId | None
    ts_send_ns: int | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    type = MsgType.PONG


@dataclass(slots=True)
class ErrorMsg:
    """``error`` (section 5). ``code`` as sent (a client must accept codes it does not know)."""

    id: RequestId | None
    code: str
    message: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    type = MsgType.ERROR


@dataclass(slots=True)
class ShutdownMsg:
    """``shutdown``: reconnect elsewhere after ``reconnect_after_ms`` (>= 0) and resume."""

    reconnect_after_ms: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    type = MsgType.SHUTDOWN


@dataclass(slots=True)
class InstrumentStatus:
    """``instrument_status`` (section 11): from the ingest on the delta subject (``ts_publish_ns``) and
    from the gateway to clients (``ts_send_ns``). ``since_ns``: when the status began."""

    instrument: str
    status: Status
    reason: str = ""
    since_ns: int | None = None
    ts_publish_ns: int | None = None
    ts_send_ns: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    type = MsgType.INSTRUMENT_STATUS


@dataclass(slots=True)
class WriteStamp:
    """``write_stamp`` (additive, docs/protocol-notes.md; only to a WebSocket opened with
    ``?write_stamps=1``): the ``frames`` (>= 1) frames after this notice went to the socket in one write
    at ``ts_write_ns`` (ns since the Unix epoch). The notice itself is not one of them."""

    ts_write_ns: int
    frames: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    type = MsgType.WRITE_STAMP


@dataclass(slots=True)
class Unknown:
    """A message of a type this version does not know (section 10: ignore it)."""

    msg_type: object
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


ServerMessage = (
    Snapshot | Delta | TradeMsg | Heartbeat | ResyncMsg | Subscribed | Unsubscribed | Pong | ErrorMsg
    | ShutdownMsg | InstrumentStatus | WriteStamp | Unknown
)
DataMessage = Snapshot | Delta


# ---------------------------------------------------------------------------------------------------
# Decode


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Fields:
    """Field access that raises ``WireError`` naming the message type, instrument and field."""

    __slots__ = ("raw", "type", "instrument")

    def __init__(self, raw: dict[str, Any], msg_type: str) -> None:
        self.raw = raw
        self.type = msg_type
        self.instrument: str | None = None

    def error(self, name: str | None, detail: str) -> WireError:
        return WireError(detail, msg_type=self.type, instrument=self.instrument, field=name)

    def instrument_id(self) -> str:
        value = self.raw.get("instrument")
        if not isinstance(value, str) or not value:
            raise self.error("instrument", f"must be a non-empty string, got {value!r}")
        self.instrument = value
        return value

    def str(self, name: str) -> str:
        value = self.raw.get(name)
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, got {value!r}")
        return value

    def nat(self, name: str) -> int:
        value = self.raw.get(name)
        if not _is_int(value) or value < 0:
            raise self.error(name, f"must be an int >= 0, got {value!r}")
        return value

    def ts(self, name: str) -> int | None:
        value = self.raw.get(name)
        return value if _is_int(value) else None

    def id(self) -> RequestId | None:
        value = self.raw.get("id")
        return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None

    def str_list(self, name: str) -> list[str]:
        value = self.raw.get(name)
        return [i for i in value if isinstance(i, str)] if isinstance(value, list) else []

    def levels(self, name: str) -> list[tuple[Decimal, Decimal]]:
        value = self.raw.get(name)
        if not isinstance(value, list):
            raise self.error(name, f"must be a list of [price, size], got {value!r}")
        out = []
        for level in value:
            if not isinstance(level, list) or len(level) != 2:
                raise self.error(name, f"level must be [price, size], got {level!r}")
            try:
                out.append((parse_decimal(level[0], what="price"), parse_decimal(level[1], what="size")))
            except InvalidDecimal as exc:
                raise self.error(name, str(exc)) from None
        return out

    def status(self, name: str, *, required: bool) -> Status | None:
        value = self.raw.get(name)
        if value is None and not required:
            return None
        try:
            return Status(value)
        except ValueError:
            raise self.error(name, f"must be one of {', '.join(Status)}, got {value!r}") from None


def _snapshot(f: _Fields) -> Snapshot:
    instrument = f.instrument_id()
    return Snapshot(
        instrument, f.str("epoch"), f.nat("seq"), f.levels("bids"), f.levels("asks"), f.nat("checksum"),
        f.ts("ts_event_ns"), f.ts("ts_ingest_ns"), f.ts("ts_publish_ns"), f.ts("ts_send_ns"),
        f.status("status", required=False), f.raw,
    )


def _delta(f: _Fields) -> Delta:
    instrument = f.instrument_id()
    epoch, seq, prev_seq = f.str("epoch"), f.nat("seq"), f.nat("prev_seq")
    if seq <= prev_seq:
        raise f.error("seq", f"seq={seq} not after prev_seq={prev_seq}")
    checksum = f.nat("checksum")
    try:
        changes = parse_wire_changes(f.raw.get("changes"))
    except InvalidDecimal as exc:
        raise f.error("changes", str(exc)) from None
    raw = f.raw
    return Delta(instrument, epoch, seq, prev_seq, changes, checksum, f.ts("ts_event_ns"), f.ts("ts_ingest_ns"),
                 f.ts("ts_publish_ns"), f.ts("ts_send_ns"), raw)


def _trade(f: _Fields) -> TradeMsg:
    instrument = f.instrument_id()
    try:
        price = parse_decimal(f.raw.get("price"), what="price")
        size = parse_decimal(f.raw.get("size"), what="size")
    except InvalidDecimal as exc:
        raise f.error("price" if "price" in str(exc) else "size", str(exc)) from None
    try:
        side = AggressorSide(f.raw.get("side"))
    except ValueError:
        raise f.error("side", f"must be 'buy' or 'sell', got {f.raw.get('side')!r}") from None
    trade_id = f.raw.get("trade_id")
    return TradeMsg(instrument, price, size, side, trade_id if isinstance(trade_id, str) else None,
                    f.ts("ts_event_ns"), f.ts("ts_ingest_ns"), f.ts("ts_publish_ns"), f.ts("ts_send_ns"), f.raw)


def _heartbeat(f: _Fields) -> Heartbeat:
    seqs = f.raw.get("seqs")
    if not isinstance(seqs, dict):
        raise f.error("seqs", f"must be an object, got {seqs!r}")
    out: dict[str, tuple[str, int]] = {}
    for instrument, position in seqs.items():  # malformed entries are skipped (nothing to verify with)
        if isinstance(position, list) and len(position) == 2 and isinstance(position[0], str) and _is_int(position[1]):
            out[instrument] = (position[0], position[1])
    return Heartbeat(f.ts("ts_send_ns"), out, f.raw)


def _resync(f: _Fields) -> ResyncMsg:
    reason = f.raw.get("reason")
    return ResyncMsg(f.instrument_id(), reason if isinstance(reason, str) else "unspecified", f.raw)


def _subscribed(f: _Fields) -> Subscribed:
    recovered = f.raw.get("recovered")
    return Subscribed(f.id(), f.str_list("instruments"), dict(recovered) if isinstance(recovered, dict) else {}, f.raw)


def _unsubscribed(f: _Fields) -> Unsubscribed:
    return Unsubscribed(f.id(), f.str_list("instruments"), f.raw)


def _pong(f: _Fields) -> Pong:
    return Pong(f.id(), f.ts("ts_send_ns"), f.raw)


def _error(f: _Fields) -> ErrorMsg:
    message = f.raw.get("message")
    return ErrorMsg(f.id(), str(f.raw.get("code")), message if isinstance(message, str) else "", f.raw)


def _shutdown(f: _Fields) -> ShutdownMsg:
    delay_ms = f.raw.get("reconnect_after_ms")
    return ShutdownMsg(delay_ms if _is_int(delay_ms) and delay_ms > 0 else 0, f.raw)


def _instrument_status(f: _Fields) -> InstrumentStatus:
    instrument = f.instrument_id()
    status = f.status("status", required=True)
    reason = f.raw.get("reason")
    return InstrumentStatus(instrument, status, reason if isinstance(reason, str) else "",  # type: ignore[arg-type]
                            f.ts("since_ns"), f.ts("ts_publish_ns"), f.ts("ts_send_ns"), f.raw)


def _write_stamp(f: _Fields) -> WriteStamp:
    ts_write_ns, frames = f.raw.get("ts_write_ns"), f.raw.get("frames")
    if not _is_int(ts_write_ns) or ts_write_ns <= 0:
        raise f.error("ts_write_ns", f"ts_write_ns must be a positive integer, got {ts_write_ns!r}")
    if not _is_int(frames) or frames < 1:
        raise f.error("frames", f"frames must be an integer >= 1, got {frames!r}")
    return WriteStamp(ts_write_ns, frames, f.raw)


_DECODERS = {
    "snapshot": _snapshot, "delta": _delta, "trade": _trade, "heartbeat": _heartbeat, "resync": _resync,
    "subscribed": _subscribed, "unsubscribed": _unsubscribed, "pong": _pong, "error": _error,
    "shutdown": _shutdown, "instrument_status": _instrument_status, "write_stamp": _write_stamp,
}


def decode(data: bytes | str | dict[str, Any]) -> ServerMessage:
    """Decode one server message (the JSON text, or an already decoded object).

    Returns the typed message, or ``Unknown`` for a ``type`` this version does not know.

    Raises:
        WireError: not JSON, not an object, or a known type with a missing or malformed field (the
            message names type, instrument and field). A bad price never gets past here.
    """
    if isinstance(data, dict):
        raw = data
    else:
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise WireError(f"not valid UTF-8 JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise WireError(f"message must be a JSON object, got {type(raw).__name__}")
    msg_type = raw.get("type")
    decoder = _DECODERS.get(msg_type) if isinstance(msg_type, str) else None
    if decoder is None:
        return Unknown(msg_type, raw)
    return decoder(_Fields(raw, msg_type))


# ---------------------------------------------------------------------------------------------------
# Encode


def _stamp(msg: dict[str, Any], ts_event_ns: int | None, ts_ingest_ns: int | None, ts_publish_ns: int | None,
           ts_send_ns: int | None = None) -> dict[str, Any]:
    if ts_event_ns is not None:
        msg["ts_event_ns"] = ts_event_ns
    if ts_ingest_ns is not None:
        msg["ts_ingest_ns"] = ts_ingest_ns
    if ts_publish_ns is not None:
        msg["ts_publish_ns"] = ts_publish_ns
    if ts_send_ns is not None:
        msg["ts_send_ns"] = ts_send_ns
    return msg


def _levels(levels: Iterable[tuple[Decimal, Decimal]]) -> list[list[str]]:
    return [[canonical(p), canonical(s)] for p, s in levels]


def to_dict(msg: ServerMessage) -> dict[str, Any]:
    """The JSON object of a typed message (keys in PROTOCOL.md's order; ``None`` stamps omitted)."""
    if isinstance(msg, Unknown):
        return dict(msg.raw)
    if isinstance(msg, Snapshot):
        out = {"type": "snapshot", "instrument": msg.instrument, "epoch": msg.epoch, "seq": msg.seq,
               "bids": _levels(msg.bids), "asks": _levels(msg.asks), "checksum": msg.checksum}
        _stamp(out, msg.ts_event_ns, msg.ts_ingest_ns, msg.ts_publish_ns, msg.ts_send_ns)
        if msg.status is not None:
            out["status"] = msg.status.value
        return out
    if isinstance(msg, Delta):
        out = {"type": "delta", "instrument": msg.instrument, "epoch": msg.epoch, "seq": msg.seq,
               "prev_seq": msg.prev_seq, "changes": [wire_change(c) for c in msg.changes], "checksum": msg.checksum}
        return _stamp(out, msg.ts_event_ns, msg.ts_ingest_ns, msg.ts_publish_ns, msg.ts_send_ns)
    if isinstance(msg, TradeMsg):
        out = {"type": "trade", "instrument": msg.instrument, "price": canonical(msg.price),
               "size": canonical(msg.size), "side": msg.side.value}
        if msg.trade_id is not None:
            out["trade_id"] = msg.trade_id
        return _stamp(out, msg.ts_event_ns, msg.ts_ingest_ns, msg.ts_publish_ns, msg.ts_send_ns)
    if isinstance(msg, Heartbeat):
        return {"type": "heartbeat", "ts_send_ns": msg.ts_send_ns,
                "seqs": {i: [e, s] for i, (e, s) in msg.seqs.items()}}
    if isinstance(msg, ResyncMsg):
        return {"type": "resync", "instrument": msg.instrument, "reason": msg.reason}
    if isinstance(msg, Subscribed):
        return _with_id("subscribed", msg.id) | {"instruments": list(msg.instruments), "recovered": dict(msg.recovered)}
    if isinstance(msg, Unsubscribed):
        return _with_id("unsubscribed", msg.id) | {"instruments": list(msg.instruments)}
    if isinstance(msg, Pong):
        return _with_id("pong", msg.id) | {"ts_send_ns": msg.ts_send_ns}
    if isinstance(msg, ErrorMsg):
        return _with_id("error", msg.id) | {"code": msg.code, "message": msg.message}
    if isinstance(msg, ShutdownMsg):
        return {"type": "shutdown", "reconnect_after_ms": msg.reconnect_after_ms}
    if isinstance(msg, InstrumentStatus):
        out = {"type": "instrument_status", "instrument": msg.instrument, "status": msg.status.value,
               "reason": msg.reason}
        if msg.since_ns is not None:
            out["since_ns"] = msg.since_ns
        if msg.ts_publish_ns is not None:
            out["ts_publish_ns"] = msg.ts_publish_ns
        if msg.ts_send_ns is not None:
            out["ts_send_ns"] = msg.ts_send_ns
        return out
    if isinstance(msg, WriteStamp):
        return {"type": "write_stamp", "ts_write_ns": msg.ts_write_ns, "frames": msg.frames}
    raise TypeError(f"not a wire message: {msg!r}")


def encode(msg: ServerMessage) -> bytes:
    """The UTF-8 JSON bytes of a typed message (one WebSocket text frame's payload)."""
    return orjson.dumps(to_dict(msg))


def _with_id(msg_type: str, id: RequestId | None) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": msg_type}
    if id is not None:
        msg["id"] = id
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
    ts_ingest_ns: int | None,
    ts_publish_ns: int | None,
    status: Status | str | None = None,
) -> dict[str, Any]:
    """``{"type":"snapshot", instrument, epoch, seq, bids, asks, checksum, ts_*, status?}`` (every level)."""
    msg = {
        "type": "snapshot",
        "instrument": instrument,
        "epoch": epoch,
        "seq": seq,
        "bids": book.wire_levels(Side.BID),
        "asks": book.wire_levels(Side.ASK),
        "checksum": book.checksum(),
    }
    _stamp(msg, ts_event_ns, ts_ingest_ns or 0, ts_publish_ns or 0)
    if status is not None:
        msg["status"] = Status(status).value
    return msg


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


def instrument_status_message(instrument: str, status: Status | str, reason: str, since_ns: int | None, *,
                              ts_publish_ns: int | None = None, ts_send_ns: int | None = None) -> dict[str, Any]:
    """``{"type":"instrument_status", instrument, status, reason, since_ns, ts_*}`` (section 11)."""
    return to_dict(InstrumentStatus(instrument, Status(status), reason, since_ns, ts_publish_ns, ts_send_ns))


def tick_size_of(event: TickSizeChange) -> str:
    return canonical(event.tick_size)


def with_send_ts(encoded: bytes, ts_send_ns: int) -> bytes:
    """Append ``"ts_send_ns": N`` to an encoded JSON object (``b'{...}'``), without re-encoding it."""
    if encoded == b"{}":
        return b'{"ts_send_ns":%d}' % ts_send_ns
    return b'%s,"ts_send_ns":%d}' % (encoded[:-1], ts_send_ns)


def with_write_ts(encoded: bytes, ts_write_ns: int) -> bytes:
    """Append ``"ts_write_ns": N`` (a ``WriteStamp``'s time) to an encoded JSON object, without
    re-encoding it; bytes that are not an object (``b'{...}'``) come back unchanged."""
    if encoded[-1:] != b"}" or encoded[:1] != b"{":
        return encoded
    if encoded == b"{}":
        return b'{"ts_write_ns":%d}' % ts_write_ns
    return b'%s,"ts_write_ns":%d}' % (encoded[:-1], ts_write_ns)


WRITE_STAMP_PREFIX = b'{"type":"write_stamp"'
"""How every ``write_stamp_notice`` begins: a reader may test frames with ``startswith`` before decoding."""


def write_stamp_notice(ts_write_ns: int, frames: int) -> bytes:
    """The encoded ``write_stamp`` notice (``WriteStamp``; starts with ``WRITE_STAMP_PREFIX``), built
    without a JSON encoder: the gateway writes one per socket write."""
    return b'{"type":"write_stamp","ts_write_ns":%d,"frames":%d}' % (ts_write_ns, frames)


# ---------------------------------------------------------------------------------------------------
# Client requests (section 3)


@dataclass(frozen=True, slots=True)
class Subscribe:
    """``subscribe``: distinct, syntactically valid ``instruments`` in request order (at least one).

    ``resume`` maps some of those instruments to the ``(epoch, seq)`` the client holds; treat it as
    read-only.
    """

    id: RequestId | None
    instruments: tuple[str, ...]
    channels: frozenset[Channel] = DEFAULT_CHANNELS
    conflate_ms: int = 0
    resume: dict[str, tuple[str, int]] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """``unsubscribe``: distinct, syntactically valid ``instruments`` in request order (at least one)."""

    id: RequestId | None
    instruments: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ResyncRequest:
    """``resync``: send a fresh snapshot of one (syntactically valid) ``instrument``."""

    id: RequestId | None
    instrument: str


@dataclass(frozen=True, slots=True)
class Ping:
    """``ping``: reply ``pong``."""

    id: RequestId | None


Request = Subscribe | Unsubscribe | ResyncRequest | Ping


def request_dict(req: Request) -> dict[str, Any]:
    """The JSON object of a client request (``id`` omitted when ``None``; defaults omitted)."""
    out: dict[str, Any] = {}
    if isinstance(req, Subscribe):
        out["op"] = "subscribe"
    elif isinstance(req, Unsubscribe):
        out["op"] = "unsubscribe"
    elif isinstance(req, ResyncRequest):
        out["op"] = "resync"
    elif isinstance(req, Ping):
        out["op"] = "ping"
    else:
        raise TypeError(f"not a request: {req!r}")
    if req.id is not None:
        out["id"] = req.id
    if isinstance(req, (Subscribe, Unsubscribe)):
        out["instruments"] = list(req.instruments)
    if isinstance(req, Subscribe):
        out["channels"] = sorted(c.value for c in req.channels)
        out["conflate_ms"] = req.conflate_ms
        if req.resume:
            out["resume"] = {i: {"epoch": e, "seq": s} for i, (e, s) in req.resume.items()}
    if isinstance(req, ResyncRequest):
        out["instrument"] = req.instrument
    return out


def encode_request(req: Request) -> bytes:
    """The UTF-8 JSON bytes of a client request (one text frame)."""
    return orjson.dumps(request_dict(req))


def resume_positions(positions: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[str, int]]:
    """``{instrument: {"epoch", "seq"}}`` (as the SDK keeps it) -> ``Subscribe.resume``."""
    return {i: (p["epoch"], p["seq"]) for i, p in positions.items()}
