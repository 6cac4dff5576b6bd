"""URIs in SIP messages: sip: and sips: URIs parsed strictly (RFC 3261 19.1, 25.1),
any other scheme (tel:, urn:, ...) kept as opaque text, since routing follows SIP
URIs only."""

from __future__ import annotations

import functools
import re
from typing import Final, NamedTuple

from proxy.sip.params import NO_PARAMS, Params, parse_uri_params
from proxy.sip.syntax import SipParseError, check_host, format_host, parse_port

MAX_URI: Final = 2048

# Linear on any input: see proxy.sip.syntax.
_USER_RE: Final = re.compile(r"[A-Za-z0-9\-_.!~*'()&=+$,;?/%]+")
_PASSWORD_RE: Final = re.compile(r"[A-Za-z0-9\-_.!~*'()&=+$,%]*")
_PCHARS: Final = r"A-Za-z0-9\-_.!~*'()\[\]/:&+$%"
_HOSTPORT_RE: Final = re.compile(
    r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(?::([0-9]{1,5}))?"
    rf"((?:;[{_PCHARS}]+(?:=[{_PCHARS}]+)?)*)"
    r"(?:\?([A-Za-z0-9\-_.!~*'()\[\]/?:+$%&=]*))?"
)
_ABS_URI_RE: Final = re.compile(r"([A-Za-z][A-Za-z0-9+\-.]*):([^\s<>\"]+)")
_BAD_ESCAPE_RE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")


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
        check_host(match[1]),
        user,
        password,
        parse_port(match[2]),
        parse_uri_params(match[3]),
        match[4],
        lowered,
    )
