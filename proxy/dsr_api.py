"""`/dsr/v1/...`: the data-subject rights over HTTP (privacy/dsr.py does the work).

Who may ask:

- the subject, proving identity through their PBX (proxy/dsr_identity.py): first
  `POST /dsr/v1/challenge`, then the request with `challenge_id` and the digest
  `authorization` computed from the PBX's challenge;
- the operator, with `Authorization: Bearer <admin token>` (`[dsr] admin_token`),
  acting on a request the operator verified by other means.

Failed proofs count per subject and per client address (memory only); past
`dsr.max_failures` within `dsr.failure_window` the answer is 429 with Retry-After.
Every error is JSON `{"error": "..."}`; refused requests are recorded in the trail.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from privacy.declaration import ConfigError, resolve_secret
from privacy.dsr import (
    MUTABLE_FIELDS,
    DataSubjectRights,
    DsrSettings,
    FailureLimiter,
    InvalidRequest,
    parse_subject,
)
from privacy.store import Store, Subject
from proxy.dsr_identity import IdentityError, PbxIdentity
from proxy.openapi import JSON, OPENAPI, error, json_response, ref
from proxy.sip.relay import Relay

PREFIX = "/dsr/v1"
ACTIONS = ("export", "rectify", "erase", "restrict", "unrestrict", "object")
_SUBJECT_KEYS = {"sip_username", "pbx_serial"}
_PROOF_KEYS = {"challenge_id", "authorization"}
_EXTRA_KEYS = {"rectify": {"changes", "instance"}}


class DsrApi:
    """What the handlers share; built in the app's cleanup context."""

    def __init__(
        self, rights: DataSubjectRights, identity: PbxIdentity, admin_token: str | None
    ) -> None:
        self.rights = rights
        self.identity = identity
        self.admin_token = admin_token
        settings = rights.settings
        self.limiter = FailureLimiter(rights.clock, settings.max_failures, settings.failure_window)


DSR_API = web.AppKey("dsr_api", DsrApi)


def load_admin_token(source: str) -> str | None:
    """The operator's token from `env:NAME` or `file:PATH`; None when not configured."""
    if not source:
        return None
    token = resolve_secret(source, "<config>", "dsr.admin_token")
    if len(token) < 16:
        raise ConfigError(
            source, "dsr.admin_token", "the admin token must be at least 16 characters"
        )
    return token


