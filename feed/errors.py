"""Error hierarchy of the feed package.

One root, ``FeedError``, split the way wsproto/h11 split theirs:

* ``RemoteError``: the peer (a venue, an upstream provider, NATS, a client) sent something wrong.
  The right response is local and bounded: resync that one instrument, reject that one request.
* ``LocalError``: our own code broke an invariant (e.g. our engine produced a crossed book from input
  it accepted). That is a bug: it raises and alerts, it is never papered over.
"""
from __future__ import annotations


class FeedError(Exception):
    """Root of every error raised by the ``feed`` package."""


class RemoteError(FeedError):
    """Something a peer sent was malformed or inconsistent."""


class LocalError(FeedError):
    """An invariant of our own code was broken: a bug."""


class InvalidDecimal(RemoteError, ValueError):
    """A price or size string is not a finite, non-negative decimal number."""


class InvalidInstrument(RemoteError, ValueError):
    """An instrument id is not of the form ``<venue>:<venue's own id>``."""


class VenueMessageError(RemoteError, ValueError):
    """A venue message could not be parsed: missing field, wrong type, bad number.

    The message names the venue, the message type and the field, e.g.
    ``polymarket book: missing field 'asset_id'``.
    """


class SeqGap(RemoteError):
    """A delta's ``prev_seq`` (or epoch) does not follow the seq the receiver holds.

    Attributes: ``instrument``, ``expected`` (the held seq), ``got`` (the delta's ``prev_seq``).
    """

    def __init__(self, instrument: str, expected: int, got: int, *, epoch_changed: bool = False) -> None:
        self.instrument = instrument
        self.expected = expected
        self.got = got
        self.epoch_changed = epoch_changed
        what = "epoch change" if epoch_changed else "seq gap"
        super().__init__(f"{what} instrument={instrument} expected={expected} got={got}")


class ChecksumMismatch(RemoteError):
    """The checksum a message carries differs from the one computed on the local book."""

    def __init__(self, instrument: str, seq: int, expected: int, got: int) -> None:
        self.instrument = instrument
        self.seq = seq
        self.expected = expected
        self.got = got
        super().__init__(f"checksum mismatch instrument={instrument} seq={seq} computed={got} sent={expected}")


class CrossedBook(LocalError):
    """Best bid >= best ask after applying input that was accepted as valid."""
