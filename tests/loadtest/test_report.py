"""The report's comparisons, rate search, idle figures and targets, on hand-made cells (the numbers a run
would produce)."""
from __future__ import annotations

import warnings

import pytest

from loadtest.bench.fanout import HopReading, hop_reading, hop_window
from loadtest.bench.report import analyse, chart, markdown


def cell(target, clients, *, rate=100.0, delivered_per_s=None, p99_ms=10.0, cpu_per_m=20.0, rss_kib=24.0,
         failures=0, errors=None, saturated=False, repeat=0, idle=0, lost=0, floor_us=None):
    return {"target": target, "clients": clients, "rate_per_s": rate, "repeat": repeat, "idle": idle,
            "idle_connected": idle or None, "idle_closed_early": 0 if idle else None,
            "delivered_per_s": delivered_per_s or rate * clients, "offered_per_s": rate * clients,
            "latency_ms": {"p50": 1.0, "p99": p99_ms, "p99_9": p99_ms, "max": p99_ms},
            "spread_ms": {"p99": 1.0}, "server_cpu_s": 2.0, "server_cpu_s_per_million": cpu_per_m,
            "upstream_nats_cpu_s": 0.5 if target == "bookcast" else None, "loadgen_cpu_s": 3.0,
            "harness_cores": 0.3, "machine_busy_pct": 95.0 if saturated else 60.0, "others_busy_pct": 5.0,
            "saturated": saturated, "load_average_1m": [1.0, 1.2],
            "rss_per_idle_connection_bytes": rss_kib * 1024, "connect_failures": failures,
            "closed_early": 0, "errors": errors or {}, "harness_failures": [], "subscribers": clients - failures,
            "losses": {"gap_lost": 0, "resync_skipped": 0, "tail_lost": lost}, "resyncs": 0, "floor_us": floor_us}


def run_of(cells):
    return analyse({"started": "t0", "finished": "t1", "cells": cells, "failed_cells": [],
                    "machine": {"cpus": 2, "kernel": "6", "python": "3.11", "nats_server": "v2"},
                    "config": {"instruments": 10, "duration_s": 20, "client_procs": 2, "workers": 2, "drain_s": 10,
                               "repeat": 3, "saturated_busy_pct": 90, "command": "bookcast bench fanout",
                               "toggles": {"exporter": False}}})


def status(run, starts):
    [t] = [t for t in run["targets"] if t["target"].startswith(starts)]
    return t["status"], t["detail"]


def test_ratios_pair_runs_and_report_their_spread():
    cells = []
    for n, (bk, nats) in enumerate([(14.0, 20.0), (15.0, 20.0), (16.0, 20.0)]):
        cells += [cell("bookcast", 1000, rate=20.0, cpu_per_m=bk, p99_ms=6.0, repeat=n),
                  cell("nats", 1000, rate=20.0, cpu_per_m=nats, p99_ms=10.0, repeat=n)]
    run = run_of(cells)
    [row] = run["comparisons"]
    cpu = row["server_cpu_s_per_million"]
    assert cpu["ratios"] == [0.7, 0.75, 0.8] and cpu["ratio"] == 0.75 and cpu["min"] == 0.7 and cpu["max"] == 0.8
    assert cpu["spread"] == pytest.approx(0.1 / 0.75)
    assert row["runs"] == 3 and row["saturated_runs"] == 0 and not row["saturated"]
    assert status(run, "server CPU s per million deliveries at 1,000 x 20/s")[0] == "met"
    assert status(run, "p99 at")[0] == "met"  # 0.6x
    rss = status(run, "bookcast RSS per idle connection")
    assert rss[0] == "missed" and "24.0 KiB (1,000 subscribed connections before publishing; --idle for idle ones)" in rss[1]
    spread = status(run, "run-to-run spread")
    assert spread[0] == "missed" and "13%" in spread[1]  # 13% spread of the CPU ratio
    # and where it comes from: bookcast's own CPU moved 14..16 (13%), nats-server's not at all
    assert cpu["spread_bookcast"] == pytest.approx(2 / 15) and cpu["spread_nats"] == 0
    assert "CPU s / M deliveries: 13% (bookcast 13%, nats 0%)" in spread[1]
    md = markdown(run)
    assert "| 1,000 x 20/s | 3 (0) | 1.00 [1.00-1.00, 0%] | 0.60 [0.60-0.60, 0%] | 0.75 [0.70-0.80, 13%]" in md
    # cells without a sampled floor (results from before it existed) give no floor ratio and no clause
    assert row["floor_us"]["ratio"] is None and "floor ratios" not in spread[1]


