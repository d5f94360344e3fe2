"""The benchmark's arithmetic (pure): neighbour pairing, disturbed windows left out and counted, intervals;
and ``bookcast ebpf --explain`` without root, with and without a benchmark's cost file."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ebpf.bench import program_costs
from ebpf.stats import DETACHED, Window, bootstrap_ci, disturbed_batches, estimate, neighbours
from tests.ebpf.test_spec import REPO, _without_capabilities


def _run(values: list[tuple[str, float, bool]]) -> list[Window]:
    return [Window(i, "syscall", mode, v, bad, "x" if bad else "") for i, (mode, v, bad) in enumerate(values)]


def test_each_attached_window_is_compared_with_its_undisturbed_detached_neighbours():
    ws = _run([(DETACHED, 100, False), ("untraced", 150, False), (DETACHED, 110, False),
               ("untraced", 400, True),                                 # disturbed: left out, counted
               (DETACHED, 999, True), ("untraced", 170, False), (DETACHED, 130, False)])
    assert [w.value for w in neighbours(ws, ws[5])] == [110, 130]       # the disturbed 999 is skipped
    e = estimate(ws, "syscall", "untraced")
    assert e.windows == 2 and e.discarded == 2
    assert e.difference == pytest.approx(((150 - 105) + (170 - 120)) / 2)
    assert e.ratio == pytest.approx((150 / 105 + 170 / 120) / 2)
    assert e.difference_ci95[0] <= e.difference <= e.difference_ci95[1]
    assert e.detached == 110                                           # median of undisturbed peers


def test_no_estimate_without_an_undisturbed_pair():
    assert estimate(_run([(DETACHED, 100, True), ("untraced", 150, False)]), "syscall", "untraced") is None


def test_bootstrap_interval_narrows_with_agreeing_windows_and_is_reproducible():
    wide, narrow = bootstrap_ci([0.0, 100.0, 20.0, 80.0]), bootstrap_ci([50.0, 51.0, 49.0, 50.0])
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    assert bootstrap_ci([1.0, 5.0, 9.0]) == bootstrap_ci([1.0, 5.0, 9.0])


def test_a_window_with_most_batches_disturbed_is_discarded():
    assert disturbed_batches(100, 50) == ""
    assert disturbed_batches(100, 51) and disturbed_batches(0, 0) and disturbed_batches(3, 3)


def _costs_file(tmp_path):
    ws = _run([(DETACHED, 100, False), ("untraced", 180, False), ("traced", 500, False), (DETACHED, 100, False)])
    summary = {"syscall": {"untraced": estimate(ws, "syscall", "untraced").as_dict(),
                           "traced": estimate(ws, "syscall", "traced").as_dict(), "windows": 4,
                           "discarded_windows": 0}}
    costs = program_costs({"syscalls": {"summary": summary}})
    assert costs["syscalls"]["syscall"]["untraced"]["ns"] == pytest.approx(80)
    path = tmp_path / "ebpf-costs.json"
    path.write_text(json.dumps({"started": "20261201-000000", "mode": "full", "cpus": 2, "kernel": "k",
                                "programs": costs}))
    return path


def _explain(args: list[str]) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        return _without_capabilities(["ebpf", "--explain", *args], timeout=240)
    return subprocess.run([sys.executable, "-m", "feed.cli", "ebpf", "--explain", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=240)


def test_explain_without_root_shows_each_program_its_cost_and_series(tmp_path):
    out = _explain(["--costs", str(_costs_file(tmp_path))])
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for name in ("syscalls", "sched", "tcp", "sockq", "netstack", "listenq", "softirq"):
        assert f"\n{name}: " in "\n" + text
    assert "raw_syscalls:sys_enter (raw)" in text and "net:netif_receive_skb" in text
    assert "cost per syscall (write of 0 bytes): untraced +80 ns" in text
    assert "bookcast_ebpf_accept_queue_limit{role,port} (gauge)" in text
    assert "bookcast_ebpf_softirq_latency_seconds{role,vec} (histogram)" in text
    assert text.count("cost: not measured yet") == 6                  # only syscalls is in that file


def test_explain_says_not_measured_yet_and_how_to_measure(tmp_path, monkeypatch):
    from ebpf import explain
    from ebpf.loader import plans

    text = explain.render([p.program for p in plans()[1]], None, tmp_path / "missing.json")
    assert "not measured yet" in text and "python -m ebpf.bench" in text
    out = _explain(["--costs", str(tmp_path / "missing.json")])
    assert out.returncode == 2 and "no such file" in out.stderr
