"""The one refusal type of softrelay's HTTP APIs, and the one middleware that renders it.

    raise Refusal(429, "rate_limited", "too many attempts", retry_after=30)

A handler raises a `Refusal`; `refusals` (in every app's middlewares) renders it. A
refusal says what the caller must do next: its `status` (4xx: change the request;
429 and 503: retry after `Retry-After`; other 5xx: retry later), `error` a stable code
to act on, `detail` a sentence for people, `headers` what the protocol adds.

    Exception
    └── Refusal(status, error, detail, headers)  {"error": code, "detail": sentence}
        ├── BadBody (webapi/body.py)              400 malformed_body: broken chunking,
        │     a Content-Encoding that does not decode; a ValueError as well
        ├── SentryRefusal                         {"detail": sentence}
        │     crash ingest (Relay's answer; the SDK reads only the status and
        │     its rate-limit headers); `error` is the metrics outcome, not sent
        └── OAuthRefusal                          {"error": code, "error_description": s}
              the token relay (RFC 6749 5.2); `error` is an RFC 6749 code,
              Cache-Control: no-store

Domain errors carry no HTTP status: they say what went wrong, and each API module
maps them to refusals in one table (`dsr/api.py` `IDENTITY_REFUSALS`, the usage
ping's `PeriodClosed`, crash ingest's envelope and worker errors).

The middleware also answers what no handler raised, in the variant of the route
(`speaks`: crash ingest answers Sentry's shape on `/api/`, OAuth on `/oauth/`):

    a header that is not UTF-8      -> 400 bad_header (lone surrogates included)
    aiohttp's own text 4xx          -> the same status (404, 405, 413 ...)
    StorageUnavailable (privacy)    -> 503 storage_unavailable with Retry-After: the
                                       database is unreachable; nothing was stored
    ClusterUnavailable (cluster)    -> 503 cluster_unavailable with Retry-After: Redis,
                                       which shared limits need, is unreachable
    any other exception             -> 500 internal, logged by class name only

The store's `StorageUnavailable` is mapped here, once, for every API: a handler lets it
pass (an API that counts outcomes counts it on the way), whatever store call raised it.

aiohttp's own handling of a failing handler logs "Error handling request from <IP>"
with the traceback; nothing reaches it from here. What no middleware sees: aiohttp's
HTTP parser answers a malformed request line, an oversized header or broken chunked
framing itself, with its plain-text 400, before a request (and an app) exists.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from aiohttp import web
from aiohttp.typedefs import Handler

from cluster.redis import ClusterUnavailable
from privacy.backend import StorageUnavailable

log = logging.getLogger("softrelay.http")


class Refusal(Exception):
    """An answer that refuses a request (see the module doc). `retry_after` (seconds,
    rounded up, at least 1) sets the Retry-After header."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        headers: Mapping[str, str] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))

    @classmethod
    def recast(cls, refusal: Refusal) -> Refusal:
        """`refusal` in this variant's shape (the middleware's own refusals, and a
        shared helper's such as `read_json`, on a route of this variant)."""
        if type(refusal) is cls:
            return refusal
        return cls(refusal.status, refusal.error, refusal.detail, refusal.headers)

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "detail": self.detail}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


class SentryRefusal(Refusal):
    """Crash ingest's refusal, in the shape Sentry's Relay answers: `{"detail"}`."""

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail}


class OAuthRefusal(Refusal):
    """The token relay's refusal (RFC 6749 5.2), never cached (5.1)."""

    # RFC 6749 5.2 and 4.1.2.1, and RFC 8628 3.5's slow_down (what a rate limit says).
    CODES: ClassVar[frozenset[str]] = frozenset(
        {
            "invalid_request",
            "invalid_client",
            "invalid_grant",
            "unauthorized_client",
            "unsupported_grant_type",
            "invalid_scope",
            "server_error",
            "temporarily_unavailable",
            "slow_down",
        }
    )

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        headers: Mapping[str, str] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(
            status, _oauth_code(status, error), detail, headers, retry_after=retry_after
        )
        self.headers["Cache-Control"] = "no-store"

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "error_description": self.detail}


