"""The OpenAPI document of every HTTP API of softrelay, served at `/openapi.json`.

Each API module describes its own operations where it adds its routes:

    openapi = app[OPENAPI]
    openapi.schema("UsagePing", {...})
    openapi.operation("/usage/v1/ping", "post", {...})

`build_app` creates the registry before any module registers, and the document is
assembled once, at the first request, from what they contributed. A path or schema
described twice is a programming error and stops the start.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
# `webapi.errors.Refusal` as every API but crash ingest and OAuth answers it (those two
# describe their variants' shapes themselves): a code to act on, a sentence for people.
REFUSAL_SCHEMA = {
    "type": "object",
    "required": ["error", "detail"],
    "additionalProperties": False,
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
}


class OpenApi:
    def __init__(self, title: str, version: str) -> None:
        self._info = {"title": title, "version": version}
        self._paths: dict[str, dict[str, Any]] = {}
        self._schemas: dict[str, Any] = {"Refusal": REFUSAL_SCHEMA}
        self._security: dict[str, Any] = {}
        self._document: dict[str, Any] | None = None

    def operation(self, path: str, method: str, spec: dict[str, Any]) -> None:
        methods = self._paths.setdefault(path, {})
        if method in methods:
            raise ValueError(f"OpenAPI: {method.upper()} {path} is described twice")
        methods[method] = spec
        self._document = None

    def schema(self, name: str, spec: dict[str, Any]) -> dict[str, str]:
        """Add a component schema; a `$ref` to it."""
        if name in self._schemas and self._schemas[name] != spec:
            raise ValueError(f"OpenAPI: schema {name} is described twice")
        self._schemas[name] = spec
        self._document = None
        return ref(name)

    def security_scheme(self, name: str, spec: dict[str, Any]) -> None:
        self._security[name] = spec
        self._document = None

    def document(self) -> dict[str, Any]:
        if self._document is None:
            components: dict[str, Any] = {"schemas": dict(sorted(self._schemas.items()))}
            if self._security:
                components["securitySchemes"] = self._security
            self._document = {
                "openapi": OPENAPI_VERSION,
                "info": self._info,
                "paths": dict(sorted(self._paths.items())),
                "components": components,
            }
        return self._document


OPENAPI = web.AppKey("openapi", OpenApi)


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def refusal(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `{"error", "detail"}` answer; `headers` as in an OpenAPI response object."""
    answer = json_response(description, ref("Refusal"))
    if headers:
        answer["headers"] = headers
    return answer


RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}


def websocket_upgrade(
    summary: str, subprotocol: str | None, refusals: dict[str, Any]
) -> dict[str, Any]:
    """A WebSocket endpoint, described as the GET that asks for the upgrade.

    OpenAPI has no WebSocket operations; the upgrade request and the answers that
    refuse it are plain HTTP, and those are what a client needs documented (and what a
    fuzzer can check). What flows after the 101 is described by `summary`.
    """
    parameters: list[dict[str, Any]] = []
    switching = "Switching to WebSocket"
    if subprotocol is not None:
        switching += f", subprotocol {subprotocol!r}"
        parameters.append(
            {
                "name": "Sec-WebSocket-Protocol",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": f"must offer {subprotocol!r}",
            }
        )
    return {
        "summary": summary,
        "parameters": parameters,
        "responses": {"101": {"description": switching}, **refusals},
    }


def add_openapi_route(app: web.Application, *, metrics: bool = True, token: bool = False) -> None:
    """Serve the document, and describe the routes of app.py itself: /metrics when it
    is served on this port (`metrics`), and its 401 when a scrape needs a `token`."""
    openapi = app[OPENAPI]
    openapi.operation(
        "/openapi.json",
        "get",
        {
            "summary": "This OpenAPI document",
            "responses": {"200": json_response("The document", {"type": "object"})},
        },
    )
    openapi.operation(
        "/healthz",
        "get",
        {
            "summary": "Liveness",
            "responses": {
                "200": json_response(
                    "Running",
                    {
                        "type": "object",
                        "required": ["status"],
                        "properties": {"status": {"const": "ok"}},
                    },
                )
            },
        },
    )
    if metrics:
        responses: dict[str, Any] = {
            "200": {
                "description": "Prometheus text format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        }
        operation: dict[str, Any] = {"summary": "Prometheus metrics", "responses": responses}
        if token:
            openapi.security_scheme("metricsToken", {"type": "http", "scheme": "bearer"})
            operation["security"] = [{"metricsToken": []}]
            responses["401"] = refusal(
                "unauthorized: no or a wrong metrics token",
                {"WWW-Authenticate": {"schema": {"type": "string"}}},
            )
        openapi.operation("/metrics", "get", operation)
    app.router.add_get("/openapi.json", _serve)


async def _serve(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI].document())
