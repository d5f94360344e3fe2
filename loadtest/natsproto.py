"""The NATS client protocol as text, for WebSocket peers that speak it themselves. Pure: no I/O, no clock.

nats-server's WebSocket listener carries the ordinary NATS client protocol inside WebSocket frames, with
no alignment between frames and protocol messages (one frame may hold several ``MSG``s, a payload may
span frames). ``NatsParser.feed(bytes)`` takes the bytes of each frame as they come and returns the
complete messages so far; the command builders produce what a subscriber sends.

Server to client (https://docs.nats.io/reference/reference-protocols/nats-protocol):

    INFO {"server_id":...}\\r\\n
    MSG <subject> <sid> [reply-to] <#bytes>\\r\\n<payload>\\r\\n
    PING\\r\\n   PONG\\r\\n   +OK\\r\\n   -ERR '<text>'\\r\\n

``HMSG`` never arrives: ``connect_command`` declares ``headers: false``.
"""
from __future__ import annotations

from dataclasses import dataclass

import orjson

CRLF = b"\r\n"
PONG = b"PONG\r\n"
PING = b"PING\r\n"


class NatsProtocolError(Exception):
    """The server sent bytes that are not the NATS client protocol (the stream cannot be trusted past them)."""


@dataclass(frozen=True, slots=True)
class Msg:
    subject: str
    sid: int
    reply: str | None
    payload: bytes


@dataclass(frozen=True, slots=True)
class Info:
    fields: dict


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class Ok:
    pass


@dataclass(frozen=True, slots=True)
class Err:
    text: str


ServerMessage = Msg | Info | Ping | Pong | Ok | Err
_PING, _PONG, _OK = Ping(), Pong(), Ok()


class NatsParser:
    """Incremental parser of server-to-client NATS protocol bytes."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[ServerMessage]:
        """Append ``data``; return every message now complete, in order.

        Raises:
            NatsProtocolError: an unknown operation or a malformed ``MSG`` line.
        """
        buf = self._buf
        buf += data
        out: list[ServerMessage] = []
        pos = 0
        while True:
            end = buf.find(CRLF, pos)
            if end < 0:
                break
            line = bytes(buf[pos:end])
            if line.startswith(b"MSG "):
                parts = line.split()
                if len(parts) not in (4, 5) or not parts[-1].isdigit() or not parts[2].isdigit():
                    raise NatsProtocolError(f"malformed MSG line {line[:200]!r}")
                size = int(parts[-1])
                start = end + 2
                if len(buf) < start + size + 2:
                    break  # the payload (or its CRLF) is still on its way
                reply = parts[3].decode() if len(parts) == 5 else None
                out.append(Msg(parts[1].decode(), int(parts[2]), reply, bytes(buf[start:start + size])))
                pos = start + size + 2
                continue
            pos = end + 2
            if line == b"PING":
                out.append(_PING)
            elif line == b"PONG":
                out.append(_PONG)
            elif line == b"+OK":
                out.append(_OK)
            elif line.startswith(b"-ERR"):
                out.append(Err(line[4:].strip().strip(b"'").decode(errors="replace")))
            elif line.startswith(b"INFO "):
                out.append(Info(orjson.loads(line[5:])))
            else:
                raise NatsProtocolError(f"unknown operation {line[:200]!r}")
        del buf[:pos]
        return out


def connect_command(name: str) -> bytes:
    """``CONNECT`` for a plain subscriber: no +OK acknowledgements, no headers, no echo."""
    options = {"verbose": False, "pedantic": False, "lang": "python", "version": "bookcast-loadtest",
               "protocol": 1, "headers": False, "no_responders": False, "echo": False, "name": name}
    return b"CONNECT " + orjson.dumps(options) + CRLF


def sub_command(subject: str, sid: int) -> bytes:
    return f"SUB {subject} {sid}\r\n".encode()


def pub_command(subject: str, payload: bytes = b"", reply: str | None = None) -> bytes:
    head = f"PUB {subject} {reply} {len(payload)}\r\n" if reply else f"PUB {subject} {len(payload)}\r\n"
    return head.encode() + payload + CRLF