def test_a_pair_whose_cells_found_different_floors_is_visible_beside_the_cpu_spread():
    cells = []
    # run 2's bookcast cell found the kernel floor 25% dearer (us per send + recv) and spent more CPU for it
    for n, (bk, bk_floor) in enumerate([(14.0, 8.0), (17.5, 10.0), (14.0, 8.0)]):
        cells += [cell("bookcast", 1000, rate=20.0, cpu_per_m=bk, repeat=n, floor_us=bk_floor),
                  cell("nats", 1000, rate=20.0, cpu_per_m=20.0, repeat=n, floor_us=8.0)]
    run = run_of(cells)
    [row] = run["comparisons"]
    assert row["floor_us"]["ratios"] == [1.0, 1.25, 1.0] and row["floor_us"]["bookcast"] == 8.0
    spread = status(run, "run-to-run spread")
    assert spread[0] == "missed"
    assert "CPU s / M deliveries: 25% (bookcast 25%, nats 0%); the pairs' floor ratios 1.00-1.25" in spread[1]
    assert "p99: 0% (bookcast 0%, nats 0%)" in spread[1] and "p99: 0% (bookcast 0%, nats 0%);" not in spread[1]
    md = markdown(run)
    assert "| 1.00 [1.00-1.25, 25%] |" in md and "| floor ratio |" in md and "| 8.0 |" in md


def test_saturated_pairs_are_left_out_of_the_verdict():
    cells = [cell("bookcast", 1000, cpu_per_m=30.0, repeat=0, saturated=True), cell("nats", 1000, cpu_per_m=20.0, repeat=0),
             cell("bookcast", 1000, cpu_per_m=14.0, repeat=1), cell("nats", 1000, cpu_per_m=20.0, repeat=1)]
    run = run_of(cells)
    [row] = run["comparisons"]
    assert row["saturated_runs"] == 1 and row["server_cpu_s_per_million"]["ratios"] == [0.7]
    assert status(run, "server CPU s per million deliveries at 1,000 x 100/s")[0] == "met"
    # every pair saturated: shown, marked, never judged
    run = run_of([cell("bookcast", 1000, cpu_per_m=30.0, saturated=True), cell("nats", 1000, cpu_per_m=20.0)])
    assert run["comparisons"][0]["saturated"] and run["comparisons"][0]["server_cpu_s_per_million"]["ratio"] == 1.5
    state, detail = status(run, "server CPU s per million deliveries at 1,000 x 100/s")
    assert state == "saturated" and "left out of the verdict" in detail
    assert "1.50 (sat.)" in markdown(run) and "**sat.**" in markdown(run)


def test_rate_search_finds_each_targets_highest_sustained_rate():
    cells = []
    for rate in (20.0, 100.0, 150.0, 200.0):
        cells.append(cell("bookcast", 1000, rate=rate, p99_ms=50.0 if rate < 200 else 900.0))
        cells.append(cell("nats", 1000, rate=rate, lost=0 if rate < 150 else 5))
    run = run_of(cells)
    [row] = run["rate_search"]
    assert row["bookcast"]["highest_sustained_per_s"] == 150.0 and row["nats"]["highest_sustained_per_s"] == 100.0
    assert row["nats"]["failed_at"] == {"rate_per_s": 150.0, "saturated": False} and row["ratio"] == 1.5
    state, detail = status(run, "highest rate")
    assert state == "met" and "bookcast 150/s (failed at 200/s)" in detail
    # nats-server never failed: its ceiling, and so the ratio, is unknown
    run = run_of([cell("bookcast", 1000, rate=r) for r in (20.0, 100.0)] + [cell("nats", 1000, rate=r) for r in (20.0, 100.0)])
    state, detail = status(run, "highest rate")
    assert state == "not measured" and detail.startswith("no ceiling reached")
    assert "sustained every rate tested, up to 100/s" in detail
    assert " x1." not in detail and run["rate_search"][0]["ratio"] is None  # no ceiling: nothing to compare
    assert "| 1,000 | 100 (all) | 100 (all) | - | 20, 100 |" in markdown(run)
    # nats-server failed only on a saturated machine: not judged either
    run = run_of([cell("bookcast", 1000, rate=20.0), cell("nats", 1000, rate=20.0, lost=3, saturated=True)])
    assert run["rate_search"][0]["nats"]["failed_at"]["saturated"] and status(run, "highest rate")[0] == "saturated"


def test_idle_mode_rss_and_healthy_p99_against_the_same_run_without_idle_connections():
    cells = [cell("bookcast", 20, p99_ms=10.0), cell("nats", 20, p99_ms=12.0),
             cell("bookcast", 20, p99_ms=11.0, idle=10_000, rss_kib=18.5), cell("nats", 20, p99_ms=30.0, idle=10_000,
                                                                               rss_kib=30.0)]
    run = run_of(cells)
    bk = [r for r in run["idle"] if r["target"] == "bookcast"][0]
    assert bk["p99_ratio"] == pytest.approx(1.1) and bk["idle_connected"] == 10_000
    assert status(run, "10,000 idle connections")[0] == "met"
    state, detail = status(run, "bookcast RSS per idle connection")
    assert state == "met" and "18.5 KiB (10,000 connections)" in detail
    rows = {r["idle"]: r for r in run["comparisons"]}
    assert rows[10_000]["rss_per_idle_connection_bytes"]["ratio"] == pytest.approx(18.5 / 30)
    assert "| bookcast | 10,000 | 1 | 10,000 | 0 | 18.5 | 11.00 | 10.00 | 1.10 |" in markdown(run)
    cells[2] = cell("bookcast", 20, p99_ms=25.0, idle=10_000, rss_kib=21.0)
    run = run_of(cells)
    assert status(run, "10,000 idle connections")[0] == "missed"
    assert status(run, "bookcast RSS per idle connection")[0] == "missed"


