"""`/contacts/v1/book`: the owner's encrypted address book, as opaque versioned bytes.

    GET    /contacts/v1/book[?owner=sip:user@domain]   200 application/octet-stream,
           ETag "<version>"; 304 on a matching If-None-Match; 404 no_book
    PUT    /contacts/v1/book   application/octet-stream (up to max_chunk_bytes), with
           If-Match: "<version>" (or *) to replace, If-None-Match: * to create
           -> 200 (201 created) {"version", "size"}, ETag "<version>"
    DELETE /contacts/v1/book   -> 204
    POST   /contacts/v1/book/uploads                       -> 201 {"upload_id", "max_chunk_bytes"}
    PUT    /contacts/v1/book/uploads/{upload_id}/{index}   a chunk (index 0..) -> 204
    POST   /contacts/v1/book/uploads/{upload_id}/commit    {"parts", "sha256"} with the
           preconditions of PUT -> 200/201 as PUT

Who: the owner the Bearer token proves (contacts/owners.py); `owner` names whose book,
and only the caller's own is answered. What the server holds is the app's ciphertext:
it never sees the book's key (mockphone/book.py is the app side).

Every refusal is a `Refusal`, JSON {"error", "detail"}, mapped here from the book's
errors (contacts/book.py) in one table, `BOOK_REFUSALS`:

    400 bad_owner, bad_precondition, empty_body, bad_index, malformed_body,
        unknown_field, bad_field, incomplete_upload
    401 unauthorized (WWW-Authenticate: Bearer)   403 not_your_book, restricted (Art. 18)
    404 no_book, no_such_upload                   409 too_many_uploads
    412 version_conflict (ETag: the current version, when there is one)
    413 body_too_large (one request: use an upload), book_too_large (max_book_bytes)
    415 unsupported_media_type   428 precondition_required   429 rate_limited
    503 book_busy (retry), storage_unavailable (the middleware)
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from contacts.book import (
    ANY,
    BadChunkIndex,
    Book,
    BookError,
    BookTooLarge,
    BookUnavailable,
    IncompleteUpload,
    NoSuchUpload,
    TooManyUploads,
    Version,
    VersionConflict,
)
from contacts.owners import Owner, active_owner, owner_of
from contacts.settings import ContactsSettings
from privacy.store import Subject
from webapi.body import BodyTooLarge, read_capped, read_json
from webapi.errors import Refusal
from webapi.openapi import JSON, RETRY_AFTER, OpenApi, json_response, refusal

PREFIX = "/contacts/v1/book"
OCTETS = "application/octet-stream"
BOOK = web.AppKey("contacts_book", Book)
MAX_COMMIT_BODY = 1024
# A strong entity tag of ours, quoted (RFC 9110 8.8.3); W/ tags never match a write.
_ETAG = re.compile(r'^"([A-Za-z0-9_-]{1,64})"$')
_OWNER = re.compile(r"^sips?:([^@;:<>\s]{1,128})@([^@;:<>\s]{1,255})$")
_INDEX = re.compile(r"^[0-9]{1,9}$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")

# The book's errors -> (status, code); the detail is the error's sentence.
BOOK_REFUSALS: dict[type[BookError], tuple[int, str]] = {
    BookTooLarge: (413, "book_too_large"),
    NoSuchUpload: (404, "no_such_upload"),
    TooManyUploads: (409, "too_many_uploads"),
    IncompleteUpload: (400, "incomplete_upload"),
    BadChunkIndex: (400, "bad_index"),
}


def _refusal(exc: BookError) -> Refusal:
    if isinstance(exc, VersionConflict):
        headers = {"ETag": f'"{exc.current}"'} if exc.current is not None else {}
        detail = (
            "the book changed since it was read: read it (the ETag is its version),"
            " merge, write again"
            if exc.current is not None
            else "there is no book (If-None-Match: * creates one)"
        )
        return Refusal(412, "version_conflict", detail, headers)
    if isinstance(exc, BookUnavailable):
        return Refusal(503, "book_busy", str(exc), retry_after=1)
    status, code = BOOK_REFUSALS[type(exc)]
    return Refusal(status, code, str(exc))


def add_book_routes(app: web.Application, settings: ContactsSettings) -> None:
    """The routes and their OpenAPI description; `BOOK` is set by add_contacts_api's
    context (contacts/api.py)."""
    handlers = _Handlers(settings)
    app.router.add_get(PREFIX, handlers.read)
    app.router.add_put(PREFIX, handlers.write)
    app.router.add_delete(PREFIX, handlers.delete)
    app.router.add_post(PREFIX + "/uploads", handlers.start_upload)
    app.router.add_put(PREFIX + "/uploads/{upload_id}/{index}", handlers.put_chunk)
    app.router.add_post(PREFIX + "/uploads/{upload_id}/commit", handlers.commit)


class _Handlers:
    def __init__(self, settings: ContactsSettings) -> None:
        self.settings = settings

    async def read(self, request: web.Request) -> web.StreamResponse:
        owner = await active_owner(request)
        _check_owner(request, owner)
        book = request.app[BOOK]
        try:
            found = await book.read(owner.subject)
        except BookError as exc:
            raise _refusal(exc) from None
        if found is None:
            raise Refusal(404, "no_book", "there is no book yet (PUT with If-None-Match: *)")
        version, data = found
        etag = f'"{version.version}"'
        headers = {"ETag": etag, "Cache-Control": "no-store"}
        if _none_match(request.headers.get("If-None-Match"), version.version):
            return web.Response(status=304, headers=headers)
        return web.Response(body=data, content_type=OCTETS, headers=headers)

    async def write(self, request: web.Request) -> web.Response:
        owner = await active_owner(request)
        expect = _precondition(request)
        data = await self._octets(request, whole_book=True)
        try:
            version, created = await request.app[BOOK].write(owner.subject, data, expect)
        except BookError as exc:
            raise _refusal(exc) from None
        return _written(version, created)

    async def delete(self, request: web.Request) -> web.Response:
        owner = await owner_of(request)
        await request.app[BOOK].delete(owner.subject)
        return web.Response(status=204)

    async def start_upload(self, request: web.Request) -> web.Response:
        owner = await active_owner(request)
        try:
            upload = await request.app[BOOK].start_upload(owner.subject)
        except BookError as exc:
            raise _refusal(exc) from None
        return web.json_response(
            {"upload_id": upload, "max_chunk_bytes": self.settings.max_chunk_bytes}, status=201
        )

    async def put_chunk(self, request: web.Request) -> web.Response:
        owner = await active_owner(request)
        text = request.match_info["index"]
        if not _INDEX.match(text):
            raise Refusal(400, "bad_index", "the chunk's index is a decimal number from 0")
        data = await self._octets(request, whole_book=False)
        try:
            await request.app[BOOK].put_chunk(
                owner.subject, request.match_info["upload_id"], int(text), data
            )
        except BookError as exc:
            raise _refusal(exc) from None
        return web.Response(status=204)

    async def commit(self, request: web.Request) -> web.Response:
        owner = await active_owner(request)
        expect = _precondition(request)
        if request.content_type != JSON:
            raise Refusal(415, "unsupported_media_type", f"send Content-Type: {JSON}")
        body = await read_json(request, MAX_COMMIT_BODY)
        if not isinstance(body, dict):
            raise Refusal(400, "malformed_body", "the body must be a JSON object")
        unknown = sorted(set(body) - {"parts", "sha256"})
        if unknown:
            raise Refusal(400, "unknown_field", f"unknown field {unknown[0][:40]!r}")
        book = request.app[BOOK]
        parts, sha256 = body.get("parts"), body.get("sha256")
        if (
            not isinstance(parts, int)
            or isinstance(parts, bool)
            or not 1 <= parts <= book.max_parts
        ):
            raise Refusal(400, "bad_field", f"field 'parts' must be 1 to {book.max_parts}")
        if not isinstance(sha256, str) or not _SHA256.match(sha256):
            raise Refusal(400, "bad_field", "field 'sha256' must be 64 hex digits")
        try:
            version, created = await book.commit_upload(
                owner.subject, request.match_info["upload_id"], parts, sha256, expect
            )
        except BookError as exc:
            raise _refusal(exc) from None
        return _written(version, created)

    async def _octets(self, request: web.Request, *, whole_book: bool) -> bytes:
        """The body: application/octet-stream, 1 to max_chunk_bytes bytes."""
        if request.content_type != OCTETS:
            raise Refusal(415, "unsupported_media_type", f"send Content-Type: {OCTETS}")
        limit = self.settings.max_chunk_bytes
        declared = request.content_length
        if whole_book and declared is not None and declared > self.settings.max_book_bytes:
            raise _refusal(BookTooLarge(self.settings.max_book_bytes))
        try:
            data = await read_capped(request.content, limit, declared)
        except BodyTooLarge:
            hint = " (a larger book goes up in chunks: POST .../uploads)" if whole_book else ""
            raise Refusal(413, "body_too_large", f"the body is over {limit} bytes{hint}") from None
        if not data:
            raise Refusal(400, "empty_body", "the body is empty")
        return data


def _written(version: Version, created: bool) -> web.Response:
    return web.json_response(
        {"version": version.version, "size": version.size},
        status=201 if created else 200,
        headers={"ETag": f'"{version.version}"', "Cache-Control": "no-store"},
    )


def _check_owner(request: web.Request, owner: Owner) -> None:
    """`?owner=sip:user@domain`: only the caller's own book is answered."""
    named = request.query.get("owner")
    if named is None:
        return
    match = _OWNER.match(named)
    if match is None:
        raise Refusal(400, "bad_owner", "owner: expected sip:user@domain")
    if Subject(match.group(1), match.group(2)) != owner.subject:
        raise Refusal(403, "not_your_book", "a book is answered to its owner's devices only")


