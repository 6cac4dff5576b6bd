"""SIP messages as the mock parties write and read them: a small writer and reader.

Written apart from the relay's parser (proxy/sip/parser.py) on purpose: the mock
phones and PBX test that relay, and a bug shared by both sides would pass every test.
It reads what a well-behaved peer sends (RFC 3261 7, 20, 25): header names in full or
compact form, comma-separated lists in Via, Contact, Route, Record-Route and Path,
name-addr and addr-spec forms. It is not hardened against hostile input: its peers are
the relay under test and the test's own parties. `SipWireError` for what it cannot read.

Streams are framed by Content-Length, with RFC 5626 CRLF keep-alives (`StreamFramer`).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Final

PING: Final = b"\r\n\r\n"  # RFC 5626 3.5.1: a double CRLF, answered by a single one
PONG: Final = b"\r\n"
MAX_MESSAGE = 65536  # octets: far above anything the parties exchange

# RFC 3261 7.3.3 and the IANA registry: compact header names.
_COMPACT = {
    "v": "via",
    "f": "from",
    "t": "to",
    "i": "call-id",
    "m": "contact",
    "l": "content-length",
    "c": "content-type",
    "k": "supported",
    "e": "content-encoding",
    "s": "subject",
    "o": "event",
    "u": "allow-events",
    "r": "refer-to",
    "b": "referred-by",
    "x": "session-expires",
    "y": "identity",
}
# Headers whose value is a comma-separated list that `get_all` splits (RFC 3261 7.3.1).
_LISTS = frozenset({"via", "contact", "route", "record-route", "path", "supported", "allow"})
# Copied into a response, in the request's order (RFC 3261 8.2.6.2).
_COPIED = ("via", "from", "to", "call-id", "cseq")
_REASONS = {
    100: "Trying",
    180: "Ringing",
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
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    486: "Busy Here",
    487: "Request Terminated",
    500: "Server Internal Error",
    503: "Service Unavailable",
    603: "Decline",
}
_STATUS_LINE = re.compile(r"SIP/2\.0 ([1-6]\d\d) ?(.*)")
_REQUEST_LINE = re.compile(r"([A-Za-z]+) (\S+) SIP/2\.0")


class SipWireError(ValueError):
    """Octets that are not a SIP message this reader understands."""


def header_key(name: str) -> str:
    """The lower-case full name of a header (`m` -> `contact`)."""
    key = name.strip().lower()
    return _COMPACT.get(key, key)


def split_list(value: str) -> list[str]:
    """A header value split at the commas that separate list items, not at those inside
    quotes or angle brackets."""
    items: list[str] = []
    start, quoted, angle, i = 0, False, False, 0
    while i < len(value):
        char = value[i]
        if quoted:
            if char == "\\":
                i += 1
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == "<":
            angle = True
        elif char == ">":
            angle = False
        elif char == "," and not angle:
            items.append(value[start:i].strip())
            start = i + 1
        i += 1
    items.append(value[start:].strip())
    return [item for item in items if item]


def _params(text: str) -> list[tuple[str, str | None]]:
    """`;name=value;flag` parameters (the text after the first `;`), in order."""
    found: list[tuple[str, str | None]] = []
    for part in _split_outside_quotes(text, ";"):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        found.append((name.strip(), value.strip() if eq else None))
    return found


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts, start, quoted = [], 0, False
    for i, char in enumerate(text):
        if char == '"':
            quoted = not quoted
        elif char == sep and not quoted:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _find(params: Sequence[tuple[str, str | None]], name: str) -> str | None:
    for key, value in params:
        if key.lower() == name:
            return value if value is not None else ""
    return None


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


# --- URIs and addresses -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Uri:
    """A sip: or sips: URI (other schemes keep their text and no parts)."""

    text: str
    scheme: str = ""
    user: str | None = None
    host: str = ""
    port: int | None = None
    params: tuple[tuple[str, str | None], ...] = ()

    def __str__(self) -> str:
        return self.text

    def param(self, name: str) -> str | None:
        return _find(self.params, name.lower())


def parse_uri(text: str) -> Uri:
    text = text.strip()
    scheme, colon, rest = text.partition(":")
    if not colon:
        raise SipWireError(f"not a URI: {text[:60]!r}")
    if scheme.lower() not in ("sip", "sips"):
        return Uri(text, scheme.lower())
    rest = rest.split("?", 1)[0]
    hostport, _, params = rest.partition(";")
    user, at, host = hostport.rpartition("@")
    port: int | None = None
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise SipWireError(f"bad IPv6 host in {text[:60]!r}")
        if host[end + 1 :].startswith(":"):
            port = _port(host[end + 2 :], text)
        host = host[: end + 1]
    elif ":" in host:
        host, port_text = host.rsplit(":", 1)
        port = _port(port_text, text)
    if not host:
        raise SipWireError(f"no host in {text[:60]!r}")
    return Uri(
        text,
        scheme.lower(),
        user.split(":", 1)[0] if at else None,
        host,
        port,
        tuple(_params(params)),
    )


def _port(text: str, uri: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise SipWireError(f"bad port in {uri[:60]!r}")
    return int(text)


@dataclass(frozen=True, slots=True)
class Push:
    """RFC 8599 push parameters of a Contact URI."""

    provider: str
    prid: str
    param: str


@dataclass(frozen=True, slots=True)
class NameAddr:
    """A From, To, Contact, Route, Record-Route or Path value: an optional display name,
    a URI, and the header's own parameters (tag, expires, +sip.instance...)."""

    uri: Uri
    display: str = ""
    params: tuple[tuple[str, str | None], ...] = ()

    def __str__(self) -> str:
        display = f"{self.display} " if self.display else ""
        params = "".join(f";{k}={v}" if v is not None else f";{k}" for k, v in self.params)
        return f"{display}<{self.uri}>{params}"

    def param(self, name: str) -> str | None:
        return _find(self.params, name.lower())

    def with_param(self, name: str, value: str) -> NameAddr:
        kept = tuple((k, v) for k, v in self.params if k.lower() != name.lower())
        return replace(self, params=(*kept, (name, value)))

    @property
    def tag(self) -> str | None:
        return self.param("tag")

    @property
    def expires(self) -> int | None:
        value = self.param("expires")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def instance(self) -> str | None:
        value = self.param("+sip.instance")
        return _unquote(value) if value else None

    @property
    def push(self) -> Push | None:
        provider, prid = self.uri.param("pn-provider"), self.uri.param("pn-prid")
        if not provider:
            return None
        return Push(provider, prid or "", self.uri.param("pn-param") or "")


