"""SIP messages (RFC 3261): requests and responses, what routing reads from them, the
changes a proxy makes, and their wire form. `proxy.sip.parser.parse` makes them from
octets; `proxy.sip.responses.make_response` answers a request.

- Headers are held as written. Structured views (`vias`, `top_via`, `from_`, `to`,
  `contacts`, `routes`, `record_routes`, `paths`, `cseq`, `max_forwards`, `expires`)
  parse on first access and are cached; a malformed header raises `SipParseError`
  then. `validate()` forces them all: the relay calls it before routing a message.
- Text is held as latin-1 (one char per octet) so any octet round-trips; a UTF-8
  display name is `text.encode("latin-1").decode("utf-8")` away.
- Mutations (`prepend`, `add`, `set`, `remove`, `pop_value`, `pop_via`, `uri`,
  `decrement_max_forwards`, `body`) make `serialize()` rebuild the message, keeping
  unchanged header lines byte-exact and setting Content-Length from the body; an
  untouched message serializes to its original octets.
- A message is made one way, `Request(method, uri, headers, body)` or
  `Response(status, reason, headers, body)`: the start line's parts, then (name,
  value) header pairs, each checked so that our own code cannot write a broken or
  injected line. `parse` makes a received message so too, and hands it its fields,
  octets and start line as they came (`Message._adopt`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final, Self, TypeVar, cast

from proxy.sip.headers import (
    LIST_HEADERS,
    CSeq,
    NameAddr,
    ViaHeader,
    canonical_name,
    check_field,
    parse_cseq,
    parse_hop,
    parse_name_addr,
    parse_via,
)
from proxy.sip.syntax import SipParseError, parse_decimal, parse_seconds, split_commas
from proxy.sip.uri import SipUri, Uri, parse_uri

MAX_MESSAGE_SIZE: Final = 65536
MAX_VALUES: Final = 128  # values of one list header, e.g. all Vias

# What a response copies from its request (RFC 3261 8.2.6.2); without these no
# response can be built.
COPIED_TO_RESPONSE: Final = ("via", "from", "to", "call-id", "cseq")


# One header field: (name as written, canonical lower-case long name, unfolded value,
# the original text of its line(s), or None once changed).
Field = tuple[str, str, str, str | None]
_T = TypeVar("_T")

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


def new_fields(headers: Iterable[tuple[str, str]]) -> list[Field]:
    """Fields for (name, value) pairs our code adds; ValueError for one the wire cannot
    carry (see `check_field`)."""
    fields: list[Field] = []
    for name, value in headers:
        check_field(name, value)
        fields.append((name, canonical_name(name), value, None))
    return fields


class Message:
    """Common part of requests and responses: headers, body, views, serialization."""

    __slots__ = ("_body", "_cache", "_fields", "_index_", "_raw", "start_line")

    def __init__(self, headers: Iterable[tuple[str, str]], body: bytes) -> None:
        """A new message from (name, value) pairs, each checked (`new_fields`);
        Content-Length is added when serialized."""
        self._fields = new_fields(headers)
        self._body = body
        self._raw: bytes | None = None  # the exact octets while nothing changed
        self.start_line: str | None = None  # as received; None once rebuilt
        self._cache: dict[str, object] = {}
        # Positions of the fields by canonical name; None after a change that moved
        # fields, rebuilt when next needed (a relay's changes come in a row).
        self._index_: dict[str, list[int]] | None = None

    def _adopt(
        self,
        fields: list[Field],
        *,
        index: dict[str, list[int]] | None = None,
        raw: bytes | None = None,
        start_line: str | None = None,
    ) -> Self:
        """Take over fields as they came, unchecked and keeping their lines as written:
        split off the wire by `proxy.sip.parser` (with their positions, the octets and
        the start line), or copied from a request by `proxy.sip.responses`."""
        self._fields = fields
        self._index_ = index
        self._raw = raw
        self.start_line = start_line
        return self

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
        check_field(name, value)
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
        check_field(name, value)
        key = canonical_name(name)
        positions = self._index.get(key)
        self._fields.insert(positions[0] if positions else 0, (name, key, value, None))
        self._changed(key, moved=True)

    def set(self, name: str, value: str) -> None:
        """Replace all fields of that name by one, where the first one was."""
        check_field(name, value)
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
            return [parse_hop(v) for v in values]
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
            return None if value is None else parse_decimal(value, "Max-Forwards", 255)

        return self._view("max_forwards", "Max-Forwards", build)

    @property
    def expires(self) -> int | None:
        def build() -> int | None:
            value = self.get("expires")
            return None if value is None else parse_seconds(value, "Expires")

        return self._view("expires", "Expires", build)

    @property
    def content_length(self) -> int | None:
        """The declared Content-Length (checked against the body by `parse`)."""
        value = self.get("content-length")
        return None if value is None else parse_decimal(value, "Content-Length", MAX_MESSAGE_SIZE)

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
    __slots__ = ("_uri", "_uri_text", "method")

    def __init__(
        self,
        method: str,
        uri: Uri | str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        """A request to `uri`, or to its text as received (parsed when first read)."""
        super().__init__(headers, body)
        self.method = method
        if isinstance(uri, str):
            self._uri_text = uri
            self._uri: Uri | None = None
        else:
            self._uri_text = str(uri)
            self._uri = uri

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

    @property
    def answerable(self) -> bool:
        """A response can be built for it: it is no ACK (which is never answered) and
        has every header a response copies (RFC 3261 8.2.6.2)."""
        return self.method != "ACK" and all(self.has(key) for key in COPIED_TO_RESPONSE)

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
    __slots__ = ("reason", "status")

    def __init__(
        self,
        status: int,
        reason: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        """A response (`proxy.sip.responses.make_response` answers a request)."""
        if not 100 <= status <= 699:
            raise ValueError(f"bad status {status}")
        if "\r" in reason or "\n" in reason:
            raise ValueError("reason phrase with CR/LF")
        reason.encode("latin-1")  # the wire form; raises for text it cannot carry
        super().__init__(headers, body)
        self.status = status
        self.reason = reason

    def _start_line(self) -> str:
        return self.start_line or f"SIP/2.0 {self.status} {self.reason}"

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"
