"""Is the peer still there: the gateway's WebSocket ping and its deadline, one connection (pure: no I/O, no
clock; every input takes ``now_ns``).

PROTOCOL.md section 4: "the gateway also sends WebSocket ping frames and closes connections that stop answering
them". RFC 6455 section 5.5.2: a ping may be sent at any time after the handshake; section 5.5.3: the peer
answers it with a pong "as soon as is practical"; any frame from the peer shows it is reading.

The rule, with ``interval_ns`` the ping interval (``--ws-ping-interval-s``):

- a ping is due when nothing has been heard from the peer for ``interval_ns``;
- the peer then has ``interval_ns / 2`` to send any frame (the pong, or anything else);
- otherwise it is dead: the adapter drops the TCP connection without a close handshake (close code 1006,
  RFC 6455 section 7.1.5), as nothing would read the close frame.

This replaces aiohttp's ``heartbeat=``: that takes a task and three timer handles per ping and one callback per
received chunk; here the worker's timer pass (``feed.gateway.app.Gateway.tick_due``, which visits every open
connection at least once per heartbeat interval) asks ``on_timer`` and writes the ping frame in the same socket
write as a heartbeat that is due. A ping is late by at most the timer pass's period (one heartbeat interval).

=========  ===================  =========  =====================================
state      input                next       action
=========  ===================  =========  =====================================
HEARD      ``heard``            HEARD      next ping due one interval from now
HEARD      ``on_timer`` (due)   PINGED     write a ping; deadline half an interval
PINGED     ``heard``            HEARD      next ping due one interval from now
PINGED     ``on_timer`` (due)   DEAD       drop the connection (1006)
DEAD       any                  DEAD       nothing
=========  ===================  =========  =====================================
"""
from __future__ import annotations

import enum

PING_FRAME = b"\x89\x00"
"""An empty server ping (RFC 6455 section 5.2: FIN, opcode 0x9, unmasked, payload length 0)."""

NEVER_NS = 1 << 62


class Liveness(enum.Enum):
    HEARD = "heard"  # the peer was heard from; the next ping is due at ``due_ns``
    PINGED = "pinged"  # a ping is out; the peer must be heard from before ``due_ns``
    DEAD = "dead"  # it was not: the connection is to be dropped


class LivenessInput(enum.Enum):
    HEARD = "heard"  # a frame came from the peer
    DUE = "due"  # ``on_timer`` at or after ``due_ns``


TRANSITIONS: dict[tuple[Liveness, LivenessInput], Liveness] = {
    (Liveness.HEARD, LivenessInput.HEARD): Liveness.HEARD,
    (Liveness.HEARD, LivenessInput.DUE): Liveness.PINGED,
    (Liveness.PINGED, LivenessInput.HEARD): Liveness.HEARD,
    (Liveness.PINGED, LivenessInput.DUE): Liveness.DEAD,
    (Liveness.DEAD, LivenessInput.HEARD): Liveness.DEAD,
    (Liveness.DEAD, LivenessInput.DUE): Liveness.DEAD,
}


class PeerLiveness:
    """One connection's ping state.

    Args:
        interval_s: the ping interval in seconds; ``0`` (or less) turns pings off (``due_ns`` is never reached).
        now_ns: when the connection opened (the handshake counts as hearing from the peer), any clock in ns,
            the same clock for every later call.

    ``due_ns`` is public so the timer pass can skip a connection with one comparison (``now_ns < due_ns``).
    """

    __slots__ = ("state", "due_ns", "interval_ns", "timeout_ns")

    def __init__(self, interval_s: float, now_ns: int) -> None:
        self.interval_ns = int(interval_s * 1e9) if interval_s > 0 else 0
        self.timeout_ns = self.interval_ns // 2
        self.state = Liveness.HEARD
        self.due_ns = now_ns + self.interval_ns if self.interval_ns else NEVER_NS

    def heard(self, now_ns: int) -> None:
        """A frame (any opcode) came from the peer at ``now_ns``."""
        state = self.state = TRANSITIONS[(self.state, LivenessInput.HEARD)]
        if state is Liveness.HEARD and self.interval_ns:
            self.due_ns = now_ns + self.interval_ns

    def on_timer(self, now_ns: int) -> Liveness | None:
        """The timer pass at ``now_ns``. Returns ``Liveness.PINGED`` when a ping is to be written now,
        ``Liveness.DEAD`` when the connection is to be dropped (once), ``None`` when there is nothing to do."""
        if now_ns < self.due_ns:
            return None
        after = self.state = TRANSITIONS[(self.state, LivenessInput.DUE)]
        # PINGED: the answer's deadline; DEAD: never due again, so it is reported once
        self.due_ns = now_ns + self.timeout_ns if after is Liveness.PINGED else NEVER_NS
        return after
