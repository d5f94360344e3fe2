"""Book checksum of PROTOCOL.md section 6.

Take the best 10 asks (lowest first) and the best 10 bids (highest first), write each level as
``price:size`` in canonical form, join each side with ``,``, join asks and bids with ``|`` (asks
first), and take the CRC-32 (zlib/IEEE, unsigned 32-bit) of the UTF-8 bytes.

Pure: no I/O.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterable

CHECKSUM_DEPTH = 10


def checksum_string(bids: Iterable[tuple[str, str]], asks: Iterable[tuple[str, str]]) -> str:
    """The string that is checksummed. ``bids``/``asks``: canonical ``(price, size)``, best first.

    Only the first ``CHECKSUM_DEPTH`` levels of each iterable are read.
    """
    ask_part = ",".join(f"{p}:{s}" for p, s in _take(asks))
    bid_part = ",".join(f"{p}:{s}" for p, s in _take(bids))
    return f"{ask_part}|{bid_part}"


def checksum(bids: Iterable[tuple[str, str]], asks: Iterable[tuple[str, str]]) -> int:
    """CRC-32 checksum (unsigned 32-bit int) of the top of book; arguments as for ``checksum_string``."""
    return zlib.crc32(checksum_string(bids, asks).encode()) & 0xFFFFFFFF


def _take(levels: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for level in levels:
        out.append(level)
        if len(out) == CHECKSUM_DEPTH:
            break
    return out
