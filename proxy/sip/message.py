"""SIP messages (RFC 3261): parse, inspect what routing needs, mutate, serialize.

Why our own parser rather than an existing pure-Python one. We measured `sipmessage`
0.7.1 (the maintained, typed candidate; `aiosipua` wraps a whole UA, not a parser to
use alone) with CPython 3.11 on this project's machine, on a 27-line INVITE with SDP
and a 20-header REGISTER carrying RFC 8599 push parameters (INVITE / REGISTER):

    sipmessage   parse 22 / 26 us; parse + routing views 95 / 118 us
    this module  parse 18 / 19 us; + top Via, From, To, CSeq 32 / 36 us;
                 parse + validate() of every routing view 51 / 64 us

(best of 5 x 20000 runs, timeit). On RFC 4475 sections 3.1.1 and 3.1.2 `sipmessage`
rejects two valid messages (wsinv, semiuri: it cannot unfold folded lines) and accepts
seven invalid ones (bigcode, clerr, ncl, scalarlg, mismatch01, mismatch02, baddate).
It does not frame a body by Content-Length (dblreq's trailing INVITE becomes body),
has no size limits, rebuilds every header on output, and bad input escapes as
ValueError, KeyError or UnicodeDecodeError (of 3000 mutated messages: 1945
UnicodeDecodeError, 32 KeyError). Fixing that means rewriting its core, so this
module does the job: strict where RFC 4475 says reject, bounded, lazy, byte-exact on
untouched headers, and bad input only ever ends in `SipParseError`.

The shape of it:

- `parse(data)` checks the start line (Request-URI included), header syntax,
  Content-Length framing and the fields every message needs (Via, From, To, Call-ID,
  CSeq; CSeq method == request method). Other headers stay text.
- Structured views (`vias`, `top_via`, `from_`, `to`, `contacts`, `routes`,
  `record_routes`, `paths`, `cseq`, `max_forwards`, `expires`) parse on first access
  and are cached; a malformed header raises `SipParseError` then. `validate()` forces
  them all: the relay calls it before routing a message.
- Text is held as latin-1 (one char per octet) so any octet round-trips; a UTF-8
  display name is `text.encode("latin-1").decode("utf-8")` away.
- Mutations (`prepend`, `add`, `set`, `remove`, `pop_value`, `pop_via`, `uri`,
  `decrement_max_forwards`, `body`) make `serialize()` rebuild the message, keeping
  unchanged header lines byte-exact and setting Content-Length from the body; an
  untouched message serializes to its original octets.
- `make_response(request, status)` builds a response as RFC 3261 8.2.6 says.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import secrets
from collections.abc import Callable, Iterable
from typing import Final, NamedTuple, TypeVar, cast

MAX_MESSAGE_SIZE: Final = 65536
MAX_HEADERS: Final = 128
MAX_LINE: Final = 8192  # one header field, after unfolding
MAX_URI: Final = 2048
MAX_HOST: Final = 255
MAX_VALUES: Final = 128  # values of one list header, e.g. all Vias
_MAX_UINT32: Final = 2**32 - 1

# RFC 3261 7.3.3, RFC 3265/6665 (o, u), RFC 3515 (r), RFC 3892 (b), RFC 4028 (x),
# RFC 3841 (a, j, d), RFC 8224 (y).
COMPACT_FORMS: Final = {
    "i": "call-id",
    "m": "contact",
    "e": "content-encoding",
    "l": "content-length",
    "c": "content-type",
    "f": "from",
    "s": "subject",
    "k": "supported",
    "t": "to",
    "v": "via",
    "o": "event",
    "u": "allow-events",
    "r": "refer-to",
    "b": "referred-by",
    "x": "session-expires",
    "a": "accept-contact",
    "j": "reject-contact",
    "d": "request-disposition",
    "y": "identity",
}

# Headers whose grammar is a comma-separated list. Only these are split on commas: an
# unknown header is one opaque value (RFC 4475 3.1.1.1).
# fmt: off
LIST_HEADERS: Final = frozenset({
    "via", "contact", "route", "record-route", "path", "service-route", "allow",
    "supported", "require", "proxy-require", "unsupported", "accept", "accept-encoding",
    "accept-language", "allow-events", "content-encoding", "content-language",
    "in-reply-to", "alert-info", "call-info", "error-info", "warning", "reason",
    "accept-contact", "reject-contact", "request-disposition", "p-asserted-identity",
    "history-info",
})
# fmt: on

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

# What a response copies from its request (RFC 3261 8.2.6.2); without these no
# response can be built.
_COPIED_TO_RESPONSE: Final = ("via", "from", "to", "call-id", "cseq")


class SipParseError(Exception):
    """A message, or one of its headers, is malformed (or exceeds a limit).

    `reason` is a short phrase for the response line and `status` the code to answer
    with (400 unless the error says otherwise: 505, 513, 414, 483). `partial` is the
    request as far as it was parsed once its header lines were split, so the relay can
    still answer it; `can_respond` says whether it may (never to an ACK or a response).
    """

    def __init__(self, reason: str, *, status: int = 400, partial: Request | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.partial = partial

    @property
    def can_respond(self) -> bool:
        p = self.partial
        if p is None or p.method == "ACK":
            return False
        return all(p.has(key) for key in _COPIED_TO_RESPONSE)


# --- lexical helpers -----------------------------------------------------------------
# Every pattern here is linear on any input: their repeated parts never overlap, so a
# crafted header cannot make them backtrack.

_TCHARS: Final = r"A-Za-z0-9\-.!%*_+`'~"
_TOKEN_RE: Final = re.compile(f"[{_TCHARS}]+")
_QUOTED: Final = r'"(?:[^"\\]|\\[\s\S])*"'
_QUOTED_RE: Final = re.compile(_QUOTED)
# A header parameter: token [ EQUAL ( token / host / quoted-string ) ]; ':' and '[]'
# admit IPv6 addresses (Via received, RFC 5118 4.5).
_PARAM_RE: Final = re.compile(
    rf"[ \t]*([{_TCHARS}]+)(?:[ \t]*=[ \t]*([{_TCHARS}:\[\]]+|{_QUOTED}))?[ \t]*"
)
# Control characters are legal only as a quoted-pair (RFC 3261 25.1): a cheap
# translate() tells whether there are any, then the regex checks each is escaped.
_CTL_OCTETS: Final = bytes([*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
_BAD_CTL_RE: Final = re.compile(r"(?<!\\)[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_WORD: Final = r"[A-Za-z0-9\-.!%*_+`'~()<>:\\\"/\[\]?{}]+"
_CALL_ID_RE: Final = re.compile(f"{_WORD}(?:@{_WORD})?")
_CSEQ_RE: Final = re.compile(rf"([0-9]{{1,10}})[ \t]+([{_TCHARS}]+)")
_VERSION_RE: Final = re.compile(r"SIP/[0-9]+\.[0-9]+", re.IGNORECASE)
_BAD_ESCAPE_RE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_OCTET: Final = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_RE: Final = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_USER_RE: Final = re.compile(r"[A-Za-z0-9\-_.!~*'()&=+$,;?/%]+")
_PASSWORD_RE: Final = re.compile(r"[A-Za-z0-9\-_.!~*'()&=+$,%]*")
_PCHARS: Final = r"A-Za-z0-9\-_.!~*'()\[\]/:&+$%"
_HOSTPORT_RE: Final = re.compile(
    r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(?::([0-9]{1,5}))?"
    rf"((?:;[{_PCHARS}]+(?:=[{_PCHARS}]+)?)*)"
    r"(?:\?([A-Za-z0-9\-_.!~*'()\[\]/?:+$%&=]*))?"
)
_ABS_URI_RE: Final = re.compile(r"([A-Za-z][A-Za-z0-9+\-.]*):([^\s<>\"]+)")
_VIA_RE: Final = re.compile(
    rf"([{_TCHARS}]+)[ \t]*/[ \t]*([{_TCHARS}]+)[ \t]*/[ \t]*([{_TCHARS}]+)"
    r"[ \t]+(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(?:[ \t]*:[ \t]*([0-9]{1,5}))?[ \t]*"
)


def _is_token(s: str) -> bool:
    # Fast path for the usual alphanumeric-with-dashes words, the regex for the rest.
    return (s.isascii() and s.replace("-", "").isalnum()) or _TOKEN_RE.fullmatch(s) is not None


def _quoted_end(s: str, start: int) -> int:
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


def _split_semis(s: str) -> list[str]:
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
            i = _quoted_end(s, i)
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
def _check_host(host: str) -> str:
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


def _port(text: str | None) -> int | None:
    if text is None:
        return None
    port = int(text)  # at most 5 ASCII digits, by the patterns
    if port > 65535:
        raise SipParseError("Bad port")
    return port


def _decimal(value: str, what: str, limit: int = _MAX_UINT32) -> int:
    # Length first: int() of a huge string is slow, and isdigit() admits non-ASCII.
    if not (value.isascii() and value.isdigit() and len(value) <= 10):
        raise SipParseError(f"Bad {what}")
    number = int(value)
    if number > limit:
        raise SipParseError(f"Bad {what}")
    return number


def _seconds(value: str, what: str) -> int:
    """delta-seconds. Values past 2**32-1 are capped: RFC 4475 3.1.2.4 lets an element
    treat them as defaults, and a registrar caps them to its own maximum anyway."""
    if not (value.isascii() and value.isdigit()):
        raise SipParseError(f"Bad {what}")
    return int(value) if len(value) <= 10 and int(value) <= _MAX_UINT32 else _MAX_UINT32


# --- parameters and URIs -------------------------------------------------------------


class Params:
    """Ordered `;name[=value]` parameters; names compare case-insensitively.

    Values are kept as written (a quoted-string keeps its quotes, so serialization is
    exact); `get` returns them unquoted. A flag parameter has the value None.
    """

    __slots__ = ("items",)

    def __init__(self, items: tuple[tuple[str, str | None], ...] = ()) -> None:
        self.items = items

    def raw(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.items:
            if key.lower() == name:
                return value
        return None

    def get(self, name: str) -> str | None:
        value = self.raw(name)
        return None if value is None else unquote(value)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        name = name.lower()
        return any(key.lower() == name for key, _ in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Params) and self.items == other.items

    def __hash__(self) -> int:
        return hash(self.items)

    def __repr__(self) -> str:
        return f"Params({self.items!r})"

    def set(self, name: str, value: str | None = None) -> Params:
        """A copy with `name` set (in its place, or appended)."""
        lowered = name.lower()
        items = list(self.items)
        for i, (key, _) in enumerate(items):
            if key.lower() == lowered:
                items[i] = (key, value)
                return Params(tuple(items))
        return Params((*items, (name, value)))

    def remove(self, name: str) -> Params:
        lowered = name.lower()
        return Params(tuple((k, v) for k, v in self.items if k.lower() != lowered))

    def __str__(self) -> str:
        return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in self.items)


NO_PARAMS: Final = Params()


def parse_params(text: str) -> Params:
    """Parse `*( SEMI generic-param )`; `text` is blank or starts at the first ';'."""
    if not text.strip(" \t"):
        return NO_PARAMS
    pieces = _split_semis(text)
    if pieces[0].strip(" \t"):
        raise SipParseError("Bad parameters")
    items: list[tuple[str, str | None]] = []
    for piece in pieces[1:]:
        match = _PARAM_RE.fullmatch(piece)
        if match is None:
            raise SipParseError("Bad parameter")
        items.append((match[1], match[2]))
    return Params(tuple(items))


def _uri_params(text: str) -> Params:
    if not text:
        return NO_PARAMS
    items: list[tuple[str, str | None]] = []
    for piece in text[1:].split(";"):
        name, eq, value = piece.partition("=")
        items.append((name, value if eq else None))
    return Params(tuple(items))


class SipUri(NamedTuple):
    """A sip: or sips: URI (RFC 3261 19.1); escapes are kept as written.

    `host` has no brackets (an IPv6 address is bare); `str()` puts them back.
    """

    host: str
    user: str | None = None
    password: str | None = None
    port: int | None = None
    params: Params = NO_PARAMS
    headers: str | None = None
    scheme: str = "sip"

    @property
    def transport(self) -> str | None:
        value = self.params.get("transport")
        return None if value is None else value.lower()

    @property
    def host_port(self) -> str:
        host = format_host(self.host)
        return host if self.port is None else f"{host}:{self.port}"

    def with_param(self, name: str, value: str | None = None) -> SipUri:
        return self._replace(params=self.params.set(name, value))

    def without_param(self, name: str) -> SipUri:
        return self._replace(params=self.params.remove(name))

    def __str__(self) -> str:
        userinfo = ""
        if self.user is not None:
            userinfo = self.user if self.password is None else f"{self.user}:{self.password}"
            userinfo += "@"
        tail = "" if self.headers is None else f"?{self.headers}"
        return f"{self.scheme}:{userinfo}{self.host_port}{self.params}{tail}"


class AbsoluteUri(NamedTuple):
    """Any other URI (tel:, urn:, ...), kept opaque: routing follows SIP URIs only."""

    scheme: str
    opaque: str

    @property
    def params(self) -> Params:
        return NO_PARAMS

    def __str__(self) -> str:
        return f"{self.scheme}:{self.opaque}"


Uri = SipUri | AbsoluteUri


# URIs repeat across messages (a user's address, a PBX's, our own in a Route) and the
# result is immutable: parsed once each. At most 1024 x MAX_URI characters are kept.
@functools.lru_cache(maxsize=1024)
def parse_uri(text: str) -> Uri:
    """Parse a URI: sip/sips strictly (RFC 3261 25.1), other schemes as opaque text."""
    if len(text) > MAX_URI:
        raise SipParseError("URI too long", status=414)
    scheme, _, rest = text.partition(":")
    lowered = scheme.lower()
    if lowered != "sip" and lowered != "sips":
        other = _ABS_URI_RE.fullmatch(text)
        if other is None:
            raise SipParseError("Bad URI")
        return AbsoluteUri(other[1].lower(), other[2])
    # '@' cannot appear (unescaped) after the userinfo, so the last one ends it; the
    # user may hold ';', '?' and '/', which keeps them out of the host-part patterns.
    at = rest.rfind("@")
    user: str | None = None
    password: str | None = None
    if at >= 0:
        user, sep, pw = rest[:at].partition(":")
        password = pw if sep else None
        if not _USER_RE.fullmatch(user) or (
            password is not None and not _PASSWORD_RE.fullmatch(password)
        ):
            raise SipParseError("Bad SIP URI user")
    match = _HOSTPORT_RE.fullmatch(rest, at + 1)
    if match is None:
        raise SipParseError("Bad SIP URI")
    if "%" in text and _BAD_ESCAPE_RE.search(text):
        raise SipParseError("Bad escape in URI")
    return SipUri(
        _check_host(match[1]),
        user,
        password,
        _port(match[2]),
        _uri_params(match[3]),
        match[4],
        lowered,
    )


# --- header views --------------------------------------------------------------------


class PushParams(NamedTuple):
    """RFC 8599 push parameters of a Contact."""

    provider: str  # pn-provider: apns, apns.dev, fcm, ...
    prid: str | None  # pn-prid: the device token (apns: token:topic-suffix)
    param: str | None  # pn-param: e.g. the APNs topic


class NameAddr(NamedTuple):
    """A name-addr or addr-spec with header parameters: From, To, Contact, Route, Path."""

    uri: Uri
    display: str | None = None  # unquoted, latin-1 text
    params: Params = NO_PARAMS

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    @property
    def expires(self) -> int | None:
        value = self.params.get("expires")
        return None if value is None else _seconds(value, "expires")

    @property
    def q(self) -> str | None:
        return self.params.get("q")

    @property
    def instance(self) -> str | None:
        """The +sip.instance (RFC 5626), unquoted, e.g. `<urn:uuid:...>`."""
        return self.params.get("+sip.instance")

    @property
    def reg_id(self) -> int | None:
        value = self.params.get("reg-id")
        return None if value is None else _decimal(value, "reg-id")

    @property
    def push(self) -> PushParams | None:
        """RFC 8599 parameters: in the Contact URI (the RFC's place), else the header."""
        for params in (self.uri.params, self.params):
            provider = params.get("pn-provider")
            if provider:
                return PushParams(provider, params.get("pn-prid"), params.get("pn-param"))
        return None

    def with_param(self, name: str, value: str | None = None) -> NameAddr:
        return self._replace(params=self.params.set(name, value))

    def __str__(self) -> str:
        display = "" if self.display is None else f"{quote(self.display)} "
        return f"{display}<{self.uri}>{self.params}"


def parse_name_addr(value: str, *, require_brackets: bool = False) -> NameAddr:
    """Parse `( name-addr / addr-spec ) *( SEMI generic-param )`."""
    display: str | None = None
    if value.startswith('"'):
        end = _quoted_end(value, 0)
        display = unquote(value[:end])
        rest = value[end:].lstrip(" \t")
        if not rest.startswith("<"):
            raise SipParseError("Bad display name")
    elif "<" in value:
        lt = value.index("<")
        words = value[:lt].split()
        # Unquoted display names are tokens and LWS; RFC 4475 3.1.1.6 asks to accept
        # one without LWS before '<'.
        if not all(_is_token(word) for word in words):
            raise SipParseError("Bad display name")
        display = " ".join(words) or None
        rest = value[lt:]
    else:
        rest = ""
    if rest:
        gt = rest.find(">")
        if gt < 0:
            raise SipParseError("Missing >")
        return NameAddr(parse_uri(rest[1:gt]), display, parse_params(rest[gt + 1 :]))
    if require_brackets:
        raise SipParseError("name-addr required")
    # addr-spec: parameters after the URI belong to the header, and a URI holding
    # ',', '?' or ';' would need brackets (RFC 3261 20).
    semi = value.find(";")
    uri_text = (value if semi < 0 else value[:semi]).rstrip(" \t")
    if "?" in uri_text or "," in uri_text:
        raise SipParseError("URI needs <>")
    return NameAddr(parse_uri(uri_text), None, parse_params("" if semi < 0 else value[semi:]))


# Route, Record-Route and Path values name the same few hops (ours among them) in
# message after message: parsed once each, as immutable NameAddrs.
@functools.lru_cache(maxsize=1024)
def _parse_hop(value: str) -> NameAddr:
    return parse_name_addr(value, require_brackets=True)


class ViaHeader(NamedTuple):
    """One Via value (RFC 3261 20.42, RFC 3581 rport)."""

    transport: str  # upper case: UDP, TCP, TLS, WS, WSS, ...
    host: str  # IPv6 without brackets
    port: int | None = None
    params: Params = NO_PARAMS

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        value = self.params.get("received")
        # RFC 5118 4.5: tolerate brackets around an IPv6 received.
        return None if value is None else value.strip("[]")

    @property
    def wants_rport(self) -> bool:
        """The rport parameter is present, with or without a value."""
        return "rport" in self.params

    @property
    def rport(self) -> int | None:
        """The rport value a server filled in; None when absent or a bare flag."""
        value = self.params.get("rport")
        return None if value is None else _decimal(value, "rport", 65535)

    @property
    def maddr(self) -> str | None:
        return self.params.get("maddr")

    @property
    def sent_by(self) -> str:
        host = format_host(self.host)
        return host if self.port is None else f"{host}:{self.port}"

    def with_param(self, name: str, value: str | None = None) -> ViaHeader:
        return self._replace(params=self.params.set(name, value))

    @classmethod
    def new(cls, transport: str, host: str, port: int | None, branch: str) -> ViaHeader:
        """A Via for a request we send; it asks for rport (RFC 3581)."""
        return cls(transport.upper(), host, port, Params((("branch", branch), ("rport", None))))

    def __str__(self) -> str:
        return f"SIP/2.0/{self.transport} {self.sent_by}{self.params}"


def parse_via(value: str) -> ViaHeader:
    match = _VIA_RE.match(value)
    if match is None:
        raise SipParseError("Bad Via")
    if match[1].upper() != "SIP" or match[2] != "2.0":
        raise SipParseError("Bad Via version")
    params = parse_params(value[match.end() :])
    return ViaHeader(match[3].upper(), _check_host(match[4]), _port(match[5]), params)


class CSeq(NamedTuple):
    number: int
    method: str

    def __str__(self) -> str:
        return f"{self.number} {self.method}"


@functools.lru_cache(maxsize=256)  # "1 INVITE", "2 BYE": few values, each an immutable CSeq
def parse_cseq(value: str) -> CSeq:
    match = _CSEQ_RE.fullmatch(value)
    if match is None:
        raise SipParseError("Bad CSeq")
    return CSeq(_decimal(match[1], "CSeq"), match[2])


# --- messages ------------------------------------------------------------------------

# One header field: (name as written, canonical lower-case long name, unfolded value,
# the original text of its line(s), or None once changed).
_Field = tuple[str, str, str, str | None]
_T = TypeVar("_T")


def canonical_name(name: str) -> str:
    key = name.lower()
    return COMPACT_FORMS.get(key, key)


def _check_field(name: str, value: str) -> None:
    # Values come from our code; a CR or LF would inject header lines.
    if not _is_token(name) or "\r" in value or "\n" in value:
        raise ValueError(f"invalid header field {name!r}")
    value.encode("latin-1")


# The cached views built from each header: a change to the header drops only these.
_VIEWS_OF: Final = {
    "via": ("vias", "top_via"),
    "from": ("from",),
    "to": ("to",),
    "cseq": ("cseq",),
    "contact": ("contacts",),
    "route": ("routes",),
    "record-route": ("record_routes",),
    "path": ("paths",),
    "max-forwards": ("max_forwards",),
    "expires": ("expires",),
}
_MISSING: Final = object()


class Message:
    """Common part of requests and responses: headers, body, views, serialization."""

    __slots__ = ("_body", "_cache", "_fields", "_index_", "_raw")

    def __init__(
        self,
        fields: list[_Field],
        body: bytes,
        raw: bytes | None,
        index: dict[str, list[int]] | None = None,
    ) -> None:
        self._fields = fields
        self._body = body
        self._raw = raw  # the exact octets while nothing changed
        self._cache: dict[str, object] = {}
        # Positions of the fields by canonical name; None after a change that moved
        # fields, rebuilt when next needed (a relay's changes come in a row).
        self._index_ = index

    # -- raw header access --

    @property
    def _index(self) -> dict[str, list[int]]:
        index = self._index_
        if index is None:
            index = {}
            for i, field in enumerate(self._fields):
                index.setdefault(field[1], []).append(i)
            self._index_ = index
        return index

    def _changed(self, key: str, *, moved: bool) -> None:
        """Header `key` changed: the octets and its views go; the index too if `moved`."""
        self._raw = None
        views = _VIEWS_OF.get(key)
        if views is not None:
            cache = self._cache
            for view in views:
                cache.pop(view, None)
        if moved:
            self._index_ = None

    @property
    def headers(self) -> list[tuple[str, str]]:
        """All header fields in order: (name as written, unfolded value)."""
        return [(f[0], f[2]) for f in self._fields]

    def has(self, name: str) -> bool:
        return canonical_name(name) in self._index

    def get(self, name: str) -> str | None:
        """The value of the first field called `name` (any case, compact or long)."""
        positions = self._index.get(canonical_name(name))
        return None if positions is None else self._fields[positions[0]][2]

    def get_all(self, name: str) -> list[str]:
        """The value of every field called `name`, one per header line."""
        return [self._fields[i][2] for i in self._index.get(canonical_name(name), ())]

    def values(self, name: str) -> list[str]:
        """Every value of `name`; list headers (Via, Contact, ...) split on commas."""
        key = canonical_name(name)
        raw = self.get_all(key)
        if key not in LIST_HEADERS:
            return raw
        values = [v for line in raw for v in split_commas(line)]
        if len(values) > MAX_VALUES:
            raise SipParseError(f"Too many {key} values")
        return values

    # -- mutation --

    def add(self, name: str, value: str) -> None:
        """Append a header field at the end."""
        _check_field(name, value)
        key = canonical_name(name)
        fields = self._fields
        fields.append((name, key, value, None))
        index = self._index_
        if index is not None:  # the others keep their places
            index.setdefault(key, []).append(len(fields) - 1)
        self._changed(key, moved=False)

    def prepend(self, name: str, value: str) -> None:
        """Insert a field before the first field of that name (top Via, Record-Route,
        Path), or before all headers when there is none."""
        _check_field(name, value)
        key = canonical_name(name)
        positions = self._index.get(key)
        self._fields.insert(positions[0] if positions else 0, (name, key, value, None))
        self._changed(key, moved=True)

    def set(self, name: str, value: str) -> None:
        """Replace all fields of that name by one, where the first one was."""
        _check_field(name, value)
        key = canonical_name(name)
        positions = self._index.get(key)
        if not positions:
            self.add(name, value)
            return
        first = self._fields[positions[0]]
        self._fields[positions[0]] = (first[0], key, value, None)
        for i in reversed(positions[1:]):
            del self._fields[i]
        self._changed(key, moved=len(positions) > 1)

    def remove(self, name: str) -> int:
        """Remove every field of that name; returns how many there were."""
        key = canonical_name(name)
        positions = self._index.get(key, [])
        for i in reversed(positions):
            del self._fields[i]
        if positions:
            self._changed(key, moved=True)
        return len(positions)

    def pop_value(self, name: str) -> str | None:
        """Remove and return the first value of a list header (the top Via or Route),
        keeping the other values of its line."""
        key = canonical_name(name)
        positions = self._index.get(key)
        if not positions:
            return None
        i = positions[0]
        fname, _, value, _ = self._fields[i]
        first, *others = split_commas(value)
        if others:
            self._fields[i] = (fname, key, ", ".join(others), None)
        else:
            del self._fields[i]
        self._changed(key, moved=not others)
        return first

    def prepend_via(self, via: ViaHeader) -> None:
        self.prepend("Via", str(via))

    def pop_via(self) -> ViaHeader:
        """Remove the top Via (a proxy does so on a response, RFC 3261 16.7)."""
        top = self._cache.get("top_via")  # parsed from the same value pop_value returns
        value = self.pop_value("via")
        if value is None:
            raise SipParseError("Missing Via header")
        return top if isinstance(top, ViaHeader) else parse_via(value)

    @property
    def body(self) -> bytes:
        return self._body

    @body.setter
    def body(self, body: bytes) -> None:
        self._body = body
        self._raw = None

    # -- structured views --

    def _view(self, key: str, header: str, build: Callable[[], _T]) -> _T:
        cached = self._cache.get(key, _MISSING)
        if cached is not _MISSING:
            return cast(_T, cached)
        try:
            value = build()
        except SipParseError as exc:
            partial = self if isinstance(self, Request) else None
            raise SipParseError(f"Bad {header} header", partial=partial) from exc
        self._cache[key] = value
        return value

    def _required(self, key: str, header: str) -> str:
        value = self.get(key)
        if value is None:
            partial = self if isinstance(self, Request) else None
            raise SipParseError(f"Missing {header} header", partial=partial)
        return value

    def _name_addrs(self, key: str, *, brackets: bool) -> list[NameAddr]:
        values = self.values(key)
        if brackets:
            return [_parse_hop(v) for v in values]
        return [parse_name_addr(v) for v in values]

    @property
    def vias(self) -> list[ViaHeader]:
        def build() -> list[ViaHeader]:
            values = self.values("via")
            top = self._cache.get("top_via")  # parsed from values[0] already
            if isinstance(top, ViaHeader):
                return [top, *(parse_via(v) for v in values[1:])]
            return [parse_via(v) for v in values]

        return self._view("vias", "Via", build)

    @property
    def top_via(self) -> ViaHeader:
        """The first Via; parses only that value, which is all a response route needs."""

        def build() -> ViaHeader:
            line = self._required("via", "Via")
            return parse_via(split_commas(line)[0])

        return self._view("top_via", "Via", build)

    @property
    def from_(self) -> NameAddr:
        return self._view("from", "From", lambda: parse_name_addr(self._required("from", "From")))

    @property
    def to(self) -> NameAddr:
        return self._view("to", "To", lambda: parse_name_addr(self._required("to", "To")))

    @property
    def call_id(self) -> str:
        return self._required("call-id", "Call-ID")

    @property
    def cseq(self) -> CSeq:
        return self._view("cseq", "CSeq", lambda: parse_cseq(self._required("cseq", "CSeq")))

    @property
    def contact_star(self) -> bool:
        """`Contact: *` (remove all bindings, RFC 3261 10.2.2)."""
        return self.get_all("contact") == ["*"]

    @property
    def contacts(self) -> list[NameAddr]:
        """Contact values; empty for `Contact: *` (check `contact_star`)."""

        def build() -> list[NameAddr]:
            if self.contact_star:
                return []
            contacts = self._name_addrs("contact", brackets=False)
            for contact in contacts:  # numeric parameters are checked with the header
                _ = contact.expires, contact.reg_id
            return contacts

        return self._view("contacts", "Contact", build)

    @property
    def routes(self) -> list[NameAddr]:
        return self._view("routes", "Route", lambda: self._name_addrs("route", brackets=True))

    @property
    def record_routes(self) -> list[NameAddr]:
        return self._view(
            "record_routes", "Record-Route", lambda: self._name_addrs("record-route", brackets=True)
        )

    @property
    def paths(self) -> list[NameAddr]:
        return self._view("paths", "Path", lambda: self._name_addrs("path", brackets=True))

    @property
    def max_forwards(self) -> int | None:
        def build() -> int | None:
            value = self.get("max-forwards")
            return None if value is None else _decimal(value, "Max-Forwards", 255)

        return self._view("max_forwards", "Max-Forwards", build)

    @property
    def expires(self) -> int | None:
        def build() -> int | None:
            value = self.get("expires")
            return None if value is None else _seconds(value, "Expires")

        return self._view("expires", "Expires", build)

    @property
    def content_length(self) -> int | None:
        """The declared Content-Length (checked against the body by `parse`)."""
        value = self.get("content-length")
        return None if value is None else _decimal(value, "Content-Length", MAX_MESSAGE_SIZE)

    def validate(self) -> None:
        """Parse every routing view now, so a malformed header surfaces here."""
        _ = (self.vias, self.from_, self.to, self.cseq, self.contacts, self.routes)
        _ = (self.record_routes, self.paths, self.max_forwards, self.expires)

    # -- serialization --

    def _start_line(self) -> str:
        raise NotImplementedError

    def serialize(self) -> bytes:
        """The message on the wire: original octets while untouched, else rebuilt with
        unchanged header lines byte-exact and Content-Length set from the body."""
        if self._raw is not None:
            return self._raw
        body = self._body
        length = str(len(body))
        lines = [self._start_line()]
        length_done = False
        for name, key, value, raw in self._fields:
            if key == "content-length":
                if length_done:
                    continue  # duplicates were checked equal by parse; keep one
                length_done = True
                keep = raw is not None and value == length
                lines.append(cast(str, raw) if keep else f"{name}: {length}")
            else:
                lines.append(raw if raw is not None else f"{name}: {value}")
        if not length_done:
            lines.append(f"Content-Length: {length}")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("latin-1") + body


class Request(Message):
    __slots__ = ("_uri", "_uri_text", "method", "start_line")

    def __init__(
        self,
        method: str,
        uri_text: str,
        fields: list[_Field],
        body: bytes = b"",
        raw: bytes | None = None,
        start_line: str | None = None,
        index: dict[str, list[int]] | None = None,
    ) -> None:
        super().__init__(fields, body, raw, index)
        self.method = method
        self._uri_text = uri_text
        self._uri: Uri | None = None
        # The start line as received; None once rebuilt.
        self.start_line = start_line

    @classmethod
    def build(
        cls, method: str, uri: Uri, headers: Iterable[tuple[str, str]], body: bytes = b""
    ) -> Request:
        """A new request; Content-Length is added when serialized."""
        fields: list[_Field] = []
        for name, value in headers:
            _check_field(name, value)
            fields.append((name, canonical_name(name), value, None))
        request = cls(method, str(uri), fields, body)
        request._uri = uri
        return request

    @property
    def uri(self) -> Uri:
        if self._uri is None:
            uri = parse_uri(self._uri_text)
            if isinstance(uri, SipUri) and uri.headers is not None:
                # RFC 3261 19.1.1: headers are not allowed in a Request-URI
                # (RFC 4475 3.1.2.11).
                raise SipParseError("Headers in Request-URI")
            self._uri = uri
        return self._uri

    @uri.setter
    def uri(self, uri: Uri) -> None:
        self._uri = uri
        self._uri_text = str(uri)
        self.start_line = None
        self._raw = None

    def decrement_max_forwards(self) -> int:
        """Apply RFC 3261 16.6 step 3 and return the new value (70 when absent).

        Raises SipParseError with status 483 when the value is already 0.
        """
        current = self.max_forwards
        if current == 0:
            raise SipParseError("Too Many Hops", status=483, partial=self)
        new = 70 if current is None else current - 1
        self.set("Max-Forwards", str(new))
        return new

    def _start_line(self) -> str:
        return self.start_line or f"{self.method} {self._uri_text} SIP/2.0"

    def __repr__(self) -> str:
        return f"<Request {self.method} {self._uri_text}>"


class Response(Message):
    __slots__ = ("reason", "start_line", "status")

    def __init__(
        self,
        status: int,
        reason: str,
        fields: list[_Field],
        body: bytes = b"",
        raw: bytes | None = None,
        start_line: str | None = None,
        index: dict[str, list[int]] | None = None,
    ) -> None:
        super().__init__(fields, body, raw, index)
        self.status = status
        self.reason = reason
        self.start_line = start_line

    def _start_line(self) -> str:
        return self.start_line or f"SIP/2.0 {self.status} {self.reason}"

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


# --- parsing -------------------------------------------------------------------------


def parse(data: bytes) -> Request | Response:
    """Parse one SIP message (a datagram, or one message framed off a stream).

    Raises SipParseError for anything malformed, and only that.
    """
    if len(data) > MAX_MESSAGE_SIZE:
        raise SipParseError("Message Too Large", status=513)
    start = 0
    while data.startswith(b"\r\n", start):  # RFC 3261 7.5: ignore CRLF before a message
        start += 2
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        raise SipParseError("Incomplete header")
    head = data[start:end]
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    breaks = len(lines) - 1
    if text.count("\r") != breaks or text.count("\n") != breaks:
        raise SipParseError("Bare CR or LF")
    if len(head.translate(None, _CTL_OCTETS)) != len(head) and _BAD_CTL_RE.search(text):
        raise SipParseError("Control character in header")

    fields, index = _parse_fields(lines, check_length=len(text) > MAX_LINE)
    first = lines[0]

    # Content-Length frames the body: octets past it in a datagram are noise (RFC 3261
    # 18.3, RFC 4475 3.1.1.8), a shorter body is an error (RFC 4475 3.1.2.2).
    body_start = end + 4
    body_end = len(data)
    length_error: str | None = None
    lengths = {fields[i][2] for i in index.get("content-length", ())}
    if len(lengths) > 1:
        length_error = "Conflicting Content-Length"
    elif lengths:
        value = lengths.pop()
        if not (value.isascii() and value.isdigit() and len(value) <= 10):
            length_error = "Bad Content-Length"
        elif body_start + int(value) > len(data):
            length_error = "Body shorter than Content-Length"
        else:
            body_end = body_start + int(value)
    body = data[body_start:body_end]
    raw = data[start:body_end] if start or body_end != len(data) else data

    message: Request | Response
    if first.startswith("SIP/"):
        message = _response(first, fields, index, body, raw)
    else:
        message = _request(first, fields, index, body, raw)
    partial = message if isinstance(message, Request) else None
    if length_error is not None:  # raised late so that a 400 can still be built
        raise SipParseError(length_error, partial=partial)
    _check_required(message, fields, index)
    return message


# Header names seen valid, as written -> (name without trailing LWS, canonical key).
# Names repeat across messages, so this skips most validation; bounded against floods.
_NAME_CACHE: dict[str, tuple[str, str]] = {}
_NAME_CACHE_SIZE: Final = 512


def _field_name(written: str) -> tuple[str, str]:
    name = written.rstrip(" \t")
    if not _is_token(name):
        raise SipParseError("Bad header line")
    result = (name, canonical_name(name))
    if len(_NAME_CACHE) < _NAME_CACHE_SIZE:
        _NAME_CACHE[written] = result
    return result


def _parse_fields(
    lines: list[str], check_length: bool
) -> tuple[list[_Field], dict[str, list[int]]]:
    """The header fields of `lines` (the start line first) and their positions by name."""
    fields: list[_Field] = []
    index: dict[str, list[int]] = {}
    known_names = _NAME_CACHE.get
    for line in lines[1:]:
        if check_length and len(line) > MAX_LINE:
            raise SipParseError("Header too long")
        first = line[:1]
        if first == " " or first == "\t":  # folded continuation (LWS): one SP
            if not fields:
                raise SipParseError("Folded first header")
            name, key, value, raw = fields[-1]
            continuation = line.strip(" \t")
            value = f"{value} {continuation}" if value else continuation
            if len(value) > MAX_LINE:
                raise SipParseError("Header too long")
            fields[-1] = (name, key, value, f"{raw}\r\n{line}")
            continue
        written, colon, value = line.partition(":")
        if not colon:
            raise SipParseError("Bad header line")
        known = known_names(written)
        name, key = _field_name(written) if known is None else known
        positions = index.get(key)
        if positions is None:
            index[key] = [len(fields)]
        else:
            positions.append(len(fields))
        fields.append((name, key, value.strip(" \t"), line))
    if len(fields) > MAX_HEADERS:
        raise SipParseError("Too many headers")
    return fields, index


def _response(
    first: str, fields: list[_Field], index: dict[str, list[int]], body: bytes, raw: bytes
) -> Response:
    version, _, rest = first.partition(" ")
    code, _, reason = rest.partition(" ")
    if version.upper() != "SIP/2.0":
        raise SipParseError("Bad version", status=505)
    if not (len(code) == 3 and code.isascii() and code.isdigit() and 100 <= int(code) <= 699):
        raise SipParseError("Bad status code")
    return Response(int(code), reason, fields, body, raw, first, index)


def _request(
    first: str, fields: list[_Field], index: dict[str, list[int]], body: bytes, raw: bytes
) -> Request:
    # Split loosely so that a bad line still yields a request we can answer with 400:
    # the URI is whatever lies between the first and the last space.
    method, sp1, rest = first.partition(" ")
    uri_text, sp2, version = rest.rpartition(" ")
    request = Request(method, uri_text, fields, body, raw, first, index)
    if not sp1 or not sp2 or not _is_token(method):
        raise SipParseError("Bad request line", partial=request)
    if version != "SIP/2.0":
        if _VERSION_RE.fullmatch(version):
            raise SipParseError("Version Not Supported", status=505, partial=request)
        raise SipParseError("Bad request line", partial=request)
    try:
        _ = request.uri
    except SipParseError as exc:
        raise SipParseError(f"Bad Request-URI: {exc.reason}", partial=request) from exc
    return request


def _check_required(
    message: Request | Response, fields: list[_Field], index: dict[str, list[int]]
) -> None:
    partial = message if isinstance(message, Request) else None
    for key, header in (("via", "Via"), ("from", "From"), ("to", "To")):
        if key not in index:
            raise SipParseError(f"Missing {header} header", partial=partial)
    for key, header in (("call-id", "Call-ID"), ("cseq", "CSeq")):
        positions = index.get(key)
        if positions is None:
            raise SipParseError(f"Missing {header} header", partial=partial)
        if len(positions) > 1:
            raise SipParseError(f"Duplicate {header} header", partial=partial)
    if not _CALL_ID_RE.fullmatch(fields[index["call-id"][0]][2]):
        raise SipParseError("Bad Call-ID header", partial=partial)
    cseq = message.cseq
    if isinstance(message, Request) and cseq.method != message.method:
        raise SipParseError("CSeq method mismatch", partial=message)


# --- responses -----------------------------------------------------------------------


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
    if not 100 <= status <= 699:
        raise ValueError(f"bad status {status}")
    reason = REASON_PHRASES.get(status, "") if reason is None else reason
    if "\r" in reason or "\n" in reason:
        raise ValueError("reason phrase with CR/LF")
    reason.encode("latin-1")  # the wire form; raises for text it cannot carry
    fields: list[_Field] = []
    for name, key, value, raw in request._fields:
        if key not in _COPIED_TO_RESPONSE:
            continue
        if key == "to" and status != 100 and not _has_tag(request, value):
            value = f"{value};tag={to_tag or new_tag()}"
            raw = None
        fields.append((name, key, value, raw))
    for name, value in headers:
        _check_field(name, value)
        fields.append((name, canonical_name(name), value, None))
    return Response(status, reason, fields, body)


def _has_tag(request: Request, value: str) -> bool:
    try:
        return request.to.tag is not None
    except SipParseError:  # a malformed To still gets its 400; look for a tag by eye
        return re.search(r";[ \t]*tag[ \t]*=", value, re.IGNORECASE) is not None
