"""The address book as the user's devices hold it (issue 19): its key, its envelope (what
softrelay stores and can never read), and the merge after a version conflict.

    key = BookKey.new("correct horse battery staple")     # the user's first device
    envelope = key.seal([Contact("Alice", ("+4930123456",))])
    key2, contacts = open_envelope(envelope, "correct horse battery staple")  # another one

mockphone/contacts.py moves envelopes to and from /contacts/v1/book (BookClient).

The book's key is 32 random bytes made on the first device. It is wrapped (AES-256-GCM)
under a key derived with scrypt from the user's sync passphrase and a random salt; the
envelope carries the salt, the scrypt parameters and the wrapped key, so any device or
web app of the user that knows the passphrase opens it, and the server, which stores
only envelopes, never has the key. The contacts are JSON, compressed, padded to a
multiple of PAD bytes (the server learns the book's size to within PAD, not the count of
its contacts), then encrypted in chunks with AES-256-GCM under a content key derived
(HKDF) from the book key and a random salt of this envelope, chunk i with nonce
(i, last?) and the whole header as associated data (the STREAM construction: a chunk
cannot be moved, dropped, or a header altered without the decryption failing).

The envelope (all integers big-endian):

    "SRB1" | log2 N u8 | r u8 | p u8 | salt 16 | wrap nonce 12 | wrapped key 48 |
    content salt 32 | chunk size u32 | chunks u32 | the chunks (chunk size + 16 each,
    the last one shorter)

What the server can still do: guess passphrases offline against the wrapped key, each
guess costing one scrypt (N = 2^17, r = 8: about 0.3 s and 128 MiB): a weak passphrase
is the limit of this scheme, which the app should say when the user picks one.

Every envelope from the server is hostile until opened: its sizes, scrypt parameters,
compressed length and the JSON inside are bounded before any work is spent on them.
"""

from __future__ import annotations

import secrets
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

MAGIC = b"SRB1"
HEADER = struct.Struct(">4sBBB16s12s48s32sII")
_WRAPPED_PART = struct.Struct(">4sBBB16s")  # what the wrap binds: magic, scrypt, salt
TAG_BYTES = 16
KEY_BYTES = 32
CHUNK_BYTES = 64 * 1024  # plaintext per chunk
PAD = 4096  # the plaintext is padded to a multiple of this
_CONTENT_INFO = b"softrelay/contacts/book/v1/content"
_WRAP_NONCE_BYTES = 12

# Bounds on what an envelope may make a device do.
MAX_ENVELOPE_BYTES = 64 * 1024 * 1024  # the server's own cap on a book is lower
MAX_BOOK_JSON = 32 * 1024 * 1024  # decompressed
MAX_CONTACTS = 100_000
MAX_NUMBERS = 100  # per contact
MAX_TEXT = 1024  # characters of a name, a number or an id
MAX_SCRYPT_MEMORY = 256 * 1024 * 1024  # 128 * r * N bytes


class BookError(ValueError):
    """An envelope that cannot be opened; the subclasses say what the user can do."""


class WrongPassphrase(BookError):
    """The passphrase does not unwrap the book key (or the wrapped key was altered):
    ask the user again."""


class DamagedBook(BookError):
    """The envelope is not one this app wrote (truncated, altered, not an envelope):
    nothing of it is used."""


@dataclass(frozen=True, slots=True)
class KdfParams:
    """scrypt's cost: N = 2**log_n, r, p. The default is OWASP's (N=2^17, r=8, p=1)."""

    log_n: int = 17
    r: int = 8
    p: int = 1

    def check(self) -> None:
        """Raises DamagedBook for parameters no device of ours writes, or that would
        make this device spend unbounded memory or time (a hostile envelope)."""
        if not (10 <= self.log_n <= 22 and 1 <= self.r <= 32 and 1 <= self.p <= 4):
            raise DamagedBook(f"scrypt parameters out of range: {self}")
        if 128 * self.r * (1 << self.log_n) > MAX_SCRYPT_MEMORY:
            raise DamagedBook(f"scrypt parameters need more than 256 MiB: {self}")

    def derive(self, passphrase: str, salt: bytes) -> bytes:
        self.check()
        kdf = Scrypt(salt=salt, length=KEY_BYTES, n=1 << self.log_n, r=self.r, p=self.p)
        return kdf.derive(passphrase.encode("utf-8"))


@dataclass(frozen=True, slots=True)
class Contact:
    """One address-book entry. `id` is the device's own: the merge after a conflict
    matches entries by it, not by name (two people may share a name)."""

    name: str
    numbers: tuple[str, ...] = ()
    id: str = field(default_factory=lambda: secrets.token_hex(8))


