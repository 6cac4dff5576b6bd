"""The app's book envelope (mockphone/book.py), no server: two devices with the same
passphrase open each other's book; a wrong passphrase, an altered byte anywhere, a cut
or hostile envelope fail as BookError, never with another exception; the envelope shows
no name or number in any encoding, compressed or not; the merge after a 412."""

from __future__ import annotations

import base64
import struct
import zlib

import orjson
import pytest

from mockphone.book import (
    HEADER,
    MAX_BOOK_JSON,
    PAD,
    BookError,
    BookKey,
    Contact,
    DamagedBook,
    KdfParams,
    WrongPassphrase,
    merge,
    open_envelope,
)

# Cheap scrypt for tests: the cost parameters are what the envelope carries, so a device
# opens whatever the writer chose (within KdfParams.check's bounds).
FAST = KdfParams(log_n=10, r=8, p=1)
PASSPHRASE = "canary sync passphrase 7f3e"
BOOK = [
    Contact("Canaryname Oberholzer", ("+4930901820", "+491701234567"), "c1"),
    Contact("Zyxwvu Canarian", ("+14155550123",), "c2"),
    Contact("Ümlaut Müller-Canary", (), "c3"),
]


def _key() -> BookKey:
    return BookKey.new(PASSPHRASE, FAST)


def test_a_second_device_with_the_passphrase_opens_the_first_devices_book() -> None:
    first = _key()
    envelope = first.seal(BOOK)
    second, contacts = open_envelope(envelope, PASSPHRASE)
    assert contacts == BOOK
    assert second.key == first.key
    # And back: the second device's envelope opens on the first without scrypt.
    edited = [*contacts, Contact("New Person", ("+4940123456",), "c4")]
    reply = second.seal(edited)
    assert first.opens(reply)
    assert first.unseal(reply) == edited


def test_each_envelope_is_encrypted_afresh() -> None:
    key = _key()
    one, two = key.seal(BOOK), key.seal(BOOK)
    assert one != two
    assert one[HEADER.size :] != two[HEADER.size :]


def test_a_wrong_passphrase_fails_cleanly() -> None:
    envelope = _key().seal(BOOK)
    with pytest.raises(WrongPassphrase, match="passphrase does not open"):
        open_envelope(envelope, PASSPHRASE + "x")


def test_a_rewrapped_book_opens_with_the_new_passphrase_only() -> None:
    old = _key()
    new = old.rewrap("a new passphrase 2024", FAST)
    envelope = new.seal(BOOK)
    assert not old.opens(envelope)
    with pytest.raises(WrongPassphrase, match="rewrapped"):
        old.unseal(envelope)
    with pytest.raises(WrongPassphrase):
        open_envelope(envelope, PASSPHRASE)
    key, contacts = open_envelope(envelope, "a new passphrase 2024")
    assert (key.key, contacts) == (old.key, BOOK)


