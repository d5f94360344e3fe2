"""The package layers (pyproject.toml [tool.importlinter]): feed imports nothing built on it, the tools
(exporter, loadtest, ebpf, chaos) are independent of each other, the pure core does no I/O, the gateway's
state machines are independent, the SDK needs no server."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    assert lint.is_file(), f"import-linter is a dev dependency; missing {lint}"
    out = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "5 kept, 0 broken" in out.stdout, out.stdout[-2000:]


def test_the_sdk_imports_without_the_server_packages():
    """``pip install bookcast`` (aiohttp, orjson, sortedcontainers) is enough for ``feed.client``."""
    code = (
        "import sys\n"
        "blocked = {'nats', 'prometheus_client', 'opentelemetry', 'uvloop', 'wsproto', 'hdrh', 'chdb', 'locust',"
        " 'matplotlib', 'clickhouse_driver'}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in blocked: raise ImportError(f'blocked {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from feed.client import BookClient, VerifiedBooks\n"
        "from feed import wire, hops\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
