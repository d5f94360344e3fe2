"""Prometheus and Alertmanager for a local stack: their configs, and Debian's binaries started on them.

``prometheus_config`` / ``alertmanager_config`` are pure (dicts from targets and intervals).
``LocalMonitoring`` is the adapter: it writes the configs and the rule file into a work dir, starts
``/usr/bin/prometheus-alertmanager`` then ``/usr/bin/prometheus`` on free loopback ports (Alertmanager's
cluster listener off, so parallel stacks never collide), waits for ``/-/ready`` and stops both by PID.

Every scrape target carries a ``region`` target label (the dashboards' ``$region``). The probe's job
keeps the probe's own ``region`` labels (``honor_labels``): one probe measures several regions.
nats-server is not scraped: its monitoring endpoint serves JSON, not the Prometheus text format.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dashboards import slo
from feed.procs import free_port, stop_process, wait_until

log = logging.getLogger("bookcast.monitoring")

PROMETHEUS_BIN = "/usr/bin/prometheus"
ALERTMANAGER_BIN = "/usr/bin/prometheus-alertmanager"
JOBS = ("bookcast-ingest", "bookcast-gateway", "bookcast-probe", "bookcast-ebpf")


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    """One process to scrape: ``job`` (one of ``JOBS``), ``address`` host:port, ``region`` label."""

    job: str
    address: str
    region: str = "local"


@dataclass(frozen=True, slots=True)
class Intervals:
    """Prometheus scrape and rule evaluation periods, Alertmanager grouping waits (seconds)."""

    scrape_s: float = 5.0
    evaluation_s: float = 5.0
    group_wait_s: float = 10.0
    group_interval_s: float = 60.0
    repeat_interval_s: float = 4 * 3600.0


def _dur(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def prometheus_config(targets: list[ScrapeTarget], *, rule_files: list[str], alertmanager: str | None,
                      intervals: Intervals, self_address: str | None = None,
                      alertmanager_region: str = "local") -> dict[str, Any]:
    """prometheus.yml as a dict: one job per bookcast role, plus Prometheus and Alertmanager themselves."""
    jobs: dict[str, list[ScrapeTarget]] = {}
    for t in targets:
        if t.job not in JOBS:
            raise ValueError(f"unknown job {t.job!r}; one of {JOBS}")
        jobs.setdefault(t.job, []).append(t)
    scrape = []
    for job in JOBS:
        if job not in jobs:
            continue
        by_region: dict[str, list[str]] = {}
        for t in jobs[job]:
            by_region.setdefault(t.region, []).append(t.address)
        entry: dict[str, Any] = {"job_name": job, "static_configs": [
            {"targets": addrs, "labels": {"region": region}} for region, addrs in sorted(by_region.items())]}
        if job == "bookcast-probe":
            entry["honor_labels"] = True
        scrape.append(entry)
    if self_address:
        scrape.append({"job_name": "prometheus", "static_configs": [
            {"targets": [self_address], "labels": {"region": alertmanager_region}}]})
    if alertmanager:
        scrape.append({"job_name": "alertmanager", "static_configs": [
            {"targets": [alertmanager], "labels": {"region": alertmanager_region}}]})
    config: dict[str, Any] = {
        "global": {"scrape_interval": _dur(intervals.scrape_s), "scrape_timeout": _dur(min(intervals.scrape_s, 10.0)),
                   "evaluation_interval": _dur(intervals.evaluation_s)},
        "rule_files": list(rule_files),
        "scrape_configs": scrape,
    }
    if alertmanager:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    return config


def alertmanager_config(webhook_url: str | None, intervals: Intervals) -> dict[str, Any]:
    """alertmanager.yml as a dict: every alert to one webhook receiver (or to none without a URL),
    grouped by alert name and region; pages and tickets share the route (``severity`` is a label)."""
    receiver: dict[str, Any] = {"name": "bookcast"}
    if webhook_url:
        receiver["webhook_configs"] = [{"url": webhook_url, "send_resolved": True}]
    return {
        "route": {"receiver": "bookcast", "group_by": ["alertname", "region"],
                  "group_wait": _dur(intervals.group_wait_s), "group_interval": _dur(intervals.group_interval_s),
                  "repeat_interval": _dur(intervals.repeat_interval_s)},
        "receivers": [receiver],
    }


def installed() -> str | None:
    """None when Debian's prometheus and prometheus-alertmanager are installed, else what is missing."""
    missing = [b for b in (PROMETHEUS_BIN, ALERTMANAGER_BIN) if not Path(b).is_file()]
    if missing:
        return f"not installed: {', '.join(missing)} (scripts/setup.sh installs prometheus and prometheus-alertmanager as root)"
    return None


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    out = open(log_path, "ab")
    try:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        out.close()


