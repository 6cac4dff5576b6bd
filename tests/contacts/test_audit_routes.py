"""The outside audit of /contacts/v1 over HTTP: a restricted subject (GDPR Art. 18) is
refused alike by the book and by Smart Contacts (as the relay refuses its REGISTER),
whichever proof it holds; what only removes its data stays open to it."""

from __future__ import annotations

import base64
from typing import Any

from contacts import oprf
from contacts.book import CATEGORY as BOOK_CATEGORY
from contacts.discovery import QUOTA
from tests.contacts.conftest import ContactsWorld, OwnerToken

BOOK = "/contacts/v1/book"
OCTETS = {"Content-Type": "application/octet-stream"}


async def test_a_restricted_subject_is_refused_by_book_and_discovery_alike(
    contacts_world: ContactsWorld, device_owner: OwnerToken
) -> None:
    world, token = contacts_world, device_owner.token
    created = await world.call(
        "PUT", BOOK, token, data=b"the book", headers=OCTETS | {"If-None-Match": "*"}
    )
    assert created.status == 201
    opted = await world.call("PUT", "/contacts/v1/discoverable", token)
    assert opted.status == 200, opted.body
    await world.store.restrict(device_owner.subject, True)
    etag = {"If-Match": created.headers["ETag"]}
    blinded = oprf.blind(b"+4915100000001")[1]
    element = {"epoch": 0, "blinded": [base64.b64encode(blinded).decode()]}
    refused: list[tuple[str, str, dict[str, Any], dict[str, str]]] = [
        ("GET", BOOK, {}, {}),
        ("PUT", BOOK, {"data": b"changed"}, OCTETS | etag),
        ("POST", BOOK + "/uploads", {}, {}),
        ("PUT", "/contacts/v1/discoverable", {}, {}),
        ("GET", "/contacts/v1/discoverable", {}, {}),
        ("GET", "/contacts/v1/discovery/set", {}, {}),
        ("POST", "/contacts/v1/discovery/evaluate", {"json": element}, {}),
    ]
    stored = sorted((r.id, r.last_used_at) for r in await world.store.find(BOOK_CATEGORY))
    for method, path, body, headers in refused:
        answer = await world.call(method, path, token, headers=headers, **body)
        assert answer.status == 403, (method, path, answer.body)
        assert answer.error == "restricted"
    assert sorted((r.id, r.last_used_at) for r in await world.store.find(BOOK_CATEGORY)) == stored
    assert await world.store.find(QUOTA) == []
    # Removing stays open: opt-out, the book's deletion.
    assert (await world.call("DELETE", "/contacts/v1/discoverable", token)).status == 204
    assert (await world.call("DELETE", BOOK, token)).status == 204
    assert await world.store.find(BOOK_CATEGORY) == []
    # Lifted, the same token works again.
    await world.store.restrict(device_owner.subject, False)
    again = await world.call("GET", BOOK, token)
    assert again.status == 404
