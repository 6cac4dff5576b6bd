"""contacts/oprf.py is RFC 9497's OPRF(ristretto255, SHA-512), mode 0, byte for byte:
the RFC's Appendix A.1.1 vectors for Blind (with the vector's blind), BlindEvaluate
and Finalize; RFC 9380's expand_message_xmd vectors; the client's blinded result
equals the server's direct computation; re-keying a stored point equals computing it
under the new key; every malformed element from a peer is InvalidElement.

The scalar arithmetic of the expected values (reduction, DeriveKeyPair) is done here
with Python integers, not with the library the module uses."""

from __future__ import annotations

import hashlib
import hmac
import random

import pytest

from contacts import oprf

# The order of the ristretto255 group (RFC 9496 4).
ORDER = 2**252 + 27742317777372353535851937790883648493

# RFC 9497 Appendix A.1.1, OPRF(ristretto255, SHA-512), mode OPRF.
SEED = bytes.fromhex("a3" * 32)
KEY_INFO = bytes.fromhex("74657374206b6579")  # "test key"
SK_SM = bytes.fromhex("5ebcea5ee37023ccb9fc2d2019f9d7737be85591ae8652ffa9ef0f4d37063b0e")
BLIND = bytes.fromhex("64d37aed22a27f5191de1c1d69fadb899d8862b58eb4220029e036ec4c1f6706")
VECTORS = [
    pytest.param(
        bytes.fromhex("00"),
        "609a0ae68c15a3cf6903766461307e5c8bb2f95e7e6550e1ffa2dc99e412803c",
        "7ec6578ae5120958eb2db1745758ff379e77cb64fe77b0b2d8cc917ea0869c7e",
        "527759c3d9366f277d8c6020418d96bb393ba2afb20ff90df23fb7708264e2f3"
        "ab9135e3bd69955851de4b1f9fe8a0973396719b7912ba9ee8aa7d0b5e24bcf6",
        id="input-00",
    ),
    pytest.param(
        bytes.fromhex("5a" * 17),
        "da27ef466870f5f15296299850aa088629945a17d1f5b7f5ff043f76b3c06418",
        "b4cbf5a4f1eeda5a63ce7b77c7d23f461db3fcab0dd28e4e17cecb5c90d02c25",
        "f4a74c9c592497375e796aa837e907b1a045d34306a749db9f34221f7e750cb4"
        "f2a6413a6bf6fa5e19ba6348eb673934a722a7ede2e7621306d18951e7cf2c73",
        id="input-5a*17",
    ),
]


def _top_bit(point: bytes) -> bytes:
    return point[:31] + bytes([point[31] | 0x80])


# RFC 9496 Appendix A.2: encodings every implementation must refuse (non-canonical
# field elements, negative field elements, a non-square x^2), and the identity, which
# decodes but is refused as an input and as a result.
BAD_ELEMENTS = [
    pytest.param(bytes.fromhex("00" + "ff" * 31), id="non-canonical-1"),
    pytest.param(bytes.fromhex("ff" * 31 + "7f"), id="non-canonical-2"),
    pytest.param(bytes.fromhex("f3" + "ff" * 30 + "7f"), id="non-canonical-3"),
    pytest.param(bytes.fromhex("ed" + "ff" * 30 + "7f"), id="non-canonical-4"),
    pytest.param(bytes.fromhex("01" + "00" * 31), id="negative-1"),
    pytest.param(bytes.fromhex("01" + "ff" * 30 + "7f"), id="negative-2"),
    pytest.param(
        bytes.fromhex("26948d35ca62e643e26a83177332e6b6afeb9d08e4268b650f1f5bbd8d81d371"),
        id="non-square",
    ),
    pytest.param(bytes(32), id="identity"),
    # A valid point's encoding with the top bit set: s >= 2**255 is not canonical (the
    # libsodium rbcl bundles decodes it as if the bit were clear; oprf.py refuses it).
    pytest.param(_top_bit(oprf.hash_to_group(b"x")), id="top-bit"),
    pytest.param(b"", id="empty"),
    pytest.param(bytes(31), id="31-bytes"),
    pytest.param(oprf.hash_to_group(b"x") + b"\x00", id="33-bytes"),
]


def scalar(value: int) -> bytes:
    return (value % ORDER).to_bytes(32, "little")


def reduce_wide(wide: bytes) -> bytes:
    return scalar(int.from_bytes(wide, "little"))