@pytest.mark.parametrize("chunk_bytes", [1024, 64 * 1024])
def test_every_altered_byte_is_refused(chunk_bytes: int) -> None:
    """Any one byte flipped, header or chunk, fails as a BookError: the header is bound
    to every chunk and to the wrapped key. (Every byte of the header, and a spread of
    the body's.)"""
    many = [Contact(f"Person {i}", (f"+49301234{i:04d}",), f"id{i}") for i in range(400)]
    envelope = _key().seal(many, chunk_bytes=chunk_bytes)
    body = range(HEADER.size, len(envelope), max(1, (len(envelope) - HEADER.size) // 50))
    for i in [*range(HEADER.size), *body, len(envelope) - 1]:
        altered = bytearray(envelope)
        altered[i] ^= 0x01
        with pytest.raises(BookError):
            open_envelope(bytes(altered), PASSPHRASE)


def test_chunks_cannot_be_dropped_reordered_or_cut() -> None:
    many = [Contact(f"Person {i}", (f"+4930{i:08d}",), f"id{i}") for i in range(2000)]
    key = _key()
    envelope = key.seal(many, chunk_bytes=1024)
    header = HEADER.unpack(envelope[: HEADER.size])
    chunk = header[-2] + 16
    chunks = [
        envelope[HEADER.size + i * chunk : HEADER.size + (i + 1) * chunk] for i in range(header[-1])
    ]
    assert len(chunks) >= 3
    swapped = envelope[: HEADER.size] + chunks[1] + chunks[0] + b"".join(chunks[2:])
    with pytest.raises(DamagedBook, match="chunk 0"):
        key.unseal(swapped)
    # The count lowered to drop the last chunk: the new last one is not marked last.
    fewer = bytearray(envelope[: HEADER.size] + b"".join(chunks[:-1]))
    fewer[HEADER.size - 4 : HEADER.size] = struct.pack(">I", len(chunks) - 1)
    with pytest.raises(DamagedBook):
        key.unseal(bytes(fewer))
    for cut in (len(envelope) - 1, HEADER.size + 10, HEADER.size, 3, 0):
        with pytest.raises(DamagedBook):
            key.unseal(envelope[:cut])


@pytest.mark.parametrize(
    ("log_n", "r", "p"),
    [(40, 8, 1), (22, 32, 1), (9, 8, 1), (17, 0, 1), (17, 8, 9)],
)
def test_hostile_scrypt_parameters_are_refused_before_any_work(log_n: int, r: int, p: int) -> None:
    envelope = bytearray(_key().seal(BOOK))
    envelope[4:7] = bytes((log_n, r, p))
    with pytest.raises(DamagedBook, match="scrypt parameters"):
        open_envelope(bytes(envelope), PASSPHRASE)


def _sealed_plain(key: BookKey, plain: bytes) -> bytes:
    """An envelope holding `plain` as its (already padded) plaintext: what only a device
    with the key can write, to show the parser's bounds past the authentication."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from mockphone.book import MAGIC, _content_key, _nonce

    salt = b"s" * 32
    chunks = -(-len(plain) // (1024 * 1024))
    header = HEADER.pack(
        MAGIC,
        key.params.log_n,
        key.params.r,
        key.params.p,
        key.salt,
        key.wrap_nonce,
        key.wrapped,
        salt,
        1024 * 1024,
        chunks,
    )
    aead = AESGCM(_content_key(key.key, salt))
    body = b"".join(
        aead.encrypt(_nonce(i, i == chunks - 1), plain[i << 20 : (i + 1) << 20], header)
        for i in range(chunks)
    )
    return header + body


def _framed(compressed: bytes) -> bytes:
    return struct.pack(">I", len(compressed)) + compressed


@pytest.mark.parametrize(
    ("plain", "reason"),
    [
        (_framed(zlib.compress(b" " * (MAX_BOOK_JSON + 1))), "decompresses past"),
        (_framed(zlib.compress(b"[1]")[:-3]), "cut short"),
        (_framed(b"not zlib at all"), "does not decompress"),
        (struct.pack(">I", 10**6) + b"x", "runs past"),
        (_framed(zlib.compress(b"\xff\xfe")), "not JSON"),
        (_framed(zlib.compress(b'{"v": 2, "contacts": []}')), "version 1"),
        (_framed(zlib.compress(b'{"v": 1, "contacts": [1]}')), "not an object"),
        (
            _framed(zlib.compress(b'{"v":1,"contacts":[{"id":"a","name":"b","numbers":[1]}]}')),
            "each text",
        ),
        (
            _framed(zlib.compress(orjson.dumps({"v": 1, "contacts": [{"id": "a", "name": "b"}]}))),
            "lacks",
        ),
    ],
)
def test_a_book_past_the_authentication_is_still_parsed_within_bounds(
    plain: bytes, reason: str
) -> None:
    key = _key()
    with pytest.raises(DamagedBook, match=reason):
        key.unseal(_sealed_plain(key, plain))


def _encodings(value: str) -> list[bytes]:
    raw = value.encode()
    return [
        raw,
        value.encode("utf-16-le"),
        raw.hex().encode(),
        base64.b64encode(raw),
        orjson.dumps(value),
        zlib.compress(raw)[2:-4],  # the deflate stream alone
    ]


def test_the_envelope_holds_no_name_or_number_in_any_encoding() -> None:
    """Not in the clear, not compressed (the plaintext is compressed before encryption;
    the deflate of the whole book JSON is not in it either), not base64 or hex."""
    key = _key()
    envelope = key.seal(BOOK)
    book_json = orjson.dumps(
        {"v": 1, "contacts": [{"id": c.id, "name": c.name, "numbers": c.numbers} for c in BOOK]}
    )
    deflated = zlib.compress(book_json, 9)
    assert deflated[10:40] not in envelope
    for contact in BOOK:
        for value in (contact.name, *contact.numbers, contact.name.split()[0]):
            for form in _encodings(value):
                assert form not in envelope, (value, form)


def test_the_size_shows_only_the_padded_length() -> None:
    """One contact more or less does not change the envelope's length: the plaintext is
    padded to a multiple of PAD."""
    key = _key()
    sizes = {len(key.seal(BOOK[:n])) for n in range(len(BOOK) + 1)}
    assert sizes == {HEADER.size + PAD + 16}


# --- merge after a 412 ----------------------------------------------------------------


A = Contact("Anna", ("+4930111",), "a")
B = Contact("Ben", ("+4930222",), "b")
C = Contact("Cleo", ("+4930333",), "c")


def test_merge_keeps_each_sides_own_changes() -> None:
    base = [A, B, C]
    local = [A, Contact("Ben B.", B.numbers, "b"), C, Contact("Dora", ("+4930444",), "d")]
    remote = [A, B, Contact("Cleo", ("+4930999",), "c"), Contact("Emil", (), "e")]
    assert merge(base, local, remote) == [
        A,
        Contact("Ben B.", B.numbers, "b"),
        Contact("Cleo", ("+4930999",), "c"),
        Contact("Emil", (), "e"),
        Contact("Dora", ("+4930444",), "d"),
    ]


def test_merge_of_a_contact_both_sides_changed_keeps_both_numbers() -> None:
    local = [Contact("Anna L.", ("+4930111", "+4930555"), "a")]
    remote = [Contact("Anna R.", ("+4930111", "+4930666"), "a")]
    assert merge([A], local, remote) == [
        Contact("Anna L.", ("+4930111", "+4930555", "+4930666"), "a")
    ]


def test_merge_of_deletions() -> None:
    changed_b = Contact("Ben", ("+4930777",), "b")
    # Deleted here, untouched there: gone. Deleted there, untouched here: gone.
    assert merge([A, B], [A], [A, B]) == [A]
    assert merge([A, B], [A, B], [A]) == [A]
    # Deleted on one side, changed on the other: the change stays.
    assert merge([A, B], [A], [A, changed_b]) == [A, changed_b]
    assert merge([A, B], [A, changed_b], [A]) == [A, changed_b]
