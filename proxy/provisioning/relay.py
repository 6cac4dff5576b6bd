"""The provisioning relay: `/provisioning/<serial>/<path>`, streamed to and from the PBX.

A PBX is reached through the tunnel it dialled (`tunnel.py`) or, when its
`[[sip.pbx]]` has a `provisioning_url`, over HTTP(S) at that URL. Request and response
bodies stream through in chunks and are never written anywhere; the phone's
credentials (Authorization, cookies) go to its PBX and nowhere else. Each access to a
configured serial adds one `provisioning_log` record: the client's IP, cut by the
store to /24 or /48 at write, and the serial (the time is the record's creation).

Refusals are `Refusal`s (webapi/errors.py), JSON `{"error", "detail"}`: 404 unknown
serial, 503 PBX offline or busy, 502 a broken answer, 504 no answer in time, 413 a body
too large, 429 rate limited.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import AsyncIterator, Iterable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from privacy.store import Store, Value
from proxy.provisioning.paths import BadPath, check_path
from proxy.provisioning.protocol import CHUNK, StreamReset
from proxy.provisioning.settings import ProvisioningSettings
from proxy.provisioning.tunnel import (
    RequestHead,
    ResponseHead,
    TunnelHub,
    TunnelUnavailable,
)
from proxy.sip.settings import PbxSettings
from webapi.body import BodyTooLarge, read_capped
from webapi.errors import Refusal
from webapi.ratelimit import Limiter

# Any path, newlines included (`.` would leave those to aiohttp's plain-text 404), so
# every answer on this prefix is the relay's own; `paths.check_path` judges the path.
ROUTE = r"/provisioning/{serial}/{path:[\s\S]*}"
METHODS = ("GET", "HEAD", "POST", "PUT")
# What a path segment may hold unencoded (RFC 3986 pchar) besides letters, digits and
# `-._~`; `;` is refused by the path check before this.
_PATH_SAFE = "/:@!$&'()*+,="
LOG_CATEGORY = "provisioning_log"
# Hop-by-hop headers (RFC 9110 7.6.1) and what would let a phone speak for the relay.
_NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
    }
)
log = logging.getLogger("softrelay.provisioning")


class ProvisioningRelay:
    def __init__(
        self,
        settings: ProvisioningSettings,
        pbxs: Iterable[PbxSettings],
        hub: TunnelHub,
        store: Store,
        limiter: Limiter,
        session: aiohttp.ClientSession,
    ) -> None:
        self._settings = settings
        self._pbxs = {pbx.serial: pbx for pbx in pbxs}
        self._hub = hub
        self._store = store
        self._limiter = limiter
        self._session = session

    async def handle(self, request: web.Request) -> web.StreamResponse:
        wait = await self._limiter.check(request.remote)
        if wait:
            raise Refusal(429, "rate_limited", "too many requests", retry_after=wait)
        serial = request.match_info["serial"]
        pbx = self._pbxs.get(serial)
        if pbx is None:
            raise Refusal(404, "unknown_serial", "no PBX with this serial is served here")
        path = request.match_info["path"]
        try:
            check_path(path)
        except BadPath as exc:
            raise Refusal(400, "bad_path", str(exc)) from None
        await self._store.put(LOG_CATEGORY, _log_fields(request.remote, serial))
        try:
            limit = self._settings.max_request_body
            body = await read_capped(request.content, limit, request.content_length)
        except BodyTooLarge:
            raise Refusal(413, "body_too_large", "the request body is over the limit") from None
        head = RequestHead(
            request.method, "/" + path, request.query_string, _forwardable(request.headers)
        )
        if pbx.provisioning_url:
            return await self._by_url(request, pbx.provisioning_url, head, body)
        return await self._by_tunnel(request, serial, head, body)

    async def _by_tunnel(
        self, request: web.Request, serial: str, head: RequestHead, body: bytes
    ) -> web.StreamResponse:
        tunnel = self._hub.get(serial)
        if tunnel is None:
            raise Refusal(503, "pbx_offline", "the PBX has no tunnel open", retry_after=30)
        try:
            exchange = await tunnel.open(head, body)
        except TunnelUnavailable as exc:
            raise Refusal(503, "pbx_unavailable", str(exc), retry_after=5) from None
        try:
            try:
                async with asyncio.timeout(self._settings.timeout):
                    answer = await exchange.response()
            except TimeoutError:
                raise Refusal(504, "pbx_timeout", "the PBX did not answer in time") from None
            except StreamReset:
                raise Refusal(502, "pbx_failed", "the PBX dropped the request") from None
            return await self._stream_back(request, answer, exchange.body.chunks())
        finally:
            await exchange.close()

    async def _by_url(
        self, request: web.Request, base: str, head: RequestHead, body: bytes
    ) -> web.StreamResponse:
        # The path as the phone meant it, percent-encoded exactly once, and the query as
        # it came: yarl left to encode would keep a `%41` that aiohttp had decoded from
        # `%2541`, and the PBX would decode it a second time.
        target = base.rstrip("/") + urllib.parse.quote(head.path, safe=_PATH_SAFE)
        if raw_query := request.rel_url.raw_query_string:
            target += "?" + raw_query
        url = URL(target, encoded=True)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._settings.timeout, sock_read=self._settings.timeout
        )
        try:
            upstream = await self._session.request(
                head.method,
                url,
                headers=CIMultiDict(head.headers),
                data=body if body else None,
                allow_redirects=False,
                timeout=timeout,
            )
        except TimeoutError:
            raise Refusal(504, "pbx_timeout", "the PBX did not answer in time") from None
        except aiohttp.ClientError:
            raise Refusal(
                503, "pbx_unreachable", "the PBX's provisioning server is unreachable"
            ) from None
        async with upstream:
            answer = ResponseHead(upstream.status, list(upstream.headers.items()))
            return await self._stream_back(request, answer, upstream.content.iter_chunked(CHUNK))

    async def _stream_back(
        self, request: web.Request, answer: ResponseHead, chunks: AsyncIterator[bytes]
    ) -> web.StreamResponse:
        headers = CIMultiDict(
            (name, value) for name, value in answer.headers if name.lower() not in _NOT_FORWARDED
        )
        length = _content_length(answer.headers)
        if length is not None and length > self._settings.max_response_body:
            raise Refusal(502, "response_too_large", "the PBX's answer is over the limit")
        response = web.StreamResponse(status=answer.status, headers=headers)
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        try:
            await self._pump(request, response, chunks, length)
        except (TimeoutError, StreamReset, BodyTooLarge, aiohttp.ClientError) as exc:
            # The status went out already: cutting the connection is how the phone
            # learns that the body is incomplete.
            fields = {"pbx_serial": request.match_info["serial"], "error": type(exc).__name__}
            log.warning("provisioning.body_aborted", extra={"fields": fields})
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            pass  # the phone went away
        return response

    async def _pump(
        self,
        request: web.Request,
        response: web.StreamResponse,
        chunks: AsyncIterator[bytes],
        length: int | None,
    ) -> None:
        limit = length if length is not None else self._settings.max_response_body
        total = 0
        while True:
            async with asyncio.timeout(self._settings.read_timeout):
                chunk = await anext(chunks, b"")
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise BodyTooLarge(limit, declared=False)
            await response.write(chunk)
        if length is not None and total != length and request.method != "HEAD":
            raise StreamReset("the body ended early")
        await response.write_eof()


def _log_fields(remote: str | None, serial: str) -> dict[str, Value]:
    fields: dict[str, Value] = {"pbx_serial": serial}
    if remote:
        fields["ip_prefix"] = remote  # the store cuts it to /24 or /48 before writing
    return fields


def _forwardable(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in headers.items() if name.lower() not in _NOT_FORWARDED]


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    for name, value in headers:
        if name.lower() == "content-length":
            return int(value) if value.isdigit() else None
    return None