def test_expand_message_xmd_matches_rfc_9380_sha512_vectors() -> None:
    """RFC 9380 Appendix K.3 (expand_message_xmd, SHA-512)."""
    dst = b"QUUX-V01-CS02-with-expander-SHA512-256"
    assert oprf.expand_message_xmd(b"abcdef0123456789", dst, 0x20).hex() == (
        "087e45a86e2939ee8b91100af1583c4938e0f5fc6c9db4b107b83346bc967f58"
    )
    assert oprf.expand_message_xmd(b"abc", dst, 0x80).hex() == (
        "7f1dddd13c08b543f2e2037b14cefb255b44c83cc397c1786d975653e36a6b11"
        "bdd7732d8b38adb4a0edc26a0cef4bb45217135456e58fbca1703cd6032cb134"
        "7ee720b87972d63fbf232587043ed2901bce7f22610c0419751c065922b48843"
        "1851041310ad659e4b23520e1772ab29dcdeb2002222a363f0c2b1c972b3efe1"
    )


def test_the_vectors_key_is_derive_key_pair_of_their_seed() -> None:
    """RFC 9497 3.2.1 DeriveKeyPair with the vectors' Seed and KeyInfo gives skSm: the
    context string and expand_message_xmd are the RFC's."""
    derive_input = SEED + len(KEY_INFO).to_bytes(2, "big") + KEY_INFO
    dst = b"DeriveKeyPair" + oprf.CONTEXT
    wide = oprf.expand_message_xmd(derive_input + b"\x00", dst, 64)
    assert reduce_wide(wide) == SK_SM


@pytest.mark.parametrize(("data", "blinded_hex", "evaluated_hex", "output_hex"), VECTORS)
def test_rfc_9497_a_1_1_vectors(
    data: bytes, blinded_hex: str, evaluated_hex: str, output_hex: str
) -> None:
    blind_scalar, blinded = oprf.blind(data, BLIND)
    assert blind_scalar == BLIND
    assert blinded.hex() == blinded_hex
    evaluated = oprf.blind_evaluate(SK_SM, blinded)
    assert evaluated.hex() == evaluated_hex
    assert oprf.blind_evaluate_many(SK_SM, [blinded, blinded]) == [evaluated, evaluated]
    assert oprf.finalize(data, BLIND, evaluated).hex() == output_hex
    # The server's side without the protocol gives the same output and the same point.
    assert oprf.evaluate(SK_SM, data).hex() == output_hex
    assert oprf.unblind(BLIND, evaluated) == oprf.element(SK_SM, data)


def test_blinded_evaluation_equals_the_servers_direct_computation() -> None:
    """For random keys, inputs and blinds: what the app unblinds is the server's
    element, and two blindings of one number look unrelated but finalize alike."""
    rng = random.Random(19)
    for _ in range(20):
        key = oprf.new_key()
        data = f"+49{rng.randrange(10**9, 10**10)}".encode()
        blind_a, blinded_a = oprf.blind(data)
        blind_b, blinded_b = oprf.blind(data)
        assert blinded_a != blinded_b
        eval_a, eval_b = oprf.blind_evaluate_many(key, [blinded_a, blinded_b])
        assert oprf.unblind(blind_a, eval_a) == oprf.element(key, data)
        assert oprf.unblind(blind_b, eval_b) == oprf.element(key, data)
        assert oprf.finalize(data, blind_a, eval_a) == oprf.evaluate(key, data)
        assert oprf.element(key, data) != oprf.element(oprf.new_key(), data)


def test_rekey_moves_an_element_to_the_new_key_without_the_input() -> None:
    old, new = oprf.new_key(), oprf.new_key()
    for number in (b"+4930123456", b"+14155550123", b""):
        moved = oprf.rekey(oprf.element(old, number), old, new)
        assert moved == oprf.element(new, number)
        assert oprf.rekey(moved, new, old) == oprf.element(old, number)
    numbers = [b"+4930123456", b"+14155550123"]
    assert oprf.rekey_many([oprf.element(old, n) for n in numbers], old, new) == [
        oprf.element(new, n) for n in numbers
    ]
    with pytest.raises(oprf.InvalidElement):
        oprf.rekey_many([oprf.element(old, numbers[0]), bytes(32)], old, new)
    # Known scalars: (3/2) * (2 * H) == 3 * H.
    point = oprf.hash_to_group(b"+4930123456")
    assert oprf.rekey(oprf.element(scalar(2), b"+4930123456"), scalar(2), scalar(3)) == (
        oprf.element(scalar(3), b"+4930123456")
    )
    assert oprf.element(scalar(1), b"+4930123456") == point


