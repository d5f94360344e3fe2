"""The fan-out benchmark checks itself: a CI-sized run on real processes (idle-connections mode: each target
with 0 and with 30 idle connections beside the healthy subscribers), every message accounted for."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def bench(*args: str, env: dict[str, str] | None = None, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "feed.cli", "bench", "fanout", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s, env=env)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    proc = bench("--quick", "--clients", "24", "--workers", "2", "--idle", "30", "--out", str(out), timeout_s=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.mark.e2e
def test_every_published_message_is_delivered_or_counted_lost(quick_run):
    out, _ = quick_run
    run = json.loads((out / "results.json").read_text())
    assert run["failed_cells"] == []
    assert sorted((c["target"], c["idle"]) for c in run["cells"]) == [("bookcast", 0), ("bookcast", 30), ("nats", 0),
                                                                     ("nats", 30)]
    cells = {c["target"]: c for c in run["cells"] if not c["idle"]}
    for c in run["cells"]:
        target = c["target"]
        assert c["subscribers"] == 24 and c["connect_failures"] == 0, target
        assert c["published"] == round(50 * 3)
        owed = c["published"] * c["subscribers"]
        assert c["owed"] == owed and c["delivered"] + sum(c["losses"].values()) == owed, target
        assert c["gaps"] == 0 and c["dups"] == 0 and c["harness_failures"] == [] and c["errors"] == {}, target
        lat = c["latency_ms"]
        assert 0 < lat["p50"] <= lat["p99"] <= lat["p99_9"] <= lat["max"], target
        assert c["delivered_per_s"] > 0 and c["server_cpu_s"] >= 0 and c["rss_idle_bytes"] > 0
        assert c["harness_cpu_s"] > 0 and 0 <= c["others_busy_pct"] <= 100 and isinstance(c["saturated"], bool)
        assert c["saturated"] == (c["machine_busy_pct"] > 90) and len(c["load_average_1m"]) == 2
        if c["idle"]:  # every idle connection held to the end, and RSS per idle connection is theirs
            assert c["idle_connected"] == 30 and c["idle_closed_early"] == 0, target
            assert c["rss_per_idle_connection_bytes"] == (c["rss_idle_bytes"] - c["rss_base_bytes"]) / 30
    bookcast = cells["bookcast"]
    assert bookcast["losses"] == {"gap_lost": 0, "resync_skipped": 0, "tail_lost": 0}
    assert bookcast["delivered"] == bookcast["owed"]
    assert bookcast["spread_ms"]["messages"] == bookcast["published"]  # each message reached several clients
    assert bookcast["upstream_nats_cpu_s"] is not None and bookcast["workers"] == 2


@pytest.mark.e2e
def test_the_peer_comparison_and_report_files_are_written(quick_run):
    out, proc = quick_run
    assert [Path(line) for line in proc.stdout.split()] == [out / "results.json", out / "report.md", out / "fanout.png"]
    run = json.loads((out / "results.json").read_text())
    rows = {r["idle"]: r for r in run["comparisons"]}
    assert set(rows) == {0, 30}
    for row in rows.values():
        assert row["clients"] == 24 and row["rate_per_s"] == 50 and row["runs"] == 1
        for figure in ("delivered_per_s", "p99_ms", "rss_per_idle_connection_bytes"):
            assert row[figure]["ratio"] == pytest.approx(row[figure]["bookcast"] / row[figure]["nats"]), figure
    assert {r["target"] for r in run["idle"]} == {"bookcast", "nats"}
    for r in run["idle"]:
        assert r["p99_ratio"] == pytest.approx(r["p99_ms"] / r["p99_without_ms"])
    assert {t["status"] for t in run["targets"]} <= {"met", "missed", "saturated", "not measured"}
    assert len(run["targets"]) == 8
    md = (out / "report.md").read_text()
    assert "| bookcast | 24 | 50 | 0 | 1 |" in md and "| nats | 24 | 50 | 30 | 1 |" in md and "## Targets" in md
    assert "| 24 x 50/s + 30 idle | 1 (" in md.split("same run")[1] and "## Idle connections" in md
    with Image.open(out / "fanout.png") as png:
        assert png.format == "PNG" and png.width > 800 and png.height > 300
    assert "[1/4] bookcast clients=24" in proc.stderr and "[4/4] nats clients=24 rate=50/s idle=30" in proc.stderr
    # the kernel floor of the run's machine, in the log, the results and every cell's row
    floor = run["machine"]["loopback_floor"]
    assert floor["send_recv_us"] > floor["syscall_us"] > 0 and floor["payload_bytes"] == 300
    assert "kernel floor: a loopback TCP send + recv of a 300-byte message costs" in proc.stderr
    assert "24 x 50/s takes" in proc.stderr and "**floor %**" in md
    pct = 100 * 24 * 50 * floor["send_recv_us"] / 1e6 / run["machine"]["cpus"]
    cell_rows = [line for line in md.splitlines() if line.startswith("| bookcast | 24 | 50 | 0 |")]
    assert cell_rows and cell_rows[0].split(" | ")[16] == f"{pct:.0f}"
    # the servers' run-queue wait per run, in every cell and its row (the upstream NATS's too for bookcast)
    for c in run["cells"]:
        assert c["server_runqueue_wait_s"] >= 0 and c["server_runs"] > 0, c["target"]
        assert c["server_wait_per_run_us"] == pytest.approx(1e6 * c["server_runqueue_wait_s"] / c["server_runs"])
        assert c["loadgen_wait_per_run_us"] is not None
        assert (c["upstream_wait_per_run_us"] is not None) == (c["target"] == "bookcast")
    bookcast_cell = next(c for c in run["cells"] if c["target"] == "bookcast" and not c["idle"])
    assert cell_rows[0].split(" | ")[18] == f"{bookcast_cell['server_wait_per_run_us']:.0f}"
    assert "**wait / run us**" in md and "us for a CPU per run" in proc.stderr
    # how often the server was preempted: a count that moves (clients woken by its writes take its CPU)
    assert all(c["server_preempted_per_s"] >= 0 for c in run["cells"])
    assert any(c["server_preempted_per_s"] > 0 for c in run["cells"])
    assert cell_rows[0].split(" | ")[19] == f"{bookcast_cell['server_preempted_per_s']:,.0f}"
    assert "**preempted/s**" in md and "/s), harness" in proc.stderr
    # the gateway's own NATS -> fan-out hop over the window, for bookcast cells only
    for c in run["cells"]:
        assert (c["gateway_hop_mean_ms"] is not None) == (c["target"] == "bookcast"), c["target"]
        assert (c["gateway_hop_p99_ms"] is not None) == (c["target"] == "bookcast"), c["target"]
    assert 0 < bookcast_cell["gateway_hop_mean_ms"] < bookcast_cell["latency_ms"]["max"]
    assert 0 < bookcast_cell["gateway_hop_p99_ms"] <= 10_000  # inside the histogram's finite buckets
    assert cell_rows[0].split(" | ")[20] == (f"{bookcast_cell['gateway_hop_mean_ms']:.2f} / "
                                             f"{bookcast_cell['gateway_hop_p99_ms']:.1f}")
    nats_row = next(line for line in md.splitlines() if line.startswith("| nats | 24 | 50 | 0 |"))
    assert nats_row.split(" | ")[20] == "- / -" and "NATS -> gateway fan-out" in proc.stderr
    assert re.search(r"NATS -> gateway fan-out [\d.]+ ms mean, p99 [\d.]+ ms\)", proc.stderr)
    # the kernel floor as each cell found it, sampled through its window on the bench's own thread
    for c in run["cells"]:
        assert c["floor_samples"] >= 1 and 0.5 < c["floor_us"] < 5_000, c
    assert cell_rows[0].split(" | ")[21] == f"{bookcast_cell['floor_us']:.1f}"
    assert re.search(r"floor [\d.]+ us, machine busy", proc.stderr)


def test_an_overhead_toggle_that_cannot_run_fails_clearly(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OTEL_EXPORTER_OTLP_ENDPOINT"}
    proc = bench("--quick", "--otlp", "on", "--out", str(tmp_path / "out"), env=env, timeout_s=120)
    assert proc.returncode == 2
    assert "--otlp on:" in proc.stderr
    assert "not available yet" in proc.stderr or "OTEL_EXPORTER_OTLP_ENDPOINT" in proc.stderr
    assert not (tmp_path / "out").exists()
