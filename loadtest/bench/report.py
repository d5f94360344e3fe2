"""Reports of a fan-out run: ``results.json``, ``report.md`` and ``fanout.png`` in the output directory.

``analyse`` (pure) adds to the run dict of ``loadtest.bench.fanout.run_all``:

* ``comparisons``: per point (clients, rate, idle connections) measured for both targets, each figure for
  bookcast and nats and their ratio bookcast / nats, paired run by run (``--repeat``: run *n* of bookcast
  against run *n* of nats, measured back to back). A figure gives the median of the ratios of the pairs
  where neither cell was saturated, their min, max and spread ``(max - min) / median``; when every pair
  was saturated it gives those of all pairs, marked ``saturated`` (no verdict comes from it);
* ``rate_search``: per client count and target, the highest rate of the run whose every repeat was
  sustained (``sustained``: no loss, no connect failure or closed connection, p99 under 250 ms), and
  whether a higher rate failed (so the ceiling is known) on a saturated machine or not; when both targets
  sustained every rate tested, no ceiling was reached and the rate target is ``not measured``;
* ``idle``: in idle-connections mode, per target, the healthy clients' p99 with the idle connections
  over the p99 without them (same run) and RSS per idle connection;
* ``targets``: issue 13's targets, each ``met``, ``missed``, ``saturated`` (only saturated cells measured
  it: the machine, not the server, was the limit) or ``not measured``, with the figures behind it.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from loadtest.bench.floor import LoopbackFloor

TARGET_CLIENTS = 1000
BIG_CLIENTS = 5000
IDLE_TARGET = 10_000
RSS_TARGET_BYTES = 20 * 1024
CPU_RATIO_TARGET = 0.8
P99_RATIO_TARGET = 0.7
RATE_RATIO_TARGET = 1.2
SPREAD_TARGET = 0.10
SUSTAINED_P99_MS = 250.0
IDLE_P99_UNCHANGED = 1.25  # a healthy client's p99 with the idle connections within 1.25x of without them
SPREAD_MIN_RUNS = 3

_COMPARED = {
    "delivered_per_s": lambda c: c["delivered_per_s"],
    "p99_ms": lambda c: c["latency_ms"]["p99"],
    "server_cpu_s_per_million": lambda c: c["server_cpu_s_per_million"],
    "rss_per_idle_connection_bytes": lambda c: c["rss_per_idle_connection_bytes"],
    # not a target: the floor each cell found (floor.FloorProbe), bookcast's cell over nats-server's; away
    # from 1 the two cells ran on a cheaper or dearer machine and the pair's CPU ratio is partly the machine's
    "floor_us": lambda c: c.get("floor_us"),
}
_LABELS = {"delivered_per_s": "delivered/s", "p99_ms": "p99", "server_cpu_s_per_million": "CPU s / M deliveries",
           "rss_per_idle_connection_bytes": "RSS / idle conn", "floor_us": "floor (us per send + recv)"}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _point(c: dict[str, Any]) -> tuple[int, float, int]:
    return c["clients"], c["rate_per_s"], c.get("idle") or 0


def point_label(clients: int, rate: float, idle: int = 0) -> str:
    return f"{clients:,} x {rate:g}/s" + (f" + {idle:,} idle" if idle else "")


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"ratio": None, "min": None, "max": None, "spread": None}
    median = statistics.median(values)
    return {"ratio": median, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / median if median and len(values) > 1 else None}


def compare(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per point, bookcast / nats ratios of every figure, paired run by run (see the module docstring)."""
    by_key = {(c["target"], *_point(c), c.get("repeat", 0)): c for c in cells}
    points = sorted({_point(c) for c in cells})
    out = []
    for point in points:
        pairs = [(bk, by_key[("nats", *point, bk.get("repeat", 0))]) for bk in cells
                 if bk["target"] == "bookcast" and _point(bk) == point
                 and ("nats", *point, bk.get("repeat", 0)) in by_key]
        if not pairs:
            continue
        clean = [(a, b) for a, b in pairs if not (a.get("saturated") or b.get("saturated"))]
        used = clean or pairs
        row: dict[str, Any] = {"clients": point[0], "rate_per_s": point[1], "idle": point[2], "runs": len(pairs),
                               "saturated_runs": len(pairs) - len(clean), "saturated": not clean}
        for name, get in _COMPARED.items():
            ratios = [r for r in (_ratio(get(a), get(b)) for a, b in used) if r is not None]
            bk = [get(a) for a, _ in used if get(a) is not None]
            nats = [get(b) for _, b in used if get(b) is not None]
            # each side's own run-to-run spread: which target's variance the ratio's spread comes from
            row[name] = {"bookcast": statistics.median(bk) if bk else None,
                         "nats": statistics.median(nats) if nats else None,
                         **_stats(ratios), "ratios": ratios, "saturated": not clean,
                         "spread_bookcast": _stats(bk)["spread"], "spread_nats": _stats(nats)["spread"]}
        out.append(row)
    return out


