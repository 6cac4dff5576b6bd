"""RFC 9497 OPRF, mode 0x00 (OPRF), suite ristretto255-SHA512, on libsodium (rbcl).

Smart Contacts runs one OPRF per phone number: the app blinds HashToGroup(number) with
a random scalar r and sends r*H(x); the server multiplies by its key k and answers
k*r*H(x); the app removes r and holds N = k*H(x), which it can compare with the
server's set without the server seeing x or learning whether it matched. Without k
nobody can compute N, so the set cannot be enumerated offline (a hash of the number
could be: the whole number space of a country hashes in hours).

The server keeps N for each discoverable number (`element`), never the number, and
publishes `tag(N)`; when the key changes it moves every N to the new key with `rekey`,
again without the numbers. Outputs match RFC 9497 Appendix A.1.1 byte for byte
(tests/contacts/test_oprf.py).

Elements are 32-byte ristretto255 encodings, scalars 32-byte little-endian integers
below the group order. A peer's element that does not decode to a valid non-identity
point raises `InvalidElement` (a `ValueError`); libsodium's scalar multiplication
checks that in the same call, so evaluation costs one library call per element.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

# rbcl ships no type information: every call goes through the typed wrappers below.
import rbcl  # type: ignore[import-untyped]

ELEMENT_BYTES = 32
SCALAR_BYTES = 32
OUTPUT_BYTES = 64
TAG_BYTES = 8

# RFC 9497 3.1 and 4.1: contextString = "OPRFV1-" || I2OSP(mode, 1) || "-" || identifier.
CONTEXT = b"OPRFV1-\x00-ristretto255-SHA512"
HASH_TO_GROUP_DST = b"HashToGroup-" + CONTEXT
_TAG_PREFIX = b"softrelay/contacts/tag/v1"
_EPOCH_PREFIX = b"softrelay/contacts/oprf/v1"


class InvalidElement(ValueError):
    """A group element from a peer is not a valid, non-identity ristretto255 point.

    `index` is the element's position when it came in a batch (blind_evaluate_many), so
    the caller can name it; None for a single element.
    """

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message if index is None else f"{message} (element {index})")
        self.index = index


# -- typed wrappers around the few rbcl calls used ------------------------------------

_scalarmult = rbcl.crypto_scalarmult_ristretto255
# The libsodium rbcl bundles decodes an encoding with the top bit set as if it were
# clear (RFC 9496 4.3.1 requires refusing it: s >= 2**255 is not canonical), so that
# bit is checked here, before every multiplication by a peer's element.
_HIGH_BIT = "not a canonical ristretto255 encoding (top bit set)"
_from_hash = rbcl.crypto_core_ristretto255_from_hash


def _mult(scalar: bytes, point: bytes) -> bytes:
    """scalar * point. libsodium refuses (rbcl: RuntimeError) a point that is not a
    canonical encoding of a group element, and a result that is the identity (the
    identity itself, or a zero scalar); rbcl raises ValueError on a wrong length."""
    if len(point) != ELEMENT_BYTES:
        raise InvalidElement(f"expected {ELEMENT_BYTES} bytes, got {len(point)}")
    if point[31] & 0x80:
        raise InvalidElement(_HIGH_BIT)
    try:
        out: bytes = _scalarmult(scalar, point)
    except RuntimeError as exc:
        raise InvalidElement("not a valid ristretto255 element") from exc
    return out


def _invert(scalar: bytes) -> bytes:
    out: bytes = rbcl.crypto_core_ristretto255_scalar_invert(scalar)
    return out


def _scalar_mul(a: bytes, b: bytes) -> bytes:
    out: bytes = rbcl.crypto_core_ristretto255_scalar_mul(a, b)
    return out


def _reduce(wide: bytes) -> bytes:
    """A 64-byte little-endian integer modulo the group order (RFC 9497 HashToScalar)."""
    out: bytes = rbcl.crypto_core_ristretto255_scalar_reduce(wide)
    return out


def _check_scalar(scalar: bytes, what: str) -> None:
    """A canonical (reduced), non-zero scalar: libsodium would silently use another
    value for a non-reduced one (it clears the top bit), and zero maps everything to
    the identity."""
    if len(scalar) != SCALAR_BYTES:
        raise ValueError(f"{what}: expected {SCALAR_BYTES} bytes, got {len(scalar)}")
    if _reduce(scalar + bytes(32)) != scalar:
        raise ValueError(f"{what}: not reduced modulo the group order")
    if not any(scalar):
        raise ValueError(f"{what}: must not be zero")


# -- RFC 9380 5.3.1 and the hash to the group -----------------------------------------


def expand_message_xmd(msg: bytes, dst: bytes, length: int) -> bytes:
    """RFC 9380 5.3.1 expand_message_xmd with SHA-512 (b_in_bytes 64, s_in_bytes 128)."""
    b_in_bytes = 64
    ell = -(-length // b_in_bytes)
    if ell > 255 or length > 65535 or len(dst) > 255:
        raise ValueError("expand_message_xmd: length or DST too long")
    dst_prime = dst + bytes([len(dst)])
    b0 = hashlib.sha512(bytes(128) + msg + length.to_bytes(2, "big") + b"\x00" + dst_prime).digest()
    block = hashlib.sha512(b0 + b"\x01" + dst_prime).digest()
    blocks = [block]
    for i in range(2, ell + 1):
        mixed = bytes(x ^ y for x, y in zip(b0, block, strict=True))
        block = hashlib.sha512(mixed + bytes([i]) + dst_prime).digest()
        blocks.append(block)
    return b"".join(blocks)[:length]


def hash_to_group(data: bytes) -> bytes:
    """RFC 9497 HashToGroup: hash_to_ristretto255 (RFC 9380 with expand_message_xmd,
    SHA-512) under DST "HashToGroup-OPRFV1-\\x00-ristretto255-SHA512"; libsodium's
    from_hash is the one-way map of RFC 9496 4.3.4 applied to the 64 uniform bytes."""
    point: bytes = _from_hash(expand_message_xmd(data, HASH_TO_GROUP_DST, 64))
    return point


# -- keys ------------------------------------------------------------------------------


def new_key() -> bytes:
    """A random non-zero scalar (the OPRF key, or a blind)."""
    while True:
        scalar: bytes = rbcl.crypto_core_ristretto255_scalar_random()
        if any(scalar):
            return scalar


def epoch_key(secret: bytes, epoch: int) -> bytes:
    """The key of one epoch, derived from the server's secret: every node holding the
    secret derives the same key, and an old epoch's key is not kept anywhere."""
    if not 0 <= epoch < 1 << 64:
        raise ValueError(f"epoch out of range: {epoch}")
    wide = hmac.new(secret, _EPOCH_PREFIX + epoch.to_bytes(8, "big"), hashlib.sha512).digest()
    key = _reduce(wide)
    if not any(key):  # probability 2**-252; a zero key would refuse every element
        raise ValueError("derived a zero key")
    return key


