"""CPU time and resident memory of processes, and the machine's busy time, read from Linux ``/proc``.

Sources: proc(5): ``/proc/<pid>/stat`` fields 14-15 (``utime``, ``stime``, clock ticks), ``/proc/<pid>/status``
``VmRSS`` (kB), ``/proc/stat`` first line (ticks per state, all CPUs); the kernel's
Documentation/scheduler/sched-stats.rst: ``/proc/<pid>/task/<tid>/schedstat`` (ns on CPU, ns runnable but
waiting on a run queue, timeslices); ``/proc/<pid>/task/<tid>/status`` ``nonvoluntary_ctxt_switches`` (times
the thread lost its CPU while still runnable: preempted). A process that has exited reads as zero, so a caller summing several
processes still gets the living ones.
"""
from __future__ import annotations

import os
import resource
from collections.abc import Iterable, Iterator

TICKS_PER_S = _TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[str, list[str]] | None:
    """``(comm, fields)`` of ``/proc/PID/stat``, fields after "pid (comm) " (field 3, state, is index 0);
    None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()


def _stat_fields(pid: int) -> list[str] | None:
    stat = _stat(pid)
    return None if stat is None else stat[1]


def _cpu_ticks(fields: list[str]) -> int:
    return int(fields[11]) + int(fields[12])  # utime + stime


def cpu_s(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (threads included, children not)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += _cpu_ticks(fields)
    return total / _TICKS_PER_S


def _task_dirs(pids: Iterable[int]) -> Iterator[str]:
    """``/proc/PID/task/TID`` of every live thread of ``pids``."""
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except (FileNotFoundError, ProcessLookupError):
            continue
        for tid in tids:
            yield f"/proc/{pid}/task/{tid}"


def runqueue_wait(pids: Iterable[int]) -> tuple[float, int]:
    """(seconds, runs): how long the threads of ``pids`` sat runnable waiting for a CPU, and how many times
    they were run, summed over every live thread (a thread that has exited takes its share with it). Seconds
    over runs is the mean delay between becoming runnable and running: on a busy machine, latency that is the
    scheduler's, not the server's."""
    wait_ns = runs = 0
    for task in _task_dirs(pids):
        try:
            with open(f"{task}/schedstat") as f:
                _, waited, slices = f.read().split()[:3]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        wait_ns += int(waited)
        runs += int(slices)
    return wait_ns / 1e9, runs


def preemptions(pids: Iterable[int]) -> int:
    """How many times the threads of ``pids`` were switched out while still runnable (``nonvoluntary_ctxt_switches``:
    a woken task or the tick took their CPU), summed over every live thread. On one machine shared with the load
    generator, a client woken by the server's own write preempts the server: that is the scheduler's latency
    added to the server's, and it does not happen to a server whose clients are on other machines."""
    total = 0
    for task in _task_dirs(pids):
        try:
            with open(f"{task}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("nonvoluntary_ctxt_switches:")), 0)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def rss_bytes(pids: Iterable[int]) -> int:
    """Sum of ``VmRSS`` of ``pids`` in bytes."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (scans ``/proc/*/stat`` for the parent pid)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == pid:
                out.append(int(entry))
    return out


def every_process_cpu_s() -> dict[int, tuple[float, str]]:
    """``{pid: (cpu_s, comm)}`` of every process on the machine (user + system CPU so far, threads included):
    two readings name whoever else was busy between them."""
    out: dict[int, tuple[float, str]] = {}
    for entry in os.listdir("/proc"):
        stat = _stat(int(entry)) if entry.isdigit() else None
        if stat is not None:
            comm, fields = stat
            out[int(entry)] = (_cpu_ticks(fields) / _TICKS_PER_S, comm)
    return out


def busiest_others(before: dict[int, tuple[float, str]], after: dict[int, tuple[float, str]], ours: Iterable[int],
                   top: int = 3, min_cpu_s: float = 0.05) -> list[dict]:
    """The ``top`` processes outside ``ours`` that used the most CPU between two ``every_process_cpu_s``
    readings (at least ``min_cpu_s``): ``[{"pid", "comm", "cpu_s"}]``, busiest first. A process born between
    the readings counts from zero; one that died is not seen."""
    mine = set(ours)
    used = [(cpu - before.get(pid, (0.0, ""))[0], pid, comm) for pid, (cpu, comm) in after.items() if pid not in mine]
    return [{"pid": pid, "comm": comm, "cpu_s": round(cpu, 2)}
            for cpu, pid, comm in sorted(used, reverse=True)[:top] if cpu >= min_cpu_s]


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot; busy excludes idle and iowait."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - values[3] - values[4], total


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (children inherit it); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard  # the kernel's nr_open default
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft
