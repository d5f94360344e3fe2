"""Does atheris add coverage over the hypothesis fuzzers? Same targets, same time budget, same measure.

For each target (the request parser, the wire decoder, the venue parsers):

1. hypothesis runs the strategies of ``tests/security/test_fuzz.py`` for ``--budget-s`` seconds (batches
   of fresh random examples), recording every input it generated;
2. atheris (libFuzzer, coverage-guided) runs the same target for the same budget in a child process,
   seeded with the same seed messages, and keeps its corpus (the inputs that found new coverage);
3. each engine's inputs are replayed in a fresh child process under coverage.py (lines and branches of
   ``feed/``), so caches warmed by one engine cannot hide lines from the other.

It prints, per target, lines and branches covered by each engine and by atheris only (what it adds), and
the failures either engine found (a target's documented-error property broken). ``atheris`` (a cp311
linux x86_64 wheel, 3.0.0: later releases ship no wheel for it and need a clang/libFuzzer build) and
``coverage`` are in the dev group; this is a command, not part of the test suite:

    .venv/bin/python -m tests.security.fuzzcov --budget-s 15 --out run/security/fuzzcov.json
    .venv/bin/python -m tests.security.fuzzcov --budget-s 60 --target venues   # a longer atheris run

Exit codes: 0 measured, 1 a child failed, 2 atheris or coverage missing.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TARGETS = ("request", "wire", "venues")
VENUE_ORDER = ("coinbase", "kalshi", "polymarket")


# -- the targets: one bytes -> None function each (an AssertionError is a finding) --------------------

def target(name: str):
    from tests.security import test_fuzz as tf

    if name == "request":
        return tf._check_request_outcome
    if name == "wire":
        return tf._check_wire_outcome

    def venues(data: bytes) -> None:
        import orjson

        if not data:
            return
        try:
            msg = orjson.loads(data[1:])
        except orjson.JSONDecodeError:
            return
        tf._check_venue_outcome(VENUE_ORDER[data[0] % len(VENUE_ORDER)], msg)

    return venues


def seeds(name: str) -> list[bytes]:
    import orjson

    from tests.security import test_fuzz as tf

    if name == "request":
        return [orjson.dumps(r) for r in tf.REQUEST_SEEDS]
    if name == "wire":
        return [orjson.dumps(s) for s in tf.WIRE_SEEDS]
    return [bytes([VENUE_ORDER.index(v)]) + orjson.dumps(m) for v in VENUE_ORDER for m in tf.SEEDS[v]]


def strategy(name: str):
    import orjson
    from hypothesis import strategies as st

    from tests.security import test_fuzz as tf

    mutated_json = st.just(tf._DELETE) | tf.NUMBERISH | tf.JSON
    if name == "request":
        fields = st.dictionaries(st.sampled_from(["id", "instruments", "instrument", "channels", "conflate_ms",
                                                  "resume", "extra"]), tf.FIELD_VALUES, max_size=5)
        near = st.builds(lambda op, f: orjson.dumps(dict(f, op=op)), tf.OPS, fields)
        mutated = st.builds(lambda s, p, r: orjson.dumps(tf._mutate(s, p, r)), st.sampled_from(tf.REQUEST_SEEDS),
                            st.lists(st.integers(0, 20), min_size=1, max_size=4), mutated_json | tf.INSTRUMENT)
        return st.binary(max_size=300) | tf.JSON.map(orjson.dumps) | near | mutated
    if name == "wire":
        mutated = st.builds(lambda s, p, r: orjson.dumps(tf._mutate(s, p, r)), st.sampled_from(tf.WIRE_SEEDS),
                            st.lists(st.integers(0, 20), min_size=1, max_size=3), mutated_json)
        return st.binary(max_size=300) | mutated
    venue = st.sampled_from(range(len(VENUE_ORDER)))

    def mutated(draw_v, seed_data):
        return bytes([draw_v]) + orjson.dumps(seed_data)

    per_venue = st.one_of(*[
        st.builds(lambda s, p, r, i=i: mutated(i, tf._mutate(s, p, r)), st.sampled_from(tf.SEEDS[v]),
                  st.lists(st.integers(0, 50), min_size=1, max_size=4), mutated_json)
        for i, v in enumerate(VENUE_ORDER)])
    return per_venue | st.builds(mutated, venue, tf.JSON)


# -- engines ---------------------------------------------------------------------------------------

def _write_records(path: Path, inputs: list[bytes]) -> None:
    with open(path, "wb") as f:
        for data in inputs:
            f.write(struct.pack("<I", len(data)) + data)


def _read_inputs(where: Path) -> list[bytes]:
    if where.is_dir():
        return [p.read_bytes() for p in sorted(where.iterdir()) if p.is_file()]
    out, raw, i = [], where.read_bytes(), 0
    while i < len(raw):
        (n,) = struct.unpack_from("<I", raw, i)
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out


def run_hypothesis(name: str, budget_s: float, records: Path) -> dict:
    from hypothesis import HealthCheck, Phase, given, settings

    fn, inputs, failures = target(name), [], []

    @settings(max_examples=200, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy(name))
    def batch(data: bytes) -> None:
        inputs.append(data)
        try:
            fn(data)
        except AssertionError as exc:
            failures.append(repr(exc)[:200])

    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        batch()
    _write_records(records, inputs)
    return {"inputs": len(inputs), "failures": failures[:5], "failure_count": len(failures)}


def atheris_child(name: str, corpus: Path, budget_s: float) -> None:
    """Runs in a child process: libFuzzer exits it at the end of the budget."""
    import atheris

    with atheris.instrument_imports(include=["feed"]):
        fn = target(name)
        fn(b"")  # imports every module the target reaches, inside the instrumented block

    def one(data: bytes) -> None:
        fn(data)  # an AssertionError is a crash: libFuzzer writes the input next to the corpus

    atheris.Setup([sys.argv[0], f"-max_total_time={int(budget_s)}", "-max_len=4096", "-rss_limit_mb=1024",
                   f"-artifact_prefix={corpus.parent}/crash-", "-print_final_stats=1", str(corpus)], one)
    atheris.Fuzz()


def run_atheris(name: str, budget_s: float, corpus: Path, log_path: Path) -> dict:
    corpus.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(seeds(name)):
        (corpus / f"seed-{i:03d}").write_bytes(data)
    with open(log_path, "wb") as log:
        proc = subprocess.run([sys.executable, "-m", "tests.security.fuzzcov", "--atheris-child", name,
                               str(corpus), str(budget_s)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              timeout=budget_s + 120)
    text = log_path.read_text(errors="replace")
    runs = next((int(line.rsplit(":", 1)[1]) for line in text.splitlines() if "stat::number_of_executed_units" in line),
                None)
    crashes = sorted(p.name for p in corpus.parent.glob("crash-*"))
    return {"inputs": sum(1 for p in corpus.iterdir() if p.is_file()), "executions": runs, "exit": proc.returncode,
            "crashes": crashes}


def replay_child(name: str, where: Path, out: Path) -> None:
    import coverage

    cov = coverage.Coverage(branch=True, data_file=None, include=[str(REPO / "feed" / "*")])
    fn = target(name)
    cov.start()
    for data in _read_inputs(where):
        try:
            fn(data)
        except AssertionError:
            pass
    cov.stop()
    data = cov.get_data()
    lines = sorted(f"{Path(f).relative_to(REPO)}:{n}" for f in data.measured_files() for n in data.lines(f) or ())
    arcs = sorted(f"{Path(f).relative_to(REPO)}:{a}:{b}" for f in data.measured_files() for a, b in data.arcs(f) or ()
                  if a > 0 and b > 0)
    out.write_text(json.dumps({"lines": lines, "arcs": arcs}))


def replay(name: str, where: Path, out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "tests.security.fuzzcov", "--replay-child", name, str(where), str(out)],
                   cwd=REPO, check=True, timeout=600)
    doc = json.loads(out.read_text())
    return {"lines": set(doc["lines"]), "arcs": set(doc["arcs"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="example: python -m "
                                "tests.security.fuzzcov --budget-s 15 --target request --out run/fuzzcov.json",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=15.0, help="seconds per engine per target (default 15)")
    p.add_argument("--target", action="append", choices=TARGETS, help="repeatable; default all")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    p.add_argument("--atheris-child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--replay-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.atheris_child:
        name, corpus, budget = args.atheris_child
        atheris_child(name, Path(corpus), float(budget))
        return 0
    if args.replay_child:
        name, where, out = args.replay_child
        replay_child(name, Path(where), Path(out))
        return 0
    try:
        import atheris  # noqa: F401
        import coverage  # noqa: F401
    except ImportError as exc:
        print(f"fuzzcov: {exc.name} is not installed here (the dev group: bash scripts/setup.sh)", file=sys.stderr)
        return 2
    figures: dict = {"budget_s": args.budget_s, "load_avg_1m": os.getloadavg()[0], "targets": {}}
    with tempfile.TemporaryDirectory(prefix="fuzzcov-") as tmp:
        for name in args.target or TARGETS:
            work = Path(tmp) / name
            work.mkdir()
            print(f"[fuzzcov] {name}: hypothesis for {args.budget_s:.0f} s", file=sys.stderr, flush=True)
            hyp = run_hypothesis(name, args.budget_s, work / "hypothesis.rec")
            print(f"[fuzzcov] {name}: atheris for {args.budget_s:.0f} s", file=sys.stderr, flush=True)
            ath = run_atheris(name, args.budget_s, work / "corpus", work / "atheris.log")
            if ath["exit"] not in (0,) and not ath["crashes"]:
                print(f"fuzzcov: atheris child failed (exit {ath['exit']}):\n"
                      f"{(work / 'atheris.log').read_text(errors='replace')[-2000:]}", file=sys.stderr)
                return 1
            print(f"[fuzzcov] {name}: replaying both under coverage.py", file=sys.stderr, flush=True)
            h = replay(name, work / "hypothesis.rec", work / "h.json")
            a = replay(name, work / "corpus", work / "a.json")
            figures["targets"][name] = row = {
                "hypothesis": {**hyp, "lines": len(h["lines"]), "branches": len(h["arcs"])},
                "atheris": {**ath, "lines": len(a["lines"]), "branches": len(a["arcs"])},
                "atheris_only": {"lines": sorted(a["lines"] - h["lines"]), "branches": len(a["arcs"] - h["arcs"])},
                "hypothesis_only": {"lines": len(h["lines"] - a["lines"]), "branches": len(h["arcs"] - a["arcs"])},
            }
            print(f"{name:8} hypothesis {row['hypothesis']['lines']:4} lines {row['hypothesis']['branches']:4} "
                  f"branches ({hyp['inputs']} inputs) | atheris {row['atheris']['lines']:4} lines "
                  f"{row['atheris']['branches']:4} branches ({ath['executions']} runs, corpus {ath['inputs']}) | "
                  f"atheris only: {len(row['atheris_only']['lines'])} lines, {row['atheris_only']['branches']} "
                  f"branches; hypothesis only: {row['hypothesis_only']['lines']} lines, "
                  f"{row['hypothesis_only']['branches']} branches; failures: hypothesis "
                  f"{hyp['failure_count']}, atheris {len(ath['crashes'])}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
