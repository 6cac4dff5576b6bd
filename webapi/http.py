"""What every HTTP API of softrelay shares at its boundary: the one refusal type, the
middleware that renders it, and the readers of request bodies.

    raise Refusal(429, "rate_limited", "too many attempts", {"Retry-After": "30"})
    body = await read_json(request, limit)          # 400/413 Refusal when malformed
    raw = await read_capped(request.content, limit, request.content_length)

`refusals` (in every app's middlewares) renders a `Refusal` as JSON
`{"error": <code>, "detail": <sentence>}`, and turns what would otherwise become a
500 or aiohttp's text page into one as well:

    Refusal                         -> its status
    BadBody (broken chunking, gzip) -> 400 malformed_body
    a header that is not UTF-8      -> 400 bad_header (lone surrogates included)
    aiohttp's own text 4xx          -> the same status, JSON (404, 405, 413 ...)
    any other exception             -> 500 internal, logged by class name only

aiohttp's own handling of a failing handler logs "Error handling request from <IP>"
with the traceback; nothing reaches it from here.

`read_capped`: a declared Content-Length over the cap is refused before a byte is read;
a body that says nothing, or says less than it sends, is refused as soon as it passes
the cap, so no more than `limit + 1` bytes are ever held.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestPayloadError

CHUNK = 64 * 1024  # the most read at once
MAX_JSON_DEPTH = 32  # nesting of a request body; our APIs need 3

log = logging.getLogger("softrelay.http")


class Refusal(Exception):
    """An answer that refuses a request: what the caller must do next is in `status`
    (4xx: change the request; 429/503: retry after `Retry-After`), `error` is a code
    to act on, `detail` a sentence for people. Rendered by `refusals`."""

    def __init__(
        self, status: int, error: str, detail: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return web.json_response(
            {"error": self.error, "detail": self.detail}, status=self.status, headers=self.headers
        )


class BodyTooLarge(Exception):
    """The body is over its cap: 413 for a request, 502 for an upstream's answer."""

    def __init__(self, limit: int, *, declared: bool) -> None:
        super().__init__(f"body larger than {limit} bytes")
        self.limit = limit
        self.declared = declared  # refused on its Content-Length, before it was read


class BadBody(ValueError):
    """A request body that cannot be read: broken chunked encoding, a Content-Encoding
    that does not decode. A ValueError, as a malformed value is."""


async def read_capped(
    content: aiohttp.StreamReader, limit: int, declared: int | None = None
) -> bytes:
    """The whole body of `content` (a request's or a client response's), at most `limit`
    bytes; `declared` is its Content-Length, None when it has none or it is not to be
    trusted (a compressed body is measured once decoded). Raises BodyTooLarge, and
    BadBody for a request body aiohttp could not decode."""
    if declared is not None and declared > limit:
        raise BodyTooLarge(limit, declared=True)
    body = bytearray()
    try:
        while chunk := await content.read(min(CHUNK, limit + 1 - len(body))):
            body += chunk
            if len(body) > limit:
                raise BodyTooLarge(limit, declared=False)
    except RequestPayloadError as exc:
        # Its message quotes what the parser choked on: the cause stays, unprinted.
        raise BadBody("the request body cannot be decoded") from exc
    return bytes(body)


async def read_json(request: web.Request, limit: int, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The request body parsed as JSON, or a 400/413 Refusal: over `limit` bytes, not
    UTF-8 (lone surrogates, escaped or raw, included), not JSON, nested deeper than
    `max_depth`. orjson parses without recursing in Python and stops at depth 1024
    itself; the tighter bound protects whatever walks the value afterwards."""
    try:
        raw = await read_capped(request.content, limit, request.content_length)
    except BodyTooLarge:
        raise Refusal(413, "body_too_large", f"the body is over {limit} bytes") from None
    except BadBody:
        raise Refusal(400, "malformed_body", "the body cannot be decoded") from None
    try:
        value = orjson.loads(raw)
    except (orjson.JSONDecodeError, RecursionError):
        raise Refusal(400, "malformed_body", "the body is not JSON in UTF-8") from None
    if _depth_over(value, max_depth):
        raise Refusal(400, "malformed_body", f"the body nests deeper than {max_depth}")
    return value


def _depth_over(value: Any, limit: int) -> bool:
    """True if containers nest deeper than `limit`; iterative, so no depth recurses."""
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[dict[Any, Any] | list[Any], int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _header_refusal(request: web.BaseRequest) -> Refusal | None:
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: every byte that is not
    # UTF-8 (a lone surrogate's \xed\xa0\x80 too) becomes a lone surrogate in the str,
    # which raises UnicodeEncodeError wherever a handler encodes it.
    for value in request.headers.values():
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                return Refusal(400, "bad_header", "a header value is not UTF-8")
    return None


def _from_http_exception(exc: web.HTTPException) -> web.StreamResponse | None:
    """aiohttp's own text refusal (404, 405, 413 of client_max_size ...) as JSON."""
    if exc.status < 400 or exc.content_type != "text/plain":
        return None
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    code = (exc.reason or "error").lower().replace(" ", "_").replace("-", "_")
    return Refusal(exc.status, code, exc.reason or "refused", headers).response()


@web.middleware
async def refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place an HTTP error is rendered (see the module doc)."""
    refused = _header_refusal(request)
    if refused is not None:
        return refused.response()
    try:
        return await handler(request)
    except Refusal as exc:
        return exc.response()
    except BadBody:
        return Refusal(400, "malformed_body", "the body cannot be decoded").response()
    except web.HTTPException as exc:
        rendered = _from_http_exception(exc)
        if rendered is None:
            raise
        return rendered
    except (asyncio.CancelledError, ConnectionError):
        raise  # the client went away: there is nobody to answer
    except Exception:
        if request.writer.output_size > 0:
            raise  # an answer is half sent: aiohttp can only drop the connection
        # The policy's log handler keeps the class only: a message may quote the body.
        log.exception("http.handler_failed")
        return Refusal(500, "internal", "the request failed; retry later").response()


__all__ = [
    "CHUNK",
    "BadBody",
    "BodyTooLarge",
    "Refusal",
    "read_capped",
    "read_json",
    "refusals",
]
