"""The console's page routes and its static files.

    add_pages(app, figures_of=lambda request: request.app[FIGURES], openapi=openapi)

GET /, /usage, /crashes, /crashes/{id}, /privacy, /cluster render the figures of the
console's API (console/views.py) for a logged-in session, and send anyone else to
/login (303); GET /login shows the form (console/sessions.py checks what it posts and
answers a refused attempt with `login_page`). GET /static/{path} serves console/static/
from memory: only files of a known type, each with its content type, an ETag and
`Cache-Control: no-cache` (the browser asks again, and a 304 answers when unchanged).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from console import views
from console.api import CRASH_FILTERS, DEFAULT_LIMIT, MAX_LIMIT, MAX_PROJECT
from console.layout import login_html
from console.overview import overview_page
from console.sessions import login_csrf, require_page, session_of
from webapi.errors import Refusal
from webapi.openapi import OpenApi, refusal

STATIC = Path(__file__).resolve().parent / "static"
# What the static route serves, by the file's suffix ("" for LICENSE); any other file
# under static/ is not served.
CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".svg": "image/svg+xml; charset=utf-8",
    "": "text/plain; charset=utf-8",
}
MAX_ID = 128  # characters of a crash report id in a path
HTML = "text/html"


class Figures(Protocol):
    """The JSON documents of the console's API (the plan's shapes), as pages read them."""

    async def overview(self) -> Mapping[str, Any]: ...
    async def usage(self) -> Mapping[str, Any]: ...
    async def crashes(self, project: str | None, limit: int) -> Mapping[str, Any]: ...
    async def crash(self, event_id: str) -> Mapping[str, Any] | None: ...
    async def privacy(self) -> Mapping[str, Any]: ...
    async def cluster(self) -> Mapping[str, Any]: ...


FiguresOf = Callable[[web.Request], Figures]
Render = Callable[[web.Request, Figures, str], Awaitable[web.Response]]


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str  # the quoted sha256 of the body

    @classmethod
    def read(cls, path: Path) -> StaticFile:
        body = path.read_bytes()
        return cls(body, CONTENT_TYPES[path.suffix], f'"{hashlib.sha256(body).hexdigest()}"')


def static_files(root: Path = STATIC) -> dict[str, StaticFile]:
    """Every file under `root` of a served type, by its path below it ("console.js")."""
    return {
        path.relative_to(root).as_posix(): StaticFile.read(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.suffix in CONTENT_TYPES
    }


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(
        text=text,
        status=status,
        content_type=HTML,
        charset="utf-8",
        headers={"Cache-Control": "no-store"},
    )


def login_page(
    request: web.Request, *, error: str | None = None, status: int = 200
) -> web.Response:
    """The login form (again, with `error`, after a refused attempt)."""
    response = _html("", status)
    response.text = login_html(csrf=login_csrf(request, response), message=error or "")
    return response


async def _login(request: web.Request) -> web.StreamResponse:
    if session_of(request) is not None:
        raise web.HTTPSeeOther("/", headers={"Cache-Control": "no-store"})
    return login_page(request)


async def _overview(request: web.Request, figures: Figures, csrf: str) -> web.Response:
    return _html(overview_page(await figures.overview(), csrf))


async def _usage(request: web.Request, figures: Figures, csrf: str) -> web.Response:
    return _html(views.usage_page(await figures.usage(), csrf))


async def _crashes(request: web.Request, figures: Figures, csrf: str) -> web.Response:
    project = request.query.get("project") or None
    if project is not None and len(project) > MAX_PROJECT:
        return _html(
            views.problem_page(f"A project name is at most {MAX_PROJECT} characters.", csrf), 400
        )
    limit_text = request.query.get("limit", str(DEFAULT_LIMIT))
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
        return _html(
            views.problem_page(f"limit is a whole number from 1 to {MAX_LIMIT}.", csrf), 400
        )
    data = await figures.crashes(project, int(limit_text))
    return _html(views.crashes_page(data, project, csrf))


async def _crash(request: web.Request, figures: Figures, csrf: str) -> web.Response:
    report_id = request.match_info["id"]
    data = await figures.crash(report_id) if len(report_id) <= MAX_ID else None
    if data is None:
        return _html(views.problem_page("There is no crash report of that id.", csrf), 404)
    return _html(views.crash_page(data, csrf))


async def _privacy(request: web.Request, figures: Figures, csrf: str) -> web.Response:
    return _html(views.privacy_page(await figures.privacy(), csrf))


async def _cluster(request: web.Request, figures: Figures, csrf: str) -> web.Response:
    return _html(views.cluster_page(await figures.cluster(), csrf))


PAGES: tuple[tuple[str, Render, str], ...] = (
    ("/", _overview, "Overview: flows, PBX links, phones, wakes, pushes, shedding"),
    ("/usage", _usage, "Usage: active installs per tenant and month"),
    ("/crashes", _crashes, "Crash reports by project"),
    ("/crashes/{id}", _crash, "One scrubbed crash report"),
    ("/privacy", _privacy, "Privacy: categories, retention audit, DSR trail, actions"),
    ("/cluster", _cluster, "Cluster: nodes, Redis and store health"),
)


def add_pages(
    app: web.Application, *, figures_of: FiguresOf, openapi: OpenApi | None = None
) -> None:
    """The page routes, GET /login and GET /static/{path} (described in `openapi`)."""

    def page(render: Render) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            session = require_page(request)
            return await render(request, figures_of(request), session.csrf)

        return handle

    for path, render, _ in PAGES:
        app.router.add_get(path, page(render))
    app.router.add_get("/login", _login)
    files = static_files()

    async def static(request: web.Request) -> web.StreamResponse:
        found = files.get(request.match_info["path"])
        if found is None:
            raise Refusal(404, "not_found", "the console has no such file")
        headers = {"ETag": found.etag, "Cache-Control": "no-cache"}
        if request.headers.get("If-None-Match") == found.etag:
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=found.body, headers={**headers, "Content-Type": found.content_type}
        )

    app.router.add_get("/static/{path:.+}", static)
    if openapi is not None:
        _describe(openapi, sorted(files))


def _describe(openapi: OpenApi, files: list[str]) -> None:
    page_answers = {
        "200": {"description": "The page", "content": {HTML: {"schema": {"type": "string"}}}},
        "303": {"description": "No session: to /login"},
    }
    for path, _, summary in PAGES:
        spec: dict[str, Any] = {"summary": summary, "responses": dict(page_answers)}
        if path == "/crashes":
            spec["parameters"] = CRASH_FILTERS
            spec["responses"]["400"] = {"description": "A bad filter (an HTML page)"}
        if path == "/crashes/{id}":
            spec["parameters"] = [
                {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
            ]
            spec["responses"]["404"] = {"description": "No such report (an HTML page)"}
        openapi.operation(path, "get", spec)
    openapi.operation(
        "/login",
        "get",
        {
            "summary": "The login form (sets the pre-login CSRF cookie); 303 / with a session",
            "responses": {
                "200": page_answers["200"],
                "303": {"description": "Already logged in: to /"},
            },
        },
    )
    openapi.operation(
        "/static/{path}",
        "get",
        {
            "summary": f"The console's files: {', '.join(files)}",
            "parameters": [
                {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": {"description": "The file, with its content type and ETag"},
                "304": {"description": "Unchanged (If-None-Match)"},
                "404": refusal("No such file"),
            },
        },
    )
