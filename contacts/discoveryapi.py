"""`/contacts/v1/discoverable` and `/contacts/v1/discovery/...`: Smart Contacts over HTTP
(contacts/discovery.py does the work).

    PUT    /contacts/v1/discoverable       -> 200 {"discoverable": true, "number": "+49..."}
    GET    /contacts/v1/discoverable       -> 200 {"discoverable": bool}
    DELETE /contacts/v1/discoverable       -> 204 (opt-out: the record goes at once)
    GET    /contacts/v1/discovery/set[?since=<version>]
                                           -> 200 application/octet-stream, ETag "<version>";
                                              304 on If-None-Match with the current one
    POST   /contacts/v1/discovery/evaluate {"epoch": E, "blinded": [base64 of 32 bytes]}
                                           -> 200 {"epoch", "evaluated": [...], "remaining"}

Every route takes the owner's proof, after the per-client rate (contacts/owners.py:
`Authorization: Bearer sipis.<account>.<secret>` or `cd.<device>.<secret>`). The set's
body: b"SRD1" | epoch u32 | kind u8 (0 full, 1 delta) | added u32 | removed u32 | added
tags | removed tags (8 bytes each, sorted); a `since` this node's journal knows gives a
delta, else the whole set.

Every refusal is a `Refusal` (webapi/errors.py), JSON `{"error", "detail"}`:

    400 not_a_number        the SIP user name is not a phone number: never discoverable
        malformed_body, unknown_field, bad_field, bad_element (names the index), bad_since
    401 unauthorized        (owners.py)
    403 not_proved          no proof of the number (a SIPIS account its provider has not
                            accepted); on the set and evaluate: no proof of the owner
                            (the quota is per proved owner, see owners.py)
        restricted          processing is restricted (Art. 18)
    409 stale_epoch         the key changed: fetch the set again, blind again
    413 too_many_elements   more than `max_elements_per_request`; body_too_large
    415 unsupported_media_type
    429 quota_exhausted     the owner's daily quota (Retry-After: the next UTC day)
        rate_limited        the global bucket, or this client address (Retry-After)

A refused evaluation evaluates nothing and charges nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from contacts.discovery import (
    BadElement,
    Busy,
    Directory,
    DiscoveryError,
    QuotaExhausted,
    Sleep,
    StaleEpoch,
    oprf_secret,
)
from contacts.numbers import e164
from contacts.oprf import ELEMENT_BYTES
from contacts.owners import Owner, active_owner, owner_of
from contacts.settings import ContactsSettings
from privacy.clock import Clock
from privacy.keys import Keyring
from privacy.store import Store
from privacy.tasks import Tasks
from webapi.body import read_json
from webapi.errors import Refusal
from webapi.openapi import (
    JSON,
    OPENAPI,
    RETRY_AFTER,
    OpenApi,
    json_response,
    refusal,
)
from webapi.ratelimit import Limiters, RateLimit

DISCOVERABLE = "/contacts/v1/discoverable"
SET = "/contacts/v1/discovery/set"
EVALUATE = "/contacts/v1/discovery/evaluate"
DIRECTORY = web.AppKey("contacts_directory", Directory)
SECURITY = "contactsOwner"
_VERSION = re.compile(r"^[0-9a-f]{32}$")
_B64_MAX = 4 * ((ELEMENT_BYTES + 2) // 3)  # base64 of one element, padded
_EVALUATE_KEYS = frozenset({"epoch", "blinded"})
log = logging.getLogger("softrelay.contacts")


def _proved(owner: Owner) -> Owner:
    """Discovery only for a proved owner: each costs an attacker a SIP identity."""
    if not owner.proved:
        raise Refusal(
            403,
            "not_proved",
            "discovery needs a proved owner: a SIPIS account its provider accepted, or a"
            " device proved through the PBX",
        )
    return owner


def global_limit(settings: ContactsSettings) -> RateLimit:
    """Elements evaluated for all owners: `global_elements_per_minute`, a burst of a tenth
    of it, but at least one full request (a request takes its count at once)."""
    per_minute = settings.global_elements_per_minute
    burst = max(settings.max_elements_per_request, -(-per_minute // 10))
    return RateLimit(per_minute=per_minute, burst=burst)


def add_discovery_routes(
    app: web.Application,
    settings: ContactsSettings,
    limiters: Limiters,
    *,
    store: web.AppKey[Store],
    keyring: Keyring,
    clock: Clock,
    sleep: Sleep = asyncio.sleep,
) -> None:
    """The routes, their OpenAPI description and the context that builds the directory
    (after the store's context: `store` must be set by then); its periodic check of the
    set runs as the context's task (`sleep` injected by tests)."""
    everyone = limiters("contacts-discovery", global_limit(settings))

    async def context(app: web.Application) -> AsyncIterator[None]:
        directory = Directory(app[store], oprf_secret(keyring), settings, clock, everyone)
        await directory.load()
        app[DIRECTORY] = directory
        async with Tasks(log, "contacts.task_failed") as tasks:
            tasks.spawn(directory.run_forever(sleep), name="contacts-discovery-refresh")
            yield

    app.cleanup_ctx.append(context)
    handlers = _Handlers(settings, store)
    app.router.add_put(DISCOVERABLE, handlers.opt_in)
    app.router.add_get(DISCOVERABLE, handlers.status)
    app.router.add_delete(DISCOVERABLE, handlers.opt_out)
    app.router.add_get(SET, handlers.discovery_set)
    app.router.add_post(EVALUATE, handlers.evaluate)
    describe(app[OPENAPI], settings)


class _Handlers:
    def __init__(self, settings: ContactsSettings, store: web.AppKey[Store]) -> None:
        self._settings = settings
        self._store = store
        # The largest body of a full request, with room for JSON's spacing; one element
        # more fits, so a request of too many is told so (413 too_many_elements).
        self._max_body = 1024 + (settings.max_elements_per_request + 1) * (_B64_MAX + 8)

    @staticmethod
    def _directory(request: web.Request) -> Directory:
        return request.app[DIRECTORY]

    async def opt_in(self, request: web.Request) -> web.Response:
        directory = self._directory(request)
        owner = await active_owner(request)
        number = e164(owner.subject.sip_username, self._settings.default_region)
        if number is None:
            raise Refusal(
                400,
                "not_a_number",
                "the SIP user name is not a phone number, so it cannot be discoverable",
            )
        if owner.number != number:
            raise Refusal(
                403,
                "not_proved",
                "this number is not proved: the provider has not accepted the account's"
                " registration (or prove the device through the PBX)",
            )
        await directory.opt_in(owner.subject, number)
        return _json({"discoverable": True, "number": number})

    async def status(self, request: web.Request) -> web.Response:
        directory = self._directory(request)
        owner = await active_owner(request)
        return _json({"discoverable": await directory.discoverable(owner.subject)})

    async def opt_out(self, request: web.Request) -> web.Response:
        directory = self._directory(request)
        owner = await owner_of(request)
        await directory.opt_out(owner.subject)
        return web.Response(status=204, headers={"Cache-Control": "no-store"})

    async def discovery_set(self, request: web.Request) -> web.Response:
        directory = self._directory(request)
        _proved(await active_owner(request))
        since = request.query.get("since")
        if since is not None and not _VERSION.match(since):
            raise Refusal(400, "bad_since", "since must be a version: 32 lower-case hex digits")
        answer = await directory.set_body(since)
        headers = {"ETag": f'"{answer.version}"', "Cache-Control": "private, no-cache"}
        held = request.if_none_match or ()
        if any(tag.value in (answer.version, "*") for tag in held):
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=answer.body, content_type="application/octet-stream", headers=headers
        )

    async def evaluate(self, request: web.Request) -> web.Response:
        directory = self._directory(request)
        owner = _proved(await active_owner(request))
        epoch, blinded = await self._evaluation(request)
        try:
            answer = await directory.evaluate(owner.subject, epoch, blinded)
        except DiscoveryError as exc:
            raise _refusal(exc) from None
        return _json(
            {
                "epoch": answer.epoch,
                "evaluated": [base64.b64encode(e).decode() for e in answer.elements],
                "remaining": answer.remaining,
            }
        )

    async def _evaluation(self, request: web.Request) -> tuple[int, list[bytes]]:
        """The request's epoch and elements, each checked (the points themselves are
        checked as they are evaluated): a 4xx naming what is wrong, nothing charged."""
        if request.content_type != "application/json":
            raise Refusal(415, "unsupported_media_type", "send Content-Type: application/json")
        body = await read_json(request, self._max_body)
        if not isinstance(body, dict):
            raise Refusal(400, "malformed_body", "the body must be a JSON object")
        for key in sorted(body):
            if key not in _EVALUATE_KEYS:
                raise Refusal(400, "unknown_field", f"unknown field {key[:40]!r}")
        epoch, blinded = body.get("epoch"), body.get("blinded")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise Refusal(400, "bad_field", "field 'epoch' must be the set's epoch, an integer")
        if not isinstance(blinded, list) or not blinded:
            raise Refusal(
                400, "bad_field", "field 'blinded' must be a non-empty list of base64 elements"
            )
        most = self._settings.max_elements_per_request
        if len(blinded) > most:
            raise Refusal(413, "too_many_elements", f"at most {most} elements in one request")
        elements: list[bytes] = []
        for index, value in enumerate(blinded):
            element = _element(value)
            if element is None:
                raise Refusal(
                    400,
                    "bad_element",
                    f"blinded[{index}] must be the base64 of {ELEMENT_BYTES} bytes",
                )
            elements.append(element)
        return epoch, elements


