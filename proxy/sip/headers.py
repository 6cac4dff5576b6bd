"""Header fields: their names (compact forms, which ones are lists) and the values the
relay reads: Via, CSeq, and name-addr (From, To, Contact, Route, Record-Route, Path)
with its parameters, including RFC 5626 instance ids and RFC 8599 push parameters.

Each value type is an immutable NamedTuple whose `str()` is its wire form; each
`parse_*` raises `SipParseError` for a malformed value.
"""

from __future__ import annotations

import functools
import re
from typing import Final, NamedTuple

from proxy.sip.params import NO_PARAMS, Params, parse_params
from proxy.sip.syntax import (
    TCHARS,
    SipParseError,
    check_host,
    format_host,
    is_token,
    parse_decimal,
    parse_port,
    parse_seconds,
    quote,
    quoted_end,
    unquote,
)
from proxy.sip.uri import Uri, parse_uri

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


def canonical_name(name: str) -> str:
    """The lower-case long name of a header: `v` and `VIA` are both `via`."""
    key = name.lower()
    return COMPACT_FORMS.get(key, key)


def check_field(name: str, value: str) -> None:
    """Refuse, with ValueError, a header field our own code would add but the wire
    cannot carry. Values come from our code; a CR or LF would inject header lines."""
    if not is_token(name) or "\r" in value or "\n" in value:
        raise ValueError(f"invalid header field {name!r}")
    value.encode("latin-1")


# Linear on any input: see proxy.sip.syntax.
_CSEQ_RE: Final = re.compile(rf"([0-9]{{1,10}})[ \t]+([{TCHARS}]+)")
_VIA_RE: Final = re.compile(
    rf"([{TCHARS}]+)[ \t]*/[ \t]*([{TCHARS}]+)[ \t]*/[ \t]*([{TCHARS}]+)"
    r"[ \t]+(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(?:[ \t]*:[ \t]*([0-9]{1,5}))?[ \t]*"
)


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
        return None if value is None else parse_seconds(value, "expires")

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
        return None if value is None else parse_decimal(value, "reg-id")

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
        end = quoted_end(value, 0)
        display = unquote(value[:end])
        rest = value[end:].lstrip(" \t")
        if not rest.startswith("<"):
            raise SipParseError("Bad display name")
    elif "<" in value:
        lt = value.index("<")
        words = value[:lt].split()
        # Unquoted display names are tokens and LWS; RFC 4475 3.1.1.6 asks to accept
        # one without LWS before '<'.
        if not all(is_token(word) for word in words):
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
def parse_hop(value: str) -> NameAddr:
    """A Route, Record-Route or Path value: a name-addr, brackets required."""
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
        return None if value is None else parse_decimal(value, "rport", 65535)

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
    return ViaHeader(match[3].upper(), check_host(match[4]), parse_port(match[5]), params)


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
    return CSeq(parse_decimal(match[1], "CSeq"), match[2])
