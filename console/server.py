"""The admin listener: an aiohttp Application of its own, on its own address (loopback
by default, TLS optional), serving the console's pages, API and /openapi.json.

    console = await ConsoleServer.start(settings, sources, ticker=Interval(settings.tick))
    console.addresses                   # [(host, port)] it listens on
    await console.close()               # streams end, the sampler stops, the listener closes

softrelay/app.py starts it last, in a cleanup context of the main app, with references
to the main app's running services (console/figures.py `Sources`), and closes it first:
the console never sees a service that has stopped. `serve --workers N` starts it in the
first worker only.

Every answer carries the same security headers (a strict Content-Security-Policy: the
pages load nothing from outside and run no inline script; no framing, no sniffing;
the referrer only to the console itself, since under `no-referrer` Chromium sends
`Origin: null` on POSTs, which the Origin check refuses), and pages and API answers
`Cache-Control: no-store`.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from aiohttp import web

from console.api import FIGURES, SAMPLER, STREAMS, Streams, add_api
from console.figures import Figures, Sources
from console.history import History, Sampler, Ticker
from console.sessions import CSRF_FIELD, GATE, TOKEN_FIELD, Gate, login, logout
from console.settings import ConsoleSettings
from privacy.tasks import Tasks
from webapi.errors import refusals
from webapi.openapi import OPENAPI, OpenApi, json_response, refusal

WINDOW_KEEP = 300.0  # seconds of samples kept at least: the overview's window
MAX_BODY = 64 * 1024  # the console takes small forms only
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self';"
    " script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
log = logging.getLogger("softrelay.console")


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    if not request.path.startswith("/static/"):  # vendored files may be cached (ETag)
        response.headers["Cache-Control"] = "no-store"


def build_console(
    settings: ConsoleSettings, sources: Sources, sampler_ticker: Ticker
) -> web.Application:
    """The admin Application (not yet listening)."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[refusals])
    app.on_response_prepare.append(_security_headers)
    app[GATE] = Gate(settings.admin_token, settings.session_ttl, sources.clock, tls=settings.tls)
    keep = max(float(settings.history), WINDOW_KEEP)
    history = History(keep, int(keep / settings.tick) + 2)
    app[FIGURES] = figures = Figures(sources, history)
    app[SAMPLER] = sampler = Sampler(_turn(figures), sampler_ticker)
    app[STREAMS] = streams = Streams(sampler)
    sampler.listen(streams.publish)
    app[OPENAPI] = openapi = OpenApi("softrelay console", "1")
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    _describe_session_routes(openapi)
    add_api(app, openapi)
    _add_pages(app, openapi)
    openapi.operation(
        "/openapi.json",
        "get",
        {
            "summary": "This OpenAPI document: the admin listener's routes",
            "responses": {"200": json_response("The document", {"type": "object"})},
        },
    )
    app.router.add_get("/openapi.json", _document)
    return app


def _turn(figures: Figures) -> Any:
    async def turn() -> dict[str, Any]:
        return figures.sample()

    return turn


def _add_pages(app: web.Application, openapi: OpenApi) -> None:
    """The HTML pages and static files (console/pages.py), when they are installed."""
    try:
        pages = importlib.import_module("console.pages")
    except ModuleNotFoundError:
        log.warning("console.no_pages")
        return
    pages.add_pages(app, figures_of=lambda request: request.app[FIGURES], openapi=openapi)


async def _document(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI].document())


class ConsoleServer:
    def __init__(self, app: web.Application, runner: web.AppRunner, tasks: Tasks) -> None:
        self.app = app
        self._runner = runner
        self._tasks = tasks

    @classmethod
    async def start(
        cls, settings: ConsoleSettings, sources: Sources, *, ticker: Ticker
    ) -> ConsoleServer:
        """Listen on `settings.listen` and start sampling; OSError (a port in use) or
        ConfigError (a TLS file that will not load) stops the start."""
        app = build_console(settings, sources, ticker)
        context = settings.ssl_context()
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5)
        await runner.setup()
        try:
            host, port = settings.listen
            await web.TCPSite(runner, host, port, ssl_context=context).start()
        except BaseException:
            await runner.cleanup()
            raise
        tasks = Tasks(log, "console.task_failed")
        tasks.spawn(app[SAMPLER].run_forever(), name="console-sampler")
        if not settings.loopback and context is None:
            log.warning("console.listening_without_tls")  # the admin token crosses in clear
        return cls(app, runner, tasks)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(str(a[0]), int(a[1])) for a in self._runner.addresses]

    @property
    def scheme(self) -> str:
        return "https" if self.app[GATE].tls else "http"

    async def close(self) -> None:
        """The streams end, the sampler stops, then the listener closes."""
        self.app[STREAMS].close()
        await self._tasks.close()
        await self._runner.cleanup()


def _describe_session_routes(openapi: OpenApi) -> None:
    form = {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "required": [TOKEN_FIELD, CSRF_FIELD],
                    "properties": {
                        TOKEN_FIELD: {"type": "string"},
                        CSRF_FIELD: {"type": "string"},
                    },
                }
            }
        },
    }
    page_or_json = {
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Refusal"}},
            "text/html": {"schema": {"type": "string"}},
        }
    }
    openapi.operation(
        "/login",
        "post",
        {
            "summary": "Log in with the admin token: 303 / with the session cookie",
            "requestBody": form,
            "responses": {
                "303": {
                    "description": "Logged in (Set-Cookie softrelay_console)",
                    "headers": {"Set-Cookie": {"schema": {"type": "string"}}},
                },
                "400": refusal("The form is not urlencoded UTF-8"),
                "401": {"description": "Wrong admin token", **page_or_json},
                "403": refusal("A foreign Origin or no pre-login CSRF cookie and field"),
                "413": refusal("The form is too large"),
                "415": refusal("Not a form"),
                "429": {
                    "description": "Too many wrong tokens from this client",
                    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                    **page_or_json,
                },
            },
        },
    )
    openapi.operation(
        "/logout",
        "post",
        {
            "summary": "Log out (CSRF-checked): 303 /login, the session dropped",
            "responses": {
                "303": {"description": "To /login"},
                "400": refusal("The form is not urlencoded UTF-8"),
                "403": refusal("No or a wrong CSRF token, or a foreign Origin: nothing done"),
                "413": refusal("The form is too large"),
                "415": refusal("Not a form"),
            },
        },
    )


__all__ = ["ConsoleServer", "build_console"]
