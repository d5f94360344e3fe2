"""The programs loaded for real, driven by known workloads: right series, right buckets, nobody else's calls.

Bucket expectations follow the kernel's log2 slots: slot k holds [2^(k-1), 2^k) µs (exported as le=2^k µs).
"""
from __future__ import annotations

import socket
import subprocess
import uuid

import pytest

from ebpf.collector import families
from ebpf.loader import Probes, UsageError
from ebpf.targets import TargetSpec
from feed.procs import wait_until
from tests.ebpf.conftest import Workload, one, series


def slot_of(us: float) -> int:
    return int(us).bit_length()


def test_sendto_is_counted_for_the_traced_process_only(probes):
    traced, unrelated = Workload("sendto", "500"), Workload("sendto", "1500")
    try:
        traced.trace(probes, "w-sendto")
        traced.go(), unrelated.go()
        traced.finish(), unrelated.finish()
    finally:
        traced.kill(), unrelated.kill()
    sendto = one(probes, "bookcast_ebpf_syscall_latency_seconds", role="w-sendto", syscall="sendto")
    assert sendto.count == 500                                   # not 2000: the other process is not ours
    assert sum(sendto.slots[:slot_of(1000)]) >= 490              # a loopback UDP sendto takes < 1 ms
    sizes = one(probes, "bookcast_ebpf_socket_send_size_bytes", role="w-sendto")
    assert sizes.slots[slot_of(64)] == 500 and sizes.total == 500 * 64
    assert not series(probes, "bookcast_ebpf_syscall_latency_seconds", role="w-sendto", syscall="recvfrom")


def test_blocking_recv_lands_in_its_timeout_bucket(probes):
    w = Workload("recv", "10", "22")
    try:
        w.trace(probes, "w-recv").go()
        w.finish()
    finally:
        w.kill()
    recv = one(probes, "bookcast_ebpf_syscall_latency_seconds", role="w-recv", syscall="recvfrom")
    assert recv.count == 10
    assert sum(recv.slots[:slot_of(22_000)]) == 0                # none shorter than the 22 ms timeout
    assert recv.slots[slot_of(22_000)] >= 5                      # [16.4, 32.8) ms, unless the machine stalls
    assert 10 * 22e6 <= recv.total < 10 * 200e6                  # sum in ns


def test_sleeping_thread_is_off_cpu_interruptible(probes):
    w = Workload("sleep", "150")
    try:
        w.trace(probes, "w-sleep").go()
        w.finish()
    finally:
        w.kill()
    off = one(probes, "bookcast_ebpf_offcpu_seconds", role="w-sleep", state="interruptible")
    assert sum(off.slots[slot_of(150_000):]) >= 1               # the 150 ms sleep, in [131, 262) ms or later
    assert sum(s.count for s in series(probes, "bookcast_ebpf_runqueue_latency_seconds", role="w-sleep")) >= 1


def test_cpu_contention_shows_as_runqueue_latency(probes):
    w = Workload("contend", "300")
    try:
        w.trace(probes, "w-contend").go()
        w.finish()
    finally:
        w.kill()
    runq = one(probes, "bookcast_ebpf_runqueue_latency_seconds", role="w-contend")
    assert sum(runq.slots[slot_of(250):]) >= 1                   # waited a slice for the spinning sibling
    preempted = one(probes, "bookcast_ebpf_offcpu_seconds", role="w-contend", state="runnable")
    assert preempted.count >= 1


def test_socket_queueing_measures_unread_data(probes):
    if not series(probes, "bookcast_ebpf_socket_queue_seconds") and \
            "bookcast_ebpf_socket_queue_seconds" in probes.skipped:
        pytest.skip(probes.skipped["bookcast_ebpf_socket_queue_seconds"])
    w = Workload("queue", "10", "20")
    try:
        w.trace(probes, "w-queue").go()
        w.finish()
    finally:
        w.kill()
    q = one(probes, "bookcast_ebpf_socket_queue_seconds", role="w-queue")
    # each of the 10 messages waited >= 20 ms unread (the first read only learns the socket); the peer's FIN
    # may add one short sample (data_ready on close, read at once), never more
    assert sum(q.slots[slot_of(20_000):]) == 10, q.slots
    assert q.count - 10 <= 1 and q.total >= 10 * 20e6, q.slots


