"""JSON lines between the benchmark and its helper processes (the publisher and the client-load processes).

A helper reads commands from stdin and writes events to stdout, one JSON object per line; it exits when
its stdin closes, so a benchmark that dies takes its helpers with it. Helper side: ``emit`` and
``commands``. Benchmark side: ``Child``.
"""
from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

MAX_LINE_BYTES = 256 * 1024 * 1024  # a client process's result line carries its per-message receive times


class BenchError(RuntimeError):
    """A helper process failed, said something unexpected, or missed a deadline (the message says which)."""


def emit(event: str, **fields: Any) -> None:
    """Write ``{"event": event, **fields}`` as one line on stdout."""
    sys.stdout.buffer.write(orjson.dumps({"event": event, **fields}) + b"\n")
    sys.stdout.buffer.flush()


async def commands() -> AsyncIterator[dict[str, Any]]:
    """Commands from stdin, one JSON object per line, until stdin closes."""
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        yield orjson.loads(line)


class Child:
    """A helper process started with ``python -m MODULE ARGS``; its stderr goes to ``log_path``."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path

    @classmethod
    async def start(cls, name: str, module: str, args: list[str], log_path: Path) -> Child:
        with open(log_path, "ab") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", module, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=log, limit=MAX_LINE_BYTES, start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        return cls(name, proc, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def send(self, command: str, **fields: Any) -> None:
        self.proc.stdin.write(orjson.dumps({"cmd": command, **fields}) + b"\n")
        await self.proc.stdin.drain()

    async def expect(self, event: str, timeout_s: float) -> dict[str, Any]:
        """The next line, which must be ``event``.

        Raises:
            BenchError: another event, end of output (the process exited) or no line within ``timeout_s``.
        """
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        except TimeoutError:
            raise BenchError(f"{self.name}: no '{event}' within {timeout_s:.0f} s{self._log_tail()}") from None
        if not line:
            code = await self.proc.wait()
            raise BenchError(f"{self.name}: exited with code {code} before '{event}'{self._log_tail()}")
        msg = orjson.loads(line)
        if msg.get("event") != event:
            raise BenchError(f"{self.name}: expected '{event}', got {str(msg)[:300]}{self._log_tail()}")
        return msg

    def _log_tail(self) -> str:
        try:
            return f"\n--- {self.log_path} ---\n{self.log_path.read_text(errors='replace')[-2000:]}"
        except OSError:
            return ""

    async def stop(self, grace_s: float = 5.0) -> None:
        """Close stdin (the helper exits by itself), then SIGTERM, then SIGKILL, by PID."""
        if self.proc.returncode is None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        for signal_it in (None, self.proc.terminate, self.proc.kill):
            if signal_it is not None and self.proc.returncode is None:
                try:
                    signal_it()
                except ProcessLookupError:
                    pass
            try:
                await asyncio.wait_for(self.proc.wait(), grace_s)
                return
            except TimeoutError:
                continue
