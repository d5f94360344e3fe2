"""The kernel floor of a delivery (``loadtest.bench.floor``): a real loopback TCP pair, timed in CPU."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loadtest.bench import floor


def test_a_loopback_send_and_recv_costs_more_than_the_cheapest_system_call():
    measured = floor.measure(payload_bytes=300, messages=2_000, trials=2)
    assert measured.send_recv_us > measured.syscall_us > 0
    assert (measured.payload_bytes, measured.messages, measured.trials) == (300, 2_000, 2)
    assert measured.cores(100_000) == pytest.approx(100_000 * measured.send_recv_us / 1e6)
    assert floor.LoopbackFloor(**measured.to_dict()) == measured  # what results.json keeps rebuilds it


def test_a_message_larger_than_one_read_is_still_read_whole():
    measured = floor.measure(payload_bytes=200_000, messages=20, trials=1)
    assert measured.send_recv_us > 0


@pytest.mark.parametrize("bad", [{"payload_bytes": 0}, {"messages": 0}, {"trials": -1}])
def test_non_positive_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="must be >= 1"):
        floor.measure(**bad)


def test_the_command_prints_json_with_the_cores_a_rate_takes_and_exits_2_on_bad_usage():
    run = lambda *a: subprocess.run([sys.executable, "-m", "loadtest.bench.floor", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    ok = run("--messages", "1000", "--trials", "1", "--rate", "100000")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["cores"] == pytest.approx(100_000 * out["send_recv_us"] / 1e6, abs=0.001) and out["machine_pct"] > 0
    bad = run("--messages", "0")
    assert bad.returncode == 2 and "must be >= 1" in bad.stderr
