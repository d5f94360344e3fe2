"""The report's comparisons and targets, on hand-made cells (the numbers a run would produce)."""
from __future__ import annotations

from loadtest.bench.report import analyse, markdown


def cell(target, clients, *, delivered_per_s, p99_ms, rss_kib, failures=0, errors=None):
    return {"target": target, "clients": clients, "rate_per_s": 100.0, "delivered_per_s": delivered_per_s,
            "offered_per_s": 100.0 * clients, "latency_ms": {"p50": 1.0, "p99": p99_ms, "p99_9": p99_ms, "max": p99_ms},
            "spread_ms": {"p99": 1.0}, "server_cpu_s": 2.0, "server_cpu_s_per_million": 20.0,
            "upstream_nats_cpu_s": 0.5 if target == "bookcast" else None, "loadgen_cpu_s": 3.0,
            "machine_busy_pct": 90.0, "rss_per_idle_connection_bytes": rss_kib * 1024, "connect_failures": failures,
            "closed_early": 0, "errors": errors or {}, "harness_failures": [], "subscribers": clients - failures,
            "losses": {"gap_lost": 0, "resync_skipped": 0, "tail_lost": 0}, "resyncs": 0}


def run_of(cells):
    return analyse({"started": "t0", "finished": "t1", "cells": cells, "failed_cells": [],
                    "machine": {"cpus": 2, "kernel": "6", "python": "3.11", "nats_server": "v2"},
                    "config": {"instruments": 10, "duration_s": 20, "client_procs": 2, "workers": 2, "drain_s": 10,
                               "command": "bookcast bench fanout", "toggles": {"exporter": False}}})


def statuses(run):
    return [t["status"] for t in run["targets"]]


def test_targets_met_and_ratios_from_the_same_run():
    run = run_of([cell("bookcast", 1000, delivered_per_s=99_500, p99_ms=8.0, rss_kib=24),
                  cell("nats", 1000, delivered_per_s=100_000, p99_ms=5.0, rss_kib=40),
                  cell("bookcast", 5000, delivered_per_s=400_000, p99_ms=80.0, rss_kib=22)])
    [row] = run["comparisons"]
    assert row["clients"] == 1000 and row["p99_ms"]["ratio"] == 1.6 and row["delivered_per_s"]["ratio"] == 0.995
    assert statuses(run) == ["met", "met", "met", "met"]
    assert "22.0 KiB" in run["targets"][3]["detail"]  # judged at the largest client count
    assert "| 1,000 | 100 | 0.99 | 1.60 | 1.00 | 0.60 |" in markdown(run)


def test_targets_missed_and_not_measured():
    run = run_of([cell("bookcast", 1000, delivered_per_s=90_000, p99_ms=11.0, rss_kib=31),
                  cell("nats", 1000, delivered_per_s=100_000, p99_ms=5.0, rss_kib=40)])
    assert statuses(run) == ["missed", "missed", "not measured", "missed"]
    run = run_of([cell("bookcast", 5000, delivered_per_s=1, p99_ms=1, rss_kib=1, failures=3,
                       errors={"ConnectionError: refused": 3})])
    assert statuses(run) == ["not measured", "not measured", "missed", "met"]
    assert "3 connect failures" in run["targets"][2]["detail"]
