"""Provider health scoring and selection for one venue (pure: no I/O, no clock; every time is passed in).

Vocabulary and rules follow eRPC's upstream scoring and selection policies
(https://docs.erpc.cloud/config/projects/selection-policies): per provider an **error rate**, a **latency
quantile** (``respLatency``, here venue event time to our receive), a **throttled rate**, a **lag** behind the
best provider of the venue (eRPC's ``blockHeadLag``, here measured in venue event time) and **staleness**
(alive but no data), each over a sliding window; **score multipliers** weigh them into one score; an
**exclusion** rule removes a provider from selection; **resampling** re-admits excluded providers
periodically (eRPC's ``resampleExcluded`` / ``resampleInterval``), here through a probation on a fresh window.

Health of one provider: an enum plus a transition table (h11 ``_state.py`` style)::

    DOWN      --connected-->    PROBATION   (a fresh window: must deliver data, fault-free, for probation_s)
    PROBATION --passed-->       HEALTHY
    PROBATION --fault-->        EXCLUDED
    HEALTHY   --fault-->        EXCLUDED
    EXCLUDED  --resample-->     PROBATION   (resample_interval_s after exclusion; window cleared)
    any       --disconnected--> DOWN

Faults (exclusion rules, checked by ``evaluate``; ``fault()`` reports one from outside, e.g. an integrity
fault of the provider's book):

* ``error_rate``: errors / (errors + data messages) over the window > ``max_error_rate`` (at least
  ``min_samples`` of them);
* ``throttled``: throttled replies / (those + data messages) > ``max_throttled_rate`` (same minimum);
* ``stale``: no data for ``stale_after_s`` while the venue moved on without it (its lag > ``stale_after_s``);
  a provider whose socket and pings are fine but whose books stopped changing;
* ``lag``: lag > ``max_lag_s`` while still delivering data (serving the past).

Lag: the venue's *frontier* is the newest venue event time any provider delivered, with the receive time at
which some provider first reached it. A provider whose newest event time is P lags by ``now - (first receive
of any event newer than P)``, 0 if nothing newer exists: a provider serving N s behind lags ~N s, a stalled one
lags by the time since it stopped, and a quiet market lags nobody.

Score, 0 for DOWN/EXCLUDED, else in (0, 1]::

    (weight / max weight) * (1 - error_rate)^m_err * (1 - throttled_rate)^m_thr
        * (best latency / own latency)^m_lat * (1 / (1 + lag_s / max_lag_s))^m_lag

latencies are the ``latency_quantile`` (p90) of the window, floored at ``latency_floor_s`` so loopback noise
does not decide. Selection (``evaluate``): the selected provider is kept while it is HEALTHY or PROBATION;
it is replaced at once when it goes DOWN (reason ``disconnect``) or EXCLUDED (the fault's name); it is
replaced by a better one (reason ``better_score``) only when that one's score exceeds it by ``switch_margin``
for ``switch_hold_s`` and at least ``min_dwell_s`` passed since the last switch (hysteresis). Candidates are
HEALTHY providers, else PROBATION ones that delivered data. With no candidate the selected one is kept
while it is connected, and if it is down the connected excluded provider with the least lag is read (a
lagging provider is better than none).
"""
from __future__ import annotations

import bisect
import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field


class Health(enum.StrEnum):
    DOWN = "down"
    PROBATION = "probation"
    HEALTHY = "healthy"
    EXCLUDED = "excluded"