def sustained(c: dict[str, Any]) -> bool:
    """The cell delivered everything, to every client, with p99 under ``SUSTAINED_P99_MS``."""
    return (not c["connect_failures"] and not c["closed_early"] and not c["harness_failures"]
            and not sum(c["losses"].values()) and c["latency_ms"]["p99"] < SUSTAINED_P99_MS)


def rate_search(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per client count: for each target the highest rate sustained in every repeat, all lower rates too."""
    out = []
    busy = [c for c in cells if not c.get("idle")]
    for clients in sorted({c["clients"] for c in busy}):
        row: dict[str, Any] = {"clients": clients}
        for target in ("bookcast", "nats"):
            mine = [c for c in busy if c["clients"] == clients and c["target"] == target]
            rates = sorted({c["rate_per_s"] for c in mine})
            best, failed = None, None
            for rate in rates:
                at = [c for c in mine if c["rate_per_s"] == rate]
                if all(sustained(c) for c in at):
                    best = rate
                    continue
                failed = {"rate_per_s": rate, "saturated": any(c.get("saturated") for c in at if not sustained(c))}
                break
            row[target] = {"highest_sustained_per_s": best, "tested": rates, "failed_at": failed}
        bk, nats = row["bookcast"], row["nats"]
        # neither target failed a rate: no ceiling is known, and the highest rate tested is no ratio
        row["ratio"] = (_ratio(bk["highest_sustained_per_s"], nats["highest_sustained_per_s"])
                        if bk["failed_at"] or nats["failed_at"] else None)
        out.append(row)
    return out


def idle_effect(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Idle-connections mode: per target, idle count and run, p99 with / p99 without the idle connections."""
    out = []
    by_key = {(c["target"], c["clients"], c["rate_per_s"], c.get("idle") or 0, c.get("repeat", 0)): c for c in cells}
    for c in cells:
        if not c.get("idle"):
            continue
        base = by_key.get((c["target"], c["clients"], c["rate_per_s"], 0, c.get("repeat", 0)))
        out.append({"target": c["target"], "idle": c["idle"], "repeat": c.get("repeat", 0),
                    "idle_connected": c.get("idle_connected"), "idle_closed_early": c.get("idle_closed_early"),
                    "idle_connect_failures": c.get("idle_connect_failures"),
                    "rss_per_idle_connection_bytes": c["rss_per_idle_connection_bytes"],
                    "p99_ms": c["latency_ms"]["p99"], "p99_without_ms": base["latency_ms"]["p99"] if base else None,
                    "p99_ratio": _ratio(c["latency_ms"]["p99"], base["latency_ms"]["p99"]) if base else None,
                    "saturated": bool(c.get("saturated") or (base and base.get("saturated"))),
                    "errors": sum(c["errors"].values()), "connect_failures": c["connect_failures"]})
    return out


def _verdict(name: str, measured: list, saturated: list, ok, detail,
             unmeasured: str | None = None) -> dict[str, Any]:
    """``measured``: the unsaturated evidence; ``saturated``: evidence from saturated cells only;
    ``unmeasured``: the detail when there is neither (default: no cell for it in this run)."""
    if measured:
        return {"target": name, "status": "met" if all(ok(r) for r in measured) else "missed",
                "detail": "; ".join(detail(r) for r in measured)}
    if saturated:
        return {"target": name, "status": "saturated",
                "detail": "only saturated cells measured it (left out of the verdict): "
                          + "; ".join(detail(r) for r in saturated)}
    return {"target": name, "status": "not measured", "detail": unmeasured or "no cell for it in this run"}


def _fig(r: dict[str, Any], name: str, scale: float = 1.0, unit: str = "") -> str:
    f = r[name]
    if f["ratio"] is None:
        return "-"
    span = f" [{f['min']:.2f}-{f['max']:.2f}]" if len(f["ratios"]) > 1 else ""
    return (f"{f['bookcast'] * scale:.3g}{unit} vs {f['nats'] * scale:.3g}{unit}: x{f['ratio']:.2f}{span}"
            f" over {len(f['ratios'])} run(s)")


def targets(run: dict[str, Any]) -> list[dict[str, Any]]:
    cells, comparisons = run["cells"], run["comparisons"]
    busy = [r for r in comparisons if not r["idle"]]
    out = []
    for rate in (20.0, 100.0):
        rows = [r for r in busy if r["clients"] == TARGET_CLIENTS and r["rate_per_s"] == rate]
        out.append(_verdict(
            f"server CPU s per million deliveries at {TARGET_CLIENTS:,} x {rate:g}/s <= {CPU_RATIO_TARGET}x nats-server's",
            [r for r in rows if not r["saturated"]], [r for r in rows if r["saturated"]],
            lambda r: r["server_cpu_s_per_million"]["ratio"] <= CPU_RATIO_TARGET,
            lambda r: _fig(r, "server_cpu_s_per_million")))
    rows = [r for r in busy if r["clients"] == TARGET_CLIENTS and r["rate_per_s"] in (20.0, 100.0)]
    out.append(_verdict(
        f"p99 at {TARGET_CLIENTS:,} x 20/s and x 100/s, unsaturated machine, <= {P99_RATIO_TARGET}x nats-server's",
        [r for r in rows if not r["saturated"]], [r for r in rows if r["saturated"]],
        lambda r: r["p99_ms"]["ratio"] <= P99_RATIO_TARGET,
        lambda r: f"{r['rate_per_s']:g}/s: " + _fig(r, "p99_ms", unit=" ms")))
    search = [r for r in run["rate_search"] if r["clients"] == TARGET_CLIENTS]
    judged, unjudged, open_ended = [], [], []
    for r in search:
        bk, nats = r["bookcast"], r["nats"]
        nats_fail = nats["failed_at"]
        # the ratio is known once nats-server's ceiling is (a rate it failed, not on a saturated machine) or
        # bookcast failed first; a rate both sustained to the top of the list says only ">=".
        if (nats_fail and not nats_fail["saturated"]) or (bk["failed_at"] and not bk["failed_at"]["saturated"]
                                                          and not nats_fail):
            judged.append(r)
        elif nats_fail or bk["failed_at"]:  # what failed, failed on a saturated machine
            unjudged.append(r)
        else:
            open_ended.append(r)

    def rate_detail(r):
        def one(t):
            f = r[t]["failed_at"]
            return (f"{t} {r[t]['highest_sustained_per_s'] or 0:g}/s"
                    + (f" (failed at {f['rate_per_s']:g}/s{', saturated' if f['saturated'] else ''})" if f
                       else f" (sustained every rate tested, up to {max(r[t]['tested'], default=0):g}/s)"))
        return one("bookcast") + " vs " + one("nats") + (f": x{r['ratio']:.2f}" if r["ratio"] else "")

    # open-ended: both sustained the highest rate tested, neither ceiling was reached, so there is no ratio yet
    out.append(_verdict(f"highest rate at {TARGET_CLIENTS:,} clients with no loss and p99 < {SUSTAINED_P99_MS:g} ms "
                        f">= {RATE_RATIO_TARGET}x nats-server's", judged, unjudged,
                        lambda r: (r["ratio"] or 0) >= RATE_RATIO_TARGET, rate_detail,
                        unmeasured=("no ceiling reached (add higher --rates, e.g. 20,100,150,200): "
                                    + "; ".join(rate_detail(r) for r in open_ended)) if open_ended else None))
    idle = run["idle"]
    rss_rows = idle or [c for c in cells if c["target"] == "bookcast" and c["rss_per_idle_connection_bytes"]]
    if not idle and rss_rows:
        top = max(c["clients"] for c in rss_rows)
        rss_rows = [c for c in rss_rows if c["clients"] == top]
    rss_rows = [r for r in rss_rows if r.get("target", "bookcast") == "bookcast"]
    out.append(_verdict(f"bookcast RSS per idle connection <= {RSS_TARGET_BYTES // 1024} KiB", rss_rows, [],
                        lambda r: r["rss_per_idle_connection_bytes"] <= RSS_TARGET_BYTES,
                        lambda r: f"{r['rss_per_idle_connection_bytes'] / 1024:.1f} KiB"
                                  + (f" ({r['idle']:,} connections)" if idle else
                                     f" ({r['clients']:,} subscribed connections before publishing; --idle for idle ones)")))
    held = [r for r in idle if r["target"] == "bookcast" and r["idle"] >= IDLE_TARGET]
    out.append(_verdict(
        f"{IDLE_TARGET:,} idle connections held on bookcast, a healthy client's p99 unchanged "
        f"(<= {IDLE_P99_UNCHANGED}x of without them)",
        [r for r in held if not r["saturated"]], [r for r in held if r["saturated"]],
        lambda r: (r["idle_connected"] == r["idle"] and not r["idle_closed_early"] and not r["errors"]
                   and r["p99_ratio"] is not None and r["p99_ratio"] <= IDLE_P99_UNCHANGED),
        lambda r: (f"run {r['repeat'] + 1}: {r['idle_connected']:,}/{r['idle']:,} held, {r['idle_closed_early']} closed, "
                   f"p99 {r['p99_ms']:.1f} ms vs {r['p99_without_ms'] or 0:.1f} ms without (x{r['p99_ratio'] or 0:.2f})")))
    spread_rows = [(r, name) for r in comparisons for name in ("server_cpu_s_per_million", "p99_ms")
                   if len(r[name]["ratios"]) >= SPREAD_MIN_RUNS and not r["saturated"]]
    sat_rows = [(r, name) for r in comparisons for name in ("server_cpu_s_per_million", "p99_ms")
                if len(r[name]["ratios"]) >= SPREAD_MIN_RUNS and r["saturated"]]
    out.append(_verdict(f"run-to-run spread of each ratio over >= {SPREAD_MIN_RUNS} runs < {SPREAD_TARGET:.0%}",
                        spread_rows, sat_rows,
                        lambda rn: rn[0][rn[1]]["spread"] is not None and rn[0][rn[1]]["spread"] < SPREAD_TARGET,
                        lambda rn: f"{point_label(rn[0]['clients'], rn[0]['rate_per_s'], rn[0]['idle'])} "
                                   f"{_LABELS[rn[1]]}: {(rn[0][rn[1]]['spread'] or 0):.0%}{_sides(rn[0][rn[1]])}"
                                   + (_floors(rn[0]) if rn[1] == "server_cpu_s_per_million" else "")))
    big = [c for c in cells if c["target"] == "bookcast" and c["clients"] == BIG_CLIENTS and not c.get("idle")]
    out.append(_verdict(f"{BIG_CLIENTS:,} clients on bookcast without errors", big, [],
                        lambda c: not (c["connect_failures"] or c["closed_early"] or c["errors"] or c["harness_failures"]),
                        lambda c: f"rate {c['rate_per_s']:g}/s: {c['subscribers']:,} connected, {c['connect_failures']} "
                                  f"connect failures, {c['closed_early']} closed, errors {c['errors'] or 0}, losses "
                                  f"{sum(c['losses'].values()):,}"))
    return out


def _sides(figure: dict[str, Any]) -> str:
    """`` (bookcast 2%, nats 12%)``: each target's own spread of a compared figure, when both are known."""
    bk, nats = figure.get("spread_bookcast"), figure.get("spread_nats")
    return f" (bookcast {bk:.0%}, nats {nats:.0%})" if bk is not None and nats is not None else ""


def _floors(row: dict[str, Any]) -> str:
    """``; the pairs' floor ratios 0.93-1.08``: how far the machine's cost moved within the pairs."""
    floor = row.get("floor_us") or {}
    return (f"; the pairs' floor ratios {floor['min']:.2f}-{floor['max']:.2f}"
            if floor.get("min") is not None else "")


def analyse(run: dict[str, Any]) -> dict[str, Any]:
    run["comparisons"] = compare(run["cells"])
    run["rate_search"] = rate_search(run["cells"])
    run["idle"] = idle_effect(run["cells"])
    run["targets"] = targets(run)
    return run


# -- rendering -------------------------------------------------------------------------------------


def or_dash(value: float | None, fmt: str) -> str:
    """``value`` formatted with ``fmt``, or "-" when it is not known (a table cell, a log figure)."""
    return "-" if value is None else format(value, fmt)


def _ratio_cell(f: dict[str, Any]) -> str:
    if f["ratio"] is None:
        return "-"
    text = f"{f['ratio']:.2f}"
    if len(f["ratios"]) > 1:
        text += f" [{f['min']:.2f}-{f['max']:.2f}, {f['spread']:.0%}]" if f["spread"] is not None else ""
    return text + (" (sat.)" if f["saturated"] else "")


def markdown(run: dict[str, Any]) -> str:
    cfg, machine = run["config"], run["machine"]
    toggles = ", ".join(f"{k} {'on' if v else 'off'}" for k, v in cfg["toggles"].items())
    loads = [v for c in run["cells"] for v in (c.get("load_average_1m") or [])]
    lf = machine.get("loopback_floor")  # absent in runs written before it was measured
    floor = LoopbackFloor(**lf) if lf else None
    lines = [
        "# Fan-out benchmark: bookcast gateway vs nats-server's WebSocket listener", "",
        f"Run {run['started']} .. {run['finished']} on {machine['cpus']} CPUs, Linux {machine['kernel']}, "
        f"Python {machine['python']}, {machine['nats_server']}. Load generator and servers share the machine.", "",
        f"- command: `{cfg['command'] or 'bookcast bench fanout (called in-process)'}`",
        f"- {cfg['instruments']} instruments, every client subscribed to all; {cfg['duration_s']:g} s of open-loop "
        f"publishing per cell; {cfg['client_procs']} client processes; bookcast gateway with {cfg['workers']} "
        f"workers; drain up to {cfg['drain_s']:g} s; repeats {cfg.get('repeat', 1)}; toggles: {toggles}",
        "- latency: receipt minus the publisher's scheduled send time (HDR, merged over client processes); spread: "
        "last minus first receipt of one message over all clients; server CPU: utime+stime of gateway supervisor "
        "+ workers (bookcast) or nats-server (nats) over the publishing and drain window; harness: load generator "
        "+ publisher CPU in cores; others: machine busy time not spent by this cell's processes (other users); "
        "**wait / run us**: the mean time a server thread sat runnable before it got a CPU, per run "
        "(/proc/PID/task/TID/schedstat): on a busy machine, latency that is the scheduler's, not the server's; "
        "**preempted/s**: how often a server thread lost its CPU while still runnable (nonvoluntary_ctxt_switches): "
        "here, mostly clients woken by the server's own writes, which clients on other machines would not do; "
        "**NATS -> gw ms** (bookcast): mean / p99 NATS publish to gateway fan-out of the cell's deltas (the "
        "gateway's bookcast_hop_nats_gateway_seconds; the p99 interpolated in its buckets, so coarse), the part "
        "of the latency spent before the first frame is written; **floor us**: the kernel floor (CPU us per "
        "loopback TCP send + recv) sampled through the window (floor.FloorProbe): on a shared VM the same work "
        "costs more CPU seconds when it is higher, and a pair's **floor ratio** away from 1 says its two cells "
        "found the machine cheaper or dearer",
        f"- a cell is **saturated** when the machine was over {cfg.get('saturated_busy_pct', 90):g}% busy (all CPUs, "
        "everyone's processes): its figures measure the machine, and it is left out of the verdict"
        + (f"; 1-minute load average during the cells {min(loads):.1f} .. {max(loads):.1f}" if loads else ""),
        *([f"- kernel floor: a loopback TCP send + recv of a {lf['payload_bytes']}-byte message costs "
           f"{lf['send_recv_us']:.1f} us of CPU on this machine (getppid {lf['syscall_us']:.2f} us; "
           "`python -m loadtest.bench.floor`); **floor %** is offered/s x that over all CPUs: the share of the "
           "machine every delivery costs in the kernel before any server or client logic runs"] if lf else []), "",
        "## Cells", "",
        "| target | clients | rate/s | idle | run | offered/s | delivered/s | p50 ms | p99 ms | p99.9 ms | max ms "
        "| server CPU s | CPU s / M | upstream nats CPU s | harness cores | machine busy % | floor % | others % "
        "| wait / run us | preempted/s | NATS -> gw ms mean / p99 | floor us | load 1m | RSS KiB / idle conn | losses "
        "| errors |",
        "|" + "---|" * 26,
    ]
    for c in run["cells"]:
        lat, rss = c["latency_ms"], c["rss_per_idle_connection_bytes"]
        load = c.get("load_average_1m")
        lines.append(
            f"| {c['target']} | {c['clients']:,} | {c['rate_per_s']:g} | {c.get('idle') or 0:,} | {c.get('repeat', 0) + 1} "
            f"| {c['offered_per_s']:,.0f} | {c['delivered_per_s']:,.0f} | {lat['p50']:.2f} | {lat['p99']:.2f} "
            f"| {lat['p99_9']:.2f} | {lat['max']:.1f} | {c['server_cpu_s']:.2f} "
            f"| {or_dash(c['server_cpu_s_per_million'], '.1f')} | {or_dash(c['upstream_nats_cpu_s'], '.2f')} "
            f"| {or_dash(c.get('harness_cores'), '.2f')} | {or_dash(c['machine_busy_pct'], '.0f')}"
            f"{' **sat.**' if c.get('saturated') else ''} "
            f"| {or_dash(floor and floor.machine_pct(c['offered_per_s'], machine.get('cpus') or 1), '.0f')} "
            f"| {or_dash(c.get('others_busy_pct'), '.0f')} | {or_dash(c.get('server_wait_per_run_us'), '.0f')} "
            f"| {or_dash(c.get('server_preempted_per_s'), ',.0f')} "
            f"| {or_dash(c.get('gateway_hop_mean_ms'), '.2f')} / {or_dash(c.get('gateway_hop_p99_ms'), '.1f')} "
            f"| {or_dash(c.get('floor_us'), '.1f')} "
            f"| {or_dash(load and max(load), '.1f')} | {or_dash(rss and rss / 1024, '.1f')} "
            f"| {sum(c['losses'].values()):,} | {sum(c['errors'].values()):,} |")
    lines += ["", "## bookcast / nats-server WebSocket, same run", "",
              "Median ratio of the unsaturated run pairs [min-max, spread (max - min) / median]; `(sat.)`: every "
              "pair saturated, shown but not judged.", "",
              "| point | runs (saturated) | delivered/s ratio | p99 ratio | CPU per M ratio | RSS per idle conn ratio "
              "| floor ratio |",
              "|---|---|---|---|---|---|---|"]
    for r in run["comparisons"]:
        lines.append(f"| {point_label(r['clients'], r['rate_per_s'], r['idle'])} | {r['runs']} ({r['saturated_runs']}) | "
                     + " | ".join(_ratio_cell(r[k]) for k in _COMPARED) + " |")
    if run["rate_search"]:
        lines += ["", "## Highest sustained rate (no loss, no closed connection, p99 < 250 ms, every run)", "",
                  "| clients | bookcast /s | nats /s | ratio | rates tested |", "|---|---|---|---|---|"]
        for r in run["rate_search"]:
            def one(t):
                f = r[t]["failed_at"]
                return (f"{or_dash(r[t]['highest_sustained_per_s'], 'g')}"
                        + (f" (fails at {f['rate_per_s']:g}{', saturated' if f['saturated'] else ''})" if f else " (all)"))
            lines.append(f"| {r['clients']:,} | {one('bookcast')} | {one('nats')} | {or_dash(r['ratio'], '.2f')} "
                         f"| {', '.join(format(x, 'g') for x in r['bookcast']['tested'])} |")
    if run["idle"]:
        lines += ["", "## Idle connections", "",
                  "| target | idle | run | held | closed | RSS KiB / idle conn | healthy p99 ms | without idle | ratio |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in run["idle"]:
            lines.append(f"| {r['target']} | {r['idle']:,} | {r['repeat'] + 1} | {or_dash(r['idle_connected'], ',')} "
                         f"| {r['idle_closed_early']} | {or_dash(r['rss_per_idle_connection_bytes'] and r['rss_per_idle_connection_bytes'] / 1024, '.1f')} "
                         f"| {r['p99_ms']:.2f} | {or_dash(r['p99_without_ms'], '.2f')} | {or_dash(r['p99_ratio'], '.2f')}"
                         f"{' (sat.)' if r['saturated'] else ''} |")
    lines += ["", "## Targets (issue 13)", ""]
    lines += [f"- **{t['status']}**: {t['target']}. {t['detail']}" for t in run["targets"]]
    problems = [f"- {c['target']} clients={c['clients']} rate={c['rate_per_s']:g}: {f}"
                for c in run["cells"] for f in c["harness_failures"]]
    problems += [f"- {f['target']} clients={f['clients']} rate={f['rate_per_s']:g}: cell failed: {f['error']}"
                 for f in run["failed_cells"]]
    errors = [f"- {c['target']} clients={c['clients']} rate={c['rate_per_s']:g}: {text} (x{n})"
              for c in run["cells"] for text, n in c["errors"].items()]
    if problems:
        lines += ["", "## Harness failures", "", *problems]
    if errors:
        lines += ["", "## Client-observed errors", "", *errors]
    return "\n".join(lines) + "\n"


def chart(run: dict[str, Any], path: Path) -> None:
    """Left: bookcast / nats ratio of each figure per point, median with min-max error bars over the runs
    (hollow: saturated, not judged), with the targets; right: server CPU s per million deliveries of each
    target per point (every point measured, also when no nats-server cell pairs with it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = run["comparisons"]
    labels = [point_label(r["clients"], r["rate_per_s"], r["idle"]).replace(" + ", "\n+ ") for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5))
    figures = [("server_cpu_s_per_million", "CPU s / M deliveries", "tab:blue", "o"),
               ("p99_ms", "p99 latency", "tab:red", "s"),
               ("delivered_per_s", "delivered msgs/s", "tab:green", "^"),
               ("rss_per_idle_connection_bytes", "RSS / idle connection", "tab:purple", "D")]
    width = 0.18
    for k, (name, label, color, marker) in enumerate(figures):
        for j, r in enumerate(rows):
            f = r[name]
            if f["ratio"] is None:
                continue
            x = j + (k - 1.5) * width
            err = [[f["ratio"] - f["min"]], [f["max"] - f["ratio"]]]
            left.errorbar([x], [f["ratio"]], yerr=err, fmt=marker, color=color, capsize=4, markersize=8,
                          markerfacecolor="none" if f["saturated"] else color, label=label if j == 0 else None)
            left.annotate(f"{f['ratio']:.2f}", (x, f["ratio"]), textcoords="offset points", xytext=(4, 4),
                          fontsize=7, color=color)
    left.axhline(1.0, color="grey", lw=1)
    left.axhline(CPU_RATIO_TARGET, color="tab:blue", lw=0.8, ls="--", label=f"CPU target {CPU_RATIO_TARGET}x")
    left.axhline(P99_RATIO_TARGET, color="tab:red", lw=0.8, ls=":", label=f"p99 target {P99_RATIO_TARGET}x")
    left.set_xticks(range(len(rows)), labels, fontsize=8)
    left.set_ylabel("bookcast / nats-server (same run)")
    left.set_title("ratios per point (median, min-max over runs; hollow = saturated)")
    left.grid(True, axis="y", alpha=0.3)
    if not rows:
        left.text(0.5, 0.5, "no nats-server cell pairs with a bookcast cell: no ratios", ha="center",
                  va="center", transform=left.transAxes, fontsize=9, color="grey")
    left.legend(fontsize="x-small", loc="best")
    points = sorted({_point(c) for c in run["cells"]})
    labelled: set[str] = set()
    for k, (target, color) in enumerate((("bookcast", "tab:blue"), ("nats", "tab:orange"))):
        for j, point in enumerate(points):
            cells = [c for c in run["cells"] if c["target"] == target and _point(c) == point
                     and c["server_cpu_s_per_million"] is not None]
            if not cells:
                continue
            vals = [c["server_cpu_s_per_million"] for c in cells]
            med = statistics.median(vals)
            saturated = all(c.get("saturated") for c in cells)
            right.bar(j + (k - 0.5) * 0.38, med, 0.38, color=color, alpha=0.5 if saturated else 0.9,
                      yerr=[[med - min(vals)], [max(vals) - med]], capsize=4,
                      label=None if target in labelled else target)
            labelled.add(target)
    right.set_xticks(range(len(points)), [point_label(*p).replace(" + ", "\n+ ") for p in points], fontsize=8)
    right.set_ylabel("server CPU s per million deliveries")
    right.set_title("server CPU per delivery (faded = saturated)")
    right.grid(True, axis="y", alpha=0.3)
    if labelled:
        right.legend(fontsize="small")
    fig.suptitle("fan-out: bookcast gateway vs nats-server WebSocket (same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(run: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``results.json``, ``report.md`` and ``fanout.png``; return their paths."""
    analyse(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "report.md", out_dir / "fanout.png"]
    paths[0].write_text(json.dumps(run, indent=2) + "\n")
    paths[1].write_text(markdown(run))
    chart(run, paths[2])
    return paths
