"""A drill's numbers, verdict and report: Markdown, JSON, rows in chDB (or a ClickHouse server), PNG timeline.

``analyse`` is pure (everything passed in, times in ``time.monotonic()`` seconds). Definitions:

* onset: the first ``fault_onset`` in the timeline; fault end: the last ``fault_end``.
* time to detect: onset to the first faulted-group event a user can see (disconnect, connect failure,
  gap detected, resync received, instrument status).
* time to fail over: onset to the first faulted-group delivery that came over another path than the
  faulted one (a URL other than the group's first).
* time to recover: onset to the moment every faulted client had again received every instrument after
  its last detection and after the system's failover (every book served and verified again).
* outage: the longest time any faulted client went without a delivery between onset and the end. With
  ``control_reference`` (a stack whose control path no drill's fault reaches: ``control_independent``) it
  counts only from the first control-group delivery in that silence: a stretch where the control got
  nothing either (the venue quiet, or a loaded machine stalling every process) is not the fault's outage
  (Netflix ChAP: the fault's effect is read against the control). ``max_silence_s`` is the plain longest
  silence, reported beside it.

* the system's own view (``system_detect`` / ``system_failover`` timeline entries, e.g. the ingest's
  provider pool excluding the faulted provider and selecting another) counts for detect and fail over
  when it comes first: a lossless provider switch is invisible to clients by design.

Verdicts, first match wins: ``failed`` when the steady state was not met *before* the fault (the method
never ran: a deviation), ``not injected`` (a fault's proof failed), ``aborted`` (the safeguard stopped
the drill), ``failed`` (steady state not met after, an undetected gap, an outage over budget,
no failover when one was expected, or no recovery), else ``passed``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from chaos.clients import DETECTION_KINDS, ClientEvent, Delivery
from chaos.probes import percentile

log = logging.getLogger("bookcast.chaos.report")


def _p99_ms(ds: list[Delivery]) -> float | None:
    p = percentile([d.e2e_s for d in ds if d.e2e_s is not None], 99)
    return None if p is None else round(p * 1e3, 3)


def analyse(*, drill: str, title: str, t0_s: float, end_s: float, timeline: list[dict], deliveries: list[Delivery],
            events: list[ClientEvent], proofs: list[dict], check: dict[str, Any] | None, faulted_first_url: str,
            n_faulted: int, instruments: list[str], max_outage_s: float, expect_failover: bool,
            journal_status: str, before_ok: bool | None, after_ok: bool | None, aborted: str | None,
            control_reference: bool = False) -> dict[str, Any]:
    onset = next((e["t_s"] for e in timeline if e["kind"] == "fault_onset"), None)
    fault_end = next((e["t_s"] for e in reversed(timeline) if e["kind"] == "fault_end"), None)
    faulted_d = [d for d in deliveries if d.group == "faulted"]
    faulted_e = [e for e in events if e.group == "faulted"]
    rel = (lambda t: None if t is None or onset is None else round(t - onset, 3))

    detect = next((e.t_s for e in faulted_e if onset is not None and e.t_s >= onset and e.kind in DETECTION_KINDS), None)
    failover = next((d.t_s for d in faulted_d if onset is not None and d.t_s >= onset and d.url
                     and d.url != faulted_first_url), None)
    # the system's own view (the ingest's provider pool): it may detect and fail over before any client sees it;
    # what it does after the experiment ended (the quiesce pauses the ingests) is not the drill's
    sys_detect = next((e["t_s"] for e in timeline if onset is not None and onset <= e["t_s"] <= end_s
                       and e["kind"] in ("system_detect", "system_failover")), None)
    sys_failover = next((e["t_s"] for e in timeline if onset is not None and onset <= e["t_s"] <= end_s
                         and e["kind"] == "system_failover"), None)
    detect = min((t for t in (detect, sys_detect) if t is not None), default=None)
    failover = min((t for t in (failover, sys_failover) if t is not None), default=None)
    recover = None
    if onset is not None:
        last_detect: dict[int, float] = {}
        for e in faulted_e:
            if e.t_s >= onset and e.kind in DETECTION_KINDS:
                last_detect[e.client] = e.t_s
        worst = onset
        for c in range(n_faulted):
            since = max(last_detect.get(c, onset), sys_failover or onset)
            for inst in instruments:
                t = next((d.t_s for d in faulted_d if d.client == c and d.instrument == inst and d.t_s > since), None)
                if t is None:
                    worst = None
                    break
                worst = max(worst, t)
            if worst is None:
                break
        recover = worst
    control_t = sorted(d.t_s for d in deliveries if d.group == "control")
    outage = outage_abs = 0.0
    if onset is not None:
        import bisect

        for c in range(n_faulted):
            # deliveries after the experiment ended (the wait for books, the quiesce) are not the drill's
            times = [onset] + [d.t_s for d in faulted_d if d.client == c and onset <= d.t_s < end_s] + [end_s]
            for a, b in zip(times, times[1:]):
                outage_abs = max(outage_abs, b - a)
                if control_reference:
                    # counted from the first moment the control path delivered what this client did not get
                    i = bisect.bisect_right(control_t, a)
                    if i < len(control_t) and control_t[i] < b:
                        outage = max(outage, b - control_t[i])
                else:
                    outage = max(outage, b - a)

    def phase(group: str, lo: float | None, hi: float | None) -> dict[str, Any]:
        ds = [d for d in deliveries if d.group == group and (lo is None or d.t_s >= lo) and (hi is None or d.t_s < hi)]
        return {"deliveries": len(ds), "p99_ms": _p99_ms(ds)}

    phases = {}
    for group in ("faulted", "control"):
        phases[group] = {"before": phase(group, t0_s, onset), "during": phase(group, onset, fault_end or end_s),
                         "after": phase(group, fault_end or end_s, end_s)}
    gaps = {g: {"detected": sum(1 for e in events if e.group == g and e.kind in ("gap_detected", "resync_received")
                                and (onset is None or e.t_s >= onset)),
                "undetected": sum(1 for u in (check or {}).get("undetected", []) if u.startswith(g + "#"))}
            for g in ("faulted", "control")}

    reasons = []
    if before_ok is False:
        verdict = "failed"
        reasons = ["steady state not met before the fault: the method did not run (a deviation, not a pass)"]
    elif any(not p["took_effect"] for p in proofs) or (onset is None and not aborted):
        verdict = "not injected"
        reasons = [f"{p['fault']}: no proof it took effect ({p['evidence']})" for p in proofs if not p["took_effect"]]
        if not proofs:
            reasons.append("no fault was injected")
    elif aborted:
        verdict, reasons = "aborted", [aborted]
    else:
        if after_ok is False:
            reasons.append("steady state not met after the fault")
        if gaps["faulted"]["undetected"] or gaps["control"]["undetected"]:
            reasons.append(f"undetected gaps: {(check or {}).get('undetected', [])[:5]}")
        if outage > max_outage_s:
            reasons.append(f"outage {outage:.2f} s > budget {max_outage_s:g} s")
        if expect_failover and failover is None:
            reasons.append("no failover: the faulted group was never served by another path")
        if recover is None:
            reasons.append("not recovered: some faulted client never got every book back")
        if check is None:
            reasons.append("the checker could not compare books")
        elif check.get("missing"):
            reasons.append(f"books missing at the end: {check['missing'][:5]}")
        verdict = "failed" if reasons else "passed"
    return {
        "drill": drill, "title": title, "verdict": verdict, "reasons": reasons, "journal_status": journal_status,
        "detect_s": rel(detect), "failover_s": rel(failover), "recover_s": rel(recover),
        "max_outage_s": round(outage, 3), "max_outage_budget_s": max_outage_s,
        "max_silence_s": round(outage_abs, 3), "outage_against_control": control_reference,
        "fault_duration_s": rel(fault_end), "gaps": gaps, "phases": phases, "proofs": proofs, "check": check,
        "deliveries": {g: sum(1 for d in deliveries if d.group == g) for g in ("faulted", "control")},
        "timeline": [{**e, "t_s": round(e["t_s"] - t0_s, 3)} for e in timeline],
        "client_events": [{"t_s": round(e.t_s - t0_s, 3), "group": e.group, "client": e.client, "kind": e.kind,
                           "instrument": e.instrument, "url": e.url, "detail": e.detail} for e in events],
    }


def _fmt(v: Any, unit: str = "") -> str:
    return "-" if v is None else f"{v}{unit}"


def markdown(r: dict[str, Any]) -> str:
    ph = r["phases"]
    lines = [f"# Drill {r['drill']}: {r['verdict'].upper()}", "", r["title"], ""]
    if r["reasons"]:
        lines += ["Reasons:", *[f"- {x}" for x in r["reasons"]], ""]
    lines += ["## What was injected, and proof it took effect", "",
              *[f"- {p['fault']}: {'took effect' if p['took_effect'] else '**not injected**'} "
                f"(`{json.dumps(p['evidence'], default=str)}`)" for p in r["proofs"]], "",
              "## Times (from fault onset)", "",
              "| detect | fail over | recover | longest outage (budget) | longest silence | fault held |",
              "|---|---|---|---|---|---|",
              f"| {_fmt(r['detect_s'], ' s')} | {_fmt(r['failover_s'], ' s')} | {_fmt(r['recover_s'], ' s')} | "
              f"{r['max_outage_s']} s ({r['max_outage_budget_s']} s"
              f"{', while the control was served' if r.get('outage_against_control') else ''}) | "
              f"{_fmt(r.get('max_silence_s'), ' s')} | {_fmt(r['fault_duration_s'], ' s')} |", "",
              "## Deliveries and e2e p99 (ms), faulted vs control", "",
              "| group | before | during | after | detected gaps | undetected gaps |", "|---|---|---|---|---|---|"]
    for g in ("faulted", "control"):
        cells = [f"{_fmt(ph[g][p]['p99_ms'])} ({ph[g][p]['deliveries']})" for p in ("before", "during", "after")]
        lines.append(f"| {g} | {' | '.join(cells)} | {r['gaps'][g]['detected']} | {r['gaps'][g]['undetected']} |")
    c = r.get("check") or {}
    lines += ["", f"Checker: {c.get('compared', 0)} books compared with its own NATS-built books, "
              f"{c.get('equal', 0)} equal, undetected {len(c.get('undetected', []))}, "
              f"wrong but detected {len(c.get('detected_wrong', []))}, missing {len(c.get('missing', []))}.", "",
              "## Timeline (s from start)", "", "| t | what |", "|---|---|"]
    lines += [f"| {e['t_s']} | {e['kind']}: {e['detail']} |" for e in r["timeline"] if e["kind"] != "steady_state"]
    lines += ["", "![timeline](timeline.png)", ""]
    return "\n".join(lines)


def timeline_png(r: dict[str, Any], deliveries: list[Delivery], t0_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for group, colour in (("faulted", "tab:red"), ("control", "tab:blue")):
        ds = [d for d in deliveries if d.group == group and d.e2e_s is not None]
        ax.scatter([d.t_s - t0_s for d in ds], [d.e2e_s * 1e3 for d in ds], s=3, c=colour, label=f"{group} e2e",
                   alpha=0.5)
    for e in r["timeline"]:
        if e["kind"] in ("fault_onset", "fault_end"):
            ax.axvline(e["t_s"], color="k" if e["kind"] == "fault_onset" else "grey", ls="--", lw=1)
    for e in r["client_events"]:
        if e["group"] == "faulted" and e["kind"] in ("disconnected", "gap_detected", "connect_failed"):
            ax.axvline(e["t_s"], color="tab:orange", lw=0.5, alpha=0.4)
    ax.set_yscale("log")
    ax.set_xlabel("s since drill start (dashed: fault onset/end; orange: faulted clients' detections)")
    ax.set_ylabel("e2e latency (ms)")
    ax.set_title(f"{r['drill']}: {r['verdict']}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


CHDB_TABLE = "chaos_drills"


def drill_row(r: dict[str, Any], run_at: str) -> dict[str, Any]:
    ph = r["phases"]
    return {"run_at": run_at, "drill": r["drill"], "verdict": r["verdict"],
            "detect_s": r["detect_s"], "failover_s": r["failover_s"], "recover_s": r["recover_s"],
            "max_outage_s": r["max_outage_s"], "detected_gaps": r["gaps"]["faulted"]["detected"],
            "undetected_gaps": r["gaps"]["faulted"]["undetected"] + r["gaps"]["control"]["undetected"],
            "faulted_p99_during_ms": ph["faulted"]["during"]["p99_ms"],
            "control_p99_during_ms": ph["control"]["during"]["p99_ms"],
            "deliveries_faulted": r["deliveries"]["faulted"], "deliveries_control": r["deliveries"]["control"]}


def write_chdb(rows: list[dict[str, Any]], path: Path) -> None:
    """Append rows to ``CHDB_TABLE`` in the chDB store at ``path`` (created when missing)."""
    from chdb.session import Session

    path.mkdir(parents=True, exist_ok=True)
    s = Session(str(path))
    try:
        s.query(f"CREATE TABLE IF NOT EXISTS {CHDB_TABLE} (run_at String, drill String, verdict String, "
                "detect_s Nullable(Float64), failover_s Nullable(Float64), recover_s Nullable(Float64), "
                "max_outage_s Float64, detected_gaps UInt32, undetected_gaps UInt32, "
                "faulted_p99_during_ms Nullable(Float64), control_p99_during_ms Nullable(Float64), "
                "deliveries_faulted UInt64, deliveries_control UInt64) ENGINE = MergeTree ORDER BY (drill, run_at)")
        payload = "\n".join(json.dumps(r) for r in rows)
        s.query(f"INSERT INTO {CHDB_TABLE} FORMAT JSONEachRow\n{payload}")
    finally:
        s.close()


def write_report(r: dict[str, Any], deliveries: list[Delivery], t0_s: float, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(r, indent=1, default=str))
    (out_dir / "report.md").write_text(markdown(r))
    try:
        timeline_png(r, deliveries, t0_s, out_dir / "timeline.png")
    except Exception as exc:  # noqa: BLE001 - a chart must never lose the report
        log.warning("timeline chart not written: %s", exc)
    return out_dir


def table(rows: list[dict[str, Any]]) -> str:
    """The drill table (Markdown) over several reports."""
    head = ("| drill | verdict | detect s | fail over s | recover s | outage s | gaps det/undet | "
            "p99 during faulted / control ms |\n|---|---|---|---|---|---|---|---|")
    body = [f"| {r['drill']} | {r['verdict']} | {_fmt(r['detect_s'])} | {_fmt(r['failover_s'])} | "
            f"{_fmt(r['recover_s'])} | {r['max_outage_s']} | {r['detected_gaps']}/{r['undetected_gaps']} | "
            f"{_fmt(r['faulted_p99_during_ms'])} / {_fmt(r['control_p99_during_ms'])} |" for r in rows]
    return "\n".join([head, *body])
