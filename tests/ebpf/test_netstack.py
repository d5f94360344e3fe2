"""The network-stack programs loaded for real (netstack, listenq, softirq): each known workload moves its
series, and a workload that should not move it does not. Bucket arithmetic as in test_probes.py."""
from __future__ import annotations

import socket

from feed.procs import wait_until
from tests.ebpf.conftest import Workload, one, series
from tests.ebpf.test_probes import slot_of


def _proc_queued(port: int, gone: int | None = None) -> int:
    """Accept-queue length of the LISTEN socket on ``port`` as the kernel reports it (rx_queue); ``gone``
    when there is no such socket (else that is an error)."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        cols = line.split()
        if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
            return int(cols[4].split(":")[1], 16)
    if gone is not None:
        return gone
    raise AssertionError(f"no listening socket on port {port}")


def test_netstack_latency_measures_a_late_read_of_a_tcp_segment(probes):
    w = Workload("netrecv", "8", "25")
    try:
        w.trace(probes, "w-netlate").go()
        w.finish()
    finally:
        w.kill()
    lat = one(probes, "bookcast_ebpf_netstack_latency_seconds", role="w-netlate")
    assert lat.count == 8                                          # one per segment read
    assert sum(lat.slots[:slot_of(25_000)]) == 0                   # none shorter than the 25 ms it sat unread
    assert 8 * 25e6 <= lat.total < 8 * 250e6


def test_netstack_latency_of_a_prompt_reader_is_small(probes):
    w = Workload("netrecv", "200", "0")
    try:
        w.trace(probes, "w-netfast").go()
        w.finish()
    finally:
        w.kill()
    lat = one(probes, "bookcast_ebpf_netstack_latency_seconds", role="w-netfast")
    assert lat.count == 200
    assert sum(lat.slots[:slot_of(1000)]) >= 150                   # mostly under 1 ms, unless the host stalls


def test_netstack_ignores_unix_sockets(probes):
    w = Workload("unixrecv", "8", "25")
    try:
        w.trace(probes, "w-unix").go()
        w.finish()
    finally:
        w.kill()
    assert series(probes, "bookcast_ebpf_socket_send_size_bytes", role="w-unix")   # it did run and send
    assert not series(probes, "bookcast_ebpf_netstack_latency_seconds", role="w-unix")


def _backlog(probes, role: str, accept_ms: int, clients: int = 5, backlog: int = 16, *extra: str):
    w = Workload("backlog", str(backlog), str(clients), str(accept_ms), *extra)
    conns: list[socket.socket] = []
    w.trace(probes, role)
    assert probes.listen[w.port][0] == role and probes.listen[w.port][2] == backlog + 1   # backlog B -> B + 1 fit
    return w, conns, w.port


def test_a_slow_accept_fills_the_accept_queue(probes):
    w, conns, port = _backlog(probes, "w-backlog", 300)
    try:
        for _ in range(5):
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        wait_until(lambda: _proc_queued(port) == 5, 10, what="5 connections queued")
        length = one(probes, "bookcast_ebpf_accept_queue_length", role="w-backlog", port=str(port))
        assert length.total == 5                                   # the in-kernel count agrees with /proc
        w.go()                                                     # now accept them, 300 ms apart
        w.finish()                                                 # no refresh since: only accept() counted down
        assert one(probes, "bookcast_ebpf_accept_queue_length", role="w-backlog", port=str(port)).total == 0
    finally:
        for c in conns:
            c.close()
        w.kill()
    arrivals = one(probes, "bookcast_ebpf_accept_queue_length_at_arrival", role="w-backlog", port=str(port))
    assert arrivals.count == 5 and arrivals.total == 1 + 2 + 3 + 4 + 5
    assert (arrivals.slots[1], arrivals.slots[2], arrivals.slots[3]) == (1, 2, 2)   # 1 | 2,3 | 4,5
    assert not series(probes, "bookcast_ebpf_accept_queue_overflows_total", port=str(port))
    limit = one(probes, "bookcast_ebpf_accept_queue_limit", role="w-backlog", port=str(port))
    assert limit.total == 17


def test_a_prompt_accept_keeps_the_accept_queue_short(probes):
    w, conns, port = _backlog(probes, "w-accepting", 0)
    try:
        w.go()                                                     # accepting before anyone connects
        for _ in range(5):
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            wait_until(lambda: _proc_queued(port, gone=0) == 0, 10, what="connection accepted")
        w.finish()
    finally:
        for c in conns:
            c.close()
        w.kill()
    arrivals = one(probes, "bookcast_ebpf_accept_queue_length_at_arrival", role="w-accepting", port=str(port))
    assert arrivals.count == 5 and arrivals.slots[1] == 5          # each found only itself
    assert one(probes, "bookcast_ebpf_accept_queue_length", role="w-accepting", port=str(port)).total == 0


def test_net_rx_softirq_runs_on_a_loopback_sender_and_not_on_a_quiet_process(probes):
    flood, quiet = Workload("udpflood", "5000"), Workload("devnull", "5000")
    try:
        flood.trace(probes, "w-flood")
        quiet.trace(probes, "w-quiet")
        flood.go(), quiet.go()
        flood.finish(), quiet.finish()
    finally:
        flood.kill(), quiet.kill()
    ran = one(probes, "bookcast_ebpf_softirq_run_seconds", role="w-flood", vec="net_rx")
    assert ran.count >= 1000 and ran.total > 0                    # the receive side ran in the sender's context
    waited = one(probes, "bookcast_ebpf_softirq_latency_seconds", role="w-flood", vec="net_rx")
    assert waited.count >= 1000
    quiet_runs = sum(s.count for s in series(probes, "bookcast_ebpf_softirq_run_seconds", role="w-quiet"))
    assert quiet_runs <= 50                                        # only what other traffic's interrupts brought
    assert series(probes, "bookcast_ebpf_softirq_run_seconds", role="host", vec="net_rx") or True



def test_a_final_ack_that_finds_the_accept_queue_full_counts_an_overflow(probes):
    """Backlog 1 (2 fit) with TCP_DEFER_ACCEPT: the 4 handshakes wait as requests until their first data,
    so all 4 SYNs saw an empty queue; then each client sends a byte: 2 children join the queue and the
    others' segments are dropped with TCP_LISTEN_OVERFLOW (their clients retransmit; nothing is accepted)."""
    w, conns, port = _backlog(probes, "w-overflow", 0, 0, 1, "defer")
    try:
        for _ in range(4):
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        for c in conns:
            c.send(b"x")
        wait_until(lambda: sum(s.total for s in series(probes, "bookcast_ebpf_accept_queue_overflows_total",
                                                        port=str(port))) >= 2, 15,
                   what="two accept-queue overflows on the port", interval_s=0.1)
        assert _proc_queued(port) == 2
        assert one(probes, "bookcast_ebpf_accept_queue_length", role="w-overflow", port=str(port)).total == 2
    finally:
        for c in conns:
            c.close()
        w.kill()
    overflows = one(probes, "bookcast_ebpf_accept_queue_overflows_total", role="w-overflow", port=str(port))
    assert overflows.total >= 2                                    # the 3rd and 4th, at least once each
