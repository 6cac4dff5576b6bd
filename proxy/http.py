"""Reading an HTTP body whole, with a cap: one helper for every endpoint and client.

    try:
        body = await read_capped(request.content, limit, request.content_length)
    except BodyTooLarge:
        return refusal(413, ...)

A declared Content-Length over the cap is refused before a byte is read; a body that
says nothing, or says less than it sends, is refused as soon as it passes the cap, so
no more than `limit + 1` bytes are ever held.
"""

from __future__ import annotations

import aiohttp

CHUNK = 64 * 1024  # the most read at once


class BodyTooLarge(Exception):
    """The body is over its cap: 413 for a request, 502 for an upstream's answer."""

    def __init__(self, limit: int, *, declared: bool) -> None:
        super().__init__(f"body larger than {limit} bytes")
        self.limit = limit
        self.declared = declared  # refused on its Content-Length, before it was read


async def read_capped(
    content: aiohttp.StreamReader, limit: int, declared: int | None = None
) -> bytes:
    """The whole body of `content` (a request's or a client response's), at most `limit`
    bytes; `declared` is its Content-Length, None when it has none or it is not to be
    trusted (a compressed body is measured once decoded). Raises BodyTooLarge."""
    if declared is not None and declared > limit:
        raise BodyTooLarge(limit, declared=True)
    body = bytearray()
    while chunk := await content.read(min(CHUNK, limit + 1 - len(body))):
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(limit, declared=False)
    return bytes(body)