def _oauth_code(status: int, error: str) -> str:
    """An RFC 6749 code for a refusal made in another's terms (malformed_body ...)."""
    if error in OAuthRefusal.CODES:
        return error
    if status == 429:
        return "slow_down"
    if status in (502, 503, 504):
        return "temporarily_unavailable"
    return "server_error" if status >= 500 else "invalid_request"


def storage_refusal(exc: StorageUnavailable) -> Refusal:
    """The answer to a request the store could not serve now: nothing was stored, retry.
    The detail never names the database (its message does: host and port)."""
    return Refusal(
        503,
        "storage_unavailable",
        "the data store is unavailable; nothing was stored; retry later",
        retry_after=exc.retry_after,
    )


# Seconds a client is told to wait when Redis is out: its reconnect backoff's cap and a bit.
CLUSTER_RETRY_AFTER = 5.0


def cluster_refusal() -> Refusal:
    """The answer to a request that needs what the cluster's nodes share (a shared limit,
    a DSR challenge) while Redis cannot be reached: refused, never let through unlimited
    (a limit that protects fails closed). The detail never names Redis's address."""
    return Refusal(
        503,
        "cluster_unavailable",
        "the service's shared state is unavailable; retry later",
        retry_after=CLUSTER_RETRY_AFTER,
    )


# Path prefix -> the variant its routes answer in; set while the routes are added.
VARIANTS = web.AppKey("refusal_variants", dict[str, type[Refusal]])


def speaks(app: web.Application, prefix: str, variant: type[Refusal]) -> None:
    """The routes under `prefix` answer every refusal, the middleware's own included,
    in `variant`'s shape."""
    if VARIANTS not in app:
        app[VARIANTS] = {}
    app[VARIANTS][prefix] = variant


def _shaped(request: web.Request, refusal: Refusal) -> web.Response:
    if type(refusal) is Refusal:  # a variant raised on purpose stays as it is
        for prefix, variant in request.app.get(VARIANTS, {}).items():
            if request.path.startswith(prefix):
                return variant.recast(refusal).response()
    return refusal.response()


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


def _from_http_exception(exc: web.HTTPException) -> Refusal | None:
    """aiohttp's own text refusal (404, 405, 413 of client_max_size ...)."""
    if exc.status < 400 or exc.content_type != "text/plain":
        return None
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    code = (exc.reason or "error").lower().replace(" ", "_").replace("-", "_")
    return Refusal(exc.status, code, exc.reason or "refused", headers)


@web.middleware
async def refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place an HTTP error is rendered (see the module doc)."""
    refused = _header_refusal(request)
    if refused is not None:
        return _shaped(request, refused)
    try:
        return await handler(request)
    except Refusal as exc:
        return _shaped(request, exc)
    except web.HTTPException as exc:
        rendered = _from_http_exception(exc)
        if rendered is None:
            raise
        return _shaped(request, rendered)
    except (asyncio.CancelledError, ConnectionError):
        raise  # the client went away: there is nobody to answer
    except StorageUnavailable as exc:
        if request.writer.output_size > 0:
            raise
        # Not logged per request: the store logs the outage once, as it begins and ends.
        return _shaped(request, storage_refusal(exc))
    except ClusterUnavailable:
        if request.writer.output_size > 0:
            raise
        # Not logged per request: the Redis owner logs the outage (cluster/redis.py).
        return _shaped(request, cluster_refusal())
    except Exception:
        if request.writer.output_size > 0:
            raise  # an answer is half sent: aiohttp can only drop the connection
        # The policy's log handler keeps the class only: a message may quote the body.
        log.exception("http.handler_failed")
        return _shaped(request, Refusal(500, "internal", "the request failed; retry later"))


__all__ = [
    "VARIANTS",
    "OAuthRefusal",
    "Refusal",
    "SentryRefusal",
    "cluster_refusal",
    "refusals",
    "speaks",
    "storage_refusal",
]
