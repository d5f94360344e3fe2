"""The verdict's rules, fed synthetic windows (pure): skew apart, each cause, the minimum, stability."""
from __future__ import annotations

import numpy as np
import pytest

from exporter.latency import PATH_HOPS, Hop, hops_ns, skewed
from exporter.verdict import Cause, HostContext, Params, clock_offset_ns, judge, skew_of

MS = 1e6
N = 2000


def window(seed: int = 1, n: int = N, **shift_ms: float) -> tuple[dict[Hop, np.ndarray], np.ndarray]:
    """A quiet stack: the upstream skewed like the bundled recording (-13 ms), the rest sub-millisecond;
    ``shift_ms`` adds a fixed delay to named hops. One-second blocks of 200 messages."""
    rng = np.random.default_rng(seed)
    values = {Hop.UPSTREAM: rng.normal(-13 * MS, 4 * MS, n), Hop.INGEST: rng.exponential(0.1 * MS, n),
              Hop.NATS_GATEWAY: rng.exponential(0.5 * MS, n), Hop.GATEWAY_QUEUE: np.full(n, np.nan),
              Hop.NETWORK: rng.exponential(0.3 * MS, n), Hop.READER: rng.exponential(0.2 * MS, n)}
    for name, ms in shift_ms.items():
        values[Hop(name)] = values[Hop(name)] + ms * MS
    return values, np.arange(n) // 200


QUIET = HostContext("psi", 0.1, None, 0.05)
STARVED = HostContext("psi", 0.97, None, 0.8)


def test_hops_split_the_client_side_and_flag_skew():
    msg = {"ts_event_ns": 100, "ts_ingest_ns": 90, "ts_publish_ns": 95, "ts_send_ns": 200, "ts_write_ns": 230}
    hops = hops_ns(msg, recv_ns=260, read_ns=300)
    assert hops == {Hop.UPSTREAM: -10, Hop.INGEST: 5, Hop.NATS_GATEWAY: 105, Hop.GATEWAY_QUEUE: 30,
                    Hop.NETWORK: 30, Hop.READER: 40, Hop.CLIENT: 60, Hop.E2E: 200}
    del msg["ts_write_ns"]
    no_write = hops_ns(msg, recv_ns=260)
    assert Hop.GATEWAY_QUEUE not in no_write and Hop.READER not in no_write and no_write[Hop.NETWORK] == 60
    assert skewed(-1) and skewed(3601 * 10**9) and not skewed(0) and not skewed(5 * 10**9)


def test_a_skewed_hop_is_counted_apart_with_its_offset_and_not_used():
    values, blocks = window()
    s = skew_of(values[Hop.UPSTREAM], 200)
    assert not s.measured and s.share > 0.99 and 11 * MS < s.offset_ns < 15 * MS and "clock skew" in s.why_not
    assert clock_offset_ns(np.array([1.0, 2.0, 3.0])) == 0.0
    v = judge(values, blocks, QUIET)
    assert v.cause is Cause.HEALTHY and Hop.UPSTREAM not in v.shares
    assert "not measured: upstream" in v.text and "clock skew" in v.text
    assert v.samples == N and v.interval[0] <= v.value <= v.interval[1] and v.agreement == 1.0


@pytest.mark.parametrize("hop,cause,ours", [
    ("upstream", Cause.UPSTREAM, False), ("ingest", Cause.INGEST, True), ("nats_gateway", Cause.NATS_GATEWAY, True),
    ("reader", Cause.READER, False), ("network", Cause.NETWORK, False)])
def test_a_steady_delay_names_its_hop(hop, cause, ours):
    values, blocks = window(**{hop: 150 + (13 if hop == "upstream" else 0)})
    v = judge(values, blocks, QUIET)
    assert v.cause is cause and v.culprit is Hop(hop) and v.ours is ours, v.text
    assert 140 * MS <= v.interval[0] <= v.value <= v.interval[1] <= 160 * MS and v.samples == N


def test_a_producer_stamped_fault_wins_over_a_starved_readers_backlog():
    values, blocks = window(nats_gateway=150, network=400)
    assert judge(values, blocks, STARVED).cause is Cause.NATS_GATEWAY


