"""Reading a body from outside, capped: a request's, or an upstream's answer.

    body = await read_json(request, limit)          # 400/413 Refusal when malformed
    raw = await read_capped(request.content, limit, request.content_length)

`read_capped`: a declared Content-Length over the cap is refused before a byte is read;
a body that says nothing, or says less than it sends, is refused as soon as it passes
the cap, so no more than `limit + 1` bytes are ever held.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from webapi.errors import Refusal

CHUNK = 64 * 1024  # the most read at once
MAX_JSON_DEPTH = 32  # nesting of a request body; our APIs need 3


class BodyTooLarge(Exception):
    """The body is over its cap: 413 for a request, 502 for an upstream's answer."""

    def __init__(self, limit: int, *, declared: bool) -> None:
        super().__init__(f"body larger than {limit} bytes")
        self.limit = limit
        self.declared = declared  # refused on its Content-Length, before it was read


class BadBody(Refusal, ValueError):
    """A request body that cannot be read: broken chunked encoding, a Content-Encoding
    that does not decode. Only a request's body raises it (an upstream's answer raises
    aiohttp's ClientPayloadError), so it is a refusal as it stands; a ValueError too,
    as a malformed value is."""

    def __init__(self) -> None:
        super().__init__(400, "malformed_body", "the body cannot be decoded")


async def read_capped(
    content: aiohttp.StreamReader, limit: int, declared: int | None = None
) -> bytes:
    """The whole body of `content` (a request's or a client response's), at most `limit`
    bytes; `declared` is its Content-Length, None when it has none or it is not to be
    trusted (a compressed body is measured once decoded). Raises BodyTooLarge, and
    BadBody for a request body aiohttp could not decode."""
    if declared is not None and declared > limit:
        raise BodyTooLarge(limit, declared=True)
    try:
        if content.is_eof():
            # All of it has arrived (a small body comes with its head): taken without a
            # read awaited per chunk, and still no more than `limit + 1` bytes.
            whole = content.read_nowait(limit + 1)
            if len(whole) > limit:
                raise BodyTooLarge(limit, declared=False)
            return whole
    except RequestPayloadError as exc:
        raise BadBody() from exc
    body = bytearray()
    try:
        while chunk := await content.read(min(CHUNK, limit + 1 - len(body))):
            body += chunk
            if len(body) > limit:
                raise BodyTooLarge(limit, declared=False)
    except RequestPayloadError as exc:
        # Its message quotes what the parser choked on: the cause stays, unprinted.
        raise BadBody() from exc
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


__all__ = ["CHUNK", "MAX_JSON_DEPTH", "BadBody", "BodyTooLarge", "read_capped", "read_json"]
