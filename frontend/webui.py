"""The web chat at / (frontend/webui/: static files, no build step) and GET /v1/status, which it shows.

The page and its assets are read once from the package when the app is
built and served from memory, so no request path ever reaches the file
system. They sit outside /v1 and need no API key: they hold no data, and
every API call the page makes sends the key the user gave it. A strict
Content-Security-Policy allows only this server's own scripts and styles,
so even text that slipped into the DOM as HTML could run nothing.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
from sanic import Request, Sanic
from sanic.response import HTTPResponse, raw

from infersnap.frontend.errors import APIError
from infersnap.plan import ServePlan
from infersnap.status import status_document

FILES = Path(__file__).parent / "webui"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # a new version of the server serves its own page at once
}


def install(app: Sanic, plan: ServePlan) -> None:
    """GET /v1/status always; the page at / and its assets at /webui/NAME when webui.enabled."""

    async def server_status(request: Request) -> HTTPResponse:
        # asked now, as `infersnap status` does: what runs and what is queued change with every request,
        # and the pushed Status carries them only as of its last push
        status = await request.app.ctx.broker.status(fresh=True)
        return raw(msgspec.json.encode(status_document(status)), content_type="application/json")

    app.add_route(server_status, "/v1/status", methods=["GET"], name="server_status")
    if not plan.webui:
        return
    assets = {path.name: (path.read_bytes(), TYPES[path.suffix]) for path in FILES.iterdir() if path.suffix in TYPES}
    page, _ = assets.pop("index.html")

    async def index(request: Request) -> HTTPResponse:
        return raw(page, content_type=TYPES[".html"], headers=HEADERS)

    async def asset(request: Request, name: str) -> HTTPResponse:
        if name not in assets:
            raise APIError(404, f"The web chat has no file '{name}'", code="not_found")
        body, content_type = assets[name]
        return raw(body, content_type=content_type, headers=HEADERS)

    app.add_route(index, "/", methods=["GET"], name="webui_index")
    app.add_route(asset, "/webui/<name>", methods=["GET"], name="webui_asset")