def test_not_measured_and_big_client_errors():
    run = run_of([cell("bookcast", 5000, failures=3, errors={"ConnectionError: refused": 3})])
    assert status(run, "5,000 clients")[0] == "missed" and "3 connect failures" in status(run, "5,000 clients")[1]
    for name in ("server CPU", "p99 at", "highest rate", "10,000 idle", "run-to-run"):
        found = [t["status"] for t in run["targets"] if t["target"].startswith(name)]
        assert found and set(found) == {"not measured"}, name
    assert len(run["targets"]) == 8


@pytest.mark.parametrize("targets", [("bookcast",), ("bookcast", "nats")])
def test_chart_draws_every_point_without_warnings_also_with_no_nats_cells(tmp_path, targets):
    cells = [cell(t, 20, idle=idle, cpu_per_m=cpu) for t in targets for idle, cpu in ((0, 14.0), (10_000, 30.0))]
    run = run_of(cells)
    assert bool(run["comparisons"]) == ("nats" in targets)
    path = tmp_path / "fanout.png"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chart(run, path)
    assert [str(w.message) for w in caught] == []
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hop_reading_sums_a_histogram_over_its_labels_and_reads_nothing_else():
    text = "\n".join([
        "# HELP bookcast_hop_nats_gateway_seconds NATS publish to gateway queueing.",
        "# TYPE bookcast_hop_nats_gateway_seconds histogram",
        'bookcast_hop_nats_gateway_seconds_bucket{le="0.001",venue="bench"} 3.0',
        'bookcast_hop_nats_gateway_seconds_bucket{le="+Inf",venue="bench"} 4.0',
        'bookcast_hop_nats_gateway_seconds_count{venue="bench"} 4.0',
        'bookcast_hop_nats_gateway_seconds_sum{venue="bench"} 0.5',
        'bookcast_hop_nats_gateway_seconds_bucket{le="0.001",venue="coinbase"} 1.0',
        'bookcast_hop_nats_gateway_seconds_bucket{le="+Inf",venue="coinbase"} 6.0',
        'bookcast_hop_nats_gateway_seconds_count{venue="coinbase"} 6.0',
        'bookcast_hop_nats_gateway_seconds_sum{venue="coinbase"} 1.5',
        'bookcast_hop_ingest_seconds_bucket{le="0.001",venue="bench"} 99.0',
        'bookcast_hop_ingest_seconds_sum{venue="bench"} 99.0',
        'bookcast_hop_ingest_seconds_count{venue="bench"} 99.0',
    ])
    assert hop_reading(text) == HopReading(2.0, 10, ((0.001, 4), (float("inf"), 10)))
    assert hop_reading(None) == HopReading(0.0, 0, ()) == hop_reading("")


def _reading(sum_s: float, counts: dict[float, int]) -> HopReading:
    cumulative, total = [], 0
    for le in (0.01, 0.025, 0.05, float("inf")):
        total += counts.get(le, 0)
        cumulative.append((le, total))
    return HopReading(sum_s, total, tuple(cumulative))


def test_hop_window_mean_and_p99_are_of_the_window_only():
    before = _reading(1.0, {0.01: 1000})  # a warm-up that was all fast
    # the window: 90 more under 10 ms, 10 between 25 and 50 ms; 100 observations summing to 0.9 s
    after = _reading(1.9, {0.01: 1090, 0.05: 10})
    mean_ms, p99_ms = hop_window(before, after)
    assert mean_ms == pytest.approx(9.0)
    # rank 99 of 100 is the 9th of the 10 in (25, 50] ms: 25 + 25 * 9 / 10 (histogram_quantile's interpolation)
    assert p99_ms == pytest.approx(47.5)
    # the same window read from a histogram that started empty gives the same quantile (the warm-up is not in it)
    assert hop_window(_reading(0.0, {}), _reading(0.9, {0.01: 90, 0.05: 10}))[1] == pytest.approx(47.5)
    # past the last finite bound reads as that bound; nothing observed in the window is no figure
    assert hop_window(before, _reading(3.0, {0.01: 1000, float("inf"): 2}))[1] == pytest.approx(50.0)
    assert hop_window(before, before) == (None, None)
    # a gateway that exposes no buckets (only sum and count) still gives its mean
    assert hop_window(HopReading(0.0, 0, ()), HopReading(0.5, 10, ())) == (pytest.approx(50.0), None)
