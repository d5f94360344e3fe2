"""NATS subject names for market data (pure).

Subjects (``<token>`` = ``subject_token(...)`` of the part):

* ``md.v1.<venue>.<symbol>``               deltas of one instrument, one message per seq
* ``md.v1.trade.<venue>.<symbol>``         trades of one instrument
* ``md.v1.snap.<venue>.<symbol>``          request/reply: the current snapshot of one instrument
* ``md.v1.meta.instruments.<venue>``       the ingest's instrument directory, re-announced every second
* ``md.v1.ctl.announce``                   ask every ingest to announce its directory now

NATS subject tokens may not contain ``.``, ``*``, ``>`` or whitespace. ``subject_token`` escapes
every byte outside ``[A-Za-z0-9_-]`` as ``%XX`` (upper-case hex of the UTF-8 byte), which is reversible
and keeps the common case (Coinbase ``BAND-GBP``, Polymarket decimal token ids) unchanged.
"""
from __future__ import annotations

from feed.model import split_instrument

PREFIX = "md.v1"
ANNOUNCE_REQUEST = f"{PREFIX}.ctl.announce"
DIRECTORY_WILDCARD = f"{PREFIX}.meta.instruments.*"
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def subject_token(text: str) -> str:
    """Escape ``text`` into one valid NATS subject token (never empty)."""
    raw = text.encode()
    if raw and all(b in _SAFE for b in raw):
        return text
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw) or "%"


def unescape_token(token: str) -> str:
    """Inverse of ``subject_token``."""
    if "%" not in token:
        return token
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "%" and i + 3 <= len(token):
            out.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            out += token[i].encode()
            i += 1
    return out.decode()


def _parts(instrument: str) -> str:
    venue, symbol = split_instrument(instrument)
    return f"{subject_token(venue)}.{subject_token(symbol)}"


def delta_subject(instrument: str) -> str:
    return f"{PREFIX}.{_parts(instrument)}"


def trade_subject(instrument: str) -> str:
    return f"{PREFIX}.trade.{_parts(instrument)}"


def snapshot_subject(instrument: str) -> str:
    return f"{PREFIX}.snap.{_parts(instrument)}"


def directory_subject(venue: str) -> str:
    return f"{PREFIX}.meta.instruments.{subject_token(venue)}"
