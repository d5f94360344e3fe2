"""The test hooks and observability options are off by default and map onto the configs."""
from __future__ import annotations

import argparse
from pathlib import Path

from feed import ingest
from feed.gateway import server


def test_ingest_options_default_off_and_map_to_the_config(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    p = argparse.ArgumentParser()
    ingest.add_arguments(p)
    base = dict(nats="nats://127.0.0.1:4222", captures=[Path("a.jsonl")], speed=0.0, loop=True, name="i")
    off = ingest.config_from_args(argparse.Namespace(**base, **vars(p.parse_args([]))))
    assert off.upstream_lag_ns == 0 and off.otlp_endpoint is None and off.speed is None
    on = ingest.config_from_args(argparse.Namespace(**base, **vars(p.parse_args(
        ["--test-upstream-lag-ms", "250", "--otlp-endpoint", "http://127.0.0.1:4317", "--trace-sample-every", "0"]))))
    assert on.upstream_lag_ns == 250_000_000 and on.otlp_endpoint == "http://127.0.0.1:4317"
    assert on.trace_sample_every == 1  # at least every delta, never a division by nothing


def test_otlp_endpoint_defaults_to_the_standard_variable(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4999")
    p = argparse.ArgumentParser()
    server.add_arguments(p)
    cfg = server.config_from_args(p.parse_args([]))
    assert cfg.otlp_endpoint == "http://127.0.0.1:4999" and cfg.instrumented and cfg.fanout_delay_s == 0
    cfg = server.config_from_args(p.parse_args(["--instrumentation", "off", "--test-fanout-delay-ms", "150"]))
    assert not cfg.instrumented and cfg.fanout_delay_s == 0.15
