"""Grafana dashboards (grafanalib), Prometheus SLO recording and alert rules, their promtool unit tests,
and the Prometheus/Alertmanager configs of a local stack.

``slo`` (SLIs, burn-rate alerts, rule file), ``boards`` (the five dashboards and the exception list),
``promtests`` (promtool scenarios) are pure; ``local`` starts Debian's Prometheus and Alertmanager;
``cli`` is ``bookcast dashboards build|check``. Committed outputs: ``rules/bookcast-rules.yml`` and
``tests/bookcast-rules.test.yml`` (tests fail when they drift from the code).
"""