def parse_name_addr(text: str) -> NameAddr:
    text = text.strip()
    if "<" in text:
        display, _, rest = text.partition("<")
        uri, close, params = rest.partition(">")
        if not close:
            raise SipWireError(f"unclosed < in {text[:60]!r}")
        params = params.strip()
        if params and not params.startswith(";"):
            raise SipWireError(f"junk after > in {text[:60]!r}")
        return NameAddr(parse_uri(uri), display.strip(), tuple(_params(params[1:])))
    # addr-spec: the parameters after the URI belong to the header (RFC 3261 20.10).
    uri, _, params = text.partition(";")
    return NameAddr(parse_uri(uri), "", tuple(_params(params)))


@dataclass(frozen=True, slots=True)
class Via:
    transport: str
    sent_by: str
    params: tuple[tuple[str, str | None], ...]

    @property
    def branch(self) -> str | None:
        return _find(self.params, "branch")


def parse_via(text: str) -> Via:
    protocol, _, rest = text.strip().partition(" ")
    parts = protocol.split("/")
    if len(parts) != 3 or parts[0].strip().upper() != "SIP":
        raise SipWireError(f"bad Via {text[:60]!r}")
    sent_by, _, params = rest.strip().partition(";")
    return Via(parts[2].strip().upper(), sent_by.strip(), tuple(_params(params)))


