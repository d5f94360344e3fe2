"""The running drill, as chaostoolkit activities see it: the stack, the client groups, the state file, the
timeline and the proofs of injection. One drill runs per process; ``current()`` raises if none runs.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from chaos.clients import ClientGroups, GroupCheckers
from chaos.stack import DrillStack
from chaos.state import StateFile


class NoDrillRunning(RuntimeError):
    """An activity was called outside ``bookcast drill run``."""


@dataclass
class TimelineEntry:
    t_s: float          # time.monotonic()
    kind: str           # fault_onset, fault_end, rollback, proof, safeguard_abort, restart, note
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Proof:
    fault: str
    took_effect: bool
    evidence: dict[str, Any]


@dataclass
class Drill:
    name: str
    stack: DrillStack
    groups: ClientGroups
    checker: GroupCheckers
    state: StateFile
    fault_limit_s: float
    started_s: float = field(default_factory=time.monotonic)
    timeline: list[TimelineEntry] = field(default_factory=list)
    proofs: list[Proof] = field(default_factory=list)
    aborted: str | None = None
    timers: list[threading.Timer] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    metrics: Any = None       # chaos.metrics.DrillMetrics, or None
    p99_scale: float = 1.0    # multiplies every steady-state probe's p99_factor

    def note(self, kind: str, detail: str, **data: Any) -> float:
        now = time.monotonic()
        with self.lock:
            self.timeline.append(TimelineEntry(now, kind, detail, data))
        if self.metrics is not None:
            self.metrics.on_note(self.name, kind)
        return now

    def first(self, kind: str) -> float | None:
        return next((e.t_s for e in self.timeline if e.kind == kind), None)

    def last(self, kind: str) -> float | None:
        return next((e.t_s for e in reversed(self.timeline) if e.kind == kind), None)

    def hard_limit(self, state_id: str, what: str) -> None:
        """Undo ``state_id`` after ``fault_limit_s`` whatever the experiment does (a fault's hard time limit)."""
        def expire() -> None:
            if self.state.undo(state_id):
                self.note("rollback", f"hard limit {self.fault_limit_s:g} s reached: undid {what}")
        timer = threading.Timer(self.fault_limit_s, expire)
        timer.daemon = True
        timer.start()
        self.timers.append(timer)


_current: Drill | None = None


def set_current(drill: Drill | None) -> None:
    global _current
    for t in (_current.timers if _current else []):
        t.cancel()
    _current = drill


def current() -> Drill:
    if _current is None:
        raise NoDrillRunning("no drill is running: activities in chaos.actions/chaos.probes run under "
                             "`bookcast drill run`")
    return _current
