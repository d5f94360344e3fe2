"""``feed.gateway.viewer``: the page and its files over real HTTP (aiohttp test server), the gateway app
wiring, and the files shipping in the wheel."""
from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from feed.gateway.app import GatewayConfig, create_app
from feed.gateway.viewer import STATIC_DIR, add_routes, load_static
from tests.e2e.harness import REPO

FILES = {"index.html", "app.js", "stream.js", "book.js", "checksum.js", "decimal.js", "recorder.js", "viewer.css"}


async def client() -> TestClient:
    app = web.Application()
    add_routes(app)
    c = TestClient(TestServer(app, host="127.0.0.1", port=0))
    await c.start_server()
    return c


async def test_page_and_files_are_served_with_their_types_and_policy():
    c = await client()
    try:
        r = await c.get("/")
        assert r.status == 200 and r.content_type == "text/html"
        html = await r.text()
        assert '<script type="module" src="/static/app.js">' in html
        assert "connect-src 'self'" in r.headers["Content-Security-Policy"] and r.headers["Cache-Control"] == "no-cache"
        for name in FILES - {"index.html"}:
            r = await c.get(f"/static/{name}")
            assert r.status == 200, name
            assert r.content_type == ("text/css" if name.endswith(".css") else "text/javascript"), name
            assert await r.read() == (STATIC_DIR / name).read_bytes()
    finally:
        await c.close()


async def test_anything_else_is_404_and_never_reaches_the_filesystem():
    c = await client()
    try:
        for path in ("/static/nope.js", "/static/..%2Fviewer.py", "/static/%2E%2E/app.py", "/static/", "/static/../viewer.py"):
            r = await c.get(path)
            assert r.status == 404, path
    finally:
        await c.close()


def test_gateway_app_serves_the_viewer_beside_the_protocol_routes():
    app = create_app(GatewayConfig())  # not started: no NATS needed to inspect the routes
    paths = {r.resource.canonical for r in app.router.routes()}
    assert {"/", "/static/{name}", "/v1/ws", "/v1/book/{instrument}", "/v1/instruments"} <= paths


def test_load_static_refuses_a_directory_without_the_page(tmp_path):
    (tmp_path / "app.js").write_text("")
    with pytest.raises(FileNotFoundError, match="no index.html"):
        load_static(tmp_path)
    assert set(load_static()) == FILES


def _uv() -> str | None:
    local = REPO / ".bootstrap" / "bin" / "uv"
    return str(local) if local.exists() else shutil.which("uv")


def test_the_wheel_ships_the_page(tmp_path):
    uv = _uv()
    if uv is None:
        pytest.skip("no uv (scripts/setup.sh installs one into .bootstrap/)")
    env = dict(os.environ, UV_PYTHON_DOWNLOADS="never")
    built = subprocess.run([uv, "build", "--wheel", "--out-dir", str(tmp_path), str(REPO)], capture_output=True,
                           text=True, timeout=240, env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = Path(tmp_path).glob("bookcast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"feed/gateway/static/{n}" for n in FILES} <= names
    assert {"feed/gateway/viewer.py", "feed/streamcheck.py", "feed/data/coinbase-level2-20210417.jsonl.gz"} <= names
