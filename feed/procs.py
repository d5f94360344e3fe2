"""Process helpers shared by the stack launcher and the tests: free ports, readiness waits, stop by PID.

Adapter module (does I/O). Every process started through here is stopped by its PID: SIGTERM, a grace
period, then SIGKILL of its whole process group.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any


# Ports handed out from below the kernel's ephemeral range (ip(7) ``ip_local_port_range``): a port taken
# from the range itself (bind to port 0) can be taken again, as the local port of some outgoing connection,
# between the moment it is handed out and the moment its server binds it. The floor keeps clear of the
# well-known service ports (ClickHouse 8123/9000, Prometheus 9090, NATS 4222/6222/8222, ...).
LISTEN_PORT_FLOOR = 20_000
_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
_handed_out: set[int] = set()
_pick = random.Random()  # its own generator: a test framework reseeding ``random`` makes no two runs pick alike


def _ephemeral_low() -> int | None:
    try:
        with open(_EPHEMERAL_RANGE) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def free_port(host: str = "127.0.0.1", *, tries: int = 64) -> int:
    """A TCP port that was free on ``host`` a moment ago: a random one in ``LISTEN_PORT_FLOOR`` up to the
    kernel's ephemeral range (where no outgoing connection takes it in the meantime), never one this process
    handed out before, checked by binding it (without SO_REUSEADDR: free for any server). When that range is
    empty (an ephemeral range starting below the floor) or ``tries`` picks are all taken, the kernel's
    choice (bind to port 0).

    Raises OSError when ``host`` cannot be bound at all."""
    low = _ephemeral_low()
    if low is not None and low - 1 > LISTEN_PORT_FLOOR:
        for _ in range(tries):
            port = _pick.randint(LISTEN_PORT_FLOOR, low - 1)
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    _handed_out.add(port)
    return port


def die_with_parent() -> None:
    """``preexec_fn`` for a child process: SIGTERM when its parent dies (Linux PR_SET_PDEATHSIG), so a killed
    run, test or benchmark leaves no server behind. A libc without ``prctl`` leaves the child as it was."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def http_ok(url: str, timeout_s: float = 0.5) -> bool:
    """True when ``GET url`` answers 200 within ``timeout_s``; any connection or HTTP error is False."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except OSError:
        return False


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], bool], timeout_s: float, *, what: str, interval_s: float = 0.02,
               proc: subprocess.Popen | None = None) -> None:
    """Poll ``predicate`` until true.

    Raises:
        TimeoutError: not true within ``timeout_s`` (the message names ``what``).
        RuntimeError: ``proc`` exited while waiting (the message carries its exit code).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process {proc.pid} exited with code {proc.returncode}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not ready after {timeout_s:.1f} s")
        time.sleep(interval_s)


def stop_process(proc: subprocess.Popen, *, grace_s: float = 5.0, sig: int = signal.SIGTERM) -> int | None:
    """Stop ``proc`` by PID: ``sig``, wait ``grace_s``, then SIGKILL its process group. Returns its exit code."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait(timeout=5)
    return proc.returncode


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    if pgid == proc.pid:  # it leads its own group: take its children with it
        os.killpg(pgid, signal.SIGKILL)
    else:
        proc.kill()


class StopSignal:
    """Becomes true on SIGINT or SIGTERM: the stop condition of a synchronous supervisor loop.

    Installs the handlers on creation (main thread only). ``bool(stop)`` tells whether a signal came.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.received = signum

    def __bool__(self) -> bool:
        return self.received is not None


async def run_until_signalled(work: Awaitable[Any], what: str, log: logging.Logger) -> int:
    """Run ``work`` (a long-running coroutine) until SIGINT/SIGTERM or until it ends, in a service's asyncio
    main. Returns the exit code: 0 on a signal or a clean end, 1 (logged as "``what`` failed: ...") when
    ``work`` raised. ``work`` is cancelled and awaited before returning; the caller then cleans up."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    code = 0
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.error("%s failed: %r", what, task.exception())
        code = 1
    task.cancel()
    stopper.cancel()
    await asyncio.gather(task, stopper, return_exceptions=True)
    return code