def test_a_starved_host_and_reader_is_host_cpu_not_the_reader():
    values, blocks = window(reader=300)
    v = judge(values, blocks, STARVED)
    assert v.cause is Cause.HOST_CPU and v.ours is False and "starved" in v.text
    assert judge(values, blocks, QUIET).cause is Cause.READER


def test_a_spread_tail_on_a_starved_host_is_host_cpu_and_otherwise_its_owner():
    values, blocks = window()
    rng = np.random.default_rng(7)
    burst = rng.random(N) < 0.05  # backlog: 5 % of messages wait 200-400 ms in the gateway, no floor
    values[Hop.NATS_GATEWAY] = values[Hop.NATS_GATEWAY] + burst * rng.uniform(200, 400, N) * MS
    starved = judge(values, blocks, STARVED)
    assert starved.cause is Cause.HOST_CPU and "100 ms budget" in starved.text
    quiet = judge(values, blocks, QUIET)
    assert quiet.cause is Cause.NATS_GATEWAY and quiet.figure == "tail share" and quiet.value > 0.9


def test_below_the_minimum_it_says_not_enough_data():
    values, blocks = window(n=150)
    v = judge(values, blocks, QUIET)
    assert v.cause is Cause.NOT_ENOUGH_DATA and v.culprit is None and "150" in v.text
    assert judge({}, np.zeros(0), QUIET).cause is Cause.NOT_ENOUGH_DATA


def test_an_undecided_window_says_not_enough_data_rather_than_guess():
    # two hops share the tail about equally: resamples disagree between mixed and either hop
    values, blocks = window()
    rng = np.random.default_rng(3)
    for hop in (Hop.NATS_GATEWAY, Hop.NETWORK):
        values[hop] = values[hop] + (rng.random(N) < 0.02) * 150 * MS
    v = judge(values, blocks, QUIET)
    assert v.cause in (Cause.MIXED, Cause.NOT_ENOUGH_DATA), v.text
    if v.cause is Cause.NOT_ENOUGH_DATA:
        assert "resamples agree" in v.text


def test_the_same_window_gives_the_same_verdict_every_time():
    values, blocks = window(ingest=120)
    verdicts = {(v.cause, v.value, v.interval, v.agreement) for v in (judge(values, blocks, QUIET) for _ in range(3))}
    assert len(verdicts) == 1


def test_every_path_hop_has_a_name_and_the_json_is_complete():
    v = judge(*window(ingest=120), QUIET)
    body = v.to_json()
    assert body["cause"] == "ingest" and body["ours"] is True and body["host"]["starved"] is False
    assert set(body["skew"]) == {h.value for h in PATH_HOPS} and body["next_steps"]
    assert Params().budget_ns > Params().steady_ns

    from exporter.report import BUDGET_MS
    assert BUDGET_MS * 1e6 == Params().budget_ns  # the command line's default is the verdict's


def test_host_context_from_ebpf_and_psi():
    from exporter.probe import parse_runqueue, read_cpu_pressure_us

    text = ('bookcast_ebpf_runqueue_latency_seconds_sum{role="gateway"} 0.5\n'
            'bookcast_ebpf_runqueue_latency_seconds_count{role="gateway"} 100\n'
            'bookcast_ebpf_runqueue_latency_seconds_sum{role="ingest"} 0.25\n'
            'bookcast_ebpf_runqueue_latency_seconds_count{role="ingest"} 50\n'
            'bookcast_ebpf_runqueue_latency_seconds_bucket{role="ingest",le="+Inf"} 50\n')
    assert parse_runqueue(text) == (0.75, 150)
    assert HostContext("ebpf", 0.99, 0.001).starved is False  # eBPF decides when it runs: 1 ms is not starved
    assert HostContext("ebpf", 0.1, 0.005).starved is True
    assert HostContext("psi", 0.6).starved and not HostContext("psi", 0.3).starved and not HostContext().starved
    assert read_cpu_pressure_us("/nonexistent") == 0
    assert read_cpu_pressure_us() >= 0
