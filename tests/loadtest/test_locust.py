"""A short headless locust run (a subprocess: locust monkey-patches with gevent) against a real stack."""
from __future__ import annotations

import json
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
    # the stats come from --json-file, written from the final stats at shutdown; the CSV is written by a
    # greenlet once a second, and on a loaded machine its last write could predate every request
    cmd = [str(LOCUST), "-f", "loadtest/locustfile.py", "--headless", "-u", "4", "-r", "4", "-t", "6s",
           "--stop-timeout", "2", "--json-file", str(prefix), "--only-summary", "BookcastUser", "NatsWsUser",
           "--bc-url", ws_stack.ws_url, "--bc-nats-ws-url", f"ws://127.0.0.1:{ws_stack.nats.websocket_port}", *mix_args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    entries = json.loads(Path(f"{prefix}.json").read_text())
    rows = {(e["method"], e["name"]): e for e in entries}
    for kind in ("WS", "NATS-WS"):
        assert rows.get((kind, "snapshot"), {}).get("num_requests", 0) >= 2, (kind, sorted(rows))  # 2 users x >= 1 book
        assert rows.get((kind, "delta"), {}).get("num_requests", 0) > 0, (kind, sorted(rows))
        assert rows[(kind, "delta")]["total_response_time"] > 0
    assert sum(e["num_failures"] for e in entries) == 0, sorted(rows)
    assert not any(name.startswith(("gap", "resync", "error", "timeout", "closed")) for _, name in rows)
