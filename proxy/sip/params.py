"""Parameters, `;name[=value]`: the one shape SIP URIs and header values share.

A URI's parameters (`sip:pbx.example;transport=tls;lr`) and a header's
(`<sip:a@b.example>;tag=1;expires=60`) are both held as `Params`; each has its own
grammar (RFC 3261 25.1: uri-parameters, generic-param), so each has its own parser.
"""

from __future__ import annotations

import re
from typing import Final

from proxy.sip.syntax import QUOTED, TCHARS, SipParseError, split_semis, unquote

# A header parameter: token [ EQUAL ( token / host / quoted-string ) ]; ':' and '[]'
# admit IPv6 addresses (Via received, RFC 5118 4.5). Linear: see proxy.sip.syntax.
_PARAM_RE: Final = re.compile(
    rf"[ \t]*([{TCHARS}]+)(?:[ \t]*=[ \t]*([{TCHARS}:\[\]]+|{QUOTED}))?[ \t]*"
)


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
    """Parse a header's `*( SEMI generic-param )`; `text` is blank or starts at the
    first ';'."""
    if not text.strip(" \t"):
        return NO_PARAMS
    pieces = split_semis(text)
    if pieces[0].strip(" \t"):
        raise SipParseError("Bad parameters")
    items: list[tuple[str, str | None]] = []
    for piece in pieces[1:]:
        match = _PARAM_RE.fullmatch(piece)
        if match is None:
            raise SipParseError("Bad parameter")
        items.append((match[1], match[2]))
    return Params(tuple(items))


def parse_uri_params(text: str) -> Params:
    """Split a URI's `*( ";" uri-parameter )`, already checked by the URI's pattern."""
    if not text:
        return NO_PARAMS
    items: list[tuple[str, str | None]] = []
    for piece in text[1:].split(";"):
        name, eq, value = piece.partition("=")
        items.append((name, value if eq else None))
    return Params(tuple(items))
