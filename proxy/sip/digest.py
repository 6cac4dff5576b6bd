"""SIP digest authentication of PBXs (RFC 3261 22, RFC 7616 with MD5 and SHA-256).

softrelay challenges only PBXs, with the secret the operator configured for their
serial; phones are challenged by their own PBX and softrelay passes that through.
A nonce is a timestamp sealed with an HMAC under a per-process key, bound to the serial
and to the flow it was sent on, and it is answered once: a REGISTER captured on one
connection proves nothing on another, nor a second time on its own. Issuing needs no
table; only nonces answered with the right secret are remembered, each for its
lifetime, and at most USED_LIMIT of them, so only holders of a secret can fill it.
Nothing of an Authorization header is ever stored or logged.

What is accepted is what was offered, nothing weaker: the algorithms of the two
challenges (SHA-256, then MD5 for PBXs that know no other; one nonce serves both, so a
PBX that takes the first nonce and answers MD5 still links), and `qop=auth` with its
`nc` and `cnonce` (no RFC 2069 answer without qop, no `auth-int`, no `-sess`
algorithm). A parameter given twice makes the header malformed: which one counts
would otherwise be a matter of parsing order.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import struct
from collections import OrderedDict
from dataclasses import dataclass

NONCE_LIFETIME = 300.0  # seconds a challenge may be answered
# Nonces answered within their lifetime, remembered to refuse a second use. Past this
# the oldest is forgotten: it was bound to a flow, so only that flow could replay it.
USED_LIMIT = 100_000
_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]+)\s*(?:,|$)')
_ALGORITHMS = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


class DigestError(Exception):
    """An Authorization header that does not prove the secret (a 403 or a new 401).

    DigestError                 wrong credentials: refuse (403)
    ├── MalformedAuthorization  not a well-formed Digest header: a 400
    └── StaleNonce              right secret, but not for a nonce of this flow now:
                                challenge again (401 with stale=true)
    """


class MalformedAuthorization(DigestError):
    """An Authorization header that is not well formed (syntax, non-ASCII, missing
    parameters): the client's error, a 400."""


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str
    qop: str
    nc: str
    cnonce: str