@dataclass
class LocalMonitoring:
    """Alertmanager + Prometheus on ``targets`` with bookcast's rules, in ``workdir``; ``stop()`` by PID."""

    workdir: Path
    targets: list[ScrapeTarget]
    rule_config: slo.RuleConfig = field(default_factory=slo.RuleConfig)
    intervals: Intervals = field(default_factory=Intervals)
    webhook_url: str | None = None
    host: str = "127.0.0.1"
    prometheus: subprocess.Popen | None = None
    alertmanager: subprocess.Popen | None = None
    prometheus_port: int = 0
    alertmanager_port: int = 0

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.host}:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://{self.host}:{self.alertmanager_port}"

    def write_configs(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prometheus_port = self.prometheus_port or free_port(self.host)
        self.alertmanager_port = self.alertmanager_port or free_port(self.host)
        (self.workdir / "bookcast-rules.yml").write_text(slo.dump_rules(slo.build_rules(self.rule_config)))
        prom = prometheus_config(self.targets, rule_files=[str(self.workdir / "bookcast-rules.yml")],
                                 alertmanager=f"{self.host}:{self.alertmanager_port}", intervals=self.intervals,
                                 self_address=f"{self.host}:{self.prometheus_port}")
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(prom, sort_keys=False))
        am = alertmanager_config(self.webhook_url, self.intervals)
        (self.workdir / "alertmanager.yml").write_text(yaml.safe_dump(am, sort_keys=False))

    def start(self, timeout_s: float = 60.0) -> None:
        """Write the configs, start both, wait until ready.

        Raises:
            RuntimeError: a binary is missing or exited at start (its log is in ``workdir``).
            TimeoutError: not ready in ``timeout_s``.
        """
        why = installed()
        if why:
            raise RuntimeError(why)
        self.write_configs()
        w = self.workdir
        self.alertmanager = _spawn([
            ALERTMANAGER_BIN, f"--config.file={w / 'alertmanager.yml'}", f"--storage.path={w / 'alertmanager-data'}",
            f"--web.listen-address={self.host}:{self.alertmanager_port}", "--cluster.listen-address=",
            "--log.level=warn"], w / "alertmanager.log")
        wait_until(lambda: _ready(self.alertmanager_url + "/-/ready"), timeout_s, what="alertmanager /-/ready",
                   proc=self.alertmanager, interval_s=0.1)
        self.prometheus = _spawn([
            PROMETHEUS_BIN, f"--config.file={w / 'prometheus.yml'}", f"--storage.tsdb.path={w / 'prometheus-data'}",
            f"--web.listen-address={self.host}:{self.prometheus_port}", "--log.level=warn",
            "--storage.tsdb.retention.time=1d"], w / "prometheus.log")
        wait_until(lambda: _ready(self.prometheus_url + "/-/ready"), timeout_s, what="prometheus /-/ready",
                   proc=self.prometheus, interval_s=0.1)
        log.info("prometheus pid=%d at %s, alertmanager pid=%d at %s", self.prometheus.pid, self.prometheus_url,
                 self.alertmanager.pid, self.alertmanager_url)

    def stop(self) -> None:
        for proc in (self.prometheus, self.alertmanager):
            if proc is not None:
                stop_process(proc, grace_s=10.0)

    def log_text(self) -> str:
        return "\n".join(f"--- {n}\n" + (self.workdir / n).read_text(errors="replace")
                         for n in ("prometheus.log", "alertmanager.log") if (self.workdir / n).exists())


def which_promtool() -> str | None:
    """promtool on PATH, else Debian's /usr/bin/promtool, else None."""
    return shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").is_file() else None)


def wait_targets_up(prometheus_url: str, jobs: set[str], timeout_s: float) -> dict[str, str]:
    """Wait until every target of ``jobs`` reports health ``up``; returns {scrapeUrl: health}.

    Raises:
        TimeoutError: some target not up in time (the message lists them with their last error).
    """
    deadline = time.monotonic() + timeout_s
    last: dict[str, str] = {}
    while True:
        try:
            with urllib.request.urlopen(prometheus_url + "/api/v1/targets", timeout=2) as r:
                active = json.loads(r.read())["data"]["activeTargets"]
            mine = [t for t in active if t["labels"].get("job") in jobs]
            last = {t["scrapeUrl"]: t["health"] + (f" ({t['lastError']})" if t.get("lastError") else "")
                    for t in mine}
            if {t["labels"]["job"] for t in mine} >= jobs and all(t["health"] == "up" for t in mine):
                return last
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"scrape targets not up after {timeout_s} s: {last}")
        time.sleep(0.2)
