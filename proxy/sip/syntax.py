"""The lexical rules of SIP text (RFC 3261 25.1) that URIs, header values and messages
share: tokens, quoted strings, comma and semicolon lists, hosts, ports and numbers; and
`SipParseError`, the one error every step of parsing raises.

Every pattern here, and in the modules built on it, is linear on any input: their
repeated parts never overlap, so a crafted header cannot make them backtrack.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Final, Protocol

MAX_HOST: Final = 255
MAX_UINT32: Final = 2**32 - 1

TCHARS: Final = r"A-Za-z0-9\-.!%*_+`'~"  # a character class's body: token characters
QUOTED: Final = r'"(?:[^"\\]|\\[\s\S])*"'  # a quoted-string, quoted-pairs included
_TOKEN_RE: Final = re.compile(f"[{TCHARS}]+")
_QUOTED_RE: Final = re.compile(QUOTED)
_OCTET: Final = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_RE: Final = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


class PartialRequest(Protocol):
    """What a parse error needs of the request it was raised for. It is a
    `proxy.sip.message.Request`, which this module does not import: the messages are
    built on it. `proxy.sip.responses.error_response` answers it."""

    @property
    def answerable(self) -> bool: ...


class SipParseError(Exception):
    """A message, or one of its headers, is malformed (or exceeds a limit).

    `reason` is a short phrase for the response line and `status` the code to answer
    with (400 unless the error says otherwise: 505, 513, 414, 483). `partial` is the
    request as far as it was parsed once its header lines were split, so the relay can
    still answer it; `can_respond` says whether it may (never to an ACK or a response).
    """

    def __init__(
        self, reason: str, *, status: int = 400, partial: PartialRequest | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.partial = partial

    @property
    def can_respond(self) -> bool:
        return self.partial is not None and self.partial.answerable


def is_token(s: str) -> bool:
    # Fast path for the usual alphanumeric-with-dashes words, the regex for the rest.
    return (s.isascii() and s.replace("-", "").isalnum()) or _TOKEN_RE.fullmatch(s) is not None


def quoted_end(s: str, start: int) -> int:
    """Index just past the quoted-string that opens at `start`."""
    match = _QUOTED_RE.match(s, start)
    if match is None:
        raise SipParseError("Unterminated quoted string")
    return match.end()


def unquote(value: str) -> str:
    """The content of a quoted-string (quoted-pairs resolved); other text unchanged."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        inner = value[1:-1]
        return re.sub(r"\\([\s\S])", r"\1", inner) if "\\" in inner else inner
    return value


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def split_commas(value: str) -> list[str]:
    """Split a header value on commas outside quoted strings and <...>."""
    if "," not in value:
        return [value]
    if '"' not in value and "<" not in value:
        return [part.strip(" \t") for part in value.split(",")]
    parts: list[str] = []
    start = 0
    in_quote = in_angle = False
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if in_quote:
            if c == "\\":
                i += 1
            elif c == '"':
                in_quote = False
        elif c == '"':
            in_quote = True
        elif c == "<":
            in_angle = True
        elif c == ">":
            in_angle = False
        elif c == "," and not in_angle:
            parts.append(value[start:i].strip(" \t"))
            start = i + 1
        i += 1
    parts.append(value[start:].strip(" \t"))
    return parts


def split_semis(s: str) -> list[str]:
    """Split on semicolons outside quoted strings."""
    if '"' not in s:
        return s.split(";")
    parts: list[str] = []
    start = 0
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == '"':
            i = quoted_end(s, i)
            continue
        if c == ";":
            parts.append(s[start:i])
            start = i + 1
        i += 1
    parts.append(s[start:])
    return parts


def _is_label(label: str) -> bool:
    return (
        label.isascii()
        and label.replace("-", "").isalnum()
        and label[0] != "-"
        and label[-1] != "-"
    )


@functools.lru_cache(maxsize=1024)  # hosts repeat across messages; values are bounded
def check_host(host: str) -> str:
    """Validate a host (name, IPv4, [IPv6]); return it without IPv6 brackets."""
    if len(host) > MAX_HOST:
        raise SipParseError("Bad host")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise SipParseError("Bad IPv6 reference") from None
        return host[1:-1]
    labels = (host[:-1] if host.endswith(".") else host).split(".")
    if not all(labels) or not all(_is_label(label) for label in labels):
        raise SipParseError("Bad host")
    # A toplabel starts with a letter, so a host ending in a digit label is IPv4.
    if labels[-1][0].isdigit() and not _IPV4_RE.fullmatch(host):
        raise SipParseError("Bad IPv4 address")
    return host


def format_host(host: str) -> str:
    """A host for a URI or Via: an IPv6 address gets its brackets back."""
    return f"[{host}]" if ":" in host else host


def parse_port(text: str | None) -> int | None:
    if text is None:
        return None
    port = int(text)  # at most 5 ASCII digits, by the callers' patterns
    if port > 65535:
        raise SipParseError("Bad port")
    return port


def parse_decimal(value: str, what: str, limit: int = MAX_UINT32) -> int:
    # Length first: int() of a huge string is slow, and isdigit() admits non-ASCII.
    if not (value.isascii() and value.isdigit() and len(value) <= 10):
        raise SipParseError(f"Bad {what}")
    number = int(value)
    if number > limit:
        raise SipParseError(f"Bad {what}")
    return number


def parse_seconds(value: str, what: str) -> int:
    """delta-seconds. Values past 2**32-1 are capped: RFC 4475 3.1.2.4 lets an element
    treat them as defaults, and a registrar caps them to its own maximum anyway."""
    if not (value.isascii() and value.isdigit()):
        raise SipParseError(f"Bad {what}")
    return int(value) if len(value) <= 10 and int(value) <= MAX_UINT32 else MAX_UINT32
