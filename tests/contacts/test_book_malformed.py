"""Hostile or broken requests to `/contacts/v1/book` get a 4xx with a JSON reason and
change nothing stored: bad tokens, bad preconditions, bad chunk indexes, a wrong
content type, an empty body, a broken commit."""

from __future__ import annotations

from typing import Any

import pytest

from contacts.book import CATEGORY
from privacy.store import Record
from tests.contacts.conftest import Answer, ContactsWorld, OwnerToken

BOOK = "/contacts/v1/book"
UPLOADS = "/contacts/v1/book/uploads"
OCTETS = {"Content-Type": "application/octet-stream"}


async def _snapshot(world: ContactsWorld) -> list[tuple[int, dict[str, Any], float]]:
    records: list[Record] = await world.store.find(CATEGORY)
    return sorted((r.id, r.fields, r.last_used_at) for r in records)


def _refused(answer: Answer, status: int, error: str) -> None:
    assert answer.status == status, answer.body
    assert answer.headers["Content-Type"].startswith("application/json")
    body = answer.json()
    assert body["error"] == error
    assert isinstance(body["detail"], str)
    assert body["detail"]


@pytest.fixture
async def book(contacts_world: ContactsWorld, device_owner: OwnerToken) -> tuple[str, str]:
    """A book of the device owner, and an upload of it in flight: (version, upload id)."""
    answer = await contacts_world.call(
        "PUT", BOOK, device_owner.token, data=b"the book", headers=OCTETS | {"If-None-Match": "*"}
    )
    assert answer.status == 201
    started = await contacts_world.call("POST", UPLOADS, device_owner.token)
    assert started.status == 201
    return answer.headers["ETag"].strip('"'), started.json()["upload_id"]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer",
        "Bearer ",
        "Basic YWxpY2U6c2VjcmV0",
        'Digest username="alice"',
        "Bearer cd.x.y",  # no such device
        "Bearer cd.AAAAAAAAAAAAAAAAAAAAAA.wrong-secret",
        "Bearer sipis.AAAAAAAAAAAAAAAAAAAAAA.wrong-secret",
        "Bearer other.AAAAAAAAAAAAAAAAAAAAAA.secret",
        "Bearer " + "cd." + "A" * 4000,
        'Bearer "cd.AAAAAAAAAAAAAAAAAAAAAA.secret"',
    ],
)
async def test_a_missing_or_wrong_token_gets_401_and_changes_nothing(
    contacts_world: ContactsWorld, book: tuple[str, str], authorization: str | None
) -> None:
    world = contacts_world
    version, _ = book
    before = await _snapshot(world)
    headers = OCTETS | {"If-Match": f'"{version}"'}
    if authorization is not None:
        headers["Authorization"] = authorization
    for method in ("GET", "PUT", "DELETE"):
        answer = await world.call(method, BOOK, headers=headers, data=b"overwritten?")
        _refused(answer, 401, "unauthorized")
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert await _snapshot(world) == before


async def test_a_revoked_device_token_gets_401(
    contacts_world: ContactsWorld, device_owner: OwnerToken, book: tuple[str, str]
) -> None:
    world = contacts_world
    answer = await world.call("DELETE", "/contacts/v1/devices/self", device_owner.token)
    assert answer.status == 204
    _refused(await world.call("GET", BOOK, device_owner.token), 401, "unauthorized")


@pytest.mark.parametrize(
    ("headers", "status", "error"),
    [
        ({}, 428, "precondition_required"),
        ({"If-Match": "abc"}, 400, "bad_precondition"),  # not quoted
        ({"If-Match": 'W/"abc"'}, 400, "bad_precondition"),  # weak: never for a write
        ({"If-Match": '"a", "b"'}, 400, "bad_precondition"),
        ({"If-Match": '"' + "a" * 65 + '"'}, 400, "bad_precondition"),
        ({"If-Match": '"a b"'}, 400, "bad_precondition"),
        ({"If-None-Match": '"abc"'}, 400, "bad_precondition"),  # a write creates with * only
        ({"If-Match": "*", "If-None-Match": "*"}, 400, "bad_precondition"),
        ({"If-Match": '"not-the-version"'}, 412, "version_conflict"),
        ({"If-None-Match": "*"}, 412, "version_conflict"),  # there is a book
    ],
)
async def test_a_bad_precondition_is_refused_and_changes_nothing(
    contacts_world: ContactsWorld,
    device_owner: OwnerToken,
    book: tuple[str, str],
    headers: dict[str, str],
    status: int,
    error: str,
) -> None:
    world = contacts_world
    version, _ = book
    before = await _snapshot(world)
    answer = await world.call(
        "PUT", BOOK, device_owner.token, data=b"new book", headers=OCTETS | headers
    )
    _refused(answer, status, error)
    if status == 412:
        assert answer.headers["ETag"] == f'"{version}"'
    assert await _snapshot(world) == before


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("x", "bad_index"),
        ("-1", "bad_index"),
        ("1.5", "bad_index"),
        ("0x1", "bad_index"),
        ("99999999999999999999", "bad_index"),  # huge: not even parsed
        ("999999", "bad_index"),  # past the parts a book can have
    ],
)
async def test_a_bad_chunk_index_gets_400_and_changes_nothing(
    contacts_world: ContactsWorld,
    device_owner: OwnerToken,
    book: tuple[str, str],
    path: str,
    error: str,
) -> None:
    world = contacts_world
    _, upload = book
    before = await _snapshot(world)
    answer = await world.call(
        "PUT", f"{UPLOADS}/{upload}/{path}", device_owner.token, data=b"chunk", headers=OCTETS
    )
    _refused(answer, 400, error)
    assert await _snapshot(world) == before


