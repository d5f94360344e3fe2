"""Chaos Toolkit probes: the steady state of a drill, from the SLOs bookcast already declares.

Steady state (``steady_state``) for a client group over the last ``window_s``:

* e2e p99 of its deliveries <= the e2e objective (``dashboards.slo.RuleConfig.e2e_objective_s``, the
  objective of the probe e2e latency SLI and its burn-rate alerts) times ``p99_factor``;
* every instrument fresh: each client received each instrument within ``max_stale_s``;
* 0 undetected gaps: checked after the drill by the independent checker (``chaos.clients.compare``).

``evaluate`` is pure (deliveries and the clock passed in); ``steady_state`` reads the running drill.
"""
from __future__ import annotations

import math
import time
from typing import Any

from chaos.clients import Delivery
from chaos.context import current


def e2e_objective_s() -> float:
    from dashboards.slo import RuleConfig

    return RuleConfig().e2e_objective_s


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def evaluate(deliveries: list[Delivery], clients: list[int], instruments: list[str], group: str, now_s: float,
             *, window_s: float, max_stale_s: float, max_p99_s: float) -> dict[str, Any]:
    """Pure: {"ok", "p99_s", "deliveries", "stale": [client instrument ...], "why"} for ``group``."""
    recent = [d for d in deliveries if d.group == group and d.t_s >= now_s - window_s]
    p99 = percentile([d.e2e_s for d in recent if d.e2e_s is not None], 99)
    last: dict[tuple[int, str], float] = {}
    for d in deliveries:
        if d.group == group:
            last[(d.client, d.instrument)] = d.t_s
    stale = [f"{group}#{c} {i}" for c in clients for i in instruments
             if now_s - last.get((c, i), -math.inf) > max_stale_s]
    why = []
    if p99 is not None and p99 > max_p99_s:
        why.append(f"e2e p99 {p99 * 1e3:.1f} ms > {max_p99_s * 1e3:.1f} ms")
    if stale:
        why.append(f"{len(stale)} stale book(s): {', '.join(stale[:4])}")
    if not recent:
        why.append("no deliveries")
    return {"ok": not why, "p99_s": p99, "deliveries": len(recent), "stale": stale, "why": "; ".join(why)}


def steady_state(group: str = "faulted", window_s: float = 3.0, max_stale_s: float = 3.0,
                 p99_factor: float = 1.0, recover_within_s: float = 0.0) -> bool:
    """True when ``group`` (``faulted`` or ``control``) meets the steady state now (see the module).

    ``recover_within_s``: once the fault began (the "after" check), wait up to this long for the steady
    state to hold, re-evaluating every 0.25 s (the time it took is noted in the timeline): a recovery is a
    condition with a deadline, not one sample at a fixed moment. Before the fault: one evaluation."""
    drill = current()
    n = drill.groups.groups[group][1]
    after = drill.first("fault_onset") is not None
    t0 = time.monotonic()
    deadline = t0 + (float(recover_within_s) if after else 0.0)
    while True:
        deliveries, _ = drill.groups.recorder.snapshot()
        result = evaluate(deliveries, list(range(n)), drill.stack.instruments, group, time.monotonic(),
                          window_s=window_s, max_stale_s=max_stale_s,
                          max_p99_s=e2e_objective_s() * p99_factor * drill.p99_scale)
        if result["ok"] or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    waited = f" (after {time.monotonic() - t0:.1f} s)" if after and recover_within_s else ""
    drill.note("steady_state", f"{group}: {'ok' if result['ok'] else result['why']}{waited}",
               group=group, ok=result["ok"], p99_s=result["p99_s"])
    return result["ok"]


def proxy_stats(proxy: str = "gateway-a") -> dict:
    """The fault proxy's own counters for ``proxy`` (bytes each way, connections, toxic hits)."""
    from chaos.stack import http_json

    return http_json(f"{current().stack.proxy_api}/proxies/{proxy}")["stats"]
