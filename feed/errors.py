"""Error hierarchy of the feed package.

One root, ``FeedError``, split the way wsproto/h11 split theirs (``LocalProtocolError`` versus
``RemoteProtocolError``):

* ``RemoteError``: the peer (a venue, an upstream provider, NATS, a client) sent something wrong.
  The right response is local and bounded: resync that one instrument, reject that one request.
* ``LocalError``: our own code broke an invariant (e.g. our engine produced a crossed book from input
  it accepted). That is a bug: it raises and alerts, it is never papered over.
* Errors of what the operator gave us (a provider config, the run state file, a capture that cannot feed a
  simulated venue) derive from ``FeedError`` directly; some are also ``LocalError`` by their module's choice
  (TLS, token key and NATS credential configuration).

Every error is raised where it is detected, and its message names the fields, e.g.
``seq gap instrument=coinbase:BAND-GBP expected=43 got=45``. Where an error compares two values,
``expected`` is always what the *receiver* holds or computed (local) and ``got`` what the peer sent
(remote).
"""
from __future__ import annotations


MAX_MESSAGE_CHARS = 300
"""Longest error message a peer's input can produce: a ``RemoteError`` quoting an attacker's 24 KB value
is cut here (with the number of characters cut), so a log line never grows with the input."""


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` cut to at most ``limit`` characters, ending ``... [N chars cut]`` when it was cut."""
    if len(message) <= limit:
        return message
    keep = max(limit - len(f"... [{len(message)} chars cut]"), 0)  # the count shown is at most len(message)
    return message[:keep] + f"... [{len(message) - keep} chars cut]"


def describe_exception(exc: BaseException) -> str:
    """``exc`` as one phrase for a log line or an operator's error: ``Class: message``; the message alone when
    it names its class already (nats-py's do: ``nats: ServiceUnavailableError: code=503 ...``); the class
    alone when there is no message (``TimeoutError``)."""
    name, text = type(exc).__name__, str(exc)
    if not text:
        return name
    return text if name in text else f"{name}: {text}"


class FeedError(Exception):
    """Root of every error raised by the ``feed`` package."""


class RemoteError(FeedError):
    """Something a peer sent was malformed or inconsistent.

    A message (the single ``str`` argument) is cut to ``MAX_MESSAGE_CHARS`` (``bounded``): it may quote
    the peer's value, and a huge value must never make a huge log line or error reply.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (bounded(args[0]),)
        super().__init__(*args)


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


class WireError(RemoteError, ValueError):
    """A bookcast wire message (PROTOCOL.md sections 3, 4 and 11) could not be decoded.

    Raised by ``feed.wire.decode``. Attributes: ``msg_type`` (the message's ``type``, or ``None``),
    ``instrument`` (or ``None``), ``field`` (the offending field, or ``None``). The message names them:
    ``delta instrument=coinbase:BAND-GBP field 'changes': price is not a decimal number: 'x'``.
    """

    def __init__(self, detail: str, *, msg_type: str | None = None, instrument: str | None = None,
                 field: str | None = None) -> None:
        self.msg_type = msg_type
        self.instrument = instrument
        self.field = field
        where = " ".join(p for p in (msg_type, f"instrument={instrument}" if instrument else None) if p)
        if field:
            where = f"{where} field '{field}'" if where else f"field '{field}'"
        super().__init__(f"{where}: {detail}" if where else detail)


class SeqGap(RemoteError):
    """A delta's ``prev_seq`` (or epoch) does not follow the seq the receiver holds.

    Attributes: ``instrument``, ``expected`` (the seq the receiver holds: local), ``got`` (the delta's
    ``prev_seq``: remote), ``epoch_changed``; ``held_epoch`` and ``got_epoch`` when known.
    """

    def __init__(self, instrument: str, expected: int, got: int, *, epoch_changed: bool = False,
                 held_epoch: str | None = None, got_epoch: str | None = None) -> None:
        self.instrument = instrument
        self.expected = expected
        self.got = got
        self.epoch_changed = epoch_changed
        self.held_epoch = held_epoch
        self.got_epoch = got_epoch
        what = "epoch change" if epoch_changed else "seq gap"
        epochs = f" held_epoch={held_epoch} got_epoch={got_epoch}" if epoch_changed and got_epoch is not None else ""
        super().__init__(f"{what} instrument={instrument} expected={expected} got={got}{epochs}")


class ChecksumMismatch(RemoteError):
    """The checksum a message carries differs from the one computed on the local book.

    Attributes: ``instrument``, ``seq``, ``expected`` (computed on the receiver's book: local), ``got``
    (the checksum the message carried: remote). ``computed`` and ``sent`` are the same two values under
    plain names.
    """

    def __init__(self, instrument: str, seq: int, expected: int, got: int) -> None:
        self.instrument = instrument
        self.seq = seq
        self.expected = expected
        self.got = got
        super().__init__(f"checksum mismatch instrument={instrument} seq={seq} expected={expected} got={got}")

    @property
    def computed(self) -> int:
        return self.expected

    @property
    def sent(self) -> int:
        return self.got


class CrossedBook(LocalError):
    """Best bid >= best ask in a book our own engine built from input that was not crossed.

    Attributes: ``instrument``, ``best_bid``, ``best_ask`` (``Decimal``). Raised by
    ``feed.book.L2Book.check_uncrossed``.
    """

    def __init__(self, instrument: str, best_bid: object, best_ask: object, context: str = "") -> None:
        self.instrument = instrument
        self.best_bid = best_bid
        self.best_ask = best_ask
        extra = f" ({context})" if context else ""
        super().__init__(f"crossed book instrument={instrument} best_bid={best_bid} best_ask={best_ask}{extra}")
