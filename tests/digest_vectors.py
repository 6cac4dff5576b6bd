"""Known-answer vectors of HTTP/SIP digest authentication, copied from the RFCs.

Both digest calculators are checked against these, each on its own: the relay's
(proxy/sip/digest.py) and the mock parties' (mockphone/digest.py). A test that computed
its expected answer with the code under test could not fail on a bug in that code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Vector:
    source: str
    algorithm: str
    username: str
    realm: str
    password: str
    method: str
    uri: str
    nonce: str
    qop: str
    nc: str
    cnonce: str
    response: str
    challenge: str  # the WWW-Authenticate value of the example
    authorization: str  # the Authorization value of the example


_7616_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
_7616_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
_7616_OPAQUE = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"


def _rfc7616(algorithm: str, response: str) -> Vector:
    """RFC 7616 section 3.9.1: Mufasa, "Circle of Life", GET /dir/index.html."""
    return Vector(
        source=f"RFC 7616 3.9.1 ({algorithm})",
        algorithm=algorithm,
        username="Mufasa",
        realm="http-auth@example.org",
        password="Circle of Life",
        method="GET",
        uri="/dir/index.html",
        nonce=_7616_NONCE,
        qop="auth",
        nc="00000001",
        cnonce=_7616_CNONCE,
        response=response,
        challenge=(
            f'Digest realm="http-auth@example.org", qop="auth, auth-int", '
            f'algorithm={algorithm}, nonce="{_7616_NONCE}", opaque="{_7616_OPAQUE}"'
        ),
        authorization=(
            f'Digest username="Mufasa", realm="http-auth@example.org", '
            f'uri="/dir/index.html", algorithm={algorithm}, nonce="{_7616_NONCE}", '
            f'nc=00000001, cnonce="{_7616_CNONCE}", qop=auth, response="{response}", '
            f'opaque="{_7616_OPAQUE}"'
        ),
    )


RFC7616_MD5 = _rfc7616("MD5", "8ca523f5e9506fed4657c9700eebdbec")
RFC7616_SHA256 = _rfc7616(
    "SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
)

# RFC 2617 section 3.5: no algorithm parameter (MD5 by default), qop=auth.
RFC2617 = Vector(
    source="RFC 2617 3.5",
    algorithm="MD5",
    username="Mufasa",
    realm="testrealm@host.com",
    password="Circle Of Life",
    method="GET",
    uri="/dir/index.html",
    nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
    qop="auth",
    nc="00000001",
    cnonce="0a4f113b",
    response="6629fae49393a05397450978507c4ef1",
    challenge=(
        'Digest realm="testrealm@host.com", qop="auth,auth-int", '
        'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41"'
    ),
    authorization=(
        'Digest username="Mufasa", realm="testrealm@host.com", '
        'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", uri="/dir/index.html", qop=auth, '
        'nc=00000001, cnonce="0a4f113b", response="6629fae49393a05397450978507c4ef1", '
        'opaque="5ccc069c403ebaf9f0171e9517f40e41"'
    ),
)

# RFC 2069 section 2.4 (the digest without qop, which RFC 2617 keeps): "CircleOfLife".
RFC2069 = Vector(
    source="RFC 2069 2.4",
    algorithm="MD5",
    username="Mufasa",
    realm="testrealm@host.com",
    password="CircleOfLife",
    method="GET",
    uri="/dir/index.html",
    nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
    qop="",
    nc="",
    cnonce="",
    response="1949323746fe6a43ef61f9606e7febea",
    challenge=(
        'Digest realm="testrealm@host.com", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", '
        'opaque="5ccc069c403ebaf9f0171e9517f40e41"'
    ),
    authorization=(
        'Digest username="Mufasa", realm="testrealm@host.com", '
        'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", uri="/dir/index.html", '
        'response="1949323746fe6a43ef61f9606e7febea", opaque="5ccc069c403ebaf9f0171e9517f40e41"'
    ),
)

WITH_QOP = (RFC7616_MD5, RFC7616_SHA256, RFC2617)
ALL = (*WITH_QOP, RFC2069)
