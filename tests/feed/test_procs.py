"""``feed.procs``: ``run_until_signalled`` (the asyncio main of the ingest's provider pool and the simulator) and
``free_port``."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from feed import procs
from feed.procs import run_until_signalled

log = logging.getLogger("test")


async def test_a_signal_stops_the_work_with_exit_0_and_cancels_it():
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
    assert await run_until_signalled(forever(), "work", log) == 0
    assert cancelled.is_set()


async def test_work_that_raises_is_exit_1_and_logged(caplog):
    async def broken() -> None:
        raise RuntimeError("upstream exploded")

    with caplog.at_level(logging.ERROR, logger="test"):
        assert await run_until_signalled(broken(), "provider pool", log) == 1
    assert "provider pool failed: RuntimeError('upstream exploded')" in caplog.text


async def test_work_that_ends_is_exit_0():
    async def done() -> None:
        return None

    assert await run_until_signalled(done(), "work", log) == 0


def test_free_ports_come_from_below_the_ephemeral_range_bindable_and_never_twice(monkeypatch):
    low = procs._ephemeral_low()
    assert low is not None and low > procs.LISTEN_PORT_FLOOR  # this machine's range (32768 by default)
    ports = [procs.free_port() for _ in range(200)]
    assert len(set(ports)) == 200 and all(procs.LISTEN_PORT_FLOOR <= p < low for p in ports)
    with socket.socket() as s:  # free for a server that does not set SO_REUSEADDR
        s.bind(("127.0.0.1", ports[-1]))
    # a taken port is never handed out: hold one and make it the only candidate
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        monkeypatch.setattr(procs._pick, "randint", lambda a, b: taken)
        port = procs.free_port(tries=3)
        assert port != taken and port not in ports  # after 3 refused picks: the kernel's choice


def test_free_port_falls_back_to_the_kernels_choice_when_the_range_below_is_empty(monkeypatch):
    monkeypatch.setattr(procs, "_ephemeral_low", lambda: 1024)
    port = procs.free_port()
    assert port >= 1024 and port in procs._handed_out
