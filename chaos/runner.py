"""Run one drill: clean up leftovers, start the drill stack and clients, run the experiment with
chaostoolkit-lib (rollbacks always), watch the safeguard, check books, write the report, leave nothing.

Adapter module. Order, each step inside ``try/finally`` so an abort, Ctrl-C (SIGINT) or SIGTERM still
rolls back and stops everything (a SIGKILL of this process leaves the state file, undone by the next run
or ``bookcast drill cleanup``):

1. ``StateFile.undo_all()``: whatever a crashed run left (processes by PID and start time, toxics,
   SIGSTOPs, nftables tables, network namespaces).
2. ``DrillStack.start()`` (every process recorded), the checker, the faulted and control groups; wait until
   every client holds every book (warm-up).
3. ``chaoslib.run.Runner.run`` with ``runtime.rollbacks.strategy = "always"``: steady-state hypothesis
   before, the method (the fault and its hold), rollbacks, the hypothesis after. A ``Safeguard`` thread
   checks the faulted and control groups every ``safeguard_interval_s``; a breach beyond budget (outage
   over ``safeguard_outage_s`` or the control group stale) aborts with ``chaoslib.exit.exit_gracefully``
   (rollbacks still run).
4. Quiesce: SIGSTOP the ingest (recorded), wait until every client's books stop moving, compare them with
   the checker's (undetected gaps), SIGCONT.
5. Stop clients and stack, ``undo_all`` again, then verify no recorded PID is still alive.

Experiment ``configuration`` keys the runner reads (all optional): ``duration_s`` (fault hold, overridden
by ``--duration-s``), ``max_outage_s`` (budget for the verdict), ``safeguard_outage_s``, ``fault_limit_s``
(hard limit of any single fault), ``faulted_clients``, ``control_clients``, ``expect_failover``,
``warmup_s``, ``speed``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from chaos.clients import Checker, ClientGroups, compare
from chaos.context import Drill, set_current
from chaos.report import analyse, drill_row, write_chdb, write_report
from chaos.stack import DrillStack
from chaos.state import StateFile, start_ticks

log = logging.getLogger("bookcast.chaos.runner")

EXPERIMENTS_DIR = Path(__file__).parent / "experiments"


class DrillError(RuntimeError):
    """A drill could not run (bad experiment, stack failed to start); the message says why."""


def experiment_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(EXPERIMENTS_DIR.glob("*.json"))}


def load_experiment(name_or_file: str) -> tuple[str, dict[str, Any]]:
    """(name, experiment) for a shipped drill name or a JSON file. Raises ``DrillError``; validates the
    experiment with chaostoolkit-lib (activities importable, arguments matching signatures)."""
    from chaoslib.exceptions import ChaosException
    from chaoslib.experiment import ensure_experiment_is_valid

    files = experiment_files()
    path = files.get(name_or_file) or Path(name_or_file)
    if not path.is_file():
        raise DrillError(f"no drill named {name_or_file!r} and no such file; shipped drills: {', '.join(files)}")
    try:
        experiment = json.loads(path.read_text())
    except ValueError as exc:
        raise DrillError(f"{path}: not JSON: {exc}") from None
    try:
        ensure_experiment_is_valid(experiment)
    except ChaosException as exc:
        raise DrillError(f"{path}: invalid experiment: {exc}") from None
    return path.stem, experiment


class Safeguard(threading.Thread):
    """Aborts the experiment (rollbacks still run) when the drill hurts more than its budget allows."""

    def __init__(self, drill: Drill, outage_s: float, interval_s: float = 0.25) -> None:
        super().__init__(name="drill-safeguard", daemon=True)
        self.drill, self.outage_s, self.interval_s = drill, outage_s, interval_s
        self.stopped = threading.Event()

    def breach(self, now_s: float) -> str | None:
        deliveries, _ = self.drill.groups.recorder.snapshot()
        onset = self.drill.first("fault_onset")
        for group in ("faulted", "control"):
            n = self.drill.groups.groups[group][1]
            limit = self.outage_s if group == "faulted" else max(3.0, self.outage_s / 2)
            for c in range(n):
                last = max((d.t_s for d in deliveries if d.group == group and d.client == c),
                           default=self.drill.started_s)
                if onset is not None and group == "faulted":
                    last = max(last, onset)
                if now_s - last > limit:
                    return f"safeguard: {group} client {c} without deliveries for {now_s - last:.1f} s > {limit:g} s"
        return None

    def run(self) -> None:
        from chaoslib.exit import exit_gracefully

        while not self.stopped.wait(self.interval_s):
            why = self.breach(time.monotonic())
            if why:
                self.drill.aborted = why
                self.drill.note("safeguard_abort", why)
                log.error("%s: aborting, rollbacks run", why)
                exit_gracefully()
                return


def _wait(predicate, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise DrillError(f"{what}: not true after {timeout_s:g} s")
        time.sleep(interval_s)


def _quiesce_and_check(drill: Drill, onset_s: float | None) -> dict[str, Any] | None:
    """Pause the ingest, wait for every book to settle, compare with the checker, resume the ingest."""
    stack, state = drill.stack, drill.state
    pid = stack.pid("ingest")
    sid = state.add("sigstop", pid=pid, start_ticks=start_ticks(pid), what="ingest (quiesce)")
    import os
    import signal

    os.kill(pid, signal.SIGSTOP)
    try:
        def settled() -> bool:
            ref = drill.checker.books()
            if len(ref) < len(stack.instruments):
                drill.checker.resnapshot() if not ref else None
                return False
            books = drill.groups.books()
            return all(books[k].get(i, (None,))[0] == ref[i][0] for k in books for i in ref)
        try:
            _wait(settled, 15, "every client book at the checker's seq", interval_s=0.25)
        except DrillError as exc:
            log.warning("%s; comparing as they are", exc)
        _, events = drill.groups.recorder.snapshot()
        since = onset_s if onset_s is not None else drill.started_s
        told = {(e.group, e.client, e.instrument) for e in events
                if e.t_s >= since and e.kind in ("gap_detected", "resync_received", "instrument_status")}
        # a reconnect drops trust in every book of that client until its snapshot: count as told
        for e in events:
            if e.t_s >= since and e.kind in ("disconnected", "connect_failed"):
                told |= {(e.group, e.client, i) for i in stack.instruments}
        return compare(drill.checker.books(), drill.groups.books(), told)
    finally:
        state.undo(sid)


def run_drill(name_or_file: str, *, duration_s: float | None = None, report_dir: Path | None = None,
              state_path: Path | None = None, failover: bool = True, faulted_via_proxy: bool = True,
              chdb_path: Path | None = None, progress=print) -> dict[str, Any]:
    """Run one drill end to end; returns the report dict (``verdict`` in it). Raises ``DrillError`` for a
    drill that cannot start (bad file, stack failed)."""
    from chaoslib.run import Runner
    from chaoslib.types import Strategy

    name, experiment = load_experiment(name_or_file)
    config = {k: (v if not isinstance(v, dict) else v.get("default")) for k, v in experiment.get("configuration", {}).items()}
    if duration_s is not None:
        config["duration_s"] = duration_s
        experiment.setdefault("configuration", {})["duration_s"] = duration_s
    hold_s = float(config.get("duration_s", 5))
    state = StateFile(state_path)
    leftovers = state.undo_all()
    if leftovers:
        progress(f"cleaned up what an earlier run left: {'; '.join(leftovers)}")
    stack = DrillStack(state, failover=failover, faulted_via_proxy=faulted_via_proxy,
                       speed=float(config.get("speed", 1.0)))
    groups = checker = drill = safeguard = None
    run_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    journal: dict[str, Any] = {"status": "not run"}
    check = None
    try:
        progress(f"drill {name}: starting nats-server, ingest, 3 gateways, fault proxy")
        try:
            stack.start()
        except (TimeoutError, RuntimeError, OSError) as exc:
            raise DrillError(f"drill stack failed to start: {exc} (logs in {stack.workdir})") from None
        checker = Checker(stack.nats.url, stack.instruments)
        checker.start()
        groups = ClientGroups({"faulted": (stack.faulted_urls(), int(config.get("faulted_clients", 2))),
                               "control": (stack.control_urls(), int(config.get("control_clients", 1)))},
                              stack.instruments)
        groups.start()
        drill = Drill(name, stack, groups, checker, state,
                      fault_limit_s=float(config.get("fault_limit_s", hold_s + 30)))
        set_current(drill)

        def warm() -> bool:
            books = groups.books()
            return all(len(b) == len(stack.instruments) for b in books.values())
        _wait(warm, 60, "every drill client holding every book")
        time.sleep(float(config.get("warmup_s", 2.0)))   # a "before" window for the steady state
        progress(f"drill {name}: {len(groups.clients)} clients on {', '.join(stack.instruments)}; running the experiment")
        safeguard = Safeguard(drill, float(config.get("safeguard_outage_s", 20.0)))
        safeguard.start()
        settings = {"runtime": {"rollbacks": {"strategy": "always"}, "hypothesis": {"strategy": "default"}}}
        journal = Runner(Strategy.DEFAULT).run(experiment, settings=settings)
        safeguard.stopped.set()
        drill.note("note", f"experiment ended: {journal.get('status')}")
        progress(f"drill {name}: experiment {journal.get('status')}; checking books against the checker")
        onset = drill.first("fault_onset")
        # wait for the faulted group to have every book again (or give up and let the verdict say so)
        try:
            _wait(warm, 20, "every book back after the fault")
        except DrillError as exc:
            log.warning("%s", exc)
        check = _quiesce_and_check(drill, onset)
    except KeyboardInterrupt:
        journal["status"] = "interrupted"
        if drill is not None:
            drill.aborted = drill.aborted or "interrupted (Ctrl-C)"
    finally:
        if safeguard is not None:
            safeguard.stopped.set()
        end_s = time.monotonic()
        deliveries, events = groups.recorder.snapshot() if groups is not None else ([], [])
        for part in (groups, checker):
            if part is not None:
                try:
                    part.stop()
                except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                    log.warning("stopping %s: %s", type(part).__name__, exc)
        stack.stop()
        rest = state.undo_all()
        if rest:
            log.warning("rollback after the drill undid: %s", "; ".join(rest))
        set_current(None)
    left = [e for e in state.entries()]
    before_ok = (journal.get("steady_states") or {}).get("before", {}) or {}
    after_ok = (journal.get("steady_states") or {}).get("after", {}) or {}
    result = analyse(drill=name, title=experiment.get("title", name), t0_s=drill.started_s, end_s=end_s,
                     timeline=[asdict(e) for e in drill.timeline], deliveries=deliveries, events=events,
                     proofs=[asdict(p) for p in drill.proofs], check=check,
                     faulted_first_url=stack.faulted_urls()[0], n_faulted=groups.groups["faulted"][1],
                     instruments=stack.instruments, max_outage_s=float(config.get("max_outage_s", 5.0)),
                     expect_failover=bool(config.get("expect_failover", True)),
                     journal_status=journal.get("status", "?"),
                     before_ok=before_ok.get("steady_state_met") if before_ok else None,
                     after_ok=after_ok.get("steady_state_met") if after_ok else None, aborted=drill.aborted)
    result["left_behind"] = left
    result["stack"] = stack.describe()
    result["run_at"] = run_at
    if report_dir is not None:
        out = report_dir / name
        write_report(result, deliveries, drill.started_s, out)
        (out / "journal.json").write_text(json.dumps(journal, indent=1, default=str))
        try:
            write_chdb([drill_row(result, run_at)], chdb_path or report_dir / "chdb")
        except Exception as exc:  # noqa: BLE001 - the Markdown and JSON report stand without it
            log.warning("chDB rows not written: %s", exc)
    return result
