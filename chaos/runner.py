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
``warmup_s``, ``speed``, ``stack`` (gateways, providers, regions), ``capture`` (relative to the repository),
``faulted_region``, ``requires_root``, ``ws_heartbeat_s`` (the drill clients' WebSocket ping interval,
default 2 s: a stalled path is detected by it), ``steady_timeout_s``.
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

from chaos.clients import ClientGroups, GroupCheckers, compare_groups
from chaos.context import Drill, set_current
from chaos.report import analyse, drill_row, write_chdb, write_report
from chaos.stack import DrillStack
from chaos.state import STACK_KINDS, StateFile, start_ticks

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


class SystemWatcher(threading.Thread):
    """Polls ``stack.system_view()`` (e.g. the ingest's provider pool) and notes in the timeline when the
    system itself saw the fault (``system_detect``: the selected provider unhealthy) and failed over
    (``system_failover``: another provider selected). Nothing when the stack has no such view."""

    def __init__(self, drill: Drill, interval_s: float = 0.1) -> None:
        super().__init__(name="drill-system-watch", daemon=True)
        self.drill, self.interval_s = drill, interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        last = None
        serving = None   # the last non-empty selection: coming back to it after none is a recovery in place
        while not self.stopped.wait(self.interval_s):
            try:
                view = self.drill.stack.system_view()
            except Exception as exc:  # noqa: BLE001 - the ingest may be the thing being faulted
                view = {"error": str(exc)[:120]}
            if view is None:
                return
            if "error" in view:       # the status endpoint did not answer in time: no news
                continue
            if last is not None and view != last:
                onset = self.drill.first("fault_onset")
                if onset is not None:
                    if view.get("selected") != last.get("selected") and not view.get("selected"):
                        # nobody selected / leading: the system saw the fault, it has not failed over yet
                        self.drill.note("system_detect", f"selected {last.get('selected')} -> none", **view)
                    elif view.get("selected") != last.get("selected") and view.get("selected") == serving:
                        self.drill.note("system", f"selected {last.get('selected')} -> {view.get('selected')} "
                                                  "(the same again: recovered in place, no failover)", **view)
                    elif view.get("selected") != last.get("selected"):
                        self.drill.note("system_failover", f"selected {last.get('selected')} -> {view.get('selected')}",
                                        **view)
                    elif last.get("healthy") and not view.get("healthy"):
                        self.drill.note("system_detect", f"{view.get('selected')} unhealthy: {view}", **view)
                    else:
                        self.drill.note("system", str(view)[:200], **view)
            if view.get("selected"):
                serving = view.get("selected")
            last = view


REPO = Path(__file__).resolve().parents[1]


def resolve_capture(text: str) -> Path:
    """An experiment's ``capture``: absolute, or relative to the repository (``../shared/data/...`` is the
    shared recordings folder beside it). Raises ``DrillError`` when missing."""
    path = Path(text) if Path(text).is_absolute() else REPO / text
    if not path.is_file():
        raise DrillError(f"capture not found: {path}")
    return path


def make_stack(kind: str, state: StateFile, config: dict[str, Any], **kw: Any):
    """The drill stack an experiment's ``configuration.stack`` names: ``gateways`` (default), ``providers``,
    ``regions``. Raises ``DrillError`` for another name."""
    if kind == "gateways":
        return DrillStack(state, **kw)
    if kind == "providers":
        from chaos.provider_stack import ProviderDrillStack

        return ProviderDrillStack(state, **kw)
    if kind == "regions":
        from chaos.region_stack import RegionDrillStack

        kw.pop("faulted_via_proxy", None)
        region_kw = {"captures": [kw.pop("capture")]} if "capture" in kw else {}
        return RegionDrillStack(state, faulted_region=str(config.get("faulted_region", "a")),
                                netns=bool(config.get("netns", False)), **region_kw, **kw)
    raise DrillError(f"unknown drill stack {kind!r}: gateways, providers or regions")


class _Shield:
    """Ignore SIGINT and SIGTERM (main thread only) until ``release``: while the runner rolls back and stops
    its stack, another signal would leave processes behind (the state file would still list them)."""

    def __init__(self) -> None:
        import signal

        self.saved: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, signal.SIG_IGN)

    def release(self) -> None:
        import signal

        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        self.saved = {}