def test_tcp_retransmits_and_srtt_on_the_listening_port(probes):
    w = Workload("tcp", "3", "50")
    table = f"bookcast_ebpf_test_{uuid.uuid4().hex[:8]}"
    client = socket.create_connection(("127.0.0.1", w.port))
    try:
        w.trace(probes, "w-tcp")
        assert probes.ports.get(w.port) == "w-tcp"                 # found from the process's listening socket
        # drop the server's segments on the way in: they leave (so they are in flight) but are never acked
        nft = subprocess.run(["nft", "-f", "-"], input=f"table inet {table} {{\n chain in {{\n type filter hook "
                             f"input priority 0;\n tcp sport {w.port} drop\n }}\n}}\n", text=True, capture_output=True)
        if nft.returncode != 0:
            pytest.skip(f"nft cannot drop packets here: {nft.stderr.strip()}")
        try:
            w.go()
            wait_until(lambda: series(probes, "bookcast_ebpf_tcp_retransmits_total", role="w-tcp"), 10,
                       what="a retransmit on the dropped port")
        finally:
            subprocess.run(["nft", "delete", "table", "inet", table], check=True)
        while client.recv(65536):
            pass
        w.finish()
    finally:
        client.close()
        w.kill()
    assert one(probes, "bookcast_ebpf_tcp_retransmits_total", role="w-tcp").total >= 1
    srtt = one(probes, "bookcast_ebpf_tcp_srtt_seconds", role="w-tcp")
    assert srtt.count >= 1 and srtt.total > 0


def test_exported_families_use_catalog_buckets_in_seconds(probes):
    w = Workload("recv", "2", "22")
    try:
        w.trace(probes, "w-export").go()
        w.finish()
    finally:
        w.kill()
    fam = next(f for f in families(probes.series()) if f.name == "bookcast_ebpf_syscall_latency_seconds")
    samples = {(s.name, s.labels.get("le")): s.value for s in fam.samples
               if s.labels.get("role") == "w-export" and s.labels.get("syscall") == "recvfrom"}
    assert samples[("bookcast_ebpf_syscall_latency_seconds_count", None)] == 2
    assert samples[("bookcast_ebpf_syscall_latency_seconds_bucket", "0.016384")] == 0   # 2^14 µs
    assert samples[("bookcast_ebpf_syscall_latency_seconds_bucket", "+Inf")] == 2
    assert 0.044 <= samples[("bookcast_ebpf_syscall_latency_seconds_sum", None)] < 0.4


def test_an_unknown_syscall_is_a_usage_error_before_anything_loads(probes):
    p = Probes(TargetSpec(), syscalls=("sendto", "no_such_call"))
    with pytest.raises(UsageError, match="no_such_call"):
        p.open()
    assert p.loaded == []


@pytest.mark.parametrize("defines", [{"SYSCALL_EXIT_FILTER": 0}, {"SYSCALL_EXIT_FILTER": 1},
                                     {"SYSCALL_ATTACH_PER_SYSCALL": 1, "TRACE_SENDTO": 1, "TRACE_RECVFROM": 1}],
                         ids=["task-storage", "thread-bit", "per-syscall"])
def test_every_exit_filter_counts_exactly(probes, defines):
    """500 traced sendto calls count 500 while an untraced process makes 1,500, whichever filter is compiled."""
    with Probes(TargetSpec(), programs=["syscalls"], syscalls=("sendto", "recvfrom"),
                defines={"syscalls": defines}) as mine:
        traced, unrelated = Workload("sendto", "500"), Workload("sendto", "1500")
        try:
            traced.trace(mine, "w-filter")
            traced.go(), unrelated.go()
            traced.finish(), unrelated.finish()
        finally:
            traced.kill(), unrelated.kill()
        assert one(mine, "bookcast_ebpf_syscall_latency_seconds", role="w-filter", syscall="sendto").count == 500
        assert not series(mine, "bookcast_ebpf_syscall_latency_seconds", role="w-filter", syscall="recvfrom")
