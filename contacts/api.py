"""`/contacts/v1/...`: the routes of contacts and their OpenAPI description.

    POST   /contacts/v1/challenge      {sip_username, pbx_serial} -> 200 the PBX's
                                       digest challenge (as /dsr/v1/challenge)
    POST   /contacts/v1/devices        {sip_username, pbx_serial, challenge_id,
                                       authorization} -> 201 {"device_token":
                                       "cd.<device id>.<secret>"}: the PBX accepted the
                                       digest, the device may act for that subject
    DELETE /contacts/v1/devices/self   -> 204: the device's token stops working
    /contacts/v1/book ...              contacts/bookapi.py
    /contacts/v1/discoverable, /contacts/v1/discovery/...   contacts/discoveryapi.py

The device proof is dsr/identity.py's (a REGISTER fetch through the relay to the
subject's PBX, which decides; softrelay never sees the password), with an instance of
its own on the same relay and the same kind of challenge store as DSR's (memory alone,
Redis in a cluster). Failed proofs count as dsr/api.py counts them: per client and
subject and per client, buckets of `[dsr] max_failures` per `failure_window`
(CLIENT_FAILURE_FACTOR times for one client), 429 with Retry-After once empty.

Refusals (besides the book's):

    400 malformed_body, unknown_field, bad_subject, not_a_device
    401 unauthorized       403 not_proved      429 rate_limited
    502 pbx_error          503 pbx_offline     504 pbx_timeout
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from cluster.redis import SharedRedis
from contacts.book import Book
from contacts.bookapi import BOOK, add_book_routes, describe_book
from contacts.discoveryapi import add_discovery_routes
from contacts.owners import OWNERS, Devices, Owners, limited, owner_of
from contacts.settings import ContactsSettings
from dsr.api import CHALLENGE_SCHEMA, ProofFailures, body_subject, issue_challenge
from dsr.identity import (
    Challenges,
    MemoryChallenges,
    PbxIdentity,
    SharedChallenges,
)
from dsr.service import DsrSettings
from privacy.clock import Clock
from privacy.keys import Keyring
from privacy.store import Store
from privacy.tasks import Tasks
from proxy.sip.relay import Relay
from sipis.api import ACCOUNTS, REGISTRAR
from webapi.body import read_json
from webapi.errors import Refusal
from webapi.openapi import JSON, OPENAPI, RETRY_AFTER, OpenApi, json_response, refusal
from webapi.ratelimit import Limiters, client_key

PREFIX = "/contacts/v1"
MAX_BODY = 16 * 1024  # a subject and a digest Authorization
_SUBJECT_KEYS = frozenset({"sip_username", "pbx_serial"})
_PROOF_KEYS = _SUBJECT_KEYS | {"challenge_id", "authorization"}
log = logging.getLogger("softrelay.contacts")


class DeviceProof:
    """The PBX digest proof of a device, and its own buckets of failed proofs (counted
    as the DSR API counts them)."""

    def __init__(self, identity: PbxIdentity, settings: DsrSettings, limiters: Limiters) -> None:
        self.identity = identity
        self.failures = ProofFailures(limiters, settings, "contacts-proof")


DEVICE_PROOF = web.AppKey("contacts_device_proof", DeviceProof)


def add_contacts_api(
    app: web.Application,
    settings: ContactsSettings,
    limiters: Limiters,
    *,
    store: web.AppKey[Store],
    relay: web.AppKey[Relay],
    keyring: Keyring,
    clock: Clock,
    proof: DsrSettings,
    cluster: web.AppKey[SharedRedis] | None = None,
    expire_interval: float | None = None,
) -> None:
    """The routes of contacts, their OpenAPI description, and the context that builds
    what they share (after the store, the relay, the cluster's Redis and SIPIS mode's
    accounts, whose contexts must come earlier). `app[OWNERS]` is set there, before the
    discovery routes' own context runs. Uploads not committed are dropped every
    `expire_interval` seconds (default: upload_ttl)."""
    limiter = limiters("contacts", settings.rate)

    async def context(app: web.Application) -> AsyncIterator[None]:
        the_store = app[store]
        devices = Devices(the_store, keyring)
        app[OWNERS] = Owners(
            devices, settings, limiter, app.get(ACCOUNTS), app.get(REGISTRAR), keyring=keyring
        )
        challenges: Challenges = (
            MemoryChallenges(clock) if cluster is None else SharedChallenges(app[cluster])
        )
        identity = PbxIdentity(app[relay], challenges, proof.pbx_timeout)
        app[DEVICE_PROOF] = DeviceProof(identity, proof, limiters)
        app[BOOK] = book = Book(the_store, settings)
        async with Tasks(log, "contacts.expire_failed") as tasks:
            tasks.spawn(
                book.expire_forever(expire_interval or settings.upload_ttl),
                name="contacts-expire-uploads",
            )
            yield

    app.cleanup_ctx.append(context)
    app.router.add_post(f"{PREFIX}/challenge", challenge)
    app.router.add_post(f"{PREFIX}/devices", register_device)
    app.router.add_delete(f"{PREFIX}/devices/self", revoke_device)
    add_book_routes(app, settings)
    openapi = app[OPENAPI]
    _describe(openapi)
    describe_book(openapi, settings)
    # Smart Contacts: its context comes after the one above (app[OWNERS] is set).
    add_discovery_routes(app, settings, limiters, store=store, keyring=keyring, clock=clock)


async def _body(request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
    if request.content_type != JSON:
        raise Refusal(415, "unsupported_media_type", f"send Content-Type: {JSON}")
    body = await read_json(request, MAX_BODY)
    if not isinstance(body, dict):
        raise Refusal(400, "malformed_body", "the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise Refusal(400, "unknown_field", f"unknown field {unknown[0][:40]!r}")
    return body


async def challenge(request: web.Request) -> web.Response:
    await limited(request)
    proof = request.app[DEVICE_PROOF]
    subject = body_subject(await _body(request, _SUBJECT_KEYS))
    client = client_key(request.remote) or "?"
    answer = await issue_challenge(proof.identity, proof.failures, client, subject)
    return web.json_response(answer, headers={"Cache-Control": "no-store"})


async def register_device(request: web.Request) -> web.Response:
    await limited(request)
    proof = request.app[DEVICE_PROOF]
    body = await _body(request, _PROOF_KEYS)
    subject = body_subject(body)
    client = client_key(request.remote) or "?"
    await proof.failures.check(client, subject)
    challenge_id, authorization = body.get("challenge_id"), body.get("authorization")
    if not isinstance(challenge_id, str) or not isinstance(authorization, str):
        raise Refusal(400, "bad_field", "challenge_id and authorization: strings")
    if len(challenge_id) > 128 or len(authorization) > 4096:
        raise Refusal(400, "bad_field", "challenge_id or authorization too long")
    await proof.failures.verify(proof.identity, client, subject, challenge_id, authorization)
    token = await request.app[OWNERS].devices.register(subject)
    return web.json_response(
        {"device_token": token}, status=201, headers={"Cache-Control": "no-store"}
    )


async def revoke_device(request: web.Request) -> web.Response:
    owner = await owner_of(request)
    if owner.device_id is None:
        raise Refusal(
            400,
            "not_a_device",
            "a SIPIS account's token names no contacts device (DELETE /sipis/v1/accounts/{id})",
        )
    await request.app[OWNERS].devices.revoke(owner.device_id)
    return web.Response(status=204)


def _describe(openapi: OpenApi) -> None:
    text = {"type": "string", "maxLength": 4096}
    subject = {
        "sip_username": {"type": "string", "description": "SIP user name"},
        "pbx_serial": {"type": "string", "description": "serial of the PBX"},
    }
    proof = {
        "challenge_id": {**text, "description": "from POST /contacts/v1/challenge"},
        "authorization": {**text, "description": "Digest credentials for the PBX's challenge"},
    }
    pbx = {
        "502": refusal("pbx_error"),
        "503": refusal("pbx_offline, storage_unavailable", RETRY_AFTER),
        "504": refusal("pbx_timeout"),
    }
    body_errors = {
        "400": refusal("malformed_body, unknown_field, bad_subject, bad_field"),
        "413": refusal("body_too_large"),
        "415": refusal("unsupported_media_type"),
        "429": refusal("rate_limited", RETRY_AFTER),
    }
    openapi.operation(
        f"{PREFIX}/challenge",
        "post",
        {
            "summary": "The PBX's digest challenge, to register a device for contacts",
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {
                        "schema": {
                            "type": "object",
                            "required": ["sip_username", "pbx_serial"],
                            "additionalProperties": False,
                            "properties": subject,
                        }
                    }
                },
            },
            "responses": {
                "200": json_response("A challenge", CHALLENGE_SCHEMA),
                **body_errors,
                **pbx,
            },
        },
    )
    openapi.operation(
        f"{PREFIX}/devices",
        "post",
        {
            "summary": "Register this device with the PBX's digest proof; its token",
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {
                        "schema": {
                            "type": "object",
                            "required": [*subject, *proof],
                            "additionalProperties": False,
                            "properties": subject | proof,
                        }
                    }
                },
            },
            "responses": {
                "201": json_response(
                    "Registered; the token is shown this once",
                    {
                        "type": "object",
                        "required": ["device_token"],
                        "properties": {"device_token": {"type": "string"}},
                    },
                ),
                "403": refusal("not_proved: the PBX refused the credentials, or a stale challenge"),
                **body_errors,
                **pbx,
            },
        },
    )
    openapi.operation(
        f"{PREFIX}/devices/self",
        "delete",
        {
            "summary": "Revoke this device's token",
            "security": [{"contactsOwner": []}],
            "responses": {
                "204": {"description": "Revoked"},
                "400": refusal("not_a_device: a SIPIS account's token"),
                "401": refusal(
                    "unauthorized", {"WWW-Authenticate": {"schema": {"type": "string"}}}
                ),
                "429": refusal("rate_limited", RETRY_AFTER),
                "503": refusal("storage_unavailable", RETRY_AFTER),
            },
        },
    )
