"""Digest authentication as the mock parties do it (RFC 7616, RFC 2617; MD5, SHA-256).

Written apart from the relay's proxy/sip/digest.py on purpose: the mock phones and PBX
test that relay, and a bug shared by both sides would pass every test. Both are checked
against the RFCs' own examples (tests/digest_vectors.py), not against each other.

The client side answers a challenge (`answer`); the registrar side of the mock PBX
issues one (`challenge`) and checks an answer to it (`proves`). The password is used
here and nowhere else; nothing is logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

_HASHES = {"MD5": "md5", "SHA-256": "sha256"}
# name=value or name="quoted value", separated by commas (RFC 7616 3.3, 3.4).
_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]+)\s*(?:,|$)')


class DigestSyntaxError(ValueError):
    """A header that is not a Digest challenge or answer with the needed parameters."""


def params(header: str) -> dict[str, str]:
    """The parameters of a `Digest ...` header (challenge or answer), names lower-cased,
    quotes and escapes removed; DigestSyntaxError unless it is one."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "digest":
        raise DigestSyntaxError("not a Digest header")
    found: dict[str, str] = {}
    position = 0
    rest = rest.strip()
    while position < len(rest):
        match = _PARAM.match(rest, position)
        if match is None or match.end() == position:
            raise DigestSyntaxError("malformed Digest header")
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        found[match.group(1).lower()] = value
        position = match.end()
    return found


def response(
    *,
    algorithm: str,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    qop: str = "",
    nc: str = "",
    cnonce: str = "",
) -> str:
    """The `response` value: RFC 7616 3.4.1 with qop=auth, RFC 2069 without qop."""
    name = _HASHES.get(algorithm.upper())
    if name is None:
        raise DigestSyntaxError(f"unsupported algorithm {algorithm[:16]!r}")

    def h(text: str) -> str:
        return hashlib.new(name, text.encode()).hexdigest()

    ha1 = h(f"{username}:{realm}:{password}")
    ha2 = h(f"{method}:{uri}")
    if not qop:
        return h(f"{ha1}:{nonce}:{ha2}")
    if qop != "auth":
        raise DigestSyntaxError("only qop=auth")
    return h(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")


@dataclass(frozen=True, slots=True)
class Answer:
    header: str  # the Authorization value
    response: str  # the digest response in it


def answer(
    challenge: str,
    *,
    username: str,
    password: str,
    method: str,
    uri: str,
    cnonce: str | None = None,
    nc: int = 1,
) -> Answer:
    """The Authorization value answering `challenge` (a WWW- or Proxy-Authenticate
    value): qop=auth when offered, else the RFC 2069 answer; MD5 when it names none."""
    offered = params(challenge)
    realm, nonce = offered.get("realm", ""), offered.get("nonce", "")
    algorithm = offered.get("algorithm", "MD5")
    qop = "auth" if "auth" in (q.strip() for q in offered.get("qop", "").split(",")) else ""
    nc_text = f"{nc:08x}" if qop else ""
    cnonce = (cnonce or secrets.token_hex(8)) if qop else ""
    digest = response(
        algorithm=algorithm,
        username=username,
        realm=realm,
        password=password,
        method=method,
        uri=uri,
        nonce=nonce,
        qop=qop,
        nc=nc_text,
        cnonce=cnonce,
    )
    header = (
        f'Digest username="{username}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
        f'response="{digest}", algorithm={algorithm}'
    )
    if qop:
        header += f', qop=auth, nc={nc_text}, cnonce="{cnonce}"'
    if "opaque" in offered:
        header += f', opaque="{offered["opaque"]}"'
    return Answer(header, digest)


def challenge(realm: str, nonce: str, algorithm: str = "MD5") -> str:
    """A WWW-Authenticate value offering qop=auth."""
    return f'Digest realm="{realm}", nonce="{nonce}", algorithm={algorithm}, qop="auth"'


def proves(header: str, *, username: str, password: str, method: str) -> bool:
    """Whether the Authorization value `header` is `username`'s answer with `password`
    (whoever checks the nonce checks it apart: `params(header)["nonce"]`)."""
    try:
        given = params(header)
        if given.get("username") != username:
            return False
        expected = response(
            algorithm=given.get("algorithm", "MD5"),
            username=username,
            realm=given["realm"],
            password=password,
            method=method,
            uri=given["uri"],
            nonce=given["nonce"],
            qop=given.get("qop", ""),
            nc=given.get("nc", ""),
            cnonce=given.get("cnonce", ""),
        )
        given_response = given.get("response", "").lower().encode()
        return hmac.compare_digest(expected.encode(), given_response)
    except (DigestSyntaxError, KeyError):
        return False
