"""Which region the SDK connects to, when it moves, and when it goes back: the pure core of region failover.

No I/O, no clock: ``feed.client.sdk`` passes ``now_s`` (monotonic, s) and carries out the decisions.

Regions are a list of URL lists, preferred first. Rules:

==================  =========================================================================================
input               rule
==================  =========================================================================================
leave(reason)       a move starts (if none is in progress, its start time is now): to the next region in order
                    (wrapping), or to region 0 when the reason is ``failback``. Inside a region the URLs are
                    used in turn, one per visit. With one region only the URL rotates.
connect_failed      the move goes on to the next region; its start time stays (the duration covers every try).
connected           the region is current from now (``arrived_at``).
recovered           every subscribed instrument has a book again: the move ends; returns ``RegionMoved``
                    with reason, duration (start of the move to now) and the gateway's ``recovered`` map.
preferred_health    the preferred region's readiness, polled while elsewhere. ``should_fail_back``: true
                    when away from region 0 for ``failback_after_s`` and region 0 has been ready without a
                    break for ``failback_after_s`` (hysteresis: a flapping region never pulls clients back).
==================  =========================================================================================

Reasons (``MoveReason``): ``disconnect`` (connection closed or failed), ``shutdown`` (the gateway said so),
``stale`` (no data and no heartbeat for ``stale_after_s``), ``not_ready`` (the gateway's ``/readyz`` failed:
it lost its NATS), ``instrument_status`` (the gateway marked a subscribed instrument ``stale``),
``failback`` (back to the preferred region), ``connect_failed``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class MoveReason(enum.StrEnum):
    DISCONNECT = "disconnect"
    SHUTDOWN = "shutdown"
    STALE = "stale"
    NOT_READY = "not_ready"
    INSTRUMENT_STATUS = "instrument_status"
    FAILBACK = "failback"
    CONNECT_FAILED = "connect_failed"


@dataclass(frozen=True, slots=True)
class RegionMoved:
    """The client moved from region ``from_region`` to ``to_region`` (indexes into ``regions``) because of
    ``reason``; ``duration_s`` runs from the fault's detection to every book being correct again.
    ``recovered``: per instrument, True when the new gateway served the resume (missed deltas), False when a
    snapshot was needed."""

    from_region: int
    to_region: int
    from_url: str
    to_url: str
    reason: MoveReason
    duration_s: float
    recovered: dict[str, bool] = field(default_factory=dict)

    @property
    def resumed(self) -> int:
        return sum(1 for v in self.recovered.values() if v)

    @property
    def snapshots(self) -> int:
        return sum(1 for v in self.recovered.values() if not v)


@dataclass
class _Move:
    from_region: int
    from_url: str
    reason: MoveReason
    started_s: float


class RegionPolicy:
    """Raises ValueError on no region, an empty region, or ``failback_after_s`` < 0."""

    def __init__(self, regions: list[list[str]], failback_after_s: float = 10.0) -> None:
        if not regions or any(not r for r in regions):
            raise ValueError(f"need at least one region, each with a URL; got {regions}")
        if failback_after_s < 0:
            raise ValueError(f"failback_after_s must be >= 0, got {failback_after_s}")
        self.regions = [list(r) for r in regions]
        self.failback_after_s = failback_after_s
        self.current = 0
        self._turn = [0] * len(regions)
        self.url = self.regions[0][0]
        self.arrived_at_s: float | None = None
        self.move: _Move | None = None
        self._preferred_ready_since_s: float | None = None

    def target(self) -> tuple[int, str]:
        """The region and URL to connect to next."""
        r = self.current
        self.url = self.regions[r][self._turn[r] % len(self.regions[r])]
        self._turn[r] += 1
        return r, self.url

    def _advance(self, reason: MoveReason) -> None:
        if reason is MoveReason.FAILBACK:
            self.current = 0
        elif len(self.regions) > 1:
            self.current = (self.current + 1) % len(self.regions)

    def leave(self, reason: MoveReason, now_s: float) -> None:
        if self.move is None:
            self.move = _Move(self.current, self.url, reason, now_s)
        self.arrived_at_s = None
        self._preferred_ready_since_s = None
        self._advance(reason)

    def connect_failed(self, now_s: float) -> None:
        if self.move is None:
            self.move = _Move(self.current, self.url, MoveReason.CONNECT_FAILED, now_s)
        self._advance(MoveReason.CONNECT_FAILED)

    def connected(self, now_s: float) -> None:
        self.arrived_at_s = now_s

    def recovered(self, now_s: float, recovered: dict[str, bool]) -> RegionMoved | None:
        move, self.move = self.move, None
        if move is None:
            return None
        return RegionMoved(move.from_region, self.current, move.from_url, self.url, move.reason,
                           max(0.0, now_s - move.started_s), dict(recovered))

    def preferred_health(self, ready: bool, now_s: float) -> None:
        if not ready:
            self._preferred_ready_since_s = None
        elif self._preferred_ready_since_s is None:
            self._preferred_ready_since_s = now_s

    def should_fail_back(self, now_s: float) -> bool:
        return (self.current != 0 and self.arrived_at_s is not None
                and now_s - self.arrived_at_s >= self.failback_after_s
                and self._preferred_ready_since_s is not None
                and now_s - self._preferred_ready_since_s >= self.failback_after_s)

    @property
    def away(self) -> bool:
        return self.current != 0
