"""The console's JSON API, its event stream and its actions, described in the admin
listener's own /openapi.json.

    GET  /api/v1/overview | usage | crashes[?project=&limit=] | crashes/{id} | privacy
         | cluster                    the figures (console/figures.py), JSON
    GET  /api/v1/events               text/event-stream: `event: overview` at every tick
    POST /api/v1/actions/audit        the retention audit taken again now
    POST /api/v1/actions/sweep        the retention sweeper run now (then the audit)

Every route needs a session (401 JSON without one); a POST needs the session's CSRF
token and the console's own Origin (403 JSON, and nothing done, without them:
console/sessions.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from console.figures import MAX_CRASHES, SERIES, Figures
from console.history import Sampler
from console.sessions import CSRF_HEADER, GATE, check_csrf, require_api
from webapi.errors import Refusal
from webapi.openapi import OpenApi, json_response, ref, refusal

PREFIX = "/api/v1"
MAX_PROJECT = 200  # characters of a ?project= filter
DEFAULT_LIMIT, MAX_LIMIT = 100, MAX_CRASHES  # crash reports listed
MAX_STREAMS = 16  # event streams open at once
STREAM_BACKLOG = 4  # events a slow stream may lag behind; the oldest go first
FIGURES = web.AppKey("console_figures", Figures)
SAMPLER = web.AppKey("console_sampler", Sampler)


class Streams:
    """The open event streams: each gets every new overview; `close` ends them all
    (before the listener stops, so no handler keeps the shutdown waiting)."""

    def __init__(self, sampler: Sampler) -> None:
        self._sampler = sampler
        self._queues: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self.closed = False

    def __len__(self) -> int:
        return len(self._queues)

    def open(self) -> asyncio.Queue[dict[str, Any] | None]:
        if self.closed or len(self._queues) >= MAX_STREAMS:
            raise Refusal(503, "busy", "too many console event streams are open", retry_after=5)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(STREAM_BACKLOG)
        self._queues.add(queue)
        return queue

    def release(self, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._queues.discard(queue)

    def publish(self, overview: dict[str, Any]) -> None:
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()  # a slow reader loses the oldest, never blocks the tick
            queue.put_nowait(overview)

    def close(self) -> None:
        self.closed = True
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)


STREAMS = web.AppKey("console_streams", Streams)


def add_api(app: web.Application, openapi: OpenApi) -> None:
    app.router.add_get(f"{PREFIX}/overview", _overview)
    app.router.add_get(f"{PREFIX}/usage", _usage)
    app.router.add_get(f"{PREFIX}/crashes", _crashes)
    app.router.add_get(f"{PREFIX}/crashes/{{id}}", _crash)
    app.router.add_get(f"{PREFIX}/privacy", _privacy)
    app.router.add_get(f"{PREFIX}/cluster", _cluster)
    app.router.add_get(f"{PREFIX}/events", _events)
    app.router.add_post(f"{PREFIX}/actions/audit", _audit)
    app.router.add_post(f"{PREFIX}/actions/sweep", _sweep)
    describe(openapi)


# The crash list's filters, as the JSON route and the page describe them.
CRASH_FILTERS: list[dict[str, Any]] = [
    {
        "name": "project",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "maxLength": MAX_PROJECT},
    },
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
    },
]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def _overview(request: web.Request) -> web.Response:
    require_api(request)
    return _json(await request.app[FIGURES].overview())


async def _usage(request: web.Request) -> web.Response:
    require_api(request)
    return _json(await request.app[FIGURES].usage())


async def _crashes(request: web.Request) -> web.Response:
    require_api(request)
    project = request.query.get("project") or None
    if project is not None and len(project) > MAX_PROJECT:
        raise Refusal(400, "bad_project", f"a project is at most {MAX_PROJECT} characters")
    limit_text = request.query.get("limit", str(DEFAULT_LIMIT))
    if not (limit_text.isascii() and limit_text.isdigit()) or not (
        1 <= int(limit_text) <= MAX_LIMIT
    ):
        raise Refusal(400, "bad_limit", f"limit is a whole number from 1 to {MAX_LIMIT}")
    return _json(await request.app[FIGURES].crashes(project, int(limit_text)))


async def _crash(request: web.Request) -> web.Response:
    require_api(request)
    found = await request.app[FIGURES].crash(request.match_info["id"])
    if found is None:
        raise Refusal(404, "not_found", "no crash report of that id")
    return _json(found)


async def _privacy(request: web.Request) -> web.Response:
    require_api(request)
    return _json(await request.app[FIGURES].privacy())


async def _cluster(request: web.Request) -> web.Response:
    require_api(request)
    return _json(await request.app[FIGURES].cluster())


async def _audit(request: web.Request) -> web.Response:
    check_csrf(request, require_api(request))
    figures = request.app[FIGURES]
    await figures.sources.audit.refresh()
    return _json({"audit": figures.audit()})


async def _sweep(request: web.Request) -> web.Response:
    check_csrf(request, require_api(request))
    figures = request.app[FIGURES]
    # Whenever asked, but never beside another process's sweep (privacy/retention.py);
    # the sweeper of `serve` takes the audit again after it.
    runs = await figures.sources.sweeper.run_if_due(None)
    deleted = {run.category: run.deleted for run in runs or ()}
    return _json({"swept": runs is not None, "deleted": deleted, "audit": figures.audit()})


async def _events(request: web.Request) -> web.StreamResponse:
    """`event: overview` now and at every tick, while the session lasts."""
    session = require_api(request)
    streams = request.app[STREAMS]
    queue = streams.open()
    try:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        sessions = request.app[GATE].sessions
        overview: dict[str, Any] | None = request.app[SAMPLER].last
        if overview is None:
            overview = await request.app[FIGURES].overview()
        while overview is not None and sessions.get(session.id) is not None:
            await response.write(b"event: overview\ndata: " + orjson.dumps(overview) + b"\n\n")
            overview = await queue.get()
        return response
    finally:
        streams.release(queue)


# --- OpenAPI -------------------------------------------------------------------------

NUMBER_OR_NULL = {"type": ["number", "null"]}
COUNT = {"type": "integer", "minimum": 0}
STRING_OR_NULL = {"type": ["string", "null"]}


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
        "properties": properties,
    }


OVERVIEW = _object(
    {
        "time": {"type": "number"},
        "node": {"type": "string"},
        "flows": _object({t: COUNT for t in ("udp", "tcp", "tls", "ws")}),
        "pbx_links": {
            "type": "array",
            "items": _object(
                {
                    "serial": {"type": "string"},
                    "online": {"type": "boolean"},
                    "transport": STRING_OR_NULL,
                    "since": NUMBER_OR_NULL,
                }
            ),
        },
        "pbx_links_online": COUNT,
        "pbx_links_total": COUNT,
        "registered_phones": COUNT,
        "parked_calls": COUNT,
        "wakes": _object(
            {
                "window_s": COUNT,
                "attempted": COUNT,
                "delivered": COUNT,
                "success_rate": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "delivery_p50_ms": NUMBER_OR_NULL,
                "delivery_p95_ms": NUMBER_OR_NULL,
            }
        ),
        "pushes": {
            "type": "array",
            "items": _object(
                {
                    "provider": {"type": "string"},
                    "outcome": {"type": "string"},
                    "count": COUNT,
                }
            ),
        },
        "dead_tokens_per_min": {"type": "number", "minimum": 0},
        "shedding": {"type": "object", "additionalProperties": COUNT},
        "series": {
            "type": "object",
            "description": f"chart series: {', '.join(SERIES)}",
            "additionalProperties": {
                "type": "array",
                "items": {
                    "type": "array",
                    "description": "[time, value]; the value null when there is none",
                    "items": NUMBER_OR_NULL,
                    "minItems": 2,
                    "maxItems": 2,
                },
            },
        },
    }
)
USAGE = _object(
    {
        "tenants": {
            "type": "array",
            "items": _object(
                {
                    "tenant": {"type": "string"},
                    "month": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}$"},
                    "active_installs": COUNT,
                    "state": {"enum": ["provisional", "closed"]},
                    "digest": STRING_OR_NULL,
                }
            ),
        }
    }
)
CRASHES = _object(
    {
        "projects": {
            "type": "array",
            "items": _object(
                {"project": {"type": "string"}, "reports": COUNT, "last_at": {"type": "number"}}
            ),
        },
        "reports": {
            "type": "array",
            "items": _object(
                {
                    "id": {"type": "string"},
                    "project": {"type": "string"},
                    "received_at": {"type": "number"},
                    "level": STRING_OR_NULL,
                    "title": {"type": "string"},
                    "release": STRING_OR_NULL,
                    "platform": STRING_OR_NULL,
                }
            ),
        },
    }
)
CRASH = _object(
    {
        "id": {"type": "string"},
        "project": {"type": "string"},
        "received_at": {"type": "number"},
        "event": {"type": "object", "description": "the stored, scrubbed report"},
    }
)
AUDIT = _object(
    {
        "verdict": {"enum": ["ok", "violation"]},
        "taken_at": NUMBER_OR_NULL,
        "problems": {
            "type": "array",
            "items": _object({"category": {"type": "string"}, "detail": {"type": "string"}}),
        },
    }
)
PRIVACY = _object(
    {
        "categories": {
            "type": "array",
            "items": _object(
                {
                    "name": {"type": "string"},
                    "title": {"type": "string"},
                    "storage": {"enum": ["database", "log", "memory"]},
                    "records": {"type": ["integer", "null"], "minimum": 0},
                    "oldest_age_s": NUMBER_OR_NULL,
                    "limit_s": COUNT,
                    "next_deletion_at": NUMBER_OR_NULL,
                    "last_sweep_at": NUMBER_OR_NULL,
                }
            ),
        },
        "audit": ref("ConsoleAudit"),
        "dsr": {
            "type": "array",
            "description": "the data-subject request trail, without subjects",
            "items": _object(
                {
                    "at": {"type": "number"},
                    "action": {"type": "string"},
                    "outcome": {"type": "string"},
                    "via": {"type": "string"},
                }
            ),
        },
    }
)
HEALTH = _object({"ok": {"type": "boolean"}, "latency_ms": NUMBER_OR_NULL})
CLUSTER = _object(
    {
        "enabled": {"type": "boolean"},
        "nodes": {
            "type": "array",
            "items": _object(
                {
                    "node_id": {"type": "string"},
                    "flows": NUMBER_OR_NULL,
                    "load": {
                        "type": ["number", "null"],
                        "description": "the node's event-loop lag, ms",
                    },
                    "last_beat": NUMBER_OR_NULL,
                }
            ),
        },
        "redis": {"oneOf": [HEALTH, {"type": "null"}]},
        "store": _object(
            {
                "backend": {"enum": ["sqlite", "postgresql"]},
                "ok": {"type": "boolean"},
                "latency_ms": NUMBER_OR_NULL,
            }
        ),
    }
)
SWEEP = _object(
    {
        "swept": {"type": "boolean"},
        "deleted": {"type": "object", "additionalProperties": COUNT},
        "audit": ref("ConsoleAudit"),
    }
)
NO_SESSION = refusal("No session: log in first (POST /login)")
FORBIDDEN = refusal("No or a wrong CSRF token, or a foreign Origin: nothing was done")
CSRF_PARAMETER = {
    "name": CSRF_HEADER,
    "in": "header",
    "required": True,
    "schema": {"type": "string"},
    "description": "the session's CSRF token (<meta name=csrf-token> of a page)",
}


def describe(openapi: OpenApi) -> None:
    openapi.security_scheme(
        "consoleSession", {"type": "apiKey", "in": "cookie", "name": "softrelay_console"}
    )
    security: list[dict[str, list[str]]] = [{"consoleSession": []}]
    openapi.schema("ConsoleAudit", AUDIT)
    for name, schema, summary in (
        ("overview", OVERVIEW, "Live figures: flows, PBX links, phones, wakes, pushes"),
        ("usage", USAGE, "Active installs per tenant and month"),
        ("privacy", PRIVACY, "Categories, retention, the audit, the DSR trail"),
        ("cluster", CLUSTER, "Nodes, Redis and the store's health"),
    ):
        schema_name = f"Console{name.capitalize()}"
        openapi.schema(schema_name, schema)
        openapi.operation(
            f"{PREFIX}/{name}",
            "get",
            {
                "summary": summary,
                "security": security,
                "responses": {
                    "200": json_response(summary, ref(schema_name)),
                    "401": NO_SESSION,
                },
            },
        )
    openapi.schema("ConsoleCrashes", CRASHES)
    openapi.operation(
        f"{PREFIX}/crashes",
        "get",
        {
            "summary": "The stored, scrubbed crash reports, by project",
            "security": security,
            "parameters": CRASH_FILTERS,
            "responses": {
                "200": json_response("Projects and the newest reports", ref("ConsoleCrashes")),
                "400": refusal("A bad project or limit"),
                "401": NO_SESSION,
            },
        },
    )
    openapi.schema("ConsoleCrash", CRASH)
    openapi.operation(
        f"{PREFIX}/crashes/{{id}}",
        "get",
        {
            "summary": "One stored, scrubbed crash report",
            "security": security,
            "parameters": [
                {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": json_response("The report", ref("ConsoleCrash")),
                "401": NO_SESSION,
                "404": refusal("No report of that id"),
            },
        },
    )
    openapi.operation(
        f"{PREFIX}/events",
        "get",
        {
            "summary": "Server-sent events: `event: overview` (data: the overview JSON) at"
            " every tick, while the session lasts",
            "security": security,
            "responses": {
                "200": {
                    "description": "The event stream",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                "401": NO_SESSION,
                "503": refusal("Too many streams are open", {"Retry-After": {"schema": COUNT}}),
            },
        },
    )
    openapi.schema("ConsoleSweep", SWEEP)
    for action, schema, summary in (
        ("audit", _object({"audit": ref("ConsoleAudit")}), "Take the retention audit now"),
        ("sweep", ref("ConsoleSweep"), "Run the retention sweeper now, then the audit"),
    ):
        openapi.operation(
            f"{PREFIX}/actions/{action}",
            "post",
            {
                "summary": summary,
                "security": security,
                "parameters": [CSRF_PARAMETER],
                "responses": {
                    "200": json_response("Done", schema),
                    "401": NO_SESSION,
                    "403": FORBIDDEN,
                },
            },
        )


__all__ = ["FIGURES", "SAMPLER", "STREAMS", "Streams", "add_api", "describe"]
