"""The address book as softrelay keeps it: the app's ciphertext, opaque and versioned,
in chunks of the policy category `address_book` (encrypted once more at rest).

Records of one owner (subject), keyed by (version, part):

    part >= 0   a chunk: `data` is base64 of that piece of the app's bytes
    part == -1  the head of a version: `parts` (its chunks), `size` (its bytes),
                `committed` 1 for the owner's current book, 0 while it is written

A write stores a new version beside the current one and then switches to it:

    1. the head, uncommitted (so an abandoned write expires: `expire_uploads`);
    2. the chunks;
    3. the head committed, replacing the current head in one compare-and-set
       (`Store.replace`): it succeeds only while the current version is still the
       one the writer named (If-Match), or there is none (If-None-Match: *), so of two
       devices racing exactly one wins and the other gets the winner's version;
    4. the old version's chunks deleted.

A crash at any step leaves the old book or the new one whole, never a mix: before 3
the old head still names the old chunks; after it the new head names chunks written in
2. An abandoned write (an uncommitted head and its chunks) goes with `expire_uploads`;
the old chunks of a write stopped between 3 and 4 are no book's any more, are never
used again and go with the retention.

An upload takes chunks and a commit for upload_ttl after it started; `expire_uploads`
drops it only after twice that, so a commit that passed its check just in time is
never swept from under it.

Reads, writes and uploads are a use: every record of the current version is touched
(at most once per TOUCH_EVERY), so the chunks live as long as their head does and the
retention (7 days after the last use in the cloudsoftphone profile) runs from the last
use of the book as a whole.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import math
import secrets
from dataclasses import dataclass
from typing import Final

from contacts.settings import ContactsSettings
from privacy.store import Record, Store, Subject, Value

CATEGORY = "address_book"
HEAD = -1
# Uploads in flight per owner: what one owner can make the server hold beyond its book is
# at most this many times max_book_bytes, for at most twice upload_ttl.
MAX_UPLOADS = 2
# A use touches the book's records at most this often (seconds): a read is then a write
# only once per interval, and the retention is counted in days.
TOUCH_EVERY = 3600.0
# A read that finds the version changed under it (a write switched versions between its
# reads) reads again this many times before it gives up.
_READ_ATTEMPTS = 3
_VERSION_BYTES = 12  # 96 random bits: the ETag, and an upload's id
VERSION_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
log = logging.getLogger("softrelay.contacts")


class BookError(Exception):
    """What a book operation refuses; contacts/bookapi.py maps each to its answer once."""


class VersionConflict(BookError):
    """The precondition does not hold: the current version is not the one named (or
    there is one where none was expected). `current`: the current version, if any."""

    def __init__(self, current: str | None) -> None:
        super().__init__("the book's version is not the one named")
        self.current = current


class BookTooLarge(BookError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the book is larger than {limit} bytes")
        self.limit = limit


class NoSuchUpload(BookError):
    """Unknown, expired, committed or another owner's upload."""


class TooManyUploads(BookError):
    pass


class IncompleteUpload(BookError):
    """The commit does not match what was uploaded; the sentence says what differs."""


class BadChunkIndex(BookError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"a chunk's index is 0 to {limit - 1}")
        self.limit = limit


class BookUnavailable(BookError):
    """The book changed under every read attempt (a storm of writes): retry."""


@dataclass(frozen=True, slots=True)
class Version:
    version: str
    size: int
    parts: int


# The precondition of a write: the version it replaces, ANY (If-Match: *: whichever is
# current, but there must be one) or None (If-None-Match: *: there must be none).
ANY: Final = "*"


def new_version() -> str:
    return secrets.token_urlsafe(_VERSION_BYTES)


def _int(record: Record, name: str) -> int:
    value = record.fields.get(name)
    return value if isinstance(value, int) else 0


