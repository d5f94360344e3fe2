"""The drill metrics of ``feed.catalog`` (chaos drills block), exported by ``bookcast drill run``.

Adapter module. ``DrillMetrics`` holds its own registry: ``bookcast_drill_running`` (1 from the first fault
onset to the last fault end of a drill), ``bookcast_drill_detect_seconds`` / ``_failover_seconds`` /
``_recover_seconds`` (the last run's figures, from ``chaos.report.analyse``) and ``bookcast_drill_gaps_total``
(kind ``detected`` / ``undetected``). Served on ``--metrics-port`` while drills run (Prometheus scrapes
it; the Drills dashboard reads these names) and written as a Prometheus text file (``drills.prom``, the
node-exporter textfile-collector format) beside the reports.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from feed.metrics import build

log = logging.getLogger("bookcast.chaos.metrics")


class DrillMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.running = build("bookcast_drill_running", self.registry)
        self.detect = build("bookcast_drill_detect_seconds", self.registry)
        self.failover = build("bookcast_drill_failover_seconds", self.registry)
        self.recover = build("bookcast_drill_recover_seconds", self.registry)
        self.gaps = build("bookcast_drill_gaps_total", self.registry)
        self._server = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on ``host:port`` (0: a free port) in a daemon thread; returns the port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return server.server_address[1]

    def on_note(self, drill: str, kind: str) -> None:
        if kind == "fault_onset":
            self.running.labels(drill).set(1)
        elif kind == "fault_end":
            self.running.labels(drill).set(0)

    def finished(self, r: dict[str, Any]) -> None:
        """A drill's report is in: its figures (NaN-free: a figure the drill did not reach is left unset)."""
        drill = r["drill"]
        self.running.labels(drill).set(0)
        for gauge, key in ((self.detect, "detect_s"), (self.failover, "failover_s"), (self.recover, "recover_s")):
            if r.get(key) is not None:
                gauge.labels(drill).set(r[key])
        detected = sum(g["detected"] for g in r["gaps"].values())
        undetected = sum(g["undetected"] for g in r["gaps"].values())
        self.gaps.labels(drill, "detected").inc(detected)
        self.gaps.labels(drill, "undetected").inc(undetected)

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(self.text())
        tmp.replace(path)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