class DigestAuthority:
    def __init__(self, realm: str, key: bytes | None = None, *, used_limit: int = USED_LIMIT):
        self.realm = realm
        self._key = key or secrets.token_bytes(32)
        self._used: OrderedDict[bytes, float] = OrderedDict()  # nonce seal -> issued
        self._used_limit = used_limit

    def challenge(
        self,
        serial: str,
        now: float,
        *,
        stale: bool = False,
        algorithm: str = "SHA-256",
        flow: bytes = b"",
    ) -> str:
        """The WWW-Authenticate value for a REGISTER of `serial` on `flow` (the
        `Flow.key` the answer must come on)."""
        stamp = struct.pack(">d", now)
        nonce = base64.urlsafe_b64encode(stamp + self._seal(stamp, serial, flow)).decode()
        nonce = nonce.rstrip("=")
        value = f'Digest realm="{self.realm}", nonce="{nonce}", algorithm={algorithm}, qop="auth"'
        return value + (", stale=true" if stale else "")

    def challenges(
        self, serial: str, now: float, *, stale: bool = False, flow: bytes = b""
    ) -> list[str]:
        """SHA-256 first, then MD5 (RFC 7616 3.7: in order of preference), since many
        deployed PBXs and SIPp 3.6 answer MD5 only."""
        return [
            self.challenge(serial, now, stale=stale, algorithm=algorithm, flow=flow)
            for algorithm in ("SHA-256", "MD5")
        ]

    def verify(
        self, header: str, serial: str, secret: str, method: str, now: float, *, flow: bytes = b""
    ) -> None:
        """Return if `header` answers, with `secret`, a challenge made for `serial` on
        `flow` less than NONCE_LIFETIME ago and not answered before; the nonce is then
        used up. Else MalformedAuthorization, DigestError (wrong secret) or StaleNonce
        (the right secret for a nonce that is not, or no longer, good here)."""
        creds = parse_authorization(header)
        if creds.username != serial or creds.realm != self.realm:
            raise DigestError("credentials for another serial or realm")
        if creds.qop.lower() != "auth":
            raise DigestError("only qop=auth, as offered")
        if not creds.nc or not creds.cnonce:
            raise MalformedAuthorization("qop=auth without nc or cnonce")
        # The secret first: whoever lacks it learns only "wrong", whatever the nonce.
        expected = response(creds, secret, method)
        if not hmac.compare_digest(expected.encode(), creds.response.lower().encode()):
            raise DigestError("wrong response")
        issued, seal = self._open(creds.nonce, serial, flow)
        if not 0 <= now - issued <= NONCE_LIFETIME:
            raise StaleNonce("nonce expired")
        while self._used and (
            len(self._used) >= self._used_limit
            or now - next(iter(self._used.values())) > NONCE_LIFETIME
        ):
            self._used.popitem(last=False)
        if seal in self._used:
            raise StaleNonce("nonce used before")
        self._used[seal] = issued

    def _seal(self, stamp: bytes, serial: str, flow: bytes) -> bytes:
        message = stamp + serial.encode() + b"\0" + flow
        return hmac.digest(self._key, message, "sha256")[:16]

    def _open(self, nonce: str, serial: str, flow: bytes) -> tuple[float, bytes]:
        """When the nonce was issued, and its seal; StaleNonce unless it is ours, for
        this serial and flow (an old one of ours after a restart is not, either)."""
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except ValueError:
            raise StaleNonce("nonce not ours") from None
        if len(raw) != 24:
            raise StaleNonce("nonce not ours")
        stamp, seal = raw[:8], raw[8:]
        if not hmac.compare_digest(seal, self._seal(stamp, serial, flow)):
            raise StaleNonce("nonce not ours")
        issued: float = struct.unpack(">d", stamp)[0]
        return issued, seal


class StaleNonce(DigestError):
    """A once-valid nonce that expired: challenge again with stale=true."""


def response(creds: Credentials, secret: str, method: str) -> str:
    """The expected `response` value of RFC 7616 for these credentials."""
    digest = _ALGORITHMS.get(creds.algorithm.upper())
    if digest is None:
        raise DigestError(f"unsupported algorithm {creds.algorithm[:16]!r}")

    def h(text: str) -> str:
        return digest(text.encode()).hexdigest()

    ha1 = h(f"{creds.username}:{creds.realm}:{secret}")
    ha2 = h(f"{method}:{creds.uri}")
    if creds.qop:
        if creds.qop != "auth":
            raise DigestError("only qop=auth is supported")
        return h(f"{ha1}:{creds.nonce}:{creds.nc}:{creds.cnonce}:{creds.qop}:{ha2}")
    return h(f"{ha1}:{creds.nonce}:{ha2}")


def parse_authorization(header: str) -> Credentials:
    """The parameters of a Digest Authorization value; MalformedAuthorization unless it
    is one, all ASCII (RFC 7616 has no other charset for them outside `username*`, which
    a PBX's serial never needs)."""
    if not header.isascii():
        raise MalformedAuthorization("non-ASCII in Authorization")
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "digest":
        raise DigestError("not a Digest authorization")
    params: dict[str, str] = {}
    position = 0
    while position < len(rest):
        match = _PARAM.match(rest, position)
        if match is None:
            raise MalformedAuthorization("malformed Authorization header")
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        name = match.group(1).lower()
        if name in params:
            raise MalformedAuthorization("a parameter given twice")
        params[name] = value
        position = match.end()
    try:
        return Credentials(
            username=params["username"],
            realm=params["realm"],
            nonce=params["nonce"],
            uri=params["uri"],
            response=params["response"],
            algorithm=params.get("algorithm", "MD5"),
            qop=params.get("qop", ""),
            nc=params.get("nc", ""),
            cnonce=params.get("cnonce", ""),
        )
    except KeyError as missing:
        raise MalformedAuthorization(f"Authorization lacks {missing.args[0]}") from None
