"""SIP digest authentication of PBXs (RFC 3261 22, RFC 7616 with MD5 and SHA-256).

softrelay challenges only PBXs, with the secret the operator configured for their
serial; phones are challenged by their own PBX and softrelay passes that through.
Nonces are stateless: a timestamp sealed with an HMAC under a per-process key, bound
to the serial, so no nonce table grows with attackers and a nonce from one serial
does not work for another. Nothing of an Authorization header is ever stored or logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import struct
from dataclasses import dataclass

NONCE_LIFETIME = 300.0  # seconds a challenge may be answered
_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]+)\s*(?:,|$)')
_ALGORITHMS = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


class DigestError(Exception):
    """An Authorization header that does not prove the secret (a 403 or a new 401)."""


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
    def __init__(self, realm: str, key: bytes | None = None) -> None:
        self.realm = realm
        self._key = key or secrets.token_bytes(32)

    def challenge(
        self, serial: str, now: float, *, stale: bool = False, algorithm: str = "SHA-256"
    ) -> str:
        """The WWW-Authenticate value for a REGISTER of `serial`."""
        stamp = struct.pack(">d", now)
        mac = hmac.digest(self._key, stamp + serial.encode(), "sha256")[:16]
        nonce = base64.urlsafe_b64encode(stamp + mac).decode().rstrip("=")
        value = f'Digest realm="{self.realm}", nonce="{nonce}", algorithm={algorithm}, qop="auth"'
        return value + (", stale=true" if stale else "")

    def challenges(self, serial: str, now: float, *, stale: bool = False) -> list[str]:
        """SHA-256 first, then MD5 (RFC 7616 3.7: in order of preference), since many
        deployed PBXs and SIPp 3.6 answer MD5 only."""
        return [
            self.challenge(serial, now, stale=stale, algorithm=algorithm)
            for algorithm in ("SHA-256", "MD5")
        ]

    def verify(self, header: str, serial: str, secret: str, method: str, now: float) -> None:
        """Raise DigestError unless `header` answers a fresh challenge with `secret`."""
        creds = parse_authorization(header)
        if creds.username != serial or creds.realm != self.realm:
            raise DigestError("credentials for another serial or realm")
        issued = self._nonce_time(creds.nonce, serial)
        if not 0 <= now - issued <= NONCE_LIFETIME:
            raise StaleNonce("nonce expired")
        expected = response(creds, secret, method)
        if not hmac.compare_digest(expected, creds.response.lower()):
            raise DigestError("wrong response")

    def _nonce_time(self, nonce: str, serial: str) -> float:
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except ValueError:
            raise DigestError("malformed nonce") from None
        if len(raw) != 24:
            raise DigestError("malformed nonce")
        stamp, mac = raw[:8], raw[8:]
        expected = hmac.digest(self._key, stamp + serial.encode(), "sha256")[:16]
        if not hmac.compare_digest(mac, expected):
            raise DigestError("nonce not ours")
        issued: float = struct.unpack(">d", stamp)[0]
        return issued


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
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "digest":
        raise DigestError("not a Digest authorization")
    params: dict[str, str] = {}
    position = 0
    while position < len(rest):
        match = _PARAM.match(rest, position)
        if match is None:
            raise DigestError("malformed Authorization header")
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[match.group(1).lower()] = value
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
        raise DigestError(f"Authorization lacks {missing.args[0]}") from None