class Transition(enum.StrEnum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    PASSED = "passed"
    FAULT = "fault"
    RESAMPLE = "resample"


class Fault(enum.StrEnum):
    """Why a provider is excluded; also the switch reason when it was the selected one."""

    ERROR_RATE = "error_rate"
    THROTTLED = "throttled"
    STALE = "stale"
    LAG = "lag"
    INTEGRITY = "integrity"


class SwitchReason(enum.StrEnum):
    INITIAL = "initial"
    RECONNECT = "reconnect"
    DISCONNECT = "disconnect"
    BETTER_SCORE = "better_score"
    ERROR_RATE = "error_rate"
    THROTTLED = "throttled"
    STALE = "stale"
    LAG = "lag"
    INTEGRITY = "integrity"


TRANSITIONS: dict[tuple[Health, Transition], Health] = {
    (Health.DOWN, Transition.CONNECTED): Health.PROBATION,
    (Health.PROBATION, Transition.PASSED): Health.HEALTHY,
    (Health.PROBATION, Transition.FAULT): Health.EXCLUDED,
    (Health.HEALTHY, Transition.FAULT): Health.EXCLUDED,
    (Health.EXCLUDED, Transition.RESAMPLE): Health.PROBATION,
    (Health.PROBATION, Transition.DISCONNECTED): Health.DOWN,
    (Health.HEALTHY, Transition.DISCONNECTED): Health.DOWN,
    (Health.EXCLUDED, Transition.DISCONNECTED): Health.DOWN,
    (Health.DOWN, Transition.DISCONNECTED): Health.DOWN,
}


@dataclass(frozen=True, slots=True)
class ScoringPolicy:
    """Thresholds and multipliers; every duration in seconds."""

    window_s: float = 30.0
    min_samples: int = 5
    max_error_rate: float = 0.5
    max_throttled_rate: float = 0.5
    stale_after_s: float = 0.5
    max_lag_s: float = 1.0
    latency_quantile: float = 0.9
    latency_floor_s: float = 0.005
    probation_s: float = 1.0
    resample_interval_s: float = 5.0
    switch_margin: float = 0.2
    switch_hold_s: float = 3.0
    min_dwell_s: float = 2.0
    error_rate_multiplier: float = 2.0
    throttled_rate_multiplier: float = 1.0
    latency_multiplier: float = 1.0
    lag_multiplier: float = 1.0
    max_latency_samples: int = 2048

    def __post_init__(self) -> None:
        for name in ("window_s", "stale_after_s", "max_lag_s", "latency_floor_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ScoringPolicy.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.latency_quantile <= 1:
            raise ValueError(f"ScoringPolicy.latency_quantile must be in (0, 1], got {self.latency_quantile!r}")


@dataclass(slots=True)
class _Provider:
    name: str
    weight: float
    health: Health = Health.DOWN
    since_ns: int = 0  # when it entered its health state
    fault: Fault | None = None
    messages: deque = field(default_factory=deque)  # recv ns of data messages
    errors: deque = field(default_factory=deque)  # recv ns of errors (any kind)
    throttles: deque = field(default_factory=deque)
    latencies: deque = field(default_factory=deque)  # (recv ns, latency ns)
    position_ns: int | None = None  # newest venue event time delivered
    last_data_ns: int | None = None
    last_alive_ns: int | None = None
    data_since_probation: bool = False

    def clear_window(self) -> None:
        self.messages.clear()
        self.errors.clear()
        self.throttles.clear()
        self.latencies.clear()
        self.data_since_probation = False


@dataclass(frozen=True, slots=True)
class ProviderView:
    """One provider as ``evaluate`` saw it: for metrics, ``/v1/status`` and tests."""

    name: str
    health: Health
    score: float
    error_rate: float
    throttled_rate: float
    latency_s: float | None  # the policy's quantile over the window, None without samples
    lag_s: float
    fault: Fault | None
    last_data_age_s: float | None


@dataclass(frozen=True, slots=True)
class Decision:
    """The result of one ``evaluate``: the selected provider, whether it changed and why, new faults."""

    selected: str | None
    previous: str | None
    reason: SwitchReason | None  # set when ``selected`` changed
    providers: dict[str, ProviderView]
    new_faults: tuple[tuple[str, Fault], ...]

    @property
    def switched(self) -> bool:
        return self.reason is not None


class Scorer:
    """Scores and selects among the providers of one venue. Feed it observations with their times (ns),
    call ``evaluate(now_ns)`` periodically (and right after a disconnect) and act on its ``Decision``.

    Raises ``KeyError`` for an unknown provider name and ``ValueError`` for no providers or a bad weight.
    """

    def __init__(self, providers: Iterable[tuple[str, float]], policy: ScoringPolicy | None = None) -> None:
        self.policy = policy or ScoringPolicy()
        self._providers: dict[str, _Provider] = {}
        for name, weight in providers:
            if not weight > 0:
                raise ValueError(f"provider {name!r}: weight must be > 0, got {weight!r}")
            self._providers[name] = _Provider(name, float(weight))
        if not self._providers:
            raise ValueError("a venue needs at least one provider")
        self.selected: str | None = None
        self._ever_selected = False
        self._last_switch_ns: int | None = None
        self._better: tuple[str, int] | None = None  # (challenger, since ns)
        # frontier: venue event times (increasing) and the receive time each was first reached
        self._frontier_event: list[int] = []
        self._frontier_recv: list[int] = []

    # -- observations -------------------------------------------------------------------------
    def _step(self, p: _Provider, transition: Transition, now_ns: int) -> None:
        new = TRANSITIONS.get((p.health, transition))
        if new is None:
            return  # not applicable in this state (e.g. a fault while DOWN)
        if new is not p.health or transition is Transition.DISCONNECTED:
            p.health = new
            p.since_ns = now_ns
        if new is Health.PROBATION:
            p.clear_window()
            p.fault = None

    def connected(self, name: str, now_ns: int) -> None:
        p = self._providers[name]
        self._step(p, Transition.CONNECTED, now_ns)
        p.last_alive_ns = now_ns

    def disconnected(self, name: str, now_ns: int) -> None:
        p = self._providers[name]
        self._step(p, Transition.DISCONNECTED, now_ns)
        p.errors.append(now_ns)

    def alive(self, name: str, now_ns: int) -> None:
        """The socket proved alive (ping answered, venue heartbeat) without book data."""
        self._providers[name].last_alive_ns = now_ns

    def error(self, name: str, now_ns: int) -> None:
        """An error from the provider: an error reply, a malformed message, a failed snapshot fetch."""
        self._providers[name].errors.append(now_ns)

    def throttled(self, name: str, now_ns: int) -> None:
        self._providers[name].throttles.append(now_ns)

    def fault(self, name: str, fault: Fault, now_ns: int) -> None:
        """Exclude a provider now for a fault found outside the scorer (e.g. ``Fault.INTEGRITY``)."""
        p = self._providers[name]
        if p.health in (Health.HEALTHY, Health.PROBATION):
            p.fault = fault
            self._step(p, Transition.FAULT, now_ns)

    def message(self, name: str, now_ns: int, ts_event_ns: int | None) -> None:
        """A data message received at ``now_ns`` carrying venue event time ``ts_event_ns`` (None: none)."""
        p = self._providers[name]
        p.messages.append(now_ns)
        p.last_data_ns = p.last_alive_ns = now_ns
        p.data_since_probation = True
        if ts_event_ns is None:
            return
        latency = now_ns - ts_event_ns
        p.latencies.append((now_ns, latency if latency > 0 else 0))
        if len(p.latencies) > self.policy.max_latency_samples:
            p.latencies.popleft()
        if p.position_ns is None or ts_event_ns > p.position_ns:
            p.position_ns = ts_event_ns
        if not self._frontier_event or ts_event_ns > self._frontier_event[-1]:
            self._frontier_event.append(ts_event_ns)
            self._frontier_recv.append(now_ns)

    # -- reading --------------------------------------------------------------------------------
    def health(self, name: str) -> Health:
        return self._providers[name].health

    def position_ns(self, name: str) -> int | None:
        return self._providers[name].position_ns

    def names(self) -> list[str]:
        return list(self._providers)

    def lag_s(self, name: str, now_ns: int) -> float:
        p = self._providers[name]
        if not self._frontier_event:
            return 0.0
        if p.position_ns is None:
            i = 0
        else:
            i = bisect.bisect_right(self._frontier_event, p.position_ns)
            if i >= len(self._frontier_event):
                return 0.0
        return max(0, now_ns - self._frontier_recv[i]) / 1e9

    # -- evaluation -----------------------------------------------------------------------------
    def _trim(self, now_ns: int) -> None:
        horizon = now_ns - int(self.policy.window_s * 1e9)
        for p in self._providers.values():
            for dq in (p.messages, p.errors, p.throttles):
                while dq and dq[0] < horizon:
                    dq.popleft()
            while p.latencies and p.latencies[0][0] < horizon:
                p.latencies.popleft()
        # keep frontier entries in the window, but always the newest one
        cut = bisect.bisect_left(self._frontier_recv, horizon)
        cut = min(cut, len(self._frontier_recv) - 1)
        if cut > 0:
            del self._frontier_event[:cut]
            del self._frontier_recv[:cut]

    def _rates(self, p: _Provider) -> tuple[float, float]:
        n = len(p.messages)
        e, t = len(p.errors), len(p.throttles)
        err = e / (e + n) if e + n >= self.policy.min_samples else 0.0
        thr = t / (t + n) if t + n >= self.policy.min_samples else 0.0
        return err, thr

    def _latency_s(self, p: _Provider) -> float | None:
        if not p.latencies:
            return None
        values = sorted(lat for _, lat in p.latencies)
        k = min(len(values) - 1, max(0, int(self.policy.latency_quantile * len(values) + 0.999999) - 1))
        return values[k] / 1e9

    def _check_fault(self, p: _Provider, err: float, thr: float, lag_s: float, now_ns: int) -> Fault | None:
        pol = self.policy
        if err > pol.max_error_rate:
            return Fault.ERROR_RATE
        if thr > pol.max_throttled_rate:
            return Fault.THROTTLED
        silent_s = (now_ns - p.last_data_ns) / 1e9 if p.last_data_ns is not None else (now_ns - p.since_ns) / 1e9
        if silent_s > pol.stale_after_s and lag_s > pol.stale_after_s:
            return Fault.STALE
        if lag_s > pol.max_lag_s:
            return Fault.LAG
        return None

    def evaluate(self, now_ns: int, *, busy: Iterable[str] = ()) -> Decision:
        """Update health, scores and the selection at ``now_ns``. Providers in ``busy`` have data waiting in
        the caller's own queue: they are not judged stale or lagging this time (the delay is ours)."""
        pol = self.policy
        busy = set(busy)
        self._trim(now_ns)
        new_faults: list[tuple[str, Fault]] = []
        stats: dict[str, tuple[float, float, float | None, float]] = {}
        for p in self._providers.values():
            err, thr = self._rates(p)
            lag_s = self.lag_s(p.name, now_ns) if p.health is not Health.DOWN else 0.0
            stats[p.name] = (err, thr, self._latency_s(p), lag_s)
            if p.health is Health.EXCLUDED and now_ns - p.since_ns >= pol.resample_interval_s * 1e9:
                self._step(p, Transition.RESAMPLE, now_ns)
            if p.health in (Health.HEALTHY, Health.PROBATION):
                fault = self._check_fault(p, err, thr, lag_s, now_ns)
                if fault in (Fault.STALE, Fault.LAG) and p.name in busy:
                    fault = None
                if fault is not None:
                    p.fault = fault
                    self._step(p, Transition.FAULT, now_ns)
                    new_faults.append((p.name, fault))
                elif (p.health is Health.PROBATION and p.data_since_probation
                      and now_ns - p.since_ns >= pol.probation_s * 1e9):
                    self._step(p, Transition.PASSED, now_ns)
        latencies = [max(lat, pol.latency_floor_s) for (_, _, lat, _) in stats.values() if lat is not None]
        best_latency = min(latencies) if latencies else None
        max_weight = max(p.weight for p in self._providers.values())
        views: dict[str, ProviderView] = {}
        for p in self._providers.values():
            err, thr, lat, lag_s = stats[p.name]
            score = 0.0
            if p.health in (Health.HEALTHY, Health.PROBATION):
                lat_factor = 1.0
                if lat is not None and best_latency is not None:
                    lat_factor = best_latency / max(lat, pol.latency_floor_s)
                score = ((p.weight / max_weight)
                         * (1 - err) ** pol.error_rate_multiplier
                         * (1 - thr) ** pol.throttled_rate_multiplier
                         * lat_factor ** pol.latency_multiplier
                         * (1 / (1 + lag_s / pol.max_lag_s)) ** pol.lag_multiplier)
            age = (now_ns - p.last_data_ns) / 1e9 if p.last_data_ns is not None else None
            views[p.name] = ProviderView(p.name, p.health, score, err, thr, lat, lag_s, p.fault, age)
        previous = self.selected
        selected, reason = self._select(views, now_ns)
        if reason is not None:
            self.selected = selected
            self._last_switch_ns = now_ns
            self._better = None
            self._ever_selected = self._ever_selected or selected is not None
        return Decision(self.selected, previous, reason, views, tuple(new_faults))

    def _select(self, views: dict[str, ProviderView], now_ns: int) -> tuple[str | None, SwitchReason | None]:
        pol = self.policy
        healthy = [v for v in views.values() if v.health is Health.HEALTHY]
        candidates = healthy or [v for v in views.values()
                                 if v.health is Health.PROBATION and self._providers[v.name].data_since_probation]
        order = {name: i for i, name in enumerate(self._providers)}
        if not candidates:  # a connected but excluded provider (least lag) is better than none
            excluded = [v for v in views.values() if v.health is Health.EXCLUDED and v.name != self.selected]
            if excluded:
                fallback = min(excluded, key=lambda v: (v.lag_s, order[v.name]))
                current = views.get(self.selected) if self.selected is not None else None
                if current is None or current.health is Health.DOWN:
                    return fallback.name, (SwitchReason.DISCONNECT if current is not None else
                                           SwitchReason.RECONNECT if self._ever_selected else SwitchReason.INITIAL)
        best = max(candidates, key=lambda v: (v.score, -order[v.name])) if candidates else None
        current = views.get(self.selected) if self.selected is not None else None
        if current is None:
            if best is None:
                return None, None
            return best.name, (SwitchReason.RECONNECT if self._ever_selected else SwitchReason.INITIAL)
        if current.health is Health.DOWN:
            if best is None:
                return None, SwitchReason.DISCONNECT
            return best.name, SwitchReason.DISCONNECT
        if current.health is Health.EXCLUDED:
            others = [v for v in candidates if v.name != current.name]
            if not others:
                return current.name, None  # nothing better: keep reading the only connected one
            best = max(others, key=lambda v: (v.score, -order[v.name]))
            return best.name, SwitchReason(current.fault.value if current.fault else "error_rate")
        if best is None or best.name == current.name or best.score <= current.score + pol.switch_margin:
            self._better = None
            return current.name, None
        if self._better is None or self._better[0] != best.name:
            self._better = (best.name, now_ns)
        held = now_ns - self._better[1] >= pol.switch_hold_s * 1e9
        dwelt = self._last_switch_ns is None or now_ns - self._last_switch_ns >= pol.min_dwell_s * 1e9
        if held and dwelt:
            return best.name, SwitchReason.BETTER_SCORE
        return current.name, None
