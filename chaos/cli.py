"""``bookcast drill``: list, run and clean up Chaos Toolkit drills (chaos/experiments/*.json).

Exit codes: 0 every drill run passed, 1 a drill failed, aborted or was not injected (or could not start),
2 bad usage (unknown drill, invalid experiment file).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

EXAMPLES = """examples:
  bookcast drill list                                   # shipped drills and what each injects
  bookcast drill run gateway-killed --report run/drills # one drill, report in run/drills/gateway-killed/
  bookcast drill run chaos/experiments/gateway-paused.json --duration-s 10
  bookcast drill run --all --duration-s 5 --report run/drills   # every drill, then the drill table
  bookcast drill run gateway-killed --no-failover       # the checks must fail: clients hold one gateway only
  bookcast drill cleanup                                # undo what a killed run left (state file)"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="drill_command", required=True, metavar="list|run|cleanup")
    sub.add_parser("list", help="shipped drills")
    r = sub.add_parser("run", help="run a drill (NAME or FILE) or --all", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("drill", nargs="?", help="a shipped drill name (bookcast drill list) or an experiment JSON file")
    r.add_argument("--all", action="store_true", help="run every shipped drill in turn and print the drill table")
    r.add_argument("--duration-s", type=float, help="how long each fault is held (default: the experiment's)")
    r.add_argument("--report", type=Path, help="write report.md, report.json, timeline.png, journal.json under "
                                               "DIR/<drill>/ and rows into the chDB store DIR/chdb")
    r.add_argument("--chdb", type=Path, help="chDB store for the drill rows (default: REPORT/chdb)")
    r.add_argument("--state", type=Path, help="state file of injections (default $BOOKCAST_CHAOS_STATE or "
                                              "run/chaos/state.json)")
    r.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve the drill metrics (feed.catalog, chaos drills block) on 127.0.0.1:PORT while the drills run (0: a free port); "
                        "they are also written to REPORT/drills.prom")
    r.add_argument("--p99-factor", type=float, default=1.0, metavar="X",
                   help="multiply every steady-state e2e p99 bound by X (a loaded shared machine; default 1)")
    r.add_argument("--no-failover", action="store_true",
                   help="faulted clients hold only the faulted path (the drills must then fail)")
    r.add_argument("--proxy-off-path", action="store_true",
                   help="faulted clients bypass the fault proxy (proxy drills must then say 'not injected')")
    c = sub.add_parser("cleanup", help="undo every injection, process and work directory a killed drill left "
                                         "(exit 1 when one could not be undone)")
    c.add_argument("--state", type=Path, help="state file (default $BOOKCAST_CHAOS_STATE or run/chaos/state.json)")


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    from chaos.runner import DrillError, experiment_files, load_experiment, run_drill

    if args.drill_command == "list":
        for name, path in experiment_files().items():
            title = json.loads(path.read_text()).get("title", "")
            print(f"{name:28s} {title}")
        return 0
    if args.drill_command == "cleanup":
        from chaos.state import StateFile

        done = StateFile(args.state).undo_all()
        print("\n".join(done) if done else "nothing to clean up")
        return 1 if any(" FAILED: " in line for line in done) else 0
    if bool(args.all) == bool(args.drill):
        print("bookcast drill run: give a drill NAME or FILE, or --all", file=sys.stderr)
        return 2
    names = list(experiment_files()) if args.all else [args.drill]
    try:
        for n in names:
            load_experiment(n)
    except DrillError as exc:
        print(f"bookcast drill run: {exc}", file=sys.stderr)
        return 2
    from chaos.report import drill_row, table

    def _terminate(signum, frame):   # SIGTERM rolls back like Ctrl-C (the runner's finally undoes everything)
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _terminate)

    from chaos.metrics import DrillMetrics

    metrics = DrillMetrics()
    if args.metrics_port is not None:
        _progress(f"drill metrics on http://127.0.0.1:{metrics.serve(args.metrics_port)}/metrics")
    rows, code = [], 0
    for n in names:
        try:
            r = run_drill(n, duration_s=args.duration_s, report_dir=args.report, state_path=args.state,
                          failover=not args.no_failover, faulted_via_proxy=not args.proxy_off_path,
                          chdb_path=args.chdb, progress=_progress, metrics=metrics,
                          p99_scale=args.p99_factor)
        except DrillError as exc:
            print(f"bookcast drill run {n}: {exc}", file=sys.stderr)
            code = 1
            continue
        except KeyboardInterrupt:
            _progress(f"drill {n}: interrupted while starting (rolled back); not running the rest")
            code = 1
            break
        except Exception as exc:  # noqa: BLE001 - one broken drill must not stop --all (it rolled back)
            print(f"bookcast drill run {n}: runtime failure: {exc!r}", file=sys.stderr)
            code = 1
            continue
        if r.get("user_interrupt"):
            _progress(f"drill {n}: interrupted (rolled back); not running the rest")
            code = 1
            break
        rows.append(drill_row(r, r["run_at"]))
        reasons = f" ({'; '.join(r['reasons'])})" if r["reasons"] else ""
        _progress(f"drill {n}: {r['verdict'].upper()}{reasons}"
                  + (f"; report in {args.report / n}" if args.report else ""))
        if r["verdict"] != "passed" or r["left_behind"]:
            code = 1
    print(table(rows))
    if args.report and rows:
        args.report.mkdir(parents=True, exist_ok=True)
        (args.report / "drills.md").write_text(table(rows) + "\n")
        metrics.write(args.report / "drills.prom")
    metrics.close()
    return code