def undo_injections(state: StateFile) -> list[str]:
    """Undo every listed injection but what the stack itself made (``STACK_KINDS``: a shared stack keeps running)."""
    done = []
    for entry in reversed(state.entries()):
        if entry["kind"] not in STACK_KINDS:
            state.undo(entry["id"])
            done.append(entry["kind"])
    return done


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait_steady(drill: Drill, experiment: dict[str, Any], timeout_s: float) -> float | None:
    """Wait (up to ``timeout_s``) until every ``steady_state`` probe of the hypothesis holds, evaluated as
    the probe would (a start-up catch-up burst must not count as the "before"). Seconds waited, or None."""
    from chaos.probes import e2e_objective_s, evaluate

    probes = [p["provider"].get("arguments", {}) for p in
              (experiment.get("steady-state-hypothesis") or {}).get("probes", [])
              if p.get("provider", {}).get("func") == "steady_state"]
    t0 = time.monotonic()
    held_since = None
    while time.monotonic() - t0 < timeout_s:
        deliveries, _ = drill.groups.recorder.snapshot()
        now = time.monotonic()
        ok = True
        for args in probes:
            group = args.get("group", "faulted")
            n = drill.groups.groups[group][1]
            r = evaluate(deliveries, list(range(n)), drill.stack.instruments, group, now,
                         window_s=float(args.get("window_s", 3.0)), max_stale_s=float(args.get("max_stale_s", 3.0)),
                         max_p99_s=e2e_objective_s() * float(args.get("p99_factor", 1.0)) * drill.p99_scale)
            ok = ok and r["ok"]
        # held for 2 s in a row: one lucky evaluation on a bursty machine is not a steady state
        held_since = (held_since or now) if ok else None
        if held_since is not None and now - held_since >= 2.0:
            return time.monotonic() - t0
        time.sleep(0.25)
    return None


def _missing_books(groups: ClientGroups, instruments: list[str]) -> str:
    """Which client lacks which book, and the last things those clients saw (for the error message)."""
    try:
        seqs = groups.seqs()
    except TimeoutError:
        return "the clients' loop did not answer in 30 s"
    missing = {f"{g}#{c}": [i for i in instruments if i not in books] for (g, c), books in seqs.items()}
    missing = {k: v for k, v in missing.items() if v}
    _, events = groups.recorder.snapshot()
    recent = [f"{e.group}#{e.client} {e.kind} {e.instrument or ''} {e.detail[:60]}".strip() for e in events
              if f"{e.group}#{e.client}" in missing][-8:]
    return f"missing {missing}; their last events: {recent}"