def add_dsr_routes(
    app: web.Application,
    settings: DsrSettings,
    store_key: web.AppKey[Store],
    relay_key: web.AppKey[Relay],
) -> None:
    """Routes, their OpenAPI description and the context that builds the API (after
    the store and the relay, which must come earlier in `cleanup_ctx`)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        rights = DataSubjectRights(app[store_key], settings)
        identity = PbxIdentity(app[relay_key], rights.clock, settings.pbx_timeout)
        app[DSR_API] = DsrApi(rights, identity, load_admin_token(settings.admin_token))
        yield

    app.cleanup_ctx.append(context)
    app.router.add_post(f"{PREFIX}/challenge", challenge)
    for action in ACTIONS:
        app.router.add_post(f"{PREFIX}/{action}", _action(action))
    app.router.add_get(f"{PREFIX}/requests", requests)
    _describe(app)


def _fail(status: int, message: str, headers: dict[str, str] | None = None) -> web.HTTPException:
    kinds: dict[int, Callable[..., web.HTTPException]] = {
        400: web.HTTPBadRequest,
        403: web.HTTPForbidden,
        429: web.HTTPTooManyRequests,
        502: web.HTTPBadGateway,
        503: web.HTTPServiceUnavailable,
        504: web.HTTPGatewayTimeout,
    }
    return kinds[status](
        text=f'{{"error": {json.dumps(message)}}}', content_type=JSON, headers=headers
    )


async def _body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise _fail(400, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise _fail(400, "the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _fail(400, f"unknown key {unknown[0][:64]!r}")
    return body


def _subject(body: dict[str, Any]) -> Subject:
    try:
        return parse_subject(body.get("sip_username"), body.get("pbx_serial"))
    except InvalidRequest as exc:
        raise _fail(400, str(exc)) from None


def _client(request: web.Request) -> str:
    return "client:" + (request.remote or "?")


def _check_limit(api: DsrApi, *keys: str) -> None:
    wait = api.limiter.retry_after(*keys)
    if wait:
        raise _fail(429, "too many failed attempts", {"Retry-After": str(wait)})


async def challenge(request: web.Request) -> web.Response:
    api = request.app[DSR_API]
    body = await _body(request, _SUBJECT_KEYS)
    subject = _subject(body)
    _check_limit(api, _client(request), _subject_key(subject))
    try:
        issued = await api.identity.challenge(subject)
    except IdentityError as exc:
        raise _fail(exc.status, exc.reason) from None
    return web.json_response(
        {
            "challenge_id": issued.id,
            "method": "REGISTER",
            "uri": issued.uri,
            "www_authenticate": list(issued.www_authenticate),
        }
    )


def _subject_key(subject: Subject) -> str:
    return f"subject:{subject.sip_username}\x1f{subject.pbx_serial}"


async def _authenticate(request: web.Request, body: dict[str, Any], subject: Subject) -> str:
    """The actor (`operator` or `subject`) once proved; raises the HTTP error otherwise."""
    api = request.app[DSR_API]
    client = _client(request)
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        _check_limit(api, client)
        token = header[7:].encode()
        if api.admin_token is None or not hmac.compare_digest(token, api.admin_token.encode()):
            api.limiter.fail(client)
            raise _fail(403, "wrong admin token")
        return "operator"
    keys = (client, _subject_key(subject))
    _check_limit(api, *keys)
    challenge_id, authorization = body.get("challenge_id"), body.get("authorization")
    if not isinstance(challenge_id, str) or not isinstance(authorization, str):
        raise _fail(403, "prove identity: challenge_id and authorization, or an admin token")
    try:
        await api.identity.verify(subject, challenge_id, authorization)
    except IdentityError as exc:
        if exc.status == 403:
            api.limiter.fail(*keys)
        raise _fail(exc.status, exc.reason) from None
    return "subject"


def _action(kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    allowed = _SUBJECT_KEYS | _PROOF_KEYS | _EXTRA_KEYS.get(kind, set())

    async def handler(request: web.Request) -> web.Response:
        api = request.app[DSR_API]
        body = await _body(request, allowed)
        subject = _subject(body)
        try:
            actor = await _authenticate(request, body, subject)
        except web.HTTPException as exc:
            outcome = {403: "refused", 429: "rate_limited"}.get(exc.status, "error")
            await api.rights.refused(kind, "unproved", outcome)
            raise
        rights = api.rights
        changes, instance = body.get("changes", {}), body.get("instance", "")
        if not isinstance(changes, dict) or not isinstance(instance, str):
            raise _fail(400, "changes: expected an object; instance: a string")
        try:
            if kind == "export":
                return web.json_response(await rights.export(subject, actor))
            if kind == "rectify":
                receipt = await rights.rectify(subject, changes, actor, instance=instance)
            elif kind == "erase":
                receipt = await rights.erase(subject, actor)
            elif kind in ("restrict", "unrestrict"):
                receipt = await rights.restrict(subject, kind == "restrict", actor)
            else:
                receipt = await rights.object(subject, actor)
        except InvalidRequest as exc:
            raise _fail(400, str(exc)) from None
        return web.json_response(receipt.as_json())

    return handler


async def requests(request: web.Request) -> web.Response:
    api = request.app[DSR_API]
    client = _client(request)
    _check_limit(api, client)
    header = request.headers.get("Authorization", "")
    token = header[7:].encode() if header.startswith("Bearer ") else b""
    if api.admin_token is None or not hmac.compare_digest(token, api.admin_token.encode()):
        api.limiter.fail(client)
        raise _fail(403, "the request trail needs the admin token")
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise _fail(400, "limit: expected an integer") from None
    if not 1 <= limit <= 1000:
        raise _fail(400, "limit: between 1 and 1000")
    entries = await api.rights.trail(limit)
    return web.json_response(
        {
            "requests": [
                {
                    "id": e.id,
                    "type": e.type,
                    "received_at": e.received_at,
                    "actor": e.actor,
                    "outcome": e.outcome,
                    "counts": e.counts,
                }
                for e in entries
            ]
        }
    )


# --- OpenAPI ------------------------------------------------------------------------


def _describe(app: web.Application) -> None:
    openapi = app[OPENAPI]
    openapi.security_scheme("adminToken", {"type": "http", "scheme": "bearer"})
    text = {"type": "string", "maxLength": 4096}
    subject_props = {
        "sip_username": {"type": "string", "description": "SIP user name"},
        "pbx_serial": {"type": "string", "description": "serial of the subject's PBX"},
    }
    proof_props = {
        "challenge_id": {**text, "description": "from POST /dsr/v1/challenge"},
        "authorization": {
            **text,
            "description": "Digest credentials for the PBX's challenge (RFC 7616)",
        },
    }
    request_schema = openapi.schema(
        "DsrRequest",
        {
            "type": "object",
            "required": ["sip_username", "pbx_serial"],
            "additionalProperties": False,
            "properties": subject_props | proof_props,
        },
    )
    rectify_schema = openapi.schema(
        "DsrRectify",
        {
            "type": "object",
            "required": ["sip_username", "pbx_serial", "changes"],
            "additionalProperties": False,
            "properties": subject_props
            | proof_props
            | {
                "changes": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {n: text for n in sorted(MUTABLE_FIELDS["registration"])},
                },
                "instance": {**text, "description": "only this device's registration"},
            },
        },
    )
    counts = {"type": "object", "additionalProperties": {"type": "integer"}}
    receipt = openapi.schema(
        "DsrReceipt",
        {
            "type": "object",
            "required": ["request_id", "type", "outcome", "counts"],
            "properties": {
                "request_id": {"type": "string"},
                "type": {"enum": list(ACTIONS)},
                "outcome": {"type": "string"},
                "counts": counts,
                "kept": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["category", "ground"],
                        "properties": {
                            "category": {"type": "string"},
                            "ground": {"type": "string"},
                        },
                    },
                },
            },
        },
    )
    export = openapi.schema(
        "DsrExport",
        {
            "type": "object",
            "required": ["format", "request_id", "generated_at", "subject", "categories"],
            "properties": {
                "format": {"const": "softrelay-dsr-export/1"},
                "request_id": {"type": "string"},
                "generated_at": {"type": "string"},
                "profile": {"type": "string"},
                "restricted": {"type": "boolean"},
                "subject": {"type": "object"},
                "categories": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["category", "purpose", "legal_basis", "included"],
                        "properties": {
                            "category": {"type": "string"},
                            "included": {"type": "boolean"},
                            "records": {"type": "array"},
                            "reason": {"type": "string"},
                        },
                    },
                },
            },
        },
    )
    errors = {
        "400": error("Malformed request"),
        "403": error("Identity not proved"),
        "429": error("Too many failed attempts; see Retry-After"),
        "502": error("The PBX answered unexpectedly"),
        "503": error("The subject's PBX is not connected"),
        "504": error("The PBX did not answer in time"),
    }
    body = {"required": True, "content": {JSON: {"schema": request_schema}}}
    openapi.operation(
        f"{PREFIX}/challenge",
        "post",
        {
            "summary": "Get the PBX's digest challenge to prove identity with",
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {
                        "schema": {
                            "type": "object",
                            "required": ["sip_username", "pbx_serial"],
                            "additionalProperties": False,
                            "properties": subject_props,
                        }
                    }
                },
            },
            "responses": {
                "200": json_response(
                    "A challenge",
                    {
                        "type": "object",
                        "required": ["challenge_id", "method", "uri", "www_authenticate"],
                        "properties": {
                            "challenge_id": {"type": "string"},
                            "method": {"const": "REGISTER"},
                            "uri": {"type": "string"},
                            "www_authenticate": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                ),
                **{k: v for k, v in errors.items() if k != "403"},
            },
        },
    )
    summaries = {
        "export": "Everything stored about the subject (Art. 15, 20)",
        "rectify": "Correct the push token or app id (Art. 16)",
        "erase": "Erase the subject in every category (Art. 17)",
        "restrict": "Restrict processing (Art. 18)",
        "unrestrict": "Lift the restriction (Art. 18)",
        "object": "Object to processing (Art. 21)",
    }
    for action in ACTIONS:
        schema = rectify_schema if action == "rectify" else request_schema
        openapi.operation(
            f"{PREFIX}/{action}",
            "post",
            {
                "summary": summaries[action],
                "security": [{}, {"adminToken": []}],
                "requestBody": body | {"content": {JSON: {"schema": schema}}},
                "responses": {
                    "200": json_response("Done", export if action == "export" else receipt),
                    **errors,
                },
            },
        )
    openapi.operation(
        f"{PREFIX}/requests",
        "get",
        {
            "summary": "The request trail (operator only; no personal data)",
            "security": [{"adminToken": []}],
            "parameters": [
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                }
            ],
            "responses": {
                "200": json_response(
                    "Newest first",
                    {
                        "type": "object",
                        "required": ["requests"],
                        "properties": {"requests": {"type": "array", "items": ref("DsrTrail")}},
                    },
                ),
                "400": errors["400"],
                "403": errors["403"],
                "429": errors["429"],
            },
        },
    )
    openapi.schema(
        "DsrTrail",
        {
            "type": "object",
            "required": ["id", "type", "received_at", "actor", "outcome", "counts"],
            "properties": {
                "id": {"type": "string"},
                "type": {"type": "string"},
                "received_at": {"type": "number"},
                "actor": {"type": "string"},
                "outcome": {"type": "string"},
                "counts": counts,
            },
        },
    )
