"""Fixtures of the exporter tests: a real ClickHouse server (Debian's 18.16) on free loopback ports."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from feed.procs import free_port, port_open, stop_process, wait_until

_CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{dir}/server.log</log><errorlog>{dir}/error.log</errorlog></logger>
  <listen_host>127.0.0.1</listen_host>
  <tcp_port>{tcp_port}</tcp_port>
  <http_port>{http_port}</http_port>
  <path>{dir}/data/</path>
  <tmp_path>{dir}/tmp/</tmp_path>
  <user_files_path>{dir}/user_files/</user_files_path>
  <format_schema_path>{dir}/format_schemas/</format_schema_path>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>5368709120</mark_cache_size>
</yandex>
"""
_USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default/></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks>
    <profile>default</profile><quota>default</quota></default></users>
  <quotas><default/></quotas>
</yandex>
"""


@pytest.fixture(scope="session")
def clickhouse_url(tmp_path_factory) -> str:
    """``clickhouse://127.0.0.1:<port>`` of a clickhouse-server started for this test run, stopped by PID."""
    binary = shutil.which("clickhouse-server")
    if binary is None:
        pytest.skip("clickhouse-server not installed (scripts/setup.sh installs Debian's clickhouse-server as root)")
    workdir: Path = tmp_path_factory.mktemp("clickhouse")
    tcp_port, http_port = free_port(), free_port()
    (workdir / "config.xml").write_text(_CONFIG.format(dir=workdir, tcp_port=tcp_port, http_port=http_port))
    (workdir / "users.xml").write_text(_USERS)
    with open(workdir / "stdout.log", "wb") as out:
        proc = subprocess.Popen([binary, f"--config-file={workdir / 'config.xml'}"], cwd=workdir, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: port_open("127.0.0.1", tcp_port), 30, what="clickhouse-server tcp port", proc=proc)
        yield f"clickhouse://127.0.0.1:{tcp_port}"
    finally:
        stop_process(proc, grace_s=10)
