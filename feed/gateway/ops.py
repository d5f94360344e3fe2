"""The gateway's ops listener: ``/metrics`` and admin routes on their own port, loopback by default.

The public port serves only the client protocol (``/v1/*``), ``/healthz``, ``/readyz`` and the browser
viewer; everything an operator or Prometheus reads lives here, so exposing the public port to the
internet exposes nothing about the process. Routes:

* ``GET /metrics``    Prometheus text (every worker merged in multiprocess mode)
* ``GET /healthz``    200 while the process runs; ``GET /readyz`` 200 when serving (as on the public port)
* ``GET /v1/status``  the worker's own view: connections, instruments, guard counters, token usage (JSON)

With several workers each binds the ops port with SO_REUSEPORT, like the public one: ``/metrics`` is the
same from any of them, ``/v1/status`` describes whichever worker answered (it says its pid).
"""
from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from feed import metrics as prom

log = logging.getLogger("bookcast.gateway.ops")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def create_ops_app(registry: CollectorRegistry | None, status: Callable[[], dict[str, Any]],
                   ready: Callable[[], bool]) -> web.Application:
    """The ops application (see the module docstring for its routes)."""
    app = web.Application()

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=prom.exposition(registry), content_type="text/plain", charset="utf-8")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ready\n") if ready() else web.Response(status=503, text="not ready\n")

    async def status_json(_: web.Request) -> web.Response:
        return web.json_response(dict(status(), pid=os.getpid()))

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/status", status_json)
    return app


async def start_ops_listener(app: web.Application, host: str, port: int, *, reuse_port: bool) -> web.AppRunner:
    """Serve ``app`` on ``host:port``; warns when ``host`` is not a loopback address."""
    if not is_loopback(host):
        log.warning("ops listener on non-loopback address %s: /metrics and /v1/status are reachable from the "
                    "network; firewall it", host)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
    log.info("ops listener pid=%d http://%s:%d (/metrics, /v1/status)", os.getpid(), host, port)
    return runner