def _wait(predicate, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise DrillError(f"{what}: not true after {timeout_s:g} s")
        time.sleep(interval_s)


def _quiesce_and_check(drill: Drill, onset_s: float | None) -> dict[str, Any] | None:
    """Pause the ingest, wait for every book to settle, compare with the checker, resume the ingest."""
    import os
    import signal

    stack, state = drill.stack, drill.state
    try:   # the checker's books first, while the ingest can still answer snapshot requests
        _wait(drill.checker.complete, 30, "the checker holding every book", interval_s=0.25)
    except DrillError as exc:
        log.warning("%s", exc)
    drill.checker.pause(True)
    sids = []
    for role in stack.quiesce_roles():
        proc = stack.procs.get(role)
        if proc is None or proc.popen is None or proc.popen.poll() is not None:
            continue
        pid = proc.popen.pid
        sids.append(state.add("sigstop", pid=pid, start_ticks=start_ticks(pid), what=f"{role} (quiesce)"))
        os.kill(pid, signal.SIGSTOP)
    try:
        stable: list = []

        def settled() -> bool:
            """Every client at the checker's seq, and nothing moved for 1 s (messages still in flight when
            the ingest was paused would otherwise land between this check and the comparison)."""
            refs = {g: drill.checker.seqs(g) for g in drill.groups.groups}
            seqs = drill.groups.seqs()
            now = (refs, seqs)
            if not stable or stable[-1] != now:
                stable[:] = [now]
                return False
            stable.append(now)
            if len(stable) < 5:
                return False
            if any(len(ref) < len(stack.instruments) for ref in refs.values()):
                return False
            return all(seqs[k].get(i) == refs[k[0]][i] for k in seqs for i in refs[k[0]])
        try:
            _wait(settled, 20, "every client book at the checker's seq", interval_s=0.25)
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
        return compare_groups(drill.checker, drill.groups.books(), told)
    finally:
        for sid in sids:
            state.undo(sid)
        drill.checker.pause(False)


def run_drill(name_or_file: str, *, duration_s: float | None = None, report_dir: Path | None = None,
              state_path: Path | None = None, failover: bool = True, faulted_via_proxy: bool = True,
              chdb_path: Path | None = None, progress=print, stack: Any = None,
              metrics: Any = None, p99_scale: float = 1.0) -> dict[str, Any]:
    """Run one drill end to end; returns the report dict (``verdict`` in it). Raises ``DrillError`` for a
    drill that cannot start (bad file, stack failed).

    ``stack``: an already started drill stack of the experiment's kind to run on (its ``failover`` and
    ``faulted_via_proxy`` are set from the arguments; it is left running, and only the drill's injections
    are undone before and after: the test suite runs several short drills on one stack). ``state_path``
    is then ignored (the stack's state file is used). ``metrics``: a ``chaos.metrics.DrillMetrics`` to
    export the drill's figures to (the catalog's drill metrics). ``p99_scale`` multiplies every steady-state
    probe's ``p99_factor`` (a loaded shared machine: the suite uses it; production-like stacks keep 1)."""
    from chaoslib.run import Runner
    from chaoslib.types import Strategy

    name, experiment = load_experiment(name_or_file)
    config = {k: (v if not isinstance(v, dict) else v.get("default")) for k, v in experiment.get("configuration", {}).items()}
    if duration_s is not None:
        config["duration_s"] = duration_s
        experiment.setdefault("configuration", {})["duration_s"] = duration_s
    hold_s = float(config.get("duration_s", 5))
    import os

    if config.get("requires_root") and os.geteuid() != 0:
        raise DrillError(f"drill {name} needs root (nftables); run it as root")
    shared_stack = stack is not None
    if shared_stack:
        state = stack.state
        undo_injections(state)
        stack.failover = failover
        if hasattr(stack, "faulted_via_proxy"):
            stack.faulted_via_proxy = faulted_via_proxy
    else:
        state = StateFile(state_path)
        leftovers = state.undo_all()
        if leftovers:
            progress(f"cleaned up what an earlier run left: {'; '.join(leftovers)}")
        extra: dict[str, Any] = {}
        if config.get("capture"):
            extra["capture"] = resolve_capture(str(config["capture"]))
        stack = make_stack(str(config.get("stack", "gateways")), state, config, failover=failover,
                           faulted_via_proxy=faulted_via_proxy, speed=float(config.get("speed", 1.0)), **extra)
    watcher = None
    user_interrupt = False    # Ctrl-C / SIGTERM (chaostoolkit also says "interrupted" for a safeguard abort)
    experiment_end_s = None
    start_failed = False
    groups = checker = drill = safeguard = None
    run_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    journal: dict[str, Any] = {"status": "not run"}
    check = None
    try:
        progress(f"drill {name}: starting the {stack.kind} drill stack ({stack.layout})")
        try:
            if not shared_stack:
                stack.start()
        except (TimeoutError, RuntimeError, OSError) as exc:
            start_failed = True
            raise DrillError(f"drill stack failed to start: {exc} (logs kept in {stack.workdir} until the next "
                             f"drill run or 'bookcast drill cleanup')") from None
        checker = GroupCheckers(stack.checker_urls(), stack.instruments, getattr(stack, "checker_kv_region", None))
        checker.start()
        urls = stack.group_urls()
        groups = ClientGroups({"faulted": (urls["faulted"], int(config.get("faulted_clients", 2))),
                               "control": (urls["control"], int(config.get("control_clients", 1)))},
                              stack.instruments, ws_heartbeat_s=float(config.get("ws_heartbeat_s", 2.0)))
        groups.start()
        drill = Drill(name, stack, groups, checker, state,
                      fault_limit_s=float(config.get("fault_limit_s", hold_s + 30)))
        drill.metrics = metrics
        drill.p99_scale = p99_scale
        set_current(drill)
        watcher = SystemWatcher(drill)
        watcher.start()

        def warm() -> bool:
            try:
                return all(len(b) == len(stack.instruments) for b in groups.seqs().values())
            except TimeoutError:     # the clients' loop busy for 30 s (a loaded machine): ask again
                return False
        try:
            # generous: on a loaded machine a deep book's snapshot (Coinbase BTC-USD: 1.1 MB) takes the SDK
            # seconds to verify per client, and every client of the drill shares this process
            _wait(warm, 180, "every drill client holding every book", interval_s=0.2)
        except DrillError as exc:
            raise DrillError(f"{exc}: {_missing_books(groups, stack.instruments)}") from None
        if hasattr(stack, "before_experiment"):
            stack.before_experiment()
        steady_wait_s = _wait_steady(drill, experiment, float(config.get("steady_timeout_s", 60.0)))
        progress(f"drill {name}: steady state reached {steady_wait_s:.1f} s after warm-up" if steady_wait_s is not None
                 else f"drill {name}: steady state NOT reached before the experiment (the hypothesis will say)")
        # the "before" window is the 2 s the steady state just held (_wait_steady); the hypothesis is checked
        # at once (a further sleep only gave a loaded machine time to break it again)
        time.sleep(float(config.get("warmup_s", 0.0)))
        progress(f"drill {name}: {len(groups.clients)} clients on {', '.join(stack.instruments)}; running the experiment")
        safeguard = Safeguard(drill, float(config.get("safeguard_outage_s", 20.0)))
        safeguard.start()
        settings = {"runtime": {"rollbacks": {"strategy": "always"}, "hypothesis": {"strategy": "default"}}}
        journal = Runner(Strategy.DEFAULT).run(experiment, settings=settings)
        experiment_end_s = time.monotonic()
        safeguard.stopped.set()
        if watcher is not None:  # the quiesce below pauses the ingests: the leases they drop are not the fault's
            watcher.stopped.set()
        drill.note("note", f"experiment ended: {journal.get('status')}")
        progress(f"drill {name}: experiment {journal.get('status')}; checking books against the checker")
        onset = drill.first("fault_onset")
        # wait for the faulted group to have every book again (or give up and let the verdict say so)
        try:
            _wait(warm, 20, "every book back after the fault")
        except DrillError as exc:
            log.warning("%s: %s", exc, _missing_books(groups, stack.instruments))
        check = _quiesce_and_check(drill, onset)
    except KeyboardInterrupt:
        user_interrupt = True
        journal["status"] = "interrupted"
        if drill is not None:
            drill.aborted = drill.aborted or "interrupted (Ctrl-C)"
    finally:
        shield = _Shield()       # a second Ctrl-C / SIGTERM must not cut the rollback short
        if safeguard is not None:
            safeguard.stopped.set()
        if watcher is not None:
            watcher.stopped.set()
        end_s = experiment_end_s or time.monotonic()   # the quiesce (ingest paused) is not an outage
        deliveries, events = groups.recorder.snapshot() if groups is not None else ([], [])
        for part in (groups, checker):
            if part is not None:
                try:
                    part.stop()
                except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                    log.warning("stopping %s: %s", type(part).__name__, exc)
        if shared_stack:
            rest = undo_injections(state)
        else:
            stack.stop()
            if not start_failed:     # a failed start keeps its logs (the next run's undo_all removes them)
                stack.cleanup_workdir(report_dir / name / "logs" if report_dir is not None else None)
            rest = state.undo_all(keep=("workdir",))
        if rest:
            log.warning("rollback after the drill undid: %s", "; ".join(rest))
        set_current(None)
        shield.release()
    left = [e for e in state.entries() if not shared_stack or e["kind"] not in STACK_KINDS]
    if not shared_stack and hasattr(stack, "leftovers"):     # asked of the kernel, not only the state file
        left += [{"kind": "in the kernel", "what": w} for w in stack.leftovers()]
    alive = [] if shared_stack else [f"{role} pid={pid}" for role, pid in stack.describe().get("pids", {}).items()
                                     if start_ticks(pid) is not None and not _zombie(pid)]
    if drill is None:
        if user_interrupt:
            raise KeyboardInterrupt(f"drill {name} interrupted while starting (rolled back)")
        raise DrillError(f"drill {name} did not start")
    before_ok = (journal.get("steady_states") or {}).get("before", {}) or {}
    after_ok = (journal.get("steady_states") or {}).get("after", {}) or {}
    result = analyse(drill=name, title=experiment.get("title", name), t0_s=drill.started_s, end_s=end_s,
                     timeline=[asdict(e) for e in drill.timeline], deliveries=deliveries, events=events,
                     proofs=[asdict(p) for p in drill.proofs], check=check,
                     faulted_first_url=stack.faulted_first_url(), n_faulted=groups.groups["faulted"][1],
                     instruments=stack.instruments, max_outage_s=float(config.get("max_outage_s", 5.0)),
                     expect_failover=bool(config.get("expect_failover", True)),
                     journal_status=journal.get("status", "?"),
                     before_ok=before_ok.get("steady_state_met") if before_ok else None,
                     after_ok=after_ok.get("steady_state_met") if after_ok else None, aborted=drill.aborted,
                     control_reference=bool(getattr(stack, "control_independent", False)))
    result["user_interrupt"] = user_interrupt
    result["left_behind"] = left + [{"kind": "process alive", "what": a} for a in alive]
    result["stack"] = stack.describe()
    result["run_at"] = run_at
    if metrics is not None:
        metrics.finished(result)
    if report_dir is not None:
        out = report_dir / name
        write_report(result, deliveries, drill.started_s, out)
        (out / "journal.json").write_text(json.dumps(journal, indent=1, default=str))
        try:
            write_chdb([drill_row(result, run_at)], chdb_path or report_dir / "chdb")
        except Exception as exc:  # noqa: BLE001 - the Markdown and JSON report stand without it
            log.warning("chDB rows not written: %s", exc)
    return result
