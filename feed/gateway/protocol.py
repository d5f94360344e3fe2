"""The gateway's side of the client protocol: parse requests, build replies (PROTOCOL.md sections 3-5).

Pure: no I/O, no clock, no environment. Text in, ``Request`` or ``ProtocolError`` out; arguments in,
encoded reply ``bytes`` out (orjson, one JSON object, ready for one WebSocket text frame).

What this module checks is the *shape* of a request. What depends on the gateway's state is the caller's:
whether an instrument exists (``unknown_instrument``), whether the token allows it (``forbidden``),
whether the connection's total subscriptions stay within ``max_instruments_per_connection``, the request
rate (``feed.gateway.ratelimit``) and the inbound frame size (close 1009; the WebSocket adapter enforces
``max_frame_bytes`` before a frame ever reaches ``parse_request``).

Choices where PROTOCOL.md is silent, made additively (section 10):

* A reply echoes the request's ``id``; when the request had none, the reply has no ``id`` field (it is
  omitted, never ``null``). Error replies carry the ``id`` whenever it could be recovered: the payload was
  a JSON object whose ``id`` is valid, even if the rest of it was not.
* A field that is present must have its documented type: ``null`` is a wrong type, not "absent"
  (``{"op":"ping","id":null}`` is ``bad_request``).
* Repeated instruments in one request collapse to one, in first-seen order; the per-request limit counts
  distinct instruments. ``unsubscribe`` is held to the same list rules as ``subscribe``.
* ``channels`` may be any non-empty subset of ``book``/``trades`` (so ``["trades"]`` alone is accepted).
* Unknown fields are ignored, in requests and inside ``resume`` entries.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from feed.errors import InvalidInstrument, RemoteError
from feed import wire
from feed.model import split_instrument
from feed.wire import (  # noqa: F401 - re-exported: the gateway's protocol vocabulary
    DEFAULT_CHANNELS,
    Channel,
    CloseCode,
    ErrorCode,
    Op,
    Ping,
    Request,
    RequestId,
    ResyncReason,
    ResyncRequest,
    Subscribe,
    Unsubscribe,
)

# The vocabulary and the request types are the wire model's (``feed.wire``); re-exported here.
Resync = ResyncRequest


@dataclass(frozen=True, slots=True)
class GatewayLimits:
    """Per-connection limits, defaulting to the values of PROTOCOL.md sections 3, 4, 5 and 7.

    Raises:
        ValueError: a limit that is not positive (``conflate_ms_max`` may be 0).
    """

    max_frame_bytes: int = 64 * 1024  # larger inbound frame: close 1009
    max_instruments_per_connection: int = 1000  # also the most distinct instruments in one request
    requests_per_s: float = 20.0  # sustained request rate
    request_burst: int = 50  # requests allowed at once from a full bucket
    max_rate_limited_in_a_row: int = 100  # then close 4029
    max_queue_bytes: int = field(default=4 * 1024 * 1024, metadata={"cli": {  # outbound queue bound (section 7)
        "flag": "--max-queue-bytes", "help": "outbound queue bound per connection"}})
    max_overflows: int = 3  # queue overflows within overflow_window_s before close 4008
    overflow_window_s: float = 60.0
    heartbeat_interval_s: float = field(default=1.0, metadata={"cli": {  # idle time before a ``heartbeat``
        "flag": "--heartbeat-interval-s", "help": "idle time before a heartbeat", "hidden": True}})
    conflate_ms_max: int = 5000  # ``conflate_ms`` is 0..conflate_ms_max

    def __post_init__(self) -> None:
        for name in (
            "max_frame_bytes", "max_instruments_per_connection", "requests_per_s", "request_burst",
            "max_rate_limited_in_a_row", "max_queue_bytes", "max_overflows", "overflow_window_s",
            "heartbeat_interval_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"GatewayLimits.{name} must be positive, got {getattr(self, name)!r}")
        if self.conflate_ms_max < 0:
            raise ValueError(f"GatewayLimits.conflate_ms_max must be >= 0, got {self.conflate_ms_max!r}")


class ProtocolError(RemoteError):
    """A client request was refused; reply ``error(e.code, e.message, e.request_id)`` and carry on.

    A request error never closes the connection (PROTOCOL.md section 5). ``request_id`` is the request's
    ``id`` when it could be recovered, else ``None``.
    """

    def __init__(self, code: ErrorCode, message: str, request_id: RequestId | None = None) -> None:
        self.code = ErrorCode(code)
        self.message = message
        self.request_id = request_id
        super().__init__(f"{self.code}: {message}")


def parse_request(text: str | bytes, limits: GatewayLimits) -> Request:
    """Parse one inbound text frame into a ``Request`` (PROTOCOL.md section 3).

    ``text`` is the frame's payload (UTF-8 ``bytes`` or ``str``). Fields of each op:

    * ``subscribe``: ``instruments`` (non-empty list of ``<venue>:<id>`` strings), ``channels`` (non-empty
      list of ``"book"``/``"trades"``, default ``["book"]``), ``conflate_ms`` (int 0..conflate_ms_max,
      default 0), ``resume`` (object ``{instrument: {"epoch": str, "seq": int >= 0}}``, each key one of
      ``instruments``; default none).
    * ``unsubscribe``: ``instruments`` as above. ``resync``: ``instrument``. ``ping``: nothing.

    Every op takes an optional ``id`` (int or string; a boolean is not an int). Unknown fields are ignored.

    Raises:
        ProtocolError: ``too_many_instruments`` when a request names more than
            ``limits.max_instruments_per_connection`` distinct instruments; otherwise ``bad_request`` (not
            JSON, not an object, missing or unknown ``op``, a field missing or of the wrong type or value).
            Its message names the field; its ``request_id`` is set whenever the ``id`` was recovered.
    """
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"request is not JSON: {str(exc)[:120]}") from None
    if not isinstance(payload, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"request must be a JSON object, got {_describe(payload)}")
    request_id = _request_id(payload)
    try:
        if "op" not in payload:
            raise _bad("missing field 'op'")
        op = payload["op"]
        if not isinstance(op, str):
            raise _bad(f"field 'op' must be a string, got {_describe(op)}")
        try:
            parse = _PARSERS[Op(op)]
        except ValueError:
            raise _bad(f"unknown op {_describe(op)} (known: {', '.join(Op)})") from None
        return parse(payload, request_id, limits)
    except ProtocolError as e:
        raise ProtocolError(e.code, e.message, request_id) from None


def _request_id(payload: dict[str, Any]) -> RequestId | None:
    if "id" not in payload:
        return None
    value = payload["id"]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _bad(f"field 'id' must be an integer or a string, got {_describe(value)}")
    return value


def _subscribe(payload: dict[str, Any], request_id: RequestId | None, limits: GatewayLimits) -> Subscribe:
    instruments = _instrument_list(payload, limits)
    return Subscribe(
        id=request_id,
        instruments=instruments,
        channels=_channels(payload),
        conflate_ms=_conflate_ms(payload, limits),
        resume=_resume(payload, instruments),
    )


def _unsubscribe(payload: dict[str, Any], request_id: RequestId | None, limits: GatewayLimits) -> Unsubscribe:
    return Unsubscribe(id=request_id, instruments=_instrument_list(payload, limits))


def _resync(payload: dict[str, Any], request_id: RequestId | None, limits: GatewayLimits) -> Resync:
    if "instrument" not in payload:
        raise _bad("missing field 'instrument'")
    return Resync(id=request_id, instrument=_instrument(payload["instrument"], "field 'instrument'"))


def _ping(payload: dict[str, Any], request_id: RequestId | None, limits: GatewayLimits) -> Ping:
    return Ping(id=request_id)


_PARSERS: dict[Op, Callable[[dict[str, Any], RequestId | None, GatewayLimits], Request]] = {
    Op.SUBSCRIBE: _subscribe,
    Op.UNSUBSCRIBE: _unsubscribe,
    Op.RESYNC: _resync,
    Op.PING: _ping,
}


def _instrument(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{where} must be a string instrument id, got {_describe(value)}")
    try:
        split_instrument(value)
    except InvalidInstrument:
        raise _bad(f"{where} must look like '<venue>:<id>', got {_describe(value)}") from None
    return value


def _instrument_list(payload: dict[str, Any], limits: GatewayLimits) -> tuple[str, ...]:
    if "instruments" not in payload:
        raise _bad("missing field 'instruments'")
    items = payload["instruments"]
    if not isinstance(items, list) or not items or not all(isinstance(item, str) for item in items):
        raise _bad("field 'instruments' must be a non-empty list of strings")
    valid = (_instrument(item, f"field 'instruments' item {i}") for i, item in enumerate(items))
    distinct = tuple(dict.fromkeys(valid))
    if len(distinct) > limits.max_instruments_per_connection:
        raise ProtocolError(
            ErrorCode.TOO_MANY_INSTRUMENTS,
            f"field 'instruments' names {len(distinct)} instruments, "
            f"limit {limits.max_instruments_per_connection}",
        )
    return distinct


def _channels(payload: dict[str, Any]) -> frozenset[Channel]:
    if "channels" not in payload:
        return DEFAULT_CHANNELS
    items = payload["channels"]
    if not isinstance(items, list) or not items or not all(isinstance(item, str) for item in items):
        raise _bad("field 'channels' must be a non-empty list of strings")
    channels = set()
    for item in items:
        try:
            channels.add(Channel(item))
        except ValueError:
            known = ", ".join(Channel)
            raise _bad(f"field 'channels' has unknown channel {_describe(item)} (known: {known})") from None
    return frozenset(channels)


def _conflate_ms(payload: dict[str, Any], limits: GatewayLimits) -> int:
    value = payload.get("conflate_ms", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limits.conflate_ms_max:
        bound = limits.conflate_ms_max
        raise _bad(f"field 'conflate_ms' must be an integer 0..{bound}, got {_describe(value)}")
    return value


def _resume(payload: dict[str, Any], instruments: tuple[str, ...]) -> dict[str, tuple[str, int]]:
    if "resume" not in payload:
        return {}
    entries = payload["resume"]
    if not isinstance(entries, dict):
        raise _bad(f"field 'resume' must be an object of {{epoch, seq}} objects, got {_describe(entries)}")
    subscribing = set(instruments)
    resume: dict[str, tuple[str, int]] = {}
    for instrument, entry in entries.items():
        where = f"field 'resume' entry {_describe(instrument)}"
        if instrument not in subscribing:
            raise _bad(f"{where} is not one of field 'instruments'")
        if not isinstance(entry, dict):
            raise _bad(f"{where} must be an object {{epoch, seq}}, got {_describe(entry)}")
        epoch, seq = entry.get("epoch"), entry.get("seq")
        if not isinstance(epoch, str):
            raise _bad(f"{where} field 'epoch' must be a string, got {_describe(epoch)}")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise _bad(f"{where} field 'seq' must be an integer >= 0, got {_describe(seq)}")
        resume[instrument] = (epoch, seq)
    return resume


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


_SHOWN_CHARS = 64  # longest client string quoted back in an error message


def shown(text: str) -> str:
    """``text`` quoted for an error message, truncated to ``_SHOWN_CHARS`` (an attacker's 8 KB instrument
    name is never echoed back whole)."""
    return _describe(text)


def _describe(value: object) -> str:
    """A short description of a JSON value for an error message, in JSON's words."""
    if isinstance(value, str):
        return repr(value if len(value) <= _SHOWN_CHARS else value[: _SHOWN_CHARS - 3] + "...")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    return "an object"