async def test_wrong_content_type_empty_body_or_unknown_upload_is_refused(
    contacts_world: ContactsWorld, device_owner: OwnerToken, book: tuple[str, str]
) -> None:
    world = contacts_world
    version, upload = book
    token = device_owner.token
    match = {"If-Match": f'"{version}"'}
    before = await _snapshot(world)
    cases = [
        (
            "PUT",
            BOOK,
            {"Content-Type": "application/json"} | match,
            b"{}",
            415,
            "unsupported_media_type",
        ),
        ("PUT", BOOK, {"Content-Type": "text/plain"} | match, b"x", 415, "unsupported_media_type"),
        ("PUT", BOOK, OCTETS | match, b"", 400, "empty_body"),
        ("PUT", f"{UPLOADS}/{upload}/0", OCTETS, b"", 400, "empty_body"),
        (
            "PUT",
            f"{UPLOADS}/{upload}/0",
            {"Content-Type": "text/plain"},
            b"x",
            415,
            "unsupported_media_type",
        ),
        ("PUT", f"{UPLOADS}/no-such-upload/0", OCTETS, b"x", 404, "no_such_upload"),
        ("PUT", f"{UPLOADS}/{'é' * 3}/0", OCTETS, b"x", 404, "no_such_upload"),
        (
            "POST",
            f"{UPLOADS}/no-such-upload/commit",
            {"Content-Type": "application/json"} | match,
            b'{"parts": 1, "sha256": "' + b"0" * 64 + b'"}',
            404,
            "no_such_upload",
        ),
    ]
    for method, path, headers, data, status, error in cases:
        answer = await world.call(method, path, token, headers=headers, data=data)
        _refused(answer, status, error)
    assert await _snapshot(world) == before


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"not json", "malformed_body"),
        (b"[]", "malformed_body"),
        (b'{"parts": 1}', "bad_field"),
        (b'{"parts": "1", "sha256": "' + b"0" * 64 + b'"}', "bad_field"),
        (b'{"parts": true, "sha256": "' + b"0" * 64 + b'"}', "bad_field"),
        (b'{"parts": 0, "sha256": "' + b"0" * 64 + b'"}', "bad_field"),
        (b'{"parts": 99999999, "sha256": "' + b"0" * 64 + b'"}', "bad_field"),
        (b'{"parts": 1, "sha256": "xyz"}', "bad_field"),
        (b'{"parts": 1, "sha256": "' + b"0" * 64 + b'", "name": "x"}', "unknown_field"),
        (b'{"parts": 1, "sha256": "' + b"0" * 64 + b'"}', "incomplete_upload"),  # no chunk yet
    ],
)
async def test_a_broken_commit_gets_400_and_changes_nothing(
    contacts_world: ContactsWorld,
    device_owner: OwnerToken,
    book: tuple[str, str],
    body: bytes,
    error: str,
) -> None:
    world = contacts_world
    version, upload = book
    before = await _snapshot(world)
    answer = await world.call(
        "POST",
        f"{UPLOADS}/{upload}/commit",
        device_owner.token,
        data=body,
        headers={"Content-Type": "application/json", "If-Match": f'"{version}"'},
    )
    _refused(answer, 400, error)
    assert await _snapshot(world) == before


async def test_a_bad_owner_query_gets_400(
    contacts_world: ContactsWorld, device_owner: OwnerToken, book: tuple[str, str]
) -> None:
    for owner in ("alice", "sip:", "sip:@x", "tel:+4930901820", "sip:a@b;transport=tcp", "x" * 500):
        answer = await contacts_world.call("GET", BOOK, device_owner.token, params={"owner": owner})
        _refused(answer, 400, "bad_owner")