class Book:
    """The books of every owner (see the module doc)."""

    def __init__(self, store: Store, settings: ContactsSettings) -> None:
        self.store = store
        self.settings = settings
        # Whatever the chunk size, no more parts than a book of 1 KiB pieces has.
        self.max_parts = math.ceil(settings.max_book_bytes / 1024)

    # --- reading --------------------------------------------------------------------

    async def current(self, subject: Subject) -> Version | None:
        """The owner's current version (not a use)."""
        head = await self._head(subject)
        return _version(head) if head is not None else None

    async def read(self, subject: Subject) -> tuple[Version, bytes] | None:
        """The current version and its bytes, or None; a use."""
        for _ in range(_READ_ATTEMPTS):
            head = await self._head(subject)
            if head is None:
                return None
            version = _version(head)
            records = await self._records(subject, version.version)
            chunks = _chunks(records, version.parts)
            if chunks is not None:
                await self._use(records)
                return version, b"".join(chunks)
            if await self._head(subject) == head:
                # Still the current head, yet its chunks are not all there: no write of
                # ours leaves that (the erasure of a racing DELETE can): no book.
                log.warning("contacts.book_damaged", extra={"fields": {"parts": version.parts}})
                await self._drop(subject, version.version)
                return None
        raise BookUnavailable("the book changed under every read; retry")

    # --- writing --------------------------------------------------------------------

    async def write(
        self, subject: Subject, data: bytes, expect: str | None
    ) -> tuple[Version, bool]:
        """Replace the book with `data` if `expect` holds (see ANY); the new version and
        whether the book was created. VersionConflict, BookTooLarge."""
        if len(data) > self.settings.max_book_bytes:
            raise BookTooLarge(self.settings.max_book_bytes)
        if expect not in (None, ANY):
            await self._check(subject, expect)  # a stale If-Match costs no chunk writes
        version = new_version()
        await self._put_head(subject, version, committed=0, parts=0, size=0)
        step = self.settings.max_chunk_bytes
        pieces = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
        for index, piece in enumerate(pieces):
            await self._put_chunk(subject, version, index, piece)
        return await self._commit(subject, Version(version, len(data), len(pieces)), expect)

    async def delete(self, subject: Subject) -> bool:
        """The owner's book, its uploads and leftovers, gone; whether there was a book."""
        had = await self._head(subject) is not None
        await self.store.delete(
            CATEGORY, sip_username=subject.sip_username, pbx_serial=subject.pbx_serial
        )
        return had

    # --- chunked uploads ------------------------------------------------------------

    async def start_upload(self, subject: Subject) -> str:
        """A new upload's id (the version it becomes). TooManyUploads past MAX_UPLOADS."""
        await self.expire_uploads(subject)
        pending = await self._pending(subject)
        if len(pending) >= MAX_UPLOADS:
            raise TooManyUploads(
                f"at most {MAX_UPLOADS} uploads at once; commit one or wait"
                f" {self.settings.upload_ttl} s for it to expire"
            )
        version = new_version()
        await self._put_head(subject, version, committed=0, parts=0, size=0)
        return version

    async def put_chunk(self, subject: Subject, upload: str, index: int, data: bytes) -> None:
        """Store chunk `index` of the upload (again: replaced). The upload's bytes so far
        may not pass max_book_bytes (BookTooLarge)."""
        if not 0 <= index < self.max_parts:
            raise BadChunkIndex(self.max_parts)
        head = await self._upload_head(subject, upload)
        records = await self._records(subject, upload)
        held = sum(_chunk_size(r) for r in records if _int(r, "part") not in (HEAD, index))
        if held + len(data) > self.settings.max_book_bytes:
            raise BookTooLarge(self.settings.max_book_bytes)
        await self._put_chunk(subject, upload, index, data)
        await self.store.touch(CATEGORY, head.id)

    async def commit_upload(
        self, subject: Subject, upload: str, parts: int, sha256: str, expect: str | None
    ) -> tuple[Version, bool]:
        """Make the upload the book if `expect` holds: its chunks must be exactly 0 to
        parts - 1 and hash to `sha256` (IncompleteUpload otherwise, the upload kept)."""
        await self._upload_head(subject, upload)
        records = await self._records(subject, upload)
        chunks = _chunks(records, parts)
        if chunks is None:
            have = sorted(_int(r, "part") for r in records if _int(r, "part") != HEAD)
            missing = sorted(set(range(parts)) - set(have))
            extra = [i for i in have if i >= parts]
            what = f"missing part {missing[0]}" if missing else f"part {extra[0]} beyond parts"
            raise IncompleteUpload(f"the upload does not match parts={parts}: {what}")
        data = b"".join(chunks)
        if len(data) > self.settings.max_book_bytes:
            raise BookTooLarge(self.settings.max_book_bytes)
        if not secrets.compare_digest(hashlib.sha256(data).hexdigest(), sha256.lower()):
            raise IncompleteUpload("the chunks do not hash to the sha256 given")
        return await self._commit(subject, Version(upload, len(data), parts), expect)

    async def expire_uploads(self, subject: Subject | None = None) -> int:
        """Drop uploads (and abandoned writes) started more than twice upload_ttl ago,
        of `subject` or of every owner; how many. The head goes first, and only while
        it is uncommitted: a version committed meanwhile is never touched."""
        cutoff = self.store.clock.now() - 2 * self.settings.upload_ttl
        where: dict[str, Value] = {"part": HEAD, "committed": 0}
        if subject is not None:
            where |= _owned(subject)
        dropped = 0
        for head in await self.store.find(CATEGORY, **where):
            if head.created_at > cutoff:
                continue
            owner, version = _owner(head), str(head.fields["version"])
            pending = _owned(owner) | {"version": version, "part": HEAD, "committed": 0}
            if await self.store.delete(CATEGORY, **pending):
                await self._drop(owner, version)
                dropped += 1
        return dropped

    async def expire_forever(self, interval: float) -> None:
        """`expire_uploads` of every owner each `interval` seconds until cancelled; a
        failed turn is logged and retried at the next."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.expire_uploads()
            except Exception:
                log.exception("contacts.expire_failed")  # the class only (the log policy)

    # --- the steps ------------------------------------------------------------------

    async def _check(self, subject: Subject, expect: str) -> None:
        current = await self.current(subject)
        if current is None or current.version != expect:
            raise VersionConflict(current.version if current else None)

    async def _commit(
        self, subject: Subject, new: Version, expect: str | None
    ) -> tuple[Version, bool]:
        """Step 3 and 4 of the module doc; on a conflict the new version's records go."""
        if expect == ANY:
            current = await self.current(subject)
            if current is None:
                await self._drop(subject, new.version)
                raise VersionConflict(None)
            expect = current.version
        swapped = await self.store.replace(
            CATEGORY,
            _head_fields(subject, new.version, committed=1, parts=new.parts, size=new.size),
            where=_owned(subject) | {"part": HEAD, "committed": 1},
            expect=None if expect is None else {"version": expect},
        )
        if not swapped:
            current = await self.current(subject)
            # Another commit of this very upload (a client's retry) won the switch: its
            # records are the book now and stay; the 412 names it.
            if current is None or current.version != new.version:
                await self._drop(subject, new.version)
            raise VersionConflict(current.version if current else None)
        if expect is not None:
            await self._drop(subject, expect)  # its head went with the replace
        records = await self._records(subject, new.version)
        if _chunks(records, new.parts) is None:
            # A DELETE between our chunk writes and the switch took the chunks: the
            # head names nothing, so it goes too, and the delete stands.
            await self._drop(subject, new.version)
            raise VersionConflict(None)
        return new, expect is None

    async def _put_head(
        self, subject: Subject, version: str, *, committed: int, parts: int, size: int
    ) -> None:
        await self.store.put(
            CATEGORY, _head_fields(subject, version, committed=committed, parts=parts, size=size)
        )

    async def _put_chunk(self, subject: Subject, version: str, index: int, data: bytes) -> None:
        await self.store.put(
            CATEGORY,
            _owned(subject)
            | {"version": version, "part": index, "data": base64.b64encode(data).decode()},
        )

    async def _drop(self, subject: Subject, version: str) -> None:
        await self.store.delete(CATEGORY, **_owned(subject), version=version)

    async def _head(self, subject: Subject) -> Record | None:
        found = await self.store.find(CATEGORY, **_owned(subject), part=HEAD, committed=1)
        # Replace keeps one; were there two (never by our writes), the newest wins.
        return max(found, key=lambda r: r.id) if found else None

    async def _pending(self, subject: Subject) -> list[Record]:
        return await self.store.find(CATEGORY, **_owned(subject), part=HEAD, committed=0)

    async def _upload_head(self, subject: Subject, upload: str) -> Record:
        if not _is_version(upload):
            raise NoSuchUpload("no such upload")
        found = await self.store.find(
            CATEGORY, **_owned(subject), version=upload, part=HEAD, committed=0
        )
        cutoff = self.store.clock.now() - self.settings.upload_ttl
        if not found or found[0].created_at <= cutoff:
            raise NoSuchUpload("no such upload (unknown, expired or committed)")
        return found[0]

    async def _records(self, subject: Subject, version: str) -> list[Record]:
        return await self.store.find(CATEGORY, **_owned(subject), version=version)

    async def _use(self, records: list[Record]) -> None:
        now = self.store.clock.now()
        for record in records:
            if now - record.last_used_at >= TOUCH_EVERY:
                await self.store.touch(CATEGORY, record.id)


