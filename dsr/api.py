"""`/dsr/v1/...`: the data-subject rights over HTTP (dsr/service.py does the work).

Who may ask:

- the subject, proving identity through their PBX (dsr/identity.py): first
  `POST /dsr/v1/challenge`, then the request with `challenge_id` and the digest
  `authorization` computed from the PBX's challenge;
- the operator, with `Authorization: Bearer <admin token>` (`[dsr] admin_token`),
  acting on a request the operator verified by other means.

Failed proofs count per client and subject, and per client (a client is
`webapi.ratelimit.client_key`: its address, an IPv6 one its /64), in token buckets of
`dsr.max_failures` failures, refilled at that many per `dsr.failure_window`
(`CLIENT_FAILURE_FACTOR` times both for one client): once a bucket is empty the answer
is 429 with Retry-After. Nothing counts per subject alone, so a stranger's bogus
proofs never lock the subject out; one client still cannot try many passwords. The
buckets are the app's `Limiters` (memory alone; Redis in a cluster, so failures on one
node count on all), and so are the challenges in flight (dsr/identity.py).

Every error is a `Refusal` (webapi/errors.py), JSON `{"error": <code>, "detail": <sentence>}`;
refused requests are recorded in the trail. What the service and the identity proof
raise is mapped here, once:

    IdentityError NOT_PROVED    403 not_proved   (counts as a failed proof)
                  PBX_OFFLINE   503 pbx_offline
                  PBX_ERROR     502 pbx_error
                  PBX_TIMEOUT   504 pbx_timeout
    InvalidRequest              400 bad_subject (the subject), bad_request (the rest)
    ClusterUnavailable          503 cluster_unavailable (the middleware: Redis is out)
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from cluster.redis import SharedRedis
from dsr.identity import (
    Challenges,
    Failure,
    IdentityError,
    MemoryChallenges,
    PbxIdentity,
    SharedChallenges,
)
from dsr.service import (
    ACTIONS,
    MUTABLE_FIELDS,
    DataSubjectRights,
    DsrSettings,
    InvalidRequest,
    Processing,
    parse_subject,
)
from dsr.sipis import SipisProcessing
from privacy.store import Store, Subject
from proxy.sip.relay import Relay
from sipis.api import ACCOUNTS, REGISTRAR
from tomlsections.reader import ConfigError, resolve_secret
from webapi.body import read_json
from webapi.errors import Refusal
from webapi.openapi import JSON, OPENAPI, RETRY_AFTER, json_response, ref, refusal
from webapi.ratelimit import Limiters, RateLimit, client_key

PREFIX = "/dsr/v1"
_SUBJECT_KEYS = {"sip_username", "pbx_serial"}
_PROOF_KEYS = {"challenge_id", "authorization"}
_EXTRA_KEYS = {"rectify": {"changes", "instance"}}
MAX_BODY = 64 * 1024  # a subject, a proof (4 KiB at most) and a few changes
# One client may fail this many times `max_failures` in a window, over all subjects:
# an office behind one address is not stopped by one user's typos, and a client still
# gets only a handful of guesses per window.
CLIENT_FAILURE_FACTOR = 4
# Why an identity was not proved -> the answer (status, code); see the module doc.
IDENTITY_REFUSALS: dict[Failure, tuple[int, str]] = {
    Failure.NOT_PROVED: (403, "not_proved"),
    Failure.PBX_OFFLINE: (503, "pbx_offline"),
    Failure.PBX_ERROR: (502, "pbx_error"),
    Failure.PBX_TIMEOUT: (504, "pbx_timeout"),
}


class ProofFailures:
    """The buckets of failed proofs of one API (see the module doc): `check` before each
    attempt, `failed` after each failure. Contacts' device proof has buckets of its own
    (`name`), counted the same way."""

    def __init__(self, limiters: Limiters, settings: DsrSettings, name: str) -> None:
        window = settings.failure_window
        self.per_subject = limiters(
            f"{name}-subject", RateLimit.per_window(settings.max_failures, window)
        )
        self.per_client = limiters(
            f"{name}-client",
            RateLimit.per_window(settings.max_failures * CLIENT_FAILURE_FACTOR, window),
        )

    async def check(self, client: str, subject: Subject | None = None) -> None:
        """429 with Retry-After while `client` (for `subject`) may not try again."""
        wait = await self.per_client.wait(client)
        if subject is not None:
            wait = max(wait, await self.per_subject.wait(_pair_key(client, subject)))
        if wait:
            raise Refusal(429, "rate_limited", "too many failed attempts", retry_after=wait)

    async def failed(self, client: str, subject: Subject | None = None) -> None:
        await self.per_client.take(client)
        if subject is not None:
            await self.per_subject.take(_pair_key(client, subject))

    async def verify(
        self,
        identity: PbxIdentity,
        client: str,
        subject: Subject,
        challenge_id: str,
        authorization: str,
    ) -> None:
        """The subject proved by the PBX's answer to the challenge, or the refusal (a
        failed proof counted)."""
        await self.check(client, subject)
        try:
            await identity.verify(subject, challenge_id, authorization)
        except IdentityError as exc:
            if exc.failure is Failure.NOT_PROVED:
                await self.failed(client, subject)
            raise identity_refusal(exc) from None


def _pair_key(client: str, subject: Subject) -> str:
    return f"{client}\x1f{subject.sip_username}\x1f{subject.pbx_serial}"


def identity_refusal(exc: IdentityError) -> Refusal:
    status, code = IDENTITY_REFUSALS[exc.failure]
    return Refusal(status, code, exc.reason)


# What `issue_challenge` answers, as both APIs' OpenAPI describe it.
CHALLENGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["challenge_id", "method", "uri", "www_authenticate"],
    "properties": {
        "challenge_id": {"type": "string"},
        "method": {"const": "REGISTER"},
        "uri": {"type": "string"},
        "www_authenticate": {"type": "array", "items": {"type": "string"}},
    },
}


async def issue_challenge(
    identity: PbxIdentity, failures: ProofFailures, client: str, subject: Subject
) -> dict[str, Any]:
    """The subject's PBX's digest challenge, as both APIs answer it."""
    await failures.check(client, subject)
    try:
        issued = await identity.challenge(subject)
    except IdentityError as exc:
        raise identity_refusal(exc) from None
    return {
        "challenge_id": issued.id,
        "method": "REGISTER",
        "uri": issued.uri,
        "www_authenticate": list(issued.www_authenticate),
    }


class DsrApi:
    """What the handlers share; built in the app's cleanup context."""

    def __init__(
        self,
        rights: DataSubjectRights,
        identity: PbxIdentity,
        admin_token: str | None,
        limiters: Limiters,
    ) -> None:
        self.rights = rights
        self.identity = identity
        self.admin_token = admin_token
        self.failures = ProofFailures(limiters, rights.settings, "dsr")


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
    *,
    limiters: Limiters,
    cluster: web.AppKey[SharedRedis] | None = None,
) -> None:
    """Routes, their OpenAPI description and the context that builds the API (after
    the store, the relay and the cluster's Redis (`cluster`, if a node of one), which
    must come earlier in `cleanup_ctx`)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        # SIPIS mode's registrations (when on: its context comes earlier) are reached at
        # once by an erasure and a restriction, and reported in an export.
        accounts, registrar = app.get(ACCOUNTS), app.get(REGISTRAR)
        processing: list[Processing] = []
        if accounts is not None and registrar is not None:
            processing.append(SipisProcessing(accounts, registrar))
        rights = DataSubjectRights(app[store_key], settings, processing)
        challenges: Challenges = (
            MemoryChallenges(rights.clock) if cluster is None else SharedChallenges(app[cluster])
        )
        identity = PbxIdentity(app[relay_key], challenges, settings.pbx_timeout)
        token = load_admin_token(settings.admin_token)
        app[DSR_API] = DsrApi(rights, identity, token, limiters)
        yield

    app.cleanup_ctx.append(context)
    app.router.add_post(f"{PREFIX}/challenge", challenge)
    for action in ACTIONS:
        app.router.add_post(f"{PREFIX}/{action}", _action(action))
    app.router.add_get(f"{PREFIX}/requests", requests)
    _describe(app)


async def _body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    body = await read_json(request, MAX_BODY)
    if not isinstance(body, dict):
        raise Refusal(400, "malformed_body", "the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise Refusal(400, "unknown_field", f"unknown key {unknown[0][:64]!r}")
    return body


def body_subject(body: dict[str, Any]) -> Subject:
    """The subject a JSON body names (`sip_username`, `pbx_serial`), or 400 bad_subject."""
    try:
        return parse_subject(body.get("sip_username"), body.get("pbx_serial"))
    except InvalidRequest as exc:
        raise Refusal(400, "bad_subject", str(exc)) from None


def _client(request: web.Request) -> str:
    return client_key(request.remote) or "?"


async def challenge(request: web.Request) -> web.Response:
    api = request.app[DSR_API]
    body = await _body(request, _SUBJECT_KEYS)
    subject = body_subject(body)
    return web.json_response(
        await issue_challenge(api.identity, api.failures, _client(request), subject)
    )


async def _authenticate(request: web.Request, body: dict[str, Any], subject: Subject) -> str:
    """The actor (`operator` or `subject`) once proved; raises the HTTP error otherwise."""
    api = request.app[DSR_API]
    client = _client(request)
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        await api.failures.check(client)
        token = header[7:].encode()
        if api.admin_token is None or not hmac.compare_digest(token, api.admin_token.encode()):
            await api.failures.failed(client)
            raise Refusal(403, "wrong_admin_token", "wrong admin token")
        return "operator"
    await api.failures.check(client, subject)
    challenge_id, authorization = body.get("challenge_id"), body.get("authorization")
    if not isinstance(challenge_id, str) or not isinstance(authorization, str):
        raise Refusal(
            403, "not_proved", "prove identity: challenge_id and authorization, or an admin token"
        )
    await api.failures.verify(api.identity, client, subject, challenge_id, authorization)
    return "subject"


def _action(kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    allowed = _SUBJECT_KEYS | _PROOF_KEYS | _EXTRA_KEYS.get(kind, set())

    async def handler(request: web.Request) -> web.Response:
        api = request.app[DSR_API]
        body = await _body(request, allowed)
        subject = body_subject(body)
        try:
            actor = await _authenticate(request, body, subject)
        except Refusal as exc:
            outcome = {403: "refused", 429: "rate_limited"}.get(exc.status, "error")
            await api.rights.refused(kind, "unproved", outcome)
            raise
        rights = api.rights
        changes, instance = body.get("changes", {}), body.get("instance", "")
        if not isinstance(changes, dict) or not isinstance(instance, str):
            raise Refusal(400, "bad_field", "changes: expected an object; instance: a string")
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
            raise Refusal(400, "bad_request", str(exc)) from None
        return web.json_response(receipt.as_json())

    return handler


async def requests(request: web.Request) -> web.Response:
    api = request.app[DSR_API]
    client = _client(request)
    await api.failures.check(client)
    header = request.headers.get("Authorization", "")
    token = header[7:].encode() if header.startswith("Bearer ") else b""
    if api.admin_token is None or not hmac.compare_digest(token, api.admin_token.encode()):
        await api.failures.failed(client)
        raise Refusal(403, "wrong_admin_token", "the request trail needs the admin token")
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise Refusal(400, "bad_query", "limit: expected an integer") from None
    if not 1 <= limit <= 1000:
        raise Refusal(400, "bad_query", "limit: between 1 and 1000")
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
        "400": refusal(
            "malformed_body, unknown_field, bad_subject, bad_field, bad_request, bad_query"
        ),
        "403": refusal("not_proved, wrong_admin_token"),
        "413": refusal("body_too_large"),
        "429": refusal("rate_limited: too many failed attempts", RETRY_AFTER),
        "502": refusal("pbx_error: the PBX answered unexpectedly"),
        "503": refusal("pbx_offline: the subject's PBX is not connected"),
        "504": refusal("pbx_timeout: the PBX did not answer in time"),
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
                "200": json_response("A challenge", CHALLENGE_SCHEMA),
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
