"""``bookcast ebpf --explain``: per program, what it measures, its tracepoints, what it cost in the last
benchmark and the series it exports, so an SRE can decide what to switch on. No root needed.

The costs come from the file ``python -m ebpf.bench`` writes (``COSTS_FILE``): per program and workload,
the mean difference against the detached peer of the same run with its 95% interval, for a process that
is not traced (what every other process on the host pays) and for a traced one. ``render`` is pure.
"""
from __future__ import annotations

import json
from pathlib import Path

from feed.catalog import CATALOG
from ebpf.spec import Program

COSTS_FILE = Path(__file__).resolve().parents[1] / "run" / "bench" / "ebpf-costs.json"
BENCH_COMMAND = "sudo .venv/bin/python -m ebpf.bench --parts cost"
# series a program's loader exports from user space beside its maps
EXTRA_SERIES = {"listenq": ("bookcast_ebpf_accept_queue_limit",)}
COST_ROWS = (("syscall", "per syscall (write of 0 bytes)"), ("ctxswitch", "per context switch"),
             ("tcp", "per TCP round trip on loopback"))


def read_costs(path: Path = COSTS_FILE) -> dict | None:
    """The last benchmark's per-program costs, or None when there is no readable file."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cost(entry: dict | None) -> str:
    if not entry:
        return "n/a (no undisturbed window)"
    lo, hi = entry["ci95"]
    return f"{entry['ns']:+.0f} ns [{lo:+.0f}, {hi:+.0f}]"


def render(programs: list[Program], costs: dict | None, costs_path: Path = COSTS_FILE) -> str:
    """The --explain text for ``programs`` with the figures in ``costs`` (the bench's file, or None)."""
    if costs is None:
        head = [f"per-event costs: not measured yet on this machine ({costs_path} is missing); measure them "
                f"with: {BENCH_COMMAND}"]
    else:
        head = [f"per-event costs: {costs.get('mode', '?')} benchmark of {costs.get('started', '?')} on "
                f"{costs.get('cpus', '?')} CPUs, kernel {costs.get('kernel', '?')} ({costs_path}); mean "
                "difference against the same run's detached windows [95% interval]. 'untraced' is what every "
                "other process on the host pays while the program is attached; 'traced' what a traced one pays."]
        every = costs.get("programs", {}).get("all")
        if every:
            head.append("all programs together: " + "; ".join(
                f"{label} untraced {_cost(every.get(key, {}).get('untraced'))}" for key, label in COST_ROWS))
    out = [*head, ""]
    for p in programs:
        out.append(f"{p.name}: {p.summary}")
        if p.explain:
            out.append(f"  why: {p.explain}")
        out.append("  tracepoints: " + ", ".join(
            f"{tp.event}{' (raw)' if tp.kind == 'raw_tracepoint' else ''}{' (optional)' if tp.optional else ''}"
            for tp in p.tracepoints))
        measured = (costs or {}).get("programs", {}).get(p.name)
        if measured is None:
            out.append("  cost: not measured yet" + (f" (run: {BENCH_COMMAND})" if costs is None else
                                                     f" (run: {BENCH_COMMAND} --programs {p.name})"))
        else:
            for key, label in COST_ROWS:
                e = measured.get(key, {})
                out.append(f"  cost {label}: untraced {_cost(e.get('untraced'))}, traced {_cost(e.get('traced'))}")
        out.append("  series:")
        for name in [m.metric for m in p.metrics] + list(EXTRA_SERIES.get(p.name, ())):
            spec = CATALOG[name]
            labels = ",".join(spec.labels)
            out.append(f"    {name}{{{labels}}} ({spec.type}) {spec.help}")
        out.append("")
    out.append("switch on a subset with: sudo bookcast ebpf --programs " + ",".join(p.name for p in programs[:2])
               + " --port 9435")
    return "\n".join(out) + "\n"
