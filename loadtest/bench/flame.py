"""A py-spy flame graph of one bookcast gateway worker while ``bookcast bench fanout`` drives it.

Runs the benchmark (bookcast target only, the arguments after ``--``), waits until its cell starts
publishing, then records the first gateway worker with ``py-spy record --nonblocking`` (it samples
without stopping the process) for ``--duration-s`` and writes the SVG.

    python -m loadtest.bench.flame --svg run/profile/before.svg -- --clients 1000 --rates 100 --duration-s 25

Exit codes: 0 the SVG was written, 1 the benchmark or py-spy failed, 2 usage.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from feed.procs import stop_process


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.flame", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--svg", type=Path, required=True, help="flame graph to write")
    p.add_argument("--duration-s", type=float, default=12.0, help="how long py-spy records (default %(default)s)")
    p.add_argument("--out", type=Path, help="benchmark output directory (default: next to the SVG)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then bookcast bench fanout arguments")
    args = p.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("flame: py-spy is not installed (uv dev dependency)", file=sys.stderr)
        return 2
    bench_args = [a for a in args.bench_args if a != "--"]
    out = args.out or args.svg.with_suffix("")
    args.svg.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.svg.with_suffix(".bench.log")
    with open(log_path, "wb") as log:
        bench = subprocess.Popen([sys.executable, "-m", "feed.cli", "bench", "fanout", "--targets", "bookcast",
                                  *bench_args, "--out", str(out)], stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        worker = None
        while time.monotonic() < deadline and bench.poll() is None:
            text = log_path.read_text(errors="replace")
            gateway_logs = list((out / "logs").glob("gateway-*.log")) if (out / "logs").exists() else []
            pids = [int(m) for g in gateway_logs for m in re.findall(r"gateway worker pid=(\d+) serving", g.read_text())]
            if "publishing" in text and pids:
                worker = pids[0]
                break
            time.sleep(0.5)
        if worker is None:
            print(f"flame: the benchmark never reached publishing; see {log_path}", file=sys.stderr)
            return 1
        time.sleep(1.0)  # past the first deltas
        rec = subprocess.run([py_spy, "record", "--nonblocking", "-p", str(worker), "-d", str(int(args.duration_s)),
                              "-o", str(args.svg), "-f", "flamegraph"], capture_output=True, text=True)
        if rec.returncode != 0 or not args.svg.exists():
            print(f"flame: py-spy failed: {rec.stderr[-2000:]}", file=sys.stderr)
            return 1
        bench.wait(timeout=900)
        print(args.svg)
        return 0 if bench.returncode == 0 else 1
    finally:
        if bench.poll() is None:
            stop_process(bench, grace_s=30)


if __name__ == "__main__":
    raise SystemExit(main())
