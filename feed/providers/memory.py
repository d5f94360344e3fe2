"""An in-process ``Link`` fed by the caller: for benchmarks and tests of the pool without sockets.

``MemoryLink.deliver(msg)`` hands a raw venue message to the pool as the provider's next frame, unless a
fault knob says otherwise: ``disconnect()`` / ``connect()``, ``stall(True)`` (frames dropped, heartbeats kept:
stall-while-alive), ``lag_s`` (every frame delivered that much later), ``heartbeat_interval_s`` (ALIVE events
while connected). ``fetch_snapshot`` answers from ``rest`` (symbol -> raw venue message or an exception).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from feed.capture import CaptureRecord
from feed.upstream import LinkEvent, ProviderSpec, UpstreamError


class MemoryLink:
    def __init__(self, spec: ProviderSpec, *, heartbeat_interval_s: float = 0.1) -> None:
        self.spec = spec
        self.rest: dict[str, Any] = {}
        self.lag_s = 0.0
        self.stalled = False
        self.heartbeat_interval_s = heartbeat_interval_s
        self._connected = asyncio.Event()
        self._connected.set()
        self._on_message: Callable[[CaptureRecord], None] | None = None
        self._on_event: Callable[[LinkEvent, str], None] | None = None
        self.fetches = 0

    async def run(self, symbols: Sequence[str], on_message, on_event) -> None:
        self._on_message, self._on_event = on_message, on_event
        on_event(LinkEvent.CONNECTED, self.spec.ws_url)
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            if self._connected.is_set():
                on_event(LinkEvent.ALIVE, "heartbeat")

    def deliver(self, msg: Any) -> None:
        if self._on_message is None or not self._connected.is_set() or self.stalled:
            return
        if self.lag_s > 0:
            asyncio.get_running_loop().call_later(self.lag_s, self._push, msg)
        else:
            self._push(msg)

    def _push(self, msg: Any) -> None:
        if self._on_message is not None and self._connected.is_set() and not self.stalled:
            self._on_message(CaptureRecord(time.time_ns(), self.spec.venue, msg))

    def disconnect(self) -> None:
        self._connected.clear()
        if self._on_event is not None:
            self._on_event(LinkEvent.DISCONNECTED, "memory link: disconnect knob")

    def connect(self) -> None:
        self._connected.set()
        if self._on_event is not None:
            self._on_event(LinkEvent.CONNECTED, self.spec.ws_url)

    def stall(self, on: bool) -> None:
        self.stalled = on

    async def fetch_snapshot(self, symbol: str) -> Any:
        self.fetches += 1
        reply = self.rest.get(symbol)
        if isinstance(reply, Exception):
            raise reply
        if reply is None:
            raise UpstreamError(f"{self.spec.name}: no REST book for {symbol}")
        return reply