def _precondition(request: web.Request) -> str | None:
    """What a write expects: a version (If-Match), ANY (If-Match: *) or None
    (If-None-Match: *); 428 without either, 400 for both or a malformed one."""
    match, none_match = request.headers.get("If-Match"), request.headers.get("If-None-Match")
    if match is not None and none_match is not None:
        raise Refusal(400, "bad_precondition", "send If-Match or If-None-Match, not both")
    if match is not None:
        match = match.strip()
        if match == "*":
            return ANY
        found = _ETAG.match(match)
        if found is None:
            raise Refusal(
                400, "bad_precondition", 'If-Match: one strong entity tag ("<version>") or *'
            )
        return found.group(1)
    if none_match is not None:
        if none_match.strip() != "*":
            raise Refusal(400, "bad_precondition", "If-None-Match on a write: only * (create)")
        return None
    raise Refusal(
        428,
        "precondition_required",
        'send If-Match: "<version>" to replace the book, or If-None-Match: * to create it',
    )


def _none_match(header: str | None, version: str) -> bool:
    """Whether a GET's If-None-Match names `version` (weak comparison, RFC 9110 13.1.2)."""
    if header is None:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or f'"{version}"' in tags


# --- OpenAPI ------------------------------------------------------------------------


def describe_book(openapi: OpenApi, settings: ContactsSettings) -> None:
    openapi.security_scheme(
        "contactsOwner",
        {
            "type": "http",
            "scheme": "bearer",
            "description": "sipis.<account id>.<device secret> (a SIPIS account) or"
            " cd.<device id>.<secret> (POST /contacts/v1/devices)",
        },
    )
    secured: dict[str, Any] = {"security": [{"contactsOwner": []}]}
    etag = {"ETag": {"schema": {"type": "string"}, "description": "the version, quoted"}}
    common = {
        "401": refusal("unauthorized", {"WWW-Authenticate": {"schema": {"type": "string"}}}),
        "429": refusal("rate_limited", RETRY_AFTER),
        "503": refusal("book_busy, storage_unavailable", RETRY_AFTER),
    }
    preconditions = [
        {
            "name": "If-Match",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": 'the version this write replaces, "<version>", or *',
        },
        {
            "name": "If-None-Match",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "* : create; there must be no book",
        },
    ]
    written = {
        "type": "object",
        "required": ["version", "size"],
        "properties": {"version": {"type": "string"}, "size": {"type": "integer"}},
    }
    restricted = {"403": refusal("restricted: processing is restricted (Art. 18)")}
    write_answers = {
        "200": json_response("Replaced", written) | {"headers": etag},
        "201": json_response("Created", written) | {"headers": etag},
        "412": refusal("version_conflict: the ETag header is the current version", etag),
        "428": refusal("precondition_required: neither If-Match nor If-None-Match"),
    }
    octets = {
        "required": True,
        "content": {OCTETS: {"schema": {"type": "string", "format": "binary"}}},
    }
    upload_id = {"name": "upload_id", "in": "path", "required": True, "schema": {"type": "string"}}
    openapi.operation(
        PREFIX,
        "get",
        secured
        | {
            "summary": "The owner's encrypted address book (the app's ciphertext)",
            "parameters": [
                {
                    "name": "owner",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "sip:user@domain: whose book; only the caller's own",
                },
                {
                    "name": "If-None-Match",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                },
            ],
            "responses": {
                "200": {
                    "description": "The book",
                    "headers": etag,
                    "content": {OCTETS: {"schema": {"type": "string", "format": "binary"}}},
                },
                "304": {"description": "Not modified", "headers": etag},
                "400": refusal("bad_owner"),
                "403": refusal("not_your_book, restricted (Art. 18)"),
                "404": refusal("no_book"),
                **common,
            },
        },
    )
    openapi.operation(
        PREFIX,
        "put",
        secured
        | {
            "summary": f"Write the book whole (up to {settings.max_chunk_bytes} bytes)",
            "parameters": preconditions,
            "requestBody": octets,
            "responses": {
                **write_answers,
                **restricted,
                "400": refusal("bad_precondition, empty_body"),
                "413": refusal("body_too_large (use an upload), book_too_large"),
                "415": refusal("unsupported_media_type"),
                **common,
            },
        },
    )
    openapi.operation(
        PREFIX,
        "delete",
        secured
        | {
            "summary": "Delete the book and any upload",
            "responses": {"204": {"description": "Deleted"}, **common},
        },
    )
    openapi.operation(
        PREFIX + "/uploads",
        "post",
        secured
        | {
            "summary": "Start a chunked upload of a larger book",
            "responses": {
                "201": json_response(
                    "Started",
                    {
                        "type": "object",
                        "required": ["upload_id", "max_chunk_bytes"],
                        "properties": {
                            "upload_id": {"type": "string"},
                            "max_chunk_bytes": {"type": "integer"},
                        },
                    },
                ),
                "409": refusal("too_many_uploads"),
                **restricted,
                **common,
            },
        },
    )
    openapi.operation(
        PREFIX + "/uploads/{upload_id}/{index}",
        "put",
        secured
        | {
            "summary": "One chunk of an upload (index 0, 1, ...)",
            "parameters": [
                upload_id,
                {"name": "index", "in": "path", "required": True, "schema": {"type": "string"}},
            ],
            "requestBody": octets,
            "responses": {
                "204": {"description": "Stored"},
                **restricted,
                "400": refusal("bad_index, empty_body"),
                "404": refusal("no_such_upload"),
                "413": refusal("body_too_large, book_too_large"),
                "415": refusal("unsupported_media_type"),
                **common,
            },
        },
    )
    openapi.operation(
        PREFIX + "/uploads/{upload_id}/commit",
        "post",
        secured
        | {
            "summary": "Make the upload the book (as PUT: If-Match or If-None-Match)",
            "parameters": [upload_id, *preconditions],
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {
                        "schema": {
                            "type": "object",
                            "required": ["parts", "sha256"],
                            "additionalProperties": False,
                            "properties": {
                                "parts": {"type": "integer", "minimum": 1},
                                "sha256": {"type": "string", "pattern": _SHA256.pattern},
                            },
                        }
                    }
                },
            },
            "responses": {
                **write_answers,
                **restricted,
                "400": refusal(
                    "bad_precondition, malformed_body, unknown_field, bad_field, incomplete_upload"
                ),
                "404": refusal("no_such_upload"),
                "413": refusal("body_too_large, book_too_large"),
                "415": refusal("unsupported_media_type"),
                **common,
            },
        },
    )