def _is_version(text: str) -> bool:
    return 0 < len(text) <= 64 and set(text) <= VERSION_CHARS


def _owned(subject: Subject) -> dict[str, Value]:
    return {"sip_username": subject.sip_username, "pbx_serial": subject.pbx_serial}


def _owner(record: Record) -> Subject:
    return Subject(str(record.fields["sip_username"]), str(record.fields["pbx_serial"]))


def _head_fields(
    subject: Subject, version: str, *, committed: int, parts: int, size: int
) -> dict[str, Value]:
    return _owned(subject) | {
        "version": version,
        "part": HEAD,
        "parts": parts,
        "size": size,
        "committed": committed,
    }


def _version(head: Record) -> Version:
    return Version(str(head.fields["version"]), _int(head, "size"), _int(head, "parts"))


def _chunk_size(record: Record) -> int:
    data = record.fields.get("data")
    if not isinstance(data, str):
        return 0
    return len(data) * 3 // 4 - data[-2:].count("=")  # base64's length, undone


def _chunks(records: list[Record], parts: int) -> list[bytes] | None:
    """The chunks 0 .. parts-1 in order, or None unless exactly those are there."""
    by_part = {_int(r, "part"): r for r in records if _int(r, "part") != HEAD}
    if parts < 1 or sorted(by_part) != list(range(parts)):
        return None
    chunks = []
    for index in range(parts):
        data = by_part[index].fields.get("data")
        try:
            chunks.append(base64.b64decode(data, validate=True) if isinstance(data, str) else b"")
        except binascii.Error:
            return None
    return chunks
