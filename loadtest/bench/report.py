"""Reports of a fan-out run: ``results.json``, ``report.md`` and ``fanout.png`` in the output directory.

``analyse`` (pure) adds to the run dict of ``loadtest.bench.fanout.run_all``:

* ``comparisons``: per (clients, rate) measured for both targets, each figure for bookcast and nats and
  their ratio bookcast / nats (same run, same machine, same load generator);
* ``targets``: the issue's targets, each ``met``, ``missed`` or ``not measured`` with the figures behind it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RSS_TARGET_BYTES = 30 * 1024
TARGET_CLIENTS = 1000
BIG_CLIENTS = 5000
# "at least equal" delivered rate: both targets delivering everything differ only by when the last message
# landed, so a ratio within 1% counts as equal.
RATE_TOLERANCE = 0.99

_COMPARED = {
    "delivered_per_s": lambda c: c["delivered_per_s"],
    "p99_ms": lambda c: c["latency_ms"]["p99"],
    "server_cpu_s_per_million": lambda c: c["server_cpu_s_per_million"],
    "rss_per_idle_connection_bytes": lambda c: c["rss_per_idle_connection_bytes"],
}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(c["target"], c["clients"], c["rate_per_s"]): c for c in cells}
    out = []
    for (target, clients, rate), bk in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        peer = by_key.get(("nats", clients, rate))
        if target != "bookcast" or peer is None:
            continue
        row: dict[str, Any] = {"clients": clients, "rate_per_s": rate}
        for name, get in _COMPARED.items():
            row[name] = {"bookcast": get(bk), "nats": get(peer), "ratio": _ratio(get(bk), get(peer))}
        out.append(row)
    return out


def _target(name: str, rows: list, met, detail) -> dict[str, Any]:
    if not rows:
        return {"target": name, "status": "not measured", "detail": "no cell at this size in this run"}
    return {"target": name, "status": "met" if all(met(r) for r in rows) else "missed",
            "detail": "; ".join(detail(r) for r in rows)}


def targets(cells: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    at_target = [r for r in comparisons if r["clients"] == TARGET_CLIENTS]
    big = [c for c in cells if c["target"] == "bookcast" and c["clients"] == BIG_CLIENTS]
    bookcast = [c for c in cells if c["target"] == "bookcast" and c["rss_per_idle_connection_bytes"] is not None]
    largest = [c for c in bookcast if c["clients"] == max((b["clients"] for b in bookcast), default=0)]

    def rate_ok(r):
        return (r["delivered_per_s"]["ratio"] or 0) >= RATE_TOLERANCE

    def p99_ok(r):
        return r["p99_ms"]["ratio"] is not None and r["p99_ms"]["ratio"] <= 2

    def clean(c):
        return not (c["connect_failures"] or c["closed_early"] or c["errors"] or c["harness_failures"])

    return [
        _target(f"{TARGET_CLIENTS:,} clients: bookcast delivered msgs/s >= nats-server WebSocket's", at_target, rate_ok,
                lambda r: f"rate {r['rate_per_s']:g}/s: {r['delivered_per_s']['bookcast']:,.0f} vs "
                          f"{r['delivered_per_s']['nats']:,.0f} (x{r['delivered_per_s']['ratio']:.3f})"),
        _target(f"{TARGET_CLIENTS:,} clients: bookcast p99 within 2x of nats-server WebSocket's", at_target, p99_ok,
                lambda r: f"rate {r['rate_per_s']:g}/s: {r['p99_ms']['bookcast']:.2f} ms vs "
                          f"{r['p99_ms']['nats']:.2f} ms (x{r['p99_ms']['ratio']:.2f})"),
        _target(f"{BIG_CLIENTS:,} clients on bookcast without errors", big, clean,
                lambda c: f"rate {c['rate_per_s']:g}/s: {c['subscribers']:,} connected, {c['connect_failures']} "
                          f"connect failures, {c['closed_early']} closed, errors {c['errors'] or 0}, losses "
                          f"{sum(c['losses'].values()):,}, resyncs {c['resyncs']:,}"),
        _target(f"bookcast RSS per idle connection < {RSS_TARGET_BYTES // 1024} KiB", largest,
                lambda c: c["rss_per_idle_connection_bytes"] < RSS_TARGET_BYTES,
                lambda c: f"{c['clients']:,} clients, rate {c['rate_per_s']:g}/s: "
                          f"{c['rss_per_idle_connection_bytes'] / 1024:.1f} KiB"),
    ]


def analyse(run: dict[str, Any]) -> dict[str, Any]:
    run["comparisons"] = compare(run["cells"])
    run["targets"] = targets(run["cells"], run["comparisons"])
    return run


# -- rendering -------------------------------------------------------------------------------------


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(run: dict[str, Any]) -> str:
    cfg, machine = run["config"], run["machine"]
    toggles = ", ".join(f"{k} {'on' if v else 'off'}" for k, v in cfg["toggles"].items())
    lines = [
        "# Fan-out benchmark: bookcast gateway vs nats-server's WebSocket listener", "",
        f"Run {run['started']} .. {run['finished']} on {machine['cpus']} CPUs, Linux {machine['kernel']}, "
        f"Python {machine['python']}, {machine['nats_server']}. Load generator and servers share the machine.", "",
        f"- command: `{cfg['command'] or 'bookcast bench fanout (called in-process)'}`",
        f"- {cfg['instruments']} instruments, every client subscribed to all; {cfg['duration_s']:g} s of open-loop "
        f"publishing per cell; {cfg['client_procs']} client processes; bookcast gateway with {cfg['workers']} "
        f"workers; drain up to {cfg['drain_s']:g} s; toggles: {toggles}",
        "- latency: receipt minus the publisher's scheduled send time (HDR, merged over client processes); spread: "
        "last minus first receipt of one message over all clients; server CPU: utime+stime of gateway supervisor "
        "+ workers (bookcast) or nats-server (nats) over the publishing and drain window", "",
        "## Cells", "",
        "| target | clients | rate/s | offered/s | delivered/s | p50 ms | p99 ms | p99.9 ms | max ms | spread p99 ms "
        "| server CPU s | CPU s / M msgs | upstream nats CPU s | load-gen CPU s | machine busy % | RSS KiB / idle conn "
        "| losses | errors |",
        "|" + "---|" * 18,
    ]
    for c in run["cells"]:
        lat, rss = c["latency_ms"], c["rss_per_idle_connection_bytes"]
        lines.append(
            f"| {c['target']} | {c['clients']:,} | {c['rate_per_s']:g} | {c['offered_per_s']:,.0f} "
            f"| {c['delivered_per_s']:,.0f} | {lat['p50']:.2f} | {lat['p99']:.2f} | {lat['p99_9']:.2f} "
            f"| {lat['max']:.1f} | {c['spread_ms']['p99']:.2f} | {c['server_cpu_s']:.2f} "
            f"| {_f(c['server_cpu_s_per_million'], '.1f')} | {_f(c['upstream_nats_cpu_s'], '.2f')} "
            f"| {c['loadgen_cpu_s']:.2f} | {_f(c['machine_busy_pct'], '.0f')} | {_f(rss and rss / 1024, '.1f')} "
            f"| {sum(c['losses'].values()):,} | {sum(c['errors'].values()):,} |")
    lines += ["", "## bookcast / nats-server WebSocket, same run", "",
              "| clients | rate/s | delivered/s ratio | p99 ratio | CPU per M msgs ratio | RSS per idle conn ratio |",
              "|---|---|---|---|---|---|"]
    for r in run["comparisons"]:
        lines.append(f"| {r['clients']:,} | {r['rate_per_s']:g} | " + " | ".join(
            _f(r[k]["ratio"], ".2f") for k in _COMPARED) + " |")
    lines += ["", "## Targets", ""]
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
    """Delivered msgs/s, p99 latency and server CPU per million deliveries against clients, per target and rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("delivered msgs/s", lambda c: c["delivered_per_s"]),
              ("p99 latency (ms)", lambda c: c["latency_ms"]["p99"]),
              ("server CPU s per million msgs", lambda c: c["server_cpu_s_per_million"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    colors = {"bookcast": "tab:blue", "nats": "tab:orange"}
    rates = sorted({c["rate_per_s"] for c in run["cells"]})
    styles = ["-", "--", ":", "-."]
    for ax, (title, get) in zip(axes, panels):
        for target in ("bookcast", "nats"):
            for k, rate in enumerate(rates):
                cells = sorted((c for c in run["cells"] if c["target"] == target and c["rate_per_s"] == rate
                                and get(c) is not None), key=lambda c: c["clients"])
                if cells:
                    ax.plot([c["clients"] for c in cells], [get(c) for c in cells], styles[k % len(styles)],
                            marker="o", color=colors[target], label=f"{target} {rate:g} msg/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("clients")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize="small")
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