@dataclass(frozen=True, slots=True)
class CSeq:
    number: int
    method: str

    def __str__(self) -> str:
        return f"{self.number} {self.method}"


# --- messages -----------------------------------------------------------------------------


@dataclass(slots=True)
class Message:
    headers: list[tuple[str, str]]
    body: bytes = b""

    def get(self, name: str) -> str | None:
        """The first field of that name, whole (None when absent)."""
        key = header_key(name)
        return next((v for n, v in self.headers if header_key(n) == key), None)

    def get_all(self, name: str) -> list[str]:
        """Every value of that name, in order; list headers split into their items."""
        key = header_key(name)
        values = [v for n, v in self.headers if header_key(n) == key]
        if key in _LISTS:
            return [item for value in values for item in split_list(value)]
        return values

    def _required(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise SipWireError(f"no {name} header")
        return value

    @property
    def call_id(self) -> str:
        return self._required("Call-ID").strip()

    @property
    def cseq(self) -> CSeq:
        number, _, method = self._required("CSeq").strip().partition(" ")
        if not number.isdigit() or not method.strip():
            raise SipWireError("bad CSeq")
        return CSeq(int(number), method.strip())

    @property
    def vias(self) -> list[Via]:
        return [parse_via(v) for v in self.get_all("Via")]

    @property
    def top_via(self) -> Via:
        vias = self.get_all("Via")
        if not vias:
            raise SipWireError("no Via header")
        return parse_via(vias[0])

    @property
    def from_(self) -> NameAddr:
        return parse_name_addr(self._required("From"))

    @property
    def to(self) -> NameAddr:
        return parse_name_addr(self._required("To"))

    @property
    def contacts(self) -> list[NameAddr]:
        return [parse_name_addr(v) for v in self.get_all("Contact") if v.strip() != "*"]

    @property
    def contact_star(self) -> bool:
        return any(v.strip() == "*" for v in self.get_all("Contact"))

    @property
    def expires(self) -> int | None:
        value = self.get("Expires")
        return int(value.strip()) if value is not None and value.strip().isdigit() else None

    @property
    def max_forwards(self) -> int | None:
        value = self.get("Max-Forwards")
        return int(value.strip()) if value is not None and value.strip().isdigit() else None

    @property
    def routes(self) -> list[NameAddr]:
        return [parse_name_addr(v) for v in self.get_all("Route")]

    @property
    def record_routes(self) -> list[NameAddr]:
        return [parse_name_addr(v) for v in self.get_all("Record-Route")]

    @property
    def paths(self) -> list[NameAddr]:
        return [parse_name_addr(v) for v in self.get_all("Path")]

    def _head(self) -> str:
        raise NotImplementedError

    def serialize(self) -> bytes:
        """The wire form; Content-Length is written from the body, whatever was given."""
        lines = [self._head()]
        lines += [f"{n}: {v}" for n, v in self.headers if header_key(n) != "content-length"]
        lines += [f"Content-Length: {len(self.body)}", "", ""]
        return "\r\n".join(lines).encode("utf-8") + self.body


@dataclass(slots=True)
class Request(Message):
    method: str = ""
    uri: Uri = field(default_factory=lambda: Uri(""))

    def _head(self) -> str:
        return f"{self.method} {self.uri} SIP/2.0"


@dataclass(slots=True)
class Response(Message):
    status: int = 0
    reason: str = ""

    def _head(self) -> str:
        return f"SIP/2.0 {self.status} {self.reason}"


def request(
    method: str, uri: str | Uri, headers: Iterable[tuple[str, str]], body: bytes = b""
) -> Request:
    target = uri if isinstance(uri, Uri) else parse_uri(uri)
    return Request(list(headers), body, method=method, uri=target)


def make_response(
    req: Request,
    status: int,
    reason: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    *,
    to_tag: str | None = None,
    body: bytes = b"",
) -> Response:
    """A response to `req` (RFC 3261 8.2.6): Via, From, To, Call-ID and CSeq copied in
    order, a To tag added when missing (except to 100), then `headers` (a dialog's
    Record-Route is the caller's to echo, RFC 3261 12.1.1)."""
    fields: list[tuple[str, str]] = []
    for name, value in req.headers:
        if header_key(name) not in _COPIED:
            continue
        key = header_key(name)
        if key == "to" and status != 100 and parse_name_addr(value).tag is None:
            value = f"{value};tag={to_tag or secrets.token_hex(5)}"
        fields.append((name, value))
    fields.extend(headers)
    reason = _REASONS.get(status, "") if reason is None else reason
    return Response(fields, body, status=status, reason=reason)


def sip_message(start: str, *headers: str, body: str = "") -> bytes:
    """A message from its start line and `Name: value` lines, Content-Length added."""
    lines = [start, *headers, f"Content-Length: {len(body.encode())}", "", body]
    return "\r\n".join(lines).encode()


def parse(data: bytes) -> Request | Response:
    """One whole message; SipWireError unless it reads as one."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise SipWireError("no blank line after the headers")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise SipWireError("headers not UTF-8") from None
    # Folded lines (RFC 3261 7.3.1) are joined before the headers are read.
    lines = re.sub(r"\r\n[ \t]+", " ", text).split("\r\n")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not re.fullmatch(r"[!-9;-~]+[ \t]*", name):
            raise SipWireError(f"bad header line {line[:60]!r}")
        headers.append((name.strip(), value.strip()))
    message: Request | Response
    if match := _STATUS_LINE.fullmatch(lines[0]):
        message = Response(headers, body, status=int(match.group(1)), reason=match.group(2))
    elif match := _REQUEST_LINE.fullmatch(lines[0]):
        message = Request(headers, body, method=match.group(1), uri=parse_uri(match.group(2)))
    else:
        raise SipWireError(f"bad start line {lines[0][:60]!r}")
    length = message.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) < len(body):
        message.body = body[: int(length)]  # a datagram's trailing octets are not the body
    return message


# --- stream framing -------------------------------------------------------------------------


class Keepalive(Enum):
    PING = "ping"  # double CRLF: answer with PONG
    PONG = "pong"  # single CRLF: the answer to our own ping


class FramingError(SipWireError):
    """The stream cannot be framed any further; `items` were framed before it."""

    def __init__(self, reason: str, items: list[bytes | Keepalive]) -> None:
        super().__init__(reason)
        self.items = items


_LENGTH = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*(\d+)[ \t]*\r?$", re.I | re.M)


@dataclass
class StreamFramer:
    """Messages and keep-alives off a byte stream (RFC 3261 18.3, RFC 5626 3.5.1).

    A lone CRLF is a pong only when we have a ping outstanding (`pinged`); otherwise it
    waits for the next octets, which tell whether it is half of a ping.
    """

    pinged: int = 0
    _buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[bytes | Keepalive]:
        self._buffer += data
        items: list[bytes | Keepalive] = []
        buffer = self._buffer
        while buffer:
            if buffer.startswith(b"\r\n"):
                if buffer.startswith(PING):
                    del buffer[:4]
                    items.append(Keepalive.PING)
                elif len(buffer) < 4 and PING.startswith(buffer) and not self.pinged:
                    break
                else:
                    del buffer[:2]
                    self.pinged = max(self.pinged - 1, 0)
                    items.append(Keepalive.PONG)
                continue
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_MESSAGE:
                    raise FramingError("message too large", items)
                break
            match = _LENGTH.search(bytes(buffer[:end]))
            if match is None:
                raise FramingError("no Content-Length on a stream", items)
            total = end + 4 + int(match.group(1))
            if total > MAX_MESSAGE:
                raise FramingError("message too large", items)
            if len(buffer) < total:
                break
            items.append(bytes(buffer[:total]))
            del buffer[:total]
        return items


def datagram_keepalive(datagram: bytes) -> Keepalive | None:
    if datagram == PING:
        return Keepalive.PING
    if datagram == PONG:
        return Keepalive.PONG
    return None
