"""The machine's kernel floor under a fan-out delivery: CPU per message over a loopback TCP connection.

At the benchmark's rates every delivery, through either target, is at least one socket write by the server
and one socket read by a client on a loopback TCP connection (one WebSocket frame each: messages of one
connection are milliseconds apart, so nothing coalesces). ``measure`` times exactly that pair on this
machine: ``sendall`` of a ``payload_bytes`` message and the ``recv`` that takes it, one message at a time, on
one connected loopback pair, in process CPU time (user + system: on loopback the receive path mostly runs in
the sender's system call, so both sides' kernel work is counted here; on this 2-core VM it equals the
machine's busy time over the loop). Beside it, the cost of the cheapest system call (``getppid``), to tell
the system-call entry cost from the TCP path.

It is a lower bound (one warm connection, no epoll, no scheduler wake-up; with 1,000 connections each of
those adds to it) and the same for both targets: ``cores(deliveries_per_s)`` of kernel time is spent
before any server or client logic runs, which says how much of a machine a point leaves to the servers
and the load generator, and makes runs on different machines comparable. On the 2-core development VM the
pair costs ~8.7 us (getppid 0.22 us), so 100,000 deliveries/s (1,000 clients x 100 msg/s) take ~0.87
cores, 43% of the machine, before either server or the load generator does anything else.

    python -m loadtest.bench.floor                 # {"send_recv_us": ..., "syscall_us": ..., ...}
    python -m loadtest.bench.floor --rate 100000   # and the cores that many deliveries/s need

Exit codes: 0 measured, 2 bad usage.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import threading
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LoopbackFloor:
    """``send_recv_us``: CPU microseconds per message of one loopback TCP send + recv (the best of
    ``trials`` runs of ``messages`` messages); ``syscall_us``: per ``getppid`` call, likewise."""

    send_recv_us: float
    syscall_us: float
    payload_bytes: int
    messages: int
    trials: int

    def cores(self, deliveries_per_s: float) -> float:
        """CPU cores the floor alone takes at ``deliveries_per_s`` deliveries per second."""
        return deliveries_per_s * self.send_recv_us / 1e6

    def machine_pct(self, deliveries_per_s: float, cpus: int) -> float:
        """The share of a ``cpus``-CPU machine (%) the floor alone takes at ``deliveries_per_s``."""
        return 100 * self.cores(deliveries_per_s) / max(cpus, 1)

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu_us_per_call(fn, calls: int, clock=time.process_time_ns) -> float:
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls / 1000


@contextlib.contextmanager
def _loopback_pair(payload_bytes: int):
    """A connected loopback TCP pair; yields ``pair()``: one ``sendall`` of ``payload_bytes`` and the
    ``recv`` (s) that take it, on warm buffers."""
    payload = b"x" * payload_bytes
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as sender:
        receiver, _ = server.accept()
        with receiver:
            sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as both targets' servers set it

            def pair() -> None:
                sender.sendall(payload)
                got = len(receiver.recv(65536))
                while got < payload_bytes:  # a short read never happens on loopback, but is not assumed
                    got += len(receiver.recv(65536))

            pair()  # warm the connection's buffers
            yield pair


def measure(payload_bytes: int = 300, messages: int = 20_000, trials: int = 3) -> LoopbackFloor:
    """Time ``trials`` runs of ``messages`` loopback TCP send + recv pairs of ``payload_bytes`` each and as
    many ``getppid`` calls; keep the lowest of each (the least disturbed by other work on the machine).

    Raises ``ValueError`` for a non-positive argument and ``OSError`` when no loopback TCP connection can
    be made."""
    if payload_bytes < 1 or messages < 1 or trials < 1:
        raise ValueError("payload_bytes, messages and trials must be >= 1")
    with _loopback_pair(payload_bytes) as pair:
        send_recv = min(_cpu_us_per_call(pair, messages) for _ in range(trials))
    syscall = min(_cpu_us_per_call(os.getppid, messages) for _ in range(trials))
    return LoopbackFloor(round(send_recv, 3), round(syscall, 3), payload_bytes, messages, trials)


def median_us(samples: list[float]) -> float | None:
    """The median of a ``FloorProbe``'s samples (``None`` for none: the window was too short to take one)."""
    return statistics.median(samples) if samples else None


class FloorProbe:
    """The floor sampled through a measured window: every ``interval_s``, ``pairs`` loopback send + recv
    pairs timed in this thread's CPU (``time.thread_time_ns``: the caller's event loop does not count), on
    a daemon thread between ``start`` and ``stop``; ``samples`` holds us per pair, in order.

    Why: on a shared VM the same work costs a different number of CPU seconds from one minute to the next
    (a bookcast cell at 1,000 x 40/s spent 6.6 and 12.2 server CPU s ten minutes apart, the load generator
    alike, with "others" at 0-1%: the host's other tenants are not in ``/proc/stat``). The sampled floor
    moves with the cells' CPU (within a target, 8.2 -> 10.4 us per pair beside 7.1 -> 8.6 server CPU s),
    where a pure-Python loop timed the same way did not (it jumps between ~26 and ~45 ns an iteration,
    unrelated to the cells). It is measured under the cell's load, so it is a thermometer of the machine
    as the cell found it, not a correction. Cost: ``pairs`` x ~9 us every ``interval_s`` (0.4% of a CPU).
    """

    def __init__(self, interval_s: float = 0.5, pairs: int = 200, payload_bytes: int = 300) -> None:
        if interval_s <= 0 or pairs < 1 or payload_bytes < 1:
            raise ValueError("interval_s, pairs and payload_bytes must be > 0")
        self.interval_s, self.pairs, self.payload_bytes = interval_s, pairs, payload_bytes
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> FloorProbe:
        self._thread = threading.Thread(target=self._run, name="bench-floor-probe", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        with _loopback_pair(self.payload_bytes) as pair:
            while True:
                self.samples.append(_cpu_us_per_call(pair, self.pairs, time.thread_time_ns))
                if self._stop.wait(self.interval_s):
                    return

    def stop(self) -> list[float]:
        """Stop sampling (waits for the thread; a second call is harmless) and return the samples."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.samples


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--payload-bytes", type=int, default=300, help="message size (default %(default)s: a benchmark delta)")
    p.add_argument("--messages", type=int, default=20_000, help="send + recv pairs per trial (default %(default)s)")
    p.add_argument("--trials", type=int, default=3, help="trials; the lowest is kept (default %(default)s)")
    p.add_argument("--rate", type=float, default=0, help="also print the cores this many deliveries/s need")
    args = p.parse_args()
    try:
        floor = measure(args.payload_bytes, args.messages, args.trials)
    except ValueError as exc:
        p.error(str(exc))
    out = floor.to_dict()
    if args.rate > 0:
        out |= {"deliveries_per_s": args.rate, "cores": round(floor.cores(args.rate), 3),
                "machine_pct": round(floor.machine_pct(args.rate, os.cpu_count() or 1), 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
