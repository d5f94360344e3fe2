"""WebSocket framing of the gateway's outbound text frames (RFC 6455 section 5), through wsproto's pure
frame serializer (python-hyper/wsproto ``FrameProtocol``: server side, unmasked, no extensions).

A data frame is the same bytes for every client (server frames are unmasked and compression is off), so
the gateway frames each delta once, at fan-out, and a connection's writer sends whatever it has queued as
one socket write of concatenated frames.
"""
from __future__ import annotations

from wsproto.frame_protocol import FrameProtocol

_SERVER = FrameProtocol(client=False, extensions=[])


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked text frame carrying ``payload`` (UTF-8 JSON bytes).

    Raises:
        UnicodeDecodeError: ``payload`` is not UTF-8 (a text frame must be).
    """
    return bytes(_SERVER.send_data(payload.decode("utf-8"), fin=True))


def frame_payload(frame: bytes) -> bytes:
    """The payload of one unmasked frame made by ``text_frame`` (for tests and tools)."""
    length = frame[1] & 0x7F
    if length == 126:
        return frame[4:]
    if length == 127:
        return frame[10:]
    return frame[2:]
