"""Benchmark: what reading the probe's sliding windows costs its event loop. ``python -m exporter.windowbench``.

The probe refreshes every window of every hop of every region on its event loop each update interval
(``RegionProbe.update``), so the time it takes is a stall of the instrument itself: frames wait in the socket
meanwhile and are measured as network latency. Two peers, same data, same run:

* ``library``: the window merged with the library's ``HdrHistogram.add`` and read with its
  ``get_percentile_to_value_dict`` (pure-Python walks of ~25,000 buckets), as the probe did before;
* ``vectorised``: ``SlidingWindow.summary`` (numpy over the slices' counts), as it does now.

Both must give identical figures (checked on every window). Prints ms per update (``--regions`` x every hop
x the probe's windows, filled with ``--values`` values each), the ratio, and writes JSON with ``--out``.

Examples:
  python -m exporter.windowbench                       # 2 regions, the probe's windows
  python -m exporter.windowbench --regions 3 --repeat 10 --out /tmp/windows.json

Exit codes: 0 figures written, 1 the two peers disagreed.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

from exporter.latency import QUANTILES, Hop, SlidingWindow


def _windows(regions: int, values: int, seed: int) -> list[SlidingWindow]:
    from exporter.probe import WINDOWS

    rng = random.Random(seed)
    out = []
    for _ in range(regions * len(Hop)):
        for _, length_s, slices in WINDOWS:
            w = SlidingWindow(length_s, slices)
            for i in range(values):  # lognormal around 2 ms, spread over the whole window
                w.record(int(rng.lognormvariate(14.5, 1.0)), i * length_s / values)
            out.append(w)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exporter.windowbench", description=__doc__.split("\n\n")[0],
                                epilog=__doc__[__doc__.index("Examples:"):], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regions", type=int, default=2, help="regions one probe reads (default 2)")
    p.add_argument("--values", type=int, default=3000, help="values recorded in each window (default 3000)")
    p.add_argument("--repeat", type=int, default=5, help="updates timed per peer; the best is reported (default 5)")
    p.add_argument("--out", help="write the figures here as JSON")
    args = p.parse_args(argv)
    windows = _windows(args.regions, args.values, seed=1)
    timings: dict[str, float] = {}
    results: dict[str, list] = {}
    for name in ("library", "vectorised"):
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            if name == "library":
                got = [_library(w.merged(w.window_s)) for w in windows]
            else:
                got = [w.summary(w.window_s) for w in windows]
            best = min(best, time.perf_counter() - t0)
        timings[name], results[name] = best, got
    agree = results["library"] == results["vectorised"]
    figures = {"regions": args.regions, "windows": len(windows), "values_per_window": args.values,
               "library_ms_per_update": timings["library"] * 1e3, "vectorised_ms_per_update": timings["vectorised"] * 1e3,
               "ratio": timings["vectorised"] / timings["library"], "identical": agree}
    print(f"{len(windows)} windows ({args.regions} regions x {len(Hop)} hops): library {figures['library_ms_per_update']:.1f} ms "
          f"per update, vectorised {figures['vectorised_ms_per_update']:.1f} ms ({figures['ratio']:.3f}x); "
          f"identical figures: {agree}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
    return 0 if agree else 1


def _library(hist) -> tuple[int, dict[float, int], int]:
    """The library's own walk (what ``summarize`` computed before it was vectorised)."""
    count = hist.get_total_count()
    if not count:
        return 0, {q: 0 for q in QUANTILES}, 0
    by_percentile = hist.get_percentile_to_value_dict([q * 100 for q in QUANTILES])
    return count, {q: by_percentile[q * 100] for q in QUANTILES}, hist.get_max_value()


if __name__ == "__main__":
    sys.exit(main())
