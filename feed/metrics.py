"""prometheus-client objects for the catalog's metrics (adapter).

Works in single-process mode and in prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``
set before start, as the multi-worker gateway does), where gauges sum over live workers.
"""
from __future__ import annotations

import os
from typing import Any

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

from feed.catalog import CATALOG, MetricType


def build(name: str, registry: CollectorRegistry | None) -> Any:
    """The prometheus-client metric for catalog entry ``name``.

    Raises:
        KeyError: ``name`` is not declared.
        ValueError: a summary (its quantiles come from a custom collector, e.g. ``exporter.probe``).
    """
    spec = CATALOG[name]
    if spec.type is MetricType.SUMMARY:
        raise ValueError(f"{name} is a summary: expose it with a custom collector")
    kwargs: dict[str, Any] = {"registry": registry} if registry is not None else {}
    if spec.type is MetricType.COUNTER:
        return Counter(spec.name.removesuffix("_total"), spec.help, spec.labels, **kwargs)
    if spec.type is MetricType.GAUGE:
        if multiprocess_dir():
            kwargs["multiprocess_mode"] = "livesum"
        return Gauge(spec.name, spec.help, spec.labels, **kwargs)
    return Histogram(spec.name, spec.help, spec.labels, buckets=spec.buckets, **kwargs)


def shared(built: dict[str, Any], name: str, registry: CollectorRegistry | None) -> Any:
    """The one metric object of catalog entry ``name`` in ``built`` (a per-owner cache), built on first use.

    Several parts of one process (an ingest, its provider pools) label the same metric: building it twice on
    one registry would raise ``ValueError: Duplicated timeseries``.
    """
    if name not in built:
        built[name] = build(name, registry)
    return built[name]


class _Null:
    """Stands in for a metric (or a label child) when per-message instrumentation is off: does nothing."""

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass

    def labels(self, *values: str) -> _Null:
        return self


NULL = _Null()


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def exposition(registry: CollectorRegistry | None) -> bytes:
    """Prometheus text exposition: the merged view of every worker in multiprocess mode."""
    if multiprocess_dir():
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)
    return generate_latest(registry) if registry is not None else generate_latest()


def ops_app(registry: CollectorRegistry | None, status: Callable[[], dict[str, Any]]) -> web.Application:
    """The operations endpoints of a bookcast process: ``/metrics`` (Prometheus text), ``/healthz``
    (200 while the process runs) and ``/v1/status`` (``status()`` as JSON)."""
    app = web.Application()

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=exposition(registry), content_type="text/plain", charset="utf-8")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def status_json(_: web.Request) -> web.Response:
        return web.json_response(status())

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/status", status_json)
    return app