def _element(value: object) -> bytes | None:
    if not isinstance(value, str) or len(value) > _B64_MAX:
        return None
    try:
        element = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):  # ValueError: not ASCII
        return None
    return element if len(element) == ELEMENT_BYTES else None


def _refusal(exc: DiscoveryError) -> Refusal:
    """A refused evaluation as the app must act on it (see the module doc)."""
    if isinstance(exc, StaleEpoch):
        return Refusal(409, "stale_epoch", str(exc))
    if isinstance(exc, BadElement):
        return Refusal(400, "bad_element", str(exc))
    if isinstance(exc, QuotaExhausted):
        return Refusal(429, "quota_exhausted", str(exc), retry_after=exc.retry_after)
    if isinstance(exc, Busy):
        return Refusal(429, "rate_limited", str(exc), retry_after=exc.retry_after)
    raise TypeError(f"unmapped discovery error {type(exc).__name__}")


def _json(value: dict[str, Any]) -> web.Response:
    return web.json_response(value, headers={"Cache-Control": "no-store"})


# --- OpenAPI ------------------------------------------------------------------------


def describe(openapi: OpenApi, settings: ContactsSettings) -> None:
    openapi.security_scheme(
        SECURITY,
        {
            "type": "http",
            "scheme": "bearer",
            "description": "sipis.<account_id>.<device_secret> or cd.<device_id>.<secret>",
        },
    )
    secured: dict[str, Any] = {"security": [{SECURITY: []}]}
    common = {
        "401": refusal(
            "unauthorized: no or a wrong token",
            {"WWW-Authenticate": {"schema": {"type": "string"}}},
        ),
        "429": refusal("rate_limited (this client address)", RETRY_AFTER),
    }
    status = openapi.schema(
        "ContactsDiscoverable",
        {
            "type": "object",
            "required": ["discoverable"],
            "properties": {
                "discoverable": {"type": "boolean"},
                "number": {"type": "string", "description": "E.164: the proved number"},
            },
        },
    )
    openapi.operation(
        DISCOVERABLE,
        "put",
        secured
        | {
            "summary": "Opt in: be discoverable under the number the provider or PBX proved",
            "responses": {
                "200": json_response("Discoverable", status),
                "400": refusal("not_a_number: the SIP user name is not a phone number"),
                "403": refusal("not_proved: the number is not proved; restricted (Art. 18)"),
                **common,
            },
        },
    )
    openapi.operation(
        DISCOVERABLE,
        "get",
        secured
        | {
            "summary": "Whether the owner is discoverable",
            "responses": {
                "200": json_response("The choice", status),
                "403": refusal("restricted (Art. 18)"),
                **common,
            },
        },
    )
    openapi.operation(
        DISCOVERABLE,
        "delete",
        secured
        | {
            "summary": "Opt out: the stored point goes at once",
            "responses": {"204": {"description": "Not discoverable"}, **common},
        },
    )
    version = {"type": "string", "pattern": _VERSION.pattern}
    openapi.operation(
        SET,
        "get",
        secured
        | {
            "summary": "The set of discoverable tags (whole, or the changes since a version)",
            "parameters": [
                {
                    "name": "since",
                    "in": "query",
                    "required": False,
                    "schema": version,
                    "description": "the version held: a delta when this node still knows it",
                }
            ],
            "responses": {
                "200": {
                    "description": "b'SRD1' | epoch u32 | kind u8 (0 full, 1 delta) | added u32"
                    " | removed u32 | added tags | removed tags (8 bytes each, sorted)",
                    "headers": {"ETag": {"schema": {"type": "string"}}},
                    "content": {
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        }
                    },
                },
                "304": {"description": "If-None-Match names the current version"},
                "400": refusal("bad_since"),
                "403": refusal("not_proved: no proved owner; restricted (Art. 18)"),
                **common,
            },
        },
    )
    most = settings.max_elements_per_request
    element = {"type": "string", "maxLength": _B64_MAX, "description": "base64, 32 bytes"}
    request = openapi.schema(
        "ContactsEvaluate",
        {
            "type": "object",
            "required": ["epoch", "blinded"],
            "additionalProperties": False,
            "properties": {
                "epoch": {"type": "integer", "minimum": 0, "description": "the set's epoch"},
                "blinded": {"type": "array", "minItems": 1, "maxItems": most, "items": element},
            },
        },
    )
    answer = openapi.schema(
        "ContactsEvaluated",
        {
            "type": "object",
            "required": ["epoch", "evaluated", "remaining"],
            "properties": {
                "epoch": {"type": "integer"},
                "evaluated": {"type": "array", "items": element},
                "remaining": {
                    "type": "integer",
                    "description": "elements this owner may still have evaluated today (UTC)",
                },
            },
        },
    )
    openapi.operation(
        EVALUATE,
        "post",
        secured
        | {
            "summary": "Evaluate blinded elements with the epoch's key (RFC 9497 OPRF)",
            "requestBody": {"required": True, "content": {JSON: {"schema": request}}},
            "responses": {
                "200": json_response("Evaluated, in order", answer),
                "400": refusal("malformed_body, unknown_field, bad_field, bad_element"),
                "403": refusal("not_proved: no proved owner; restricted (Art. 18)"),
                "409": refusal("stale_epoch: the key changed; fetch the set again"),
                "413": refusal("too_many_elements, body_too_large"),
                "415": refusal("unsupported_media_type"),
                **common,
                "429": refusal(
                    "quota_exhausted (until the next UTC day), rate_limited", RETRY_AFTER
                ),
            },
        },
    )
