"""``bookcast up --prometheus`` (and ``--ebpf`` as root): Prometheus and Alertmanager start on generated
configs, scrape every process the stack started, and print their URLs; the Kernel dashboard's queries
return data from the real eBPF exporter; Ctrl-C stops everything, Prometheus included."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from dashboards import cli as dcli
from dashboards import slo
from dashboards.local import installed, wait_targets_up
from ebpf.loader import missing_prerequisites
from feed.procs import stop_process
from tests.dashboards.monitoring import query, wait_for
from tests.test_cli import REPO, interrupt_and_check_nothing_left

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(installed() is not None, reason=str(installed()))]

# TCP retransmits do not happen on a healthy loopback: the counter may have no series without a fault.
MAY_BE_EMPTY_WITHOUT_FAULT = ("bookcast_ebpf_tcp_retransmits_total",)


def test_up_prometheus_scrapes_every_process_and_kernel_panels_have_data(tmp_path):
    ebpf = not missing_prerequisites()
    args = ["up", "--port", "0", "--workers", "1", "--prometheus"] + (["--ebpf"] if ebpf else [])
    proc = subprocess.Popen([sys.executable, "-m", "feed.cli", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
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
        assert prom and am, text
        url = prom.group(1)
        jobs = {"bookcast-ingest", "bookcast-gateway", "bookcast-probe", "prometheus", "alertmanager"}
        if ebpf:
            jobs.add("bookcast-ebpf")
        up = wait_targets_up(url, jobs, 60)
        assert len(up) == len(jobs), up
        assert {r["metric"]["region"] for r in query(url, 'up{job=~"bookcast-.*"}')} == {"local"}
        wait_for(lambda: query(url, slo.ratio_record("e2e_latency", "5m")), 60, "recording rules evaluated")
        if ebpf:
            built = tmp_path / "built"
            dcli.build(built, config=slo.RuleConfig(), prometheus_url=url)
            kernel = [built / "dashboards" / "bookcast-kernel.json"]

            def kernel_data():
                results = dcli.check(url, kernel, rate_interval="30s")
                empty = [r for r in results if not r.series and not any(m in r.query.expr for m in MAY_BE_EMPTY_WITHOUT_FAULT)]
                return results if not empty else None
            try:
                results = wait_for(kernel_data, 90, "every Kernel panel query returns eBPF data", interval_s=2)
            except TimeoutError:
                results = dcli.check(url, kernel, rate_interval="30s")
                pytest.fail("kernel queries without data: "
                            f"{[(r.query.where, r.query.expr) for r in results if not r.series]}")
            assert len(results) >= 15
        interrupt_and_check_nothing_left(proc, expect_children=6 + ebpf)  # nats, ingest, gateway(+1), probe, prom, am
    finally:
        stop_process(proc)
