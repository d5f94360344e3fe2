"""``feed.procs.run_until_signalled``: the asyncio main of the ingest's provider pool and the simulator."""
from __future__ import annotations

import asyncio
import logging
import os
import signal

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
