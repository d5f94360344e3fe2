"""``bookcast up --prometheus``: Prometheus and Alertmanager start on generated configs, scrape every
process the stack started (ingest, gateway, probe, themselves), evaluate bookcast's rules, print their
URLs; Ctrl-C stops everything, Prometheus and Alertmanager included. (eBPF panels are covered by
test_stack_prometheus.py, which runs the eBPF exporter when root.)"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dashboards import slo
from dashboards.local import installed, wait_targets_up
from feed.procs import stop_process
from tests.dashboards.monitoring import api, query
from tests.test_cli import interrupt_and_check_nothing_left

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(installed() is not None, reason=str(installed()))]


def test_up_prometheus_scrapes_every_process_and_evaluates_the_rules(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "feed.cli", "up", "--port", "0", "--workers", "1", "--prometheus"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines, deadline = [], time.monotonic() + 120
        while not any("try " in ln for ln in lines) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        text = "".join(lines)
        prom = re.search(r"prometheus (http://\S+)", text)
        am = re.search(r"alerts\s+(http://\S+) \(Alertmanager", text)
        prom_dir = re.search(r"rules and configs in (\S+)\)", text)
        assert prom and am and prom_dir, text
        url = prom.group(1)
        jobs = {"bookcast-ingest", "bookcast-gateway", "bookcast-probe", "prometheus", "alertmanager"}
        up = wait_targets_up(url, jobs, 60)
        assert len(up) == len(jobs), up
        assert {r["metric"]["region"] for r in query(url, 'up{job=~"bookcast-.*"}')} == {"local"}
        loaded = api(url, "rules")["groups"]
        alerts = {r["name"] for g in loaded for r in g["rules"] if r["type"] == "alerting"}
        assert alerts == set(slo.alert_names(slo.build_rules()))
        assert {g["file"] for g in loaded} == {str(Path(prom_dir.group(1)) / "bookcast-rules.yml")}
        assert query(url, 'ALERTS{alertstate="firing"}') == []
        interrupt_and_check_nothing_left(proc, expect_children=6)  # nats, ingest, gateway, probe, prometheus, am
        assert not Path(prom_dir.group(1)).exists()  # the temp dir of configs and TSDB is removed
    finally:
        stop_process(proc)