@pytest.mark.parametrize("bad", BAD_ELEMENTS)
def test_a_bad_element_is_invalid_element_everywhere_a_peer_sends_one(bad: bytes) -> None:
    key = oprf.new_key()
    with pytest.raises(oprf.InvalidElement):
        oprf.blind_evaluate(key, bad)
    with pytest.raises(oprf.InvalidElement):
        oprf.unblind(BLIND, bad)
    with pytest.raises(oprf.InvalidElement):
        oprf.finalize(b"+4930123456", BLIND, bad)
    with pytest.raises(oprf.InvalidElement):
        oprf.rekey(bad, key, oprf.new_key())
    good = oprf.blind(b"+4930123456")[1]
    with pytest.raises(oprf.InvalidElement) as caught:
        oprf.blind_evaluate_many(key, [good, good, bad, good])
    assert caught.value.index == 2
    assert "element 2" in str(caught.value)


def test_random_bytes_are_refused_unless_they_encode_a_point() -> None:
    """Random 32-byte strings: most are not encodings; each one either evaluates to a
    valid point or raises InvalidElement, never another error."""
    rng = random.Random(9497)
    refused = 0
    for _ in range(200):
        candidate = rng.randbytes(32)
        try:
            result = oprf.blind_evaluate(SK_SM, candidate)
        except oprf.InvalidElement:
            refused += 1
            continue
        # A point that decoded: evaluating it again with the inverse key gets it back.
        inverse = scalar(pow(int.from_bytes(SK_SM, "little"), -1, ORDER))
        assert oprf.blind_evaluate(inverse, result) == candidate
    assert refused > 100  # an accepted random string is the exception


def test_blind_evaluate_many_keeps_the_order_and_accepts_an_empty_request() -> None:
    key = oprf.new_key()
    blinded = [oprf.blind(f"+4930{i:06}".encode())[1] for i in range(5)]
    assert oprf.blind_evaluate_many(key, blinded) == [oprf.blind_evaluate(key, b) for b in blinded]
    assert oprf.blind_evaluate_many(key, []) == []


def test_a_blind_that_is_zero_or_not_reduced_is_refused() -> None:
    with pytest.raises(ValueError, match="zero"):
        oprf.blind(b"+4930123456", bytes(32))
    with pytest.raises(ValueError, match="reduced"):
        oprf.blind(b"+4930123456", ORDER.to_bytes(32, "little"))
    with pytest.raises(ValueError, match="32 bytes"):
        oprf.blind(b"+4930123456", bytes(31))


def test_epoch_key_is_the_reduced_hmac_of_the_epoch() -> None:
    secret = b"\x07" * 32
    for epoch in (0, 1, 20_000):
        wide = hmac.new(
            secret, b"softrelay/contacts/oprf/v1" + epoch.to_bytes(8, "big"), hashlib.sha512
        ).digest()
        assert oprf.epoch_key(secret, epoch) == reduce_wide(wide)
    assert oprf.epoch_key(secret, 1) != oprf.epoch_key(secret, 2)
    assert oprf.epoch_key(secret, 1) != oprf.epoch_key(b"\x08" * 32, 1)
    with pytest.raises(ValueError, match="epoch"):
        oprf.epoch_key(secret, -1)


def test_tag_is_eight_bytes_of_the_hash_of_the_element_only() -> None:
    key = oprf.new_key()
    point = oprf.element(key, b"+4930123456")
    expected = hashlib.sha512(b"softrelay/contacts/tag/v1" + point).digest()[:8]
    assert oprf.tag(point) == expected
    # What the app unblinds tags the same: membership works without the number.
    blind_scalar, blinded = oprf.blind(b"+4930123456")
    unblinded = oprf.unblind(blind_scalar, oprf.blind_evaluate(key, blinded))
    assert oprf.tag(unblinded) == expected
    assert oprf.tag(oprf.element(key, b"+4930123457")) != expected
    with pytest.raises(oprf.InvalidElement):
        oprf.tag(point[:31])


def test_new_key_is_a_reduced_non_zero_scalar() -> None:
    keys = {oprf.new_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert 0 < int.from_bytes(key, "little") < ORDER
