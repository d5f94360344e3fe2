"""Helpers for the dashboard and alert tests: Prometheus HTTP API queries and an Alertmanager webhook sink."""
from __future__ import annotations

import json
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from feed.procs import free_port


def api(prometheus_url: str, path: str, **params: str) -> dict:
    url = f"{prometheus_url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def query(prometheus_url: str, promql: str) -> list[dict]:
    return api(prometheus_url, "query", query=promql)["result"]


def query_range(prometheus_url: str, promql: str, start: float, end: float, step_s: float = 1.0) -> list[dict]:
    return api(prometheus_url, "query_range", query=promql, start=f"{start:.3f}", end=f"{end:.3f}",
               step=f"{step_s:g}")["result"]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.25):
    """Poll until ``predicate()`` returns something truthy; return it. Raises TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not true after {timeout_s} s")
        time.sleep(interval_s)


class WebhookSink:
    """An HTTP server on a free loopback port that keeps every Alertmanager webhook payload it receives
    (a thread of the test process, shut down by ``stop``)."""

    def __init__(self) -> None:
        self.payloads: list[dict] = []
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with sink.lock:
                    sink.payloads.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook-sink", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/alerts"

    def alerts(self) -> list[dict]:
        with self.lock:
            return [a for p in self.payloads for a in p.get("alerts", [])]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
