"""Gateway config declared once: dataclass fields -> CLI options -> the worker's argv -> the same config."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from feed.gateway import config as cfg
from feed.gateway.config import GatewayConfig, ServerConfig
from feed.gateway.protocol import GatewayLimits
from feed.gateway.server import RestartBackoff


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    cfg.add_arguments(p)
    return p


def test_defaults_come_from_the_dataclasses(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert cfg.server_config_from_args(parser().parse_args([])) == ServerConfig()


def test_worker_argv_round_trips_every_option():
    changed = ServerConfig(host="127.0.0.2", port=9, workers=3, gateway=GatewayConfig(
        nats_url="nats://127.0.0.1:1", limits=GatewayLimits(max_queue_bytes=1234, heartbeat_interval_s=0.5),
        ring_size=7, ws_ping_interval_s=3.0, snapshot_timeout_s=0.5, drain_timeout_s=1.5, nats_reconnect_wait_s=0.1,
        ws_writer_limit_bytes=4096, socket_sndbuf_bytes=8192, name="g", instrumented=False,
        otlp_endpoint="http://127.0.0.1:4317", instrument_linger_s=2.0, fanout_delay_s=0.25))
    argv = cfg.worker_argv(changed)
    assert cfg.server_config_from_args(parser().parse_args(argv)) == changed
    # every option differs from its default here, so every one is really carried
    assert len(argv) == 2 * len(cfg.OPTIONS)
    named = cfg.worker_argv(changed, name="g-1")
    assert cfg.config_from_args(parser().parse_args(named)).name == "g-1"


def test_every_cli_field_is_an_option_and_nothing_else():
    flags = {o.flag for o in cfg.OPTIONS}
    declared = {f.metadata["cli"]["flag"] for cls in (ServerConfig, GatewayConfig, GatewayLimits)
                for f in dataclasses.fields(cls) if "cli" in f.metadata}
    assert flags == declared and len(flags) == len(cfg.OPTIONS)
    assert {"--nats", "--port", "--workers", "--max-queue-bytes", "--test-fanout-delay-ms"} <= flags


def test_bad_limit_is_a_clear_error():
    with pytest.raises(ValueError, match="max_queue_bytes"):
        cfg.server_config_from_args(parser().parse_args(["--max-queue-bytes", "0"]))


def test_restart_backoff_doubles_while_workers_die_young_and_resets():
    b = RestartBackoff(0.5, 4.0, healthy_after_s=10.0)
    assert [b.next_delay_s(1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.next_delay_s(60.0) == 0.5 and b.next_delay_s(0.1) == 1.0
