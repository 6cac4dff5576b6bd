"""Answering a request: the response RFC 3261 8.2.6 builds (Via, From, To, Call-ID and
CSeq copied in order, a To tag added), the reason phrase each status is sent with, and
the answer to a request that failed to parse (`error_response`).

The copied fields keep their lines exactly as the request had them (a proxy's peer
matches its own Via); the added `headers` are checked like any new field.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from typing import Final

from proxy.sip.message import COPIED_TO_RESPONSE, Field, Request, Response, new_fields
from proxy.sip.syntax import SipParseError

REASON_PHRASES: Final = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    410: "Gone",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    421: "Extension Required",
    423: "Interval Too Brief",
    430: "Flow Failed",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    484: "Address Incomplete",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    555: "Push Notification Service Not Supported",
    600: "Busy Everywhere",
    603: "Decline",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}


def new_tag() -> str:
    return secrets.token_hex(6)


def make_response(
    request: Request,
    status: int,
    reason: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    *,
    to_tag: str | None = None,
    body: bytes = b"",
) -> Response:
    """A response to `request` (RFC 3261 8.2.6): Via, From, To, Call-ID and CSeq copied
    in order, a To tag added when missing (except to 100), then `headers`."""
    copied: list[Field] = []
    for name, key, value, raw in request._fields:  # as received: copied byte-exact
        if key not in COPIED_TO_RESPONSE:
            continue
        if key == "to" and status != 100 and not _has_tag(request, value):
            value = f"{value};tag={to_tag or new_tag()}"
            raw = None
        copied.append((name, key, value, raw))
    phrase = REASON_PHRASES.get(status, "") if reason is None else reason
    return Response(status, phrase, (), body)._adopt([*copied, *new_fields(headers)])


def error_response(exc: SipParseError) -> Response | None:
    """The answer to the request `exc` was raised for, with its status and reason; None
    when none may be sent (a response, an ACK, or no header a response must copy)."""
    partial = exc.partial
    if not isinstance(partial, Request) or not partial.answerable:
        return None
    return make_response(partial, exc.status, exc.reason)


def _has_tag(request: Request, value: str) -> bool:
    try:
        return request.to.tag is not None
    except SipParseError:  # a malformed To still gets its 400; look for a tag by eye
        return re.search(r";[ \t]*tag[ \t]*=", value, re.IGNORECASE) is not None
