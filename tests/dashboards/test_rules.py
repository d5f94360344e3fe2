"""Prometheus rules: promtool checks and unit tests, committed files in sync, runbooks for every alert,
and the generated Prometheus and Alertmanager configs accepted by promtool and amtool."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dashboards import local, promtests, slo
from feed.catalog import CATALOG

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "dashboards" / "rules" / "bookcast-rules.yml"
TESTS = REPO / "dashboards" / "tests" / "bookcast-rules.test.yml"
RUNBOOKS = REPO / "docs" / "runbooks.md"
PROMTOOL = local.which_promtool()
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (scripts/setup.sh installs "
                                                              "Debian's prometheus as root)")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=REPO, capture_output=True, text=True, timeout=120)


def test_committed_rules_and_promtool_tests_are_what_the_code_generates():
    assert RULES.read_text() == slo.dump_rules(slo.build_rules()), "run: bookcast dashboards build, copy the rules"
    assert TESTS.read_text() == promtests.dump_tests(), "run: python -m dashboards.promtests"


@needs_promtool
def test_promtool_check_rules():
    res = _run(PROMTOOL, "check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


@needs_promtool
def test_promtool_unit_tests_pass():
    res = _run(PROMTOOL, "test", "rules", str(TESTS))
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
def test_promtool_catches_a_wrong_expectation(tmp_path):
    """The unit tests can fail: expecting a page in the healthy scenario is reported."""
    body = promtests.build_tests()
    body["rule_files"] = [str(RULES)]
    healthy = body["tests"][0]
    body["tests"] = [healthy]
    healthy["alert_rule_test"][0]["exp_alerts"] = [{"exp_labels": {"region": "r", "severity": "page"}}]
    path = tmp_path / "wrong.test.yml"
    path.write_text(yaml.safe_dump(body))
    res = _run(PROMTOOL, "test", "rules", str(path))
    assert res.returncode != 0 and "FAILED" in res.stdout + res.stderr


def test_every_alert_fires_in_a_scenario_and_stays_silent_when_healthy():
    alerts = set(slo.alert_names(slo.build_rules()))
    assert alerts == set(slo.DEFAULT_FOR)
    fired = {alert for sc in promtests.SCENARIOS for _, alert, expected in sc.checks if expected}
    assert fired == alerts
    quiet_before = {alert for sc in promtests.SCENARIOS[1:] for _, alert, expected in sc.checks if not expected}
    assert quiet_before == alerts  # each burn scenario also checks a time it must not fire yet
    healthy = promtests.SCENARIOS[0]
    assert {alert for _, alert, expected in healthy.checks if not expected} == alerts
    # both page rules of every burn alert are exercised
    windows = {(alert, e["long_window"]) for sc in promtests.SCENARIOS for _, alert, exp in sc.checks for e in exp
               if "long_window" in e}
    assert {w for a, w in windows if a == "BookcastLatencyBudgetBurn"} == {"1h", "6h"}


def _headings(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown text."""
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def test_every_alert_has_a_runbook_section_with_first_checks():
    rules = slo.build_rules()
    text = RUNBOOKS.read_text()
    anchors = _headings(text)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            url = rule["annotations"]["runbook_url"]
            doc, _, anchor = url.partition("#")
            assert doc == "docs/runbooks.md" and anchor in anchors, (rule["alert"], url)
            section = text.split(f"## {rule['alert']}\n", 1)[1].split("\n## ", 1)[0]
            for part in ("Symptoms", "First checks", "Mitigation", "Escalation"):
                assert f"**{part}**" in section, (rule["alert"], part)
            assert "```" in section and ("bookcast " in section or "promql" in section), rule["alert"]


def test_rules_use_only_catalog_metrics():
    used = slo.metric_names(slo.build_rules())
    base = {n.removesuffix("_bucket").removesuffix("_count") for n in used}
    assert base <= set(CATALOG), base - set(CATALOG)
    assert len(base) >= 10


@pytest.mark.parametrize("bad", [dict(e2e_objective_s=0.3), dict(e2e_latency_target=1.0),
                                 dict(for_override="five seconds")])
def test_bad_rule_config_is_refused(bad):
    with pytest.raises(ValueError):
        slo.build_rules(slo.RuleConfig(**bad))


def test_for_override_shortens_every_alert():
    rules = slo.build_rules(slo.RuleConfig(for_override="5s"))
    fors = {r["for"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert fors == {"5s"}


@needs_promtool
def test_generated_prometheus_and_alertmanager_configs_are_valid(tmp_path):
    targets = [local.ScrapeTarget("bookcast-ingest", "127.0.0.1:1"), local.ScrapeTarget("bookcast-gateway", "127.0.0.1:2"),
               local.ScrapeTarget("bookcast-gateway", "127.0.0.1:3", region="eu"),
               local.ScrapeTarget("bookcast-probe", "127.0.0.1:4")]
    mon = local.LocalMonitoring(tmp_path, targets, webhook_url="http://127.0.0.1:9/hook")
    mon.write_configs()
    res = _run(PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    config = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"bookcast-ingest", "bookcast-gateway", "bookcast-probe", "prometheus", "alertmanager"}
    assert jobs["bookcast-probe"]["honor_labels"] is True
    assert {c["labels"]["region"] for c in jobs["bookcast-gateway"]["static_configs"]} == {"local", "eu"}
    amtool = shutil.which("amtool")
    if amtool:
        res = _run(amtool, "check-config", str(tmp_path / "alertmanager.yml"))
        assert res.returncode == 0, res.stdout + res.stderr
    with pytest.raises(ValueError):
        local.prometheus_config([local.ScrapeTarget("nats", "127.0.0.1:5")], rule_files=[], alertmanager=None,
                                intervals=local.Intervals())
