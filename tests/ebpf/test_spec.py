"""Specs against the catalog, planning on kernels without some tracepoints, unit conversion, role scan."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ebpf.collector import prometheus_buckets
from ebpf.spec import PROGRAMS_DIR, SpecError, catalog_problems, load_programs, plan, print_symbols
from ebpf.targets import TargetSpec, role_of
from feed.catalog import CATALOG, naming_problems

REPO = Path(__file__).resolve().parents[2]


def test_every_spec_metric_is_in_the_catalog_with_its_labels_and_log2_buckets():
    _, programs = load_programs()
    assert {p.name for p in programs} == {"syscalls", "sched", "tcp", "sockq", "netstack", "listenq", "softirq"}
    named = {m.metric for p in programs for m in p.metrics}
    assert named and all(name in CATALOG for name in named)
    assert [problem for p in programs for problem in catalog_problems(p)] == []
    assert all(not naming_problems(CATALOG[n]) for n in named | {"bookcast_ebpf_up", "bookcast_ebpf_traced_processes"})
    for p in programs:
        assert p.source.is_file() and p.source.parent == PROGRAMS_DIR


def test_a_metric_naming_something_outside_the_catalog_is_refused():
    header, programs = load_programs()
    prog = programs[0]
    bad = dataclasses.replace(prog, metrics=(dataclasses.replace(prog.metrics[0], metric="bookcast_ebpf_nope_seconds"),))
    assert "not in feed/catalog.py" in catalog_problems(bad)[0]
    with pytest.raises(SpecError):
        plan(bad, header, {tp.event for tp in prog.tracepoints})


def _program(name: str):
    header, programs = load_programs()
    return header, next(p for p in programs if p.name == name)


def test_plan_passes_limits_as_d_flags_from_spec_and_catalog():
    header, sched = _program("sched")
    p = plan(sched, header, {tp.event for tp in sched.tracepoints})
    flags = set(p.cflags)
    assert f"-DHIST_SLOTS={len(CATALOG['bookcast_ebpf_offcpu_seconds'].buckets)}" in flags
    assert f"-DMAX_PROCESSES={header['MAX_PROCESSES']}" in flags
    assert {"-DSTATE_RUNNABLE=0", "-DSTATE_INTERRUPTIBLE=1", "-DSTATE_UNINTERRUPTIBLE=2", "-DSTATE_OTHER=3"} <= flags
    assert not p.skipped and len(p.metrics) == 2


@pytest.mark.parametrize("missing, exported, have_flags", [
    (set(), {"bookcast_ebpf_socket_queue_seconds", "bookcast_ebpf_socket_send_size_bytes"},
     {"-DHAVE_SK_DATA_READY=1", "-DHAVE_SOCK_SEND_LENGTH=1"}),
    ({"sock:sock_send_length"}, {"bookcast_ebpf_socket_queue_seconds"}, {"-DHAVE_SOCK_SEND_LENGTH=0"}),
    ({"sock:sk_data_ready"}, {"bookcast_ebpf_socket_send_size_bytes"}, {"-DHAVE_SK_DATA_READY=0"}),
    ({"sock:sk_data_ready", "sock:sock_send_length", "sock:sock_recv_length"}, set(), set()),
])
def test_a_missing_optional_tracepoint_skips_its_metric_with_a_reason(missing, exported, have_flags):
    header, sockq = _program("sockq")
    p = plan(sockq, header, {tp.event for tp in sockq.tracepoints} - missing)
    assert {m.metric for m in p.metrics} == exported
    assert have_flags <= set(p.cflags)
    assert all("not on this kernel" in why and any(e in why for e in missing) for why in p.skipped.values())
    assert p.loadable == bool(exported)


def test_a_missing_required_tracepoint_skips_the_program():
    header, syscalls = _program("syscalls")
    p = plan(syscalls, header, {"raw_syscalls:sys_enter"})
    assert not p.loadable and "raw_syscalls:sys_exit" in p.skipped["bookcast_ebpf_syscall_latency_seconds"]


def test_log2_slots_become_cumulative_buckets_with_overflow_only_in_inf():
    bounds = CATALOG["bookcast_ebpf_syscall_latency_seconds"].buckets
    slots = [0] * (len(bounds) + 1)
    slots[0], slots[5], slots[-1] = 2, 3, 1               # <1 µs, [16, 32) µs, beyond the last bound
    buckets = dict(prometheus_buckets(slots, bounds))
    assert buckets["1e-06"] == 2 and buckets["1.6e-05"] == 2 and buckets["3.2e-05"] == 5
    assert buckets[list(buckets)[-2]] == 5 and buckets["+Inf"] == 6
    with pytest.raises(ValueError):
        prometheus_buckets(slots[:-1], bounds)


@pytest.mark.parametrize("argv, role", [
    (["/r/.venv/bin/python", "-m", "feed.cli", "replay", "--nats", "x", "a.jsonl"], "ingest"),
    (["/r/.venv/bin/python", "-m", "feed.cli", "--log-level", "DEBUG", "gateway", "--worker"], "gateway"),
    (["/r/.venv/bin/python", "/r/.venv/bin/bookcast", "gateway", "--port", "8080"], "gateway"),
    (["/r/.venv/bin/bookcast", "probe", "--url", "ws://x"], "probe"),
    (["/r/.venv/bin/nats-server", "-c", "/tmp/n.conf"], "nats"),
    (["/r/.venv/bin/python", "-m", "feed.cli", "ebpf", "--port", "1"], None),
    (["/r/.venv/bin/python", "-m", "feed.cli", "up"], None),
    (["/usr/bin/python3", "-m", "pytest", "gateway"], None),
    ([], None),
])
def test_role_of_a_command_line(argv, role):
    assert role_of(argv) == role


def test_scan_under_a_pid_finds_bookcast_processes_below_it(tmp_path):
    def proc(pid: int, argv: list[str], children: list[int] = ()) -> None:
        d = tmp_path / str(pid)
        (d / "task" / str(pid)).mkdir(parents=True)
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (d / "task" / str(pid) / "children").write_text(" ".join(map(str, children)))

    py = "/r/.venv/bin/python"
    proc(10, [py, "-m", "feed.cli", "up"], [11, 12, 13])
    proc(11, ["/r/.venv/bin/nats-server", "-c", "c"])
    proc(12, [py, "-m", "feed.cli", "gateway", "--workers", "2"], [14])
    proc(13, [py, "-m", "feed.cli", "ebpf", "--role-scan"])
    proc(14, [py, "-m", "feed.cli", "gateway", "--worker"])
    proc(20, [py, "-m", "feed.cli", "gateway"])                   # another stack's gateway
    spec = TargetSpec(scan=True, under=10, exclude={13})
    assert spec.resolve(tmp_path) == {11: "nats", 12: "gateway", 14: "gateway"}
    assert TargetSpec(scan=True, exclude=set()).resolve(tmp_path)[20] == "gateway"
    assert TargetSpec(pids=[(20, "edge"), (99, "gone")]).resolve(tmp_path) == {20: "edge"}
    cgroup = tmp_path / "cg"
    (cgroup / "child").mkdir(parents=True)
    (cgroup / "cgroup.procs").write_text("11\n")
    (cgroup / "child" / "cgroup.procs").write_text("20\n21\n")   # 21: not a bookcast command -> "other"
    assert TargetSpec(cgroups=[cgroup], exclude=set()).resolve(tmp_path) == {11: "nats", 20: "gateway", 21: "other"}


def test_ebpf_help_shows_examples():
    out = subprocess.run([sys.executable, "-m", "feed.cli", "ebpf", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.returncode == 0 and "examples:" in out.stdout and "bookcast ebpf --print-c" in out.stdout


def _without_capabilities(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all",
                           sys.executable, "-m", "feed.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), **kw)


def test_print_c_works_without_root():
    if os.geteuid() == 0:
        out = _without_capabilities(["ebpf", "--print-c"], timeout=60)
    else:
        out = subprocess.run([sys.executable, "-m", "feed.cli", "ebpf", "--print-c"], capture_output=True,
                             text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("bookcast.h", "syscalls.bpf.c", "sched.bpf.c", "tcp.bpf.c", "sockq.bpf.c", "netstack.bpf.c",
                 "listenq.bpf.c", "softirq.bpf.c"):
        assert f"// ==== {name}" in out.stdout
    slots = len(CATALOG["bookcast_ebpf_syscall_latency_seconds"].buckets)
    assert out.stdout.count("// cflags: ") == 7 and f"-DHIST_SLOTS={slots}" in out.stdout
    assert "RAW_TRACEPOINT_PROBE(sys_enter)" in out.stdout


def test_enum_values_come_from_the_tracepoint_print_format():
    fmt = ('print fmt: "skbaddr=%p reason: %s", REC->skbaddr, __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, '
           '{ 40, "TCP_LISTEN_OVERFLOW" }, { 0x29, "HEX" })')
    assert print_symbols(fmt, "reason") == {"NOT_SPECIFIED": 2, "TCP_LISTEN_OVERFLOW": 40, "HEX": 0x29}
    assert print_symbols(fmt, "vec") == {}
    header, listenq = _program("listenq")
    events = {tp.event for tp in listenq.tracepoints}
    assert "-DREASON_TCP_LISTEN_OVERFLOW=40" in plan(listenq, header, events, symbols={"REASON_TCP_LISTEN_OVERFLOW": 40}).cflags
    assert "-DREASON_TCP_LISTEN_OVERFLOW=-1" in plan(listenq, header, events).cflags     # unknown: never matches


def test_count_histograms_and_gauges_map_to_the_catalog():
    header, listenq = _program("listenq")
    p = plan(listenq, header, {tp.event for tp in listenq.tracepoints})
    assert f"-DHIST_SLOTS={len(CATALOG['bookcast_ebpf_accept_queue_length_at_arrival'].buckets)}" in p.cflags
    assert {m.metric: m.kernel_unit for m in p.metrics} == {
        "bookcast_ebpf_accept_queue_length_at_arrival": "log2_count",
        "bookcast_ebpf_accept_queue_length": "queue_length",
        "bookcast_ebpf_accept_queue_overflows_total": "count"}
    assert catalog_problems(listenq) == []


def test_a_short_syscall_list_attaches_per_syscall_tracepoints():
    from ebpf.loader import DEFAULT_SYSCALLS, syscall_attach_defines

    assert syscall_attach_defines(["sendto", "recvfrom"]) == {"SYSCALL_ATTACH_PER_SYSCALL": 1, "TRACE_SENDTO": 1,
                                                              "TRACE_RECVFROM": 1}
    assert syscall_attach_defines(list(DEFAULT_SYSCALLS)) == {}                 # long list: the raw pair
    assert syscall_attach_defines(["sendto", "write", "read"]) == {}