@dataclass(frozen=True, slots=True)
class BookKey:
    """The book key and its wrap: what a device keeps after creating or opening a book
    (an app would keep it in the keychain, not the passphrase)."""

    key: bytes = field(repr=False)
    params: KdfParams
    salt: bytes
    wrap_nonce: bytes
    wrapped: bytes = field(repr=False)

    @classmethod
    def new(cls, passphrase: str, params: KdfParams | None = None) -> BookKey:
        """A new book's key (the user's first device), wrapped under the passphrase."""
        return _wrap(secrets.token_bytes(KEY_BYTES), passphrase, params or KdfParams())

    @classmethod
    def open(cls, envelope: bytes, passphrase: str) -> BookKey:
        """The key of `envelope`, unwrapped with the passphrase (one scrypt)."""
        header = _Header.parse(envelope)
        kek = header.params.derive(passphrase, header.salt)
        try:
            key = AESGCM(kek).decrypt(header.wrap_nonce, header.wrapped, header.wrap_aad)
        except InvalidTag:
            raise WrongPassphrase(
                "the passphrase does not open this book (or its wrapped key was altered)"
            ) from None
        return cls(key, header.params, header.salt, header.wrap_nonce, header.wrapped)

    def rewrap(self, passphrase: str, params: KdfParams | None = None) -> BookKey:
        """The same book key under a new passphrase (the user changed it): the next
        envelope written carries the new wrap, and the old passphrase no longer opens it."""
        return _wrap(self.key, passphrase, params or self.params)

    def opens(self, envelope: bytes) -> bool:
        """Whether `envelope` carries this wrap (else: another device rewrapped the key
        under a new passphrase, or it is another book)."""
        header = _Header.parse(envelope)
        return (header.params, header.salt, header.wrap_nonce, header.wrapped) == (
            self.params,
            self.salt,
            self.wrap_nonce,
            self.wrapped,
        )

    def seal(self, contacts: Iterable[Contact], chunk_bytes: int = CHUNK_BYTES) -> bytes:
        """The envelope of `contacts`: what the server stores."""
        if not 1024 <= chunk_bytes <= 1024 * 1024:
            raise ValueError("chunk_bytes must be between 1 KiB and 1 MiB")
        plain = _pad(zlib.compress(_book_json(contacts), 9))
        chunks = -(-len(plain) // chunk_bytes)
        content_salt = secrets.token_bytes(32)
        header = HEADER.pack(
            MAGIC,
            self.params.log_n,
            self.params.r,
            self.params.p,
            self.salt,
            self.wrap_nonce,
            self.wrapped,
            content_salt,
            chunk_bytes,
            chunks,
        )
        aead = AESGCM(_content_key(self.key, content_salt))
        parts = [header]
        for i in range(chunks):
            piece = plain[i * chunk_bytes : (i + 1) * chunk_bytes]
            parts.append(aead.encrypt(_nonce(i, i == chunks - 1), piece, header))
        return b"".join(parts)

    def unseal(self, envelope: bytes) -> list[Contact]:
        """The contacts of `envelope`, which must carry this key's wrap (`opens`)."""
        header = _Header.parse(envelope)
        if (header.salt, header.wrapped) != (self.salt, self.wrapped):
            raise WrongPassphrase("the book was rewrapped: open it with the passphrase")
        aead = AESGCM(_content_key(self.key, header.content_salt))
        size = header.chunk_bytes + TAG_BYTES
        body = memoryview(envelope)[HEADER.size :]
        plain = bytearray()
        for i in range(header.chunks):
            last = i == header.chunks - 1
            try:
                plain += aead.decrypt(_nonce(i, last), body[i * size : (i + 1) * size], header.raw)
            except InvalidTag:
                raise DamagedBook(f"chunk {i} of the book fails its check") from None
        return _parse_book(_unpad(bytes(plain)))


def open_envelope(envelope: bytes, passphrase: str) -> tuple[BookKey, list[Contact]]:
    """A device that has only the passphrase (a second phone, the web app): the key
    and the contacts of `envelope`."""
    key = BookKey.open(envelope, passphrase)
    return key, key.unseal(envelope)


def _wrap(book_key: bytes, passphrase: str, params: KdfParams) -> BookKey:
    salt = secrets.token_bytes(16)
    nonce = secrets.token_bytes(_WRAP_NONCE_BYTES)
    aad = _WRAPPED_PART.pack(MAGIC, params.log_n, params.r, params.p, salt)
    wrapped = AESGCM(params.derive(passphrase, salt)).encrypt(nonce, book_key, aad)
    return BookKey(book_key, params, salt, nonce, wrapped)


def _content_key(book_key: bytes, content_salt: bytes) -> bytes:
    """A key per envelope: its chunks' nonces can then simply count from 0."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=content_salt, info=_CONTENT_INFO)
    return hkdf.derive(book_key)


def _nonce(index: int, last: bool) -> bytes:
    return struct.pack(">7xIB", index, 1 if last else 0)


@dataclass(frozen=True, slots=True)
class _Header:
    raw: bytes
    params: KdfParams
    salt: bytes
    wrap_nonce: bytes
    wrapped: bytes
    content_salt: bytes
    chunk_bytes: int
    chunks: int

    @property
    def wrap_aad(self) -> bytes:
        return self.raw[: _WRAPPED_PART.size]

    @classmethod
    def parse(cls, envelope: bytes) -> _Header:
        """The header, its sizes checked against the envelope's length."""
        if len(envelope) > MAX_ENVELOPE_BYTES:
            raise DamagedBook("the envelope is larger than any book")
        if len(envelope) < HEADER.size or envelope[:4] != MAGIC:
            raise DamagedBook("not a book envelope (SRB1)")
        raw = envelope[: HEADER.size]
        _, log_n, r, p, salt, nonce, wrapped, content_salt, chunk_bytes, chunks = HEADER.unpack(raw)
        params = KdfParams(log_n, r, p)
        params.check()
        if not 1024 <= chunk_bytes <= 1024 * 1024 or chunks < 1:
            raise DamagedBook("the envelope's chunk size or count is out of range")
        body = len(envelope) - HEADER.size
        size = chunk_bytes + TAG_BYTES
        # Every chunk full but the last, which holds 1 to chunk_bytes bytes.
        if not (chunks - 1) * size + TAG_BYTES < body <= chunks * size:
            raise DamagedBook("the envelope's length does not match its chunk count")
        return cls(raw, params, salt, nonce, wrapped, content_salt, chunk_bytes, chunks)


def _pad(compressed: bytes) -> bytes:
    framed = struct.pack(">I", len(compressed)) + compressed
    return framed + bytes(-len(framed) % PAD)


def _unpad(plain: bytes) -> bytes:
    """The compressed book JSON inside the padding, decompressed within MAX_BOOK_JSON."""
    if len(plain) < 4:
        raise DamagedBook("the book's plaintext is shorter than its length field")
    (length,) = struct.unpack(">I", plain[:4])
    if length > len(plain) - 4:
        raise DamagedBook("the book's length field runs past its plaintext")
    inflate = zlib.decompressobj()
    try:
        text = inflate.decompress(plain[4 : 4 + length], MAX_BOOK_JSON)
    except zlib.error:
        raise DamagedBook("the book does not decompress") from None
    if not inflate.eof or inflate.unconsumed_tail:
        raise DamagedBook(f"the book decompresses past {MAX_BOOK_JSON} bytes, or is cut short")
    return text


def _book_json(contacts: Iterable[Contact]) -> bytes:
    entries = [{"id": c.id, "name": c.name, "numbers": list(c.numbers)} for c in contacts]
    if len(entries) > MAX_CONTACTS:
        raise ValueError(f"a book holds at most {MAX_CONTACTS} contacts")
    return orjson.dumps({"v": 1, "contacts": entries})


def _parse_book(text: bytes) -> list[Contact]:
    """The contacts in the decrypted JSON; anything but the shape this app writes is
    a DamagedBook (it passed the authentication, so only a buggy writer makes one)."""
    try:
        book = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise DamagedBook("the book is not JSON") from None
    entries = book.get("contacts") if isinstance(book, dict) and book.get("v") == 1 else None
    if not isinstance(entries, list) or len(entries) > MAX_CONTACTS:
        raise DamagedBook("the book is not a version 1 list of contacts")
    contacts = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DamagedBook(f"contact {i} is not an object")
        cid, name, numbers = entry.get("id"), entry.get("name"), entry.get("numbers")
        if not (_text(cid) and _text(name) and isinstance(numbers, list)):
            raise DamagedBook(f"contact {i} lacks a text id and name, or a list of numbers")
        if len(numbers) > MAX_NUMBERS or not all(_text(n) for n in numbers):
            raise DamagedBook(f"contact {i}: at most {MAX_NUMBERS} numbers, each text")
        contacts.append(Contact(str(name), tuple(numbers), str(cid)))
    return contacts


def _text(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_TEXT


def merge(
    base: Sequence[Contact], local: Sequence[Contact], remote: Sequence[Contact]
) -> list[Contact]:
    """A three-way merge by contact id after a 412: `base` is what this device last read,
    `local` its edit of it, `remote` the book another device wrote meanwhile. A change on
    one side only wins; a contact both sides changed keeps the local name and the union
    of both sides' numbers; a contact one side deleted and the other left alone goes; one
    deleted on one side and changed on the other stays, changed. Remote order first,
    then the contacts new on this device."""
    old = {c.id: c for c in base}
    mine = {c.id: c for c in local}
    merged: list[Contact] = []
    for theirs in remote:
        before, ours = old.get(theirs.id), mine.get(theirs.id)
        if ours is None:
            if before is None or before != theirs:
                merged.append(theirs)  # new there, or changed there while deleted here
        elif before is None or ours == before:
            merged.append(theirs)
        elif theirs == before:
            merged.append(ours)
        else:
            numbers = tuple(dict.fromkeys((*ours.numbers, *theirs.numbers)))
            merged.append(Contact(ours.name, numbers, ours.id))
    there = {c.id for c in remote}
    for ours in local:
        if ours.id in there:
            continue
        before = old.get(ours.id)
        if before is None or before != ours:
            merged.append(ours)  # new here, or changed here while deleted there
    return merged
