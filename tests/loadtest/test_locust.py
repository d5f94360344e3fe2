"""A short headless locust run (a subprocess: locust monkey-patches with gevent) against a real stack."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCUST = Path(sys.executable).parent / "locust"
MIX = ["coinbase:SKL-USD", "coinbase:DASH-BTC", "coinbase:SKL-BTC"]


MIX_ARGS = ["--bc-instruments", ",".join(MIX), "--bc-weights", "3,2,1", "--bc-per-user", "2", "--bc-channels", "book,trades"]
DISCOVER_ARGS = ["--bc-per-user", "1000"]  # no list: every instrument the gateway lists / the directory announces


@pytest.mark.e2e
@pytest.mark.parametrize("mix_args", [MIX_ARGS, DISCOVER_ARGS], ids=["weighted-mix", "discovered"])
def test_headless_locust_receives_verified_books_from_both_targets_without_failures(ws_stack, tmp_path, mix_args):
    prefix = tmp_path / "locust"
    cmd = [str(LOCUST), "-f", "loadtest/locustfile.py", "--headless", "-u", "4", "-r", "4", "-t", "6s",
           "--stop-timeout", "2", "--csv", str(prefix), "--only-summary", "BookcastUser", "NatsWsUser",
           "--bc-url", ws_stack.ws_url, "--bc-nats-ws-url", f"ws://127.0.0.1:{ws_stack.nats.websocket_port}", *mix_args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    for kind in ("WS", "NATS-WS"):
        assert int(rows[(kind, "snapshot")]["Request Count"]) >= 2, (kind, sorted(rows))  # 2 users x >= 1 book
        assert int(rows[(kind, "delta")]["Request Count"]) > 0, (kind, sorted(rows))
        assert float(rows[(kind, "delta")]["Median Response Time"]) > 0
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0, sorted(rows)
    assert not any(name.startswith(("gap", "resync", "error", "timeout", "closed")) for _, name in rows)
