"""The book viewer (issue 12): the gateway serves a browser page at ``/`` and its files under ``/static/``.

The page (``feed/gateway/static/``: plain modern JavaScript modules, no build step, no dependency) is a
PROTOCOL.md v1 client like any other: it lists ``GET /v1/instruments``, subscribes on ``/v1/ws``, keeps
the book, verifies ``prev_seq``/epoch and the section 6 CRC-32 on every message, and offers the frames it
received as a capture file (``venue: "bookcast"``) that ``bookcast replay --check`` verifies
(``feed.streamcheck``).

Routes, all ``GET``:

* ``/`` -> ``static/index.html``;
* ``/static/<name>`` -> that file, for the files present in ``static/`` when the app is built (read into
  memory once; any other name is 404, so no request reaches the filesystem).

Responses carry ``Cache-Control: no-cache`` (a gateway upgrade is picked up at once) and a
Content-Security-Policy that allows only this origin (scripts, styles, fetch and WebSocket). These
routes never need a token, even with auth on (PROTOCOL.md section 8 covers the WebSocket and REST
routes): the page asks the user for one and sends it as ``?token=`` and ``Authorization: Bearer``.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(str(resources.files("feed.gateway") / "static"))
CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
}


def load_static(directory: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """``{file name: (bytes, content type)}`` for every file of a known type directly in ``directory``.

    Raises:
        FileNotFoundError: ``directory`` has no ``index.html`` (a broken install: the wheel lost the page).
    """
    files = {
        path.name: (path.read_bytes(), CONTENT_TYPES[path.suffix])
        for path in sorted(directory.iterdir())
        if path.is_file() and path.suffix in CONTENT_TYPES
    }
    if "index.html" not in files:
        raise FileNotFoundError(f"book viewer page missing: no index.html in {directory}")
    return files


def add_routes(app: web.Application) -> None:
    """Serve the viewer on ``app``: ``GET /`` (the page) and ``GET /static/{name}`` (its files)."""
    files = load_static()

    def respond(name: str) -> web.Response:
        body, content_type = files[name]
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=HEADERS)

    async def index(request: web.Request) -> web.Response:
        return respond("index.html")

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files:
            raise web.HTTPNotFound(text=f"no viewer file {name!r}\n")
        return respond(name)

    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