# ---------------------------------------------------------------------------------------------------
# Replies (PROTOCOL.md section 4), encoded by the wire model (``feed.wire.encode``): keys in the order of
# the section's examples; ``id`` omitted when the request had none.


def subscribed(id: RequestId | None, instruments: Iterable[str], recovered: Mapping[str, bool]) -> bytes:
    """``{"type":"subscribed","id":1,"instruments":[...],"recovered":{instrument: bool}}``.

    ``recovered`` should have one entry per instrument: ``true`` when its ``resume`` succeeded (missed
    deltas follow), ``false`` when a snapshot follows.
    """
    return wire.encode(wire.Subscribed(id, list(instruments), dict(recovered)))


def unsubscribed(id: RequestId | None, instruments: Iterable[str]) -> bytes:
    """``{"type":"unsubscribed","id":2,"instruments":[...]}``."""
    return wire.encode(wire.Unsubscribed(id, list(instruments)))


def pong(id: RequestId | None, ts_send_ns: int) -> bytes:
    """``{"type":"pong","id":4,"ts_send_ns":N}``; ``ts_send_ns`` in ns since the Unix epoch."""
    return wire.encode(wire.Pong(id, ts_send_ns))


def error(code: ErrorCode, message: str, id: RequestId | None = None) -> bytes:
    """``{"type":"error","id":3,"code":"unknown_instrument","message":"..."}`` (PROTOCOL.md section 5).

    Raises:
        ValueError: ``code`` is not an ``ErrorCode`` value.
    """
    return wire.encode(wire.ErrorMsg(id, ErrorCode(code).value, message))


def resync(instrument: str, reason: ResyncReason) -> bytes:
    """``{"type":"resync","instrument":"...","reason":"slow_consumer"}``; a snapshot must follow it.

    Raises:
        ValueError: ``reason`` is not a ``ResyncReason`` value.
    """
    return wire.encode(wire.ResyncMsg(instrument, ResyncReason(reason).value))


def heartbeat(ts_send_ns: int, seqs: Mapping[str, tuple[str, int]]) -> bytes:
    """``{"type":"heartbeat","ts_send_ns":N,"seqs":{instrument: [epoch, last seq]}}``.

    ``seqs`` covers every instrument the connection subscribes to; ``ts_send_ns`` in ns since the Unix epoch.
    """
    return wire.encode(wire.Heartbeat(ts_send_ns, dict(seqs)))


def shutdown(reconnect_after_ms: int) -> bytes:
    """``{"type":"shutdown","reconnect_after_ms":500}``: sent before draining, then close 1001."""
    return wire.encode(wire.ShutdownMsg(reconnect_after_ms))