# -- the protocol ----------------------------------------------------------------------


def blind(data: bytes, blind_scalar: bytes | None = None) -> tuple[bytes, bytes]:
    """The client's Blind: (blind, blind * HashToGroup(data)). `blind_scalar` fixes the
    blind (the RFC's test vectors); None draws a random one, as the app must."""
    if blind_scalar is None:
        blind_scalar = new_key()
    else:
        _check_scalar(blind_scalar, "blind")
    # The identity (RFC 9497: InvalidInputError) is refused inside _mult.
    return blind_scalar, _mult(blind_scalar, hash_to_group(data))


def blind_evaluate(key: bytes, blinded: bytes) -> bytes:
    """The server's BlindEvaluate: key * blinded; InvalidElement on a bad point."""
    _check_scalar(key, "key")
    return _mult(key, blinded)


_is_valid_point = rbcl.crypto_core_ristretto255_is_valid_point
_IDENTITY = bytes(ELEMENT_BYTES)  # ristretto255's one encoding of the identity


def first_invalid(elements: Sequence[bytes]) -> int | None:
    """The index of the first element `blind_evaluate_many` would refuse, else None: the
    same checks (32 bytes, canonical, a group element, not the identity) at a tenth of
    a multiplication each, so a request is refused before it is charged anything."""
    for index, element in enumerate(elements):
        if (
            not isinstance(element, bytes)
            or len(element) != ELEMENT_BYTES
            or element[31] & 0x80
            or element == _IDENTITY
            or not _is_valid_point(element)
        ):
            return index
    return None


