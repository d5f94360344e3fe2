"""The upstream link interface the pool reads providers through (``feed.upstream``, part A of issue 16).

Re-exports ``ProviderSpec``, ``LinkEvent``, ``Link``, ``open_link`` and ``UpstreamError`` from
``feed.upstream``. Until that package is present (it lands from the ``venues`` branch), stand-ins with the
agreed shapes are defined here so the pool can be built and tested against in-process fake links;
``open_link`` then raises ``UpstreamError`` saying live links are not available.
"""
from __future__ import annotations

try:  # pragma: no cover - which branch is taken depends on whether part A has landed
    from feed.upstream import Link, LinkEvent, ProviderSpec, open_link  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover
    import enum
    from collections.abc import Callable, Mapping
    from dataclasses import dataclass
    from typing import Any, Protocol

    from feed.capture import CaptureRecord
    from feed.errors import RemoteError

    @dataclass(frozen=True)
    class ProviderSpec:  # type: ignore[no-redef]
        name: str
        venue: str
        ws_url: str
        rest_url: str | None = None
        weight: float = 1.0
        auth: Mapping[str, str] | None = None

    class LinkEvent(enum.StrEnum):  # type: ignore[no-redef]
        CONNECTED = "connected"
        DISCONNECTED = "disconnected"
        ERROR = "error"
        ALIVE = "alive"
        THROTTLED = "throttled"

    class Link(Protocol):  # type: ignore[no-redef]
        spec: ProviderSpec

        async def run(self, symbols: list[str], on_message: Callable[[CaptureRecord], None],
                      on_event: Callable[[LinkEvent, str], None]) -> None: ...

        async def fetch_snapshot(self, symbol: str) -> Any: ...

    class UpstreamError(RemoteError):  # type: ignore[no-redef]
        """A provider failed: refused, closed, answered with an error."""

    def open_link(spec: ProviderSpec) -> Link:  # type: ignore[no-redef]
        raise UpstreamError(f"provider {spec.name}: live links (feed.upstream) are not installed in this build")

if "UpstreamError" not in globals():  # pragma: no cover
    try:
        from feed.upstream import UpstreamError  # type: ignore[import-not-found,no-redef]
    except ImportError:
        from feed.errors import RemoteError as UpstreamError  # type: ignore[assignment]

__all__ = ["Link", "LinkEvent", "ProviderSpec", "UpstreamError", "open_link"]
