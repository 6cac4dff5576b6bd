"""The published set of Smart Contacts: the tags of one key epoch, its version, and a
bounded journal of the changes between versions (contacts/discovery.py keeps it).

    b"SRD1" | epoch u32 BE | kind u8 (0 full, 1 delta) | added u32 | removed u32
            | added tags (8 bytes each, sorted) | removed tags (sorted)

A version is the first 16 bytes of SHA-256 over the epoch and the sorted tags, in hex:
the same on every node holding the same set, so an app may ask any node for a delta
from the version it holds; a node whose journal does not reach back to it answers with
the whole set.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from contacts import oprf

# The journal of changes between versions: this many steps, this many tags in all; an
# app holding an older version gets the whole set.
JOURNAL_STEPS = 1024
JOURNAL_TAGS = 100_000
MAGIC = b"SRD1"
FULL, DELTA = 0, 1
_HEADER = struct.Struct(">4sIBII")  # magic, epoch, kind, added, removed


@dataclass(frozen=True, slots=True)
class _Step:
    before: str  # the version this step starts from
    added: frozenset[bytes]
    removed: frozenset[bytes]


class TagSet:
    """The tags of one epoch, with a count per tag (two owners may share a number), kept
    sorted so a version costs one pass; changes since the last published version are
    collected and journalled when a version is next asked for."""

    def __init__(self, epoch: int, counts: Mapping[bytes, int] | None = None) -> None:
        self.epoch = epoch
        self._counts: dict[bytes, int] = dict(counts or {})
        self._sorted = sorted(self._counts)
        self._added: set[bytes] = set()
        self._removed: set[bytes] = set()
        self._journal: deque[_Step] = deque()
        self._journal_tags = 0
        self._version = self._digest()
        self._full: bytes | None = None

    def __len__(self) -> int:
        return len(self._counts)

    def __contains__(self, tag: object) -> bool:
        return tag in self._counts

    def add(self, tag: bytes) -> None:
        count = self._counts.get(tag, 0)
        self._counts[tag] = count + 1
        if count == 0:
            bisect.insort(self._sorted, tag)
            self._appeared(tag)

    def remove(self, tag: bytes) -> None:
        count = self._counts.get(tag, 0)
        if count > 1:
            self._counts[tag] = count - 1
        elif count == 1:
            del self._counts[tag]
            del self._sorted[bisect.bisect_left(self._sorted, tag)]
            self._went(tag)

    def replace(self, counts: dict[bytes, int]) -> None:
        """The set as rebuilt from the store: the difference is journalled as any change."""
        for tag in counts.keys() - self._counts.keys():
            self._appeared(tag)
        for tag in self._counts.keys() - counts.keys():
            self._went(tag)
        self._counts = counts
        self._sorted = sorted(counts)

    def _appeared(self, tag: bytes) -> None:
        if tag in self._removed:
            self._removed.discard(tag)
        else:
            self._added.add(tag)

    def _went(self, tag: bytes) -> None:
        if tag in self._added:
            self._added.discard(tag)
        else:
            self._removed.add(tag)

    @property
    def version(self) -> str:
        self._publish()
        return self._version

    def full(self) -> bytes:
        """The whole set: header, then every tag, sorted."""
        self._publish()
        if self._full is None:
            header = _HEADER.pack(MAGIC, self.epoch, FULL, len(self._sorted), 0)
            self._full = header + b"".join(self._sorted)
        return self._full

    def delta(self, since: str) -> bytes | None:
        """The changes from version `since` to the current one; None when the journal
        does not reach back to it (the caller answers with the whole set)."""
        self._publish()
        if since == self._version:
            return _HEADER.pack(MAGIC, self.epoch, DELTA, 0, 0)
        steps = list(self._journal)
        start = next((i for i in range(len(steps) - 1, -1, -1) if steps[i].before == since), None)
        if start is None:
            return None
        added: set[bytes] = set()
        removed: set[bytes] = set()
        for step in steps[start:]:
            for tag in step.added:
                if tag in removed:
                    removed.discard(tag)
                else:
                    added.add(tag)
            for tag in step.removed:
                if tag in added:
                    added.discard(tag)
                else:
                    removed.add(tag)
        header = _HEADER.pack(MAGIC, self.epoch, DELTA, len(added), len(removed))
        return header + b"".join(sorted(added)) + b"".join(sorted(removed))

    def _publish(self) -> None:
        if not self._added and not self._removed:
            return
        step = _Step(self._version, frozenset(self._added), frozenset(self._removed))
        self._added.clear()
        self._removed.clear()
        self._version = self._digest()
        self._full = None
        self._journal.append(step)
        self._journal_tags += len(step.added) + len(step.removed)
        while self._journal and (
            len(self._journal) > JOURNAL_STEPS or self._journal_tags > JOURNAL_TAGS
        ):
            old = self._journal.popleft()
            self._journal_tags -= len(old.added) + len(old.removed)

    def _digest(self) -> str:
        digest = hashlib.sha256(struct.pack(">I", self.epoch))
        digest.update(b"".join(self._sorted))
        return digest.digest()[:16].hex()


@dataclass(frozen=True, slots=True)
class SetBody:
    version: str
    body: bytes
    delta: bool


def parse_set(body: bytes) -> tuple[int, int, list[bytes], list[bytes]]:
    """(epoch, kind, added, removed) of a set body: the client's side of `set_body`."""
    if len(body) < _HEADER.size:
        raise ValueError("set body shorter than its header")
    magic, epoch, kind, added, removed = _HEADER.unpack_from(body)
    size = oprf.TAG_BYTES
    if magic != MAGIC or kind not in (FULL, DELTA):
        raise ValueError("not a discovery set (SRD1)")
    if len(body) != _HEADER.size + size * (added + removed):
        raise ValueError("set body length does not match its counts")
    tags = [body[i : i + size] for i in range(_HEADER.size, len(body), size)]
    return epoch, kind, tags[:added], tags[added:]