def blind_evaluate_many(key: bytes, blinded: Sequence[bytes]) -> list[bytes]:
    """BlindEvaluate of a request's elements, in order. The server's hot path: one
    library call per element (libsodium validates the point in it); the first bad
    element raises InvalidElement naming its index, and nothing is returned."""
    _check_scalar(key, "key")  # once: so a failure below is the element's
    mult = _scalarmult
    out: list[bytes] = []
    append = out.append
    try:
        for b in blinded:
            if b[31] & 0x80:
                raise InvalidElement(_HIGH_BIT, len(out))
            append(mult(key, b))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        # rbcl: RuntimeError for a point libsodium refuses, ValueError for a wrong
        # length, TypeError for something not bytes; IndexError: shorter than 32.
        if isinstance(exc, InvalidElement):
            raise
        raise InvalidElement("not a valid ristretto255 element", len(out)) from exc
    return out


def unblind(blind_scalar: bytes, evaluated: bytes) -> bytes:
    """N = blind^-1 * evaluated: the server's k * HashToGroup(data), without the blind."""
    return _mult(_invert(blind_scalar), evaluated)


def finalize(data: bytes, blind_scalar: bytes, evaluated: bytes) -> bytes:
    """The client's Finalize: the RFC 9497 output, SHA-512 over the input and N."""
    return _output(data, unblind(blind_scalar, evaluated))


def element(key: bytes, data: bytes) -> bytes:
    """The server's k * HashToGroup(data), no blinding: what it keeps for a discoverable
    number (and, as `evaluate`, what finalize hashes on the client)."""
    return _mult(key, hash_to_group(data))


def evaluate(key: bytes, data: bytes) -> bytes:
    """RFC 9497 Evaluate: the output computed with the key, without the protocol."""
    return _output(data, element(key, data))


def rekey(point: bytes, old_key: bytes, new_key: bytes) -> bytes:
    """(new/old) * point: a point of the old key moved to the new one, without the input."""
    return _mult(_scalar_mul(new_key, _invert(old_key)), point)


def rekey_many(points: Sequence[bytes], old_key: bytes, new_key: bytes) -> list[bytes]:
    """`rekey` of many points: the factor new/old is computed once (an inversion costs
    about a quarter of a multiplication), then one multiplication per point."""
    factor = _scalar_mul(new_key, _invert(old_key))
    return [_mult(factor, point) for point in points]


def tag(point: bytes) -> bytes:
    """8 bytes of SHA-512 over N: what the published set holds for a discoverable user.
    N is already a pseudorandom function of the number (DDH), so truncating its hash
    only shortens it; the server builds the set from the stored N, without numbers."""
    if len(point) != ELEMENT_BYTES:
        raise InvalidElement(f"expected {ELEMENT_BYTES} bytes, got {len(point)}")
    return hashlib.sha512(_TAG_PREFIX + point).digest()[:TAG_BYTES]


def _output(data: bytes, unblinded: bytes) -> bytes:
    """RFC 9497 3.3.1 Finalize's hash: len(input) || input || len(N) || N || "Finalize"."""
    if len(data) > 0xFFFF:
        raise ValueError("input longer than 65535 bytes")
    return hashlib.sha512(
        len(data).to_bytes(2, "big")
        + data
        + len(unblinded).to_bytes(2, "big")
        + unblinded
        + b"Finalize"
    ).digest()
