"""The audit: does what is on disk match what the policy allows?

Two independent checks, both read-only:

- `audit` judges every policy category against its retention from what is actually
  kept: database rows (expired ones included, so a sweeper that fell behind shows),
  the subjects behind the account rule, the daily log files, and any table or file of a
  memory-only category. Data the policy does not declare (an extra column with values,
  a `c_*` table or log directory of no such category) is a violation of its own.
- Deleted rows must leave the live files too: one verdict per table of the store says
  how (SQLite overwrites as it deletes; PostgreSQL rewrites a table after deletions,
  which the audit bounds by `[store] vacuum_within`) and how long deleted rows have
  waited for it (`Backend.purge_states`).
- `scan_for_canaries` searches every file under the data directory (and any captured
  service output the operator names), byte by byte, for marker values in the encodings
  data commonly leaks in: a marker found means some path stored what it must not, in the
  clear. `scan_sealed` searches what no file shows in the clear: every encrypted field
  of the store (crash reports included), decrypted with the keyring, and names the
  category and field of each hit, never the text around it.

The audit judges expiry by the rule the sweeper deletes by (basis time + retention <=
now), re-implemented here rather than borrowed, so a bug in the sweeper cannot hide.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import re
import stat
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Literal

import orjson

from privacy.backend import PurgeState, TableStats
from privacy.policy import Category, Policy, Storage
from privacy.store import Opened, Store, stored_categories, table_name
from tomlsections.reader import format_duration

Verdict = Literal["ok", "violation", "memory only"]
LOG_DIR = "log"
MIN_CANARY_CHARS = 4
# Base64 of a value shorter than this leaves too few stable characters to search for.
MIN_BASE64_BYTES = 6
CHUNK_BYTES = 1 << 20
# The audit's rows about deleted rows leaving a table's files: "deleted:c_registration".
PURGE_PREFIX = "deleted:"
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
_DAY_FILE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.jsonl$")


@dataclass(frozen=True)
class CategoryVerdict:
    category: str
    storage: Storage
    records: int | None  # None for logs and memory: they are judged by file, not by row
    oldest_age_seconds: float | None
    limit_seconds: int
    verdict: Verdict
    detail: str


@dataclass(frozen=True)
class CanaryHit:
    value: str
    path: Path
    encoding: str


@dataclass(frozen=True)
class SealedHit:
    """A canary inside an encrypted value: where (category and field), in how many
    records, and in which encoding; nothing of the plaintext around it."""

    value: str
    category: str
    field: str
    records: int
    encoding: str


@dataclass(frozen=True)
class SealedScan:
    hits: list[SealedHit]
    searched: int  # encrypted values opened and searched
    unopened: dict[str, int]  # "category.field" -> values no key opens (the scan is blind there)


# --- retention audit ----------------------------------------------------------------


@dataclass(frozen=True)
class _Disk:
    """What the file system holds, surveyed once off the event loop."""

    tables: frozenset[str]  # category tables (`c_*`) in the SQLite file, if there is one
    log_dirs: dict[str, list[Path]]  # every regular file under log/<name>/, per name
    log_strays: list[Path]  # files directly under log/, outside any category


async def audit(store: Store, data_dir: Path) -> list[CategoryVerdict]:
    """One verdict per policy category, then one per undeclared piece of data."""
    now = store.clock.now()
    stats = await store.stats()
    undeclared = await store.undeclared_columns()
    disk = await asyncio.to_thread(_survey, data_dir, frozenset(await store.backend.tables()))
    verdicts: list[CategoryVerdict] = []
    for cat in store.policy.categories.values():
        if cat.storage is Storage.DATABASE:
            verdicts.append(_database_verdict(cat, stats[cat.name], now))
            verdicts.extend(_undeclared_columns(cat, undeclared.get(cat.name, {})))
        elif cat.storage is Storage.LOG:
            verdicts.append(_log_verdict(cat, disk.log_dirs.get(cat.name, []), now))
        else:
            verdicts.append(_memory_verdict(cat, disk))
    verdicts.extend(_undeclared_places(store.policy, disk))
    verdicts.extend(_purge_verdict(state) for state in await store.backend.purge_states())
    return verdicts


def _expired(age: float, limit: int) -> bool:
    # The sweeper deletes basis <= now - limit, and reads treat such rows as gone.
    return age >= limit


def _database_verdict(cat: Category, stats: TableStats, now: float) -> CategoryVerdict:
    limit = cat.retention.seconds
    what = "subject" if cat.name == "account" else "record"
    if stats.oldest is None:
        return CategoryVerdict(cat.name, cat.storage, stats.rows, None, limit, "ok", f"no {what}s")
    age = now - stats.oldest
    if _expired(age, limit):
        detail = f"oldest {what} is {human_duration(age - limit)} older than the limit"
        return CategoryVerdict(cat.name, cat.storage, stats.rows, age, limit, "violation", detail)
    detail = f"oldest {what} expires in {human_duration(limit - age)}"
    return CategoryVerdict(cat.name, cat.storage, stats.rows, age, limit, "ok", detail)


def _undeclared_columns(cat: Category, columns: Mapping[str, int]) -> Iterator[CategoryVerdict]:
    # A column with only NULLs holds nothing (a field the policy dropped since, say).
    for column, count in sorted(columns.items()):
        if count:
            detail = (
                f"column {column!r} of {table_name(cat.name)} is not declared by the policy"
                f" and holds {_plural(count, 'value')}"
            )
            yield CategoryVerdict(
                cat.name, cat.storage, count, None, cat.retention.seconds, "violation", detail
            )


def _log_verdict(cat: Category, files: list[Path], now: float) -> CategoryVerdict:
    limit = cat.retention.seconds
    if not files:
        return CategoryVerdict(cat.name, cat.storage, None, None, limit, "ok", "no log files")
    days = [day for day in map(_file_day, files) if day is not None]
    # The sweeper deletes only files named by their day, so any other would stay forever.
    undated = sorted(path.name for path in files if _file_day(path) is None)
    age = now - _day_start(min(days)) if days else None
    problems: list[str] = []
    if age is not None and _expired(age, limit):
        problems.append(f"oldest file is {human_duration(age - limit)} older than the limit")
    if undated:
        problems.append(f"not named by its day, so never swept: {', '.join(undated)}")
    if problems:
        detail = "; ".join([_plural(len(files), "file"), *problems])
        return CategoryVerdict(cat.name, cat.storage, None, age, limit, "violation", detail)
    assert age is not None  # files exist and all are named by their day
    detail = f"{_plural(len(files), 'file')}, oldest expires in {human_duration(limit - age)}"
    return CategoryVerdict(cat.name, cat.storage, None, age, limit, "ok", detail)


def _memory_verdict(cat: Category, disk: _Disk) -> CategoryVerdict:
    found: list[str] = []
    if table_name(cat.name) in disk.tables:
        found.append(f"table {table_name(cat.name)}")
    if files := disk.log_dirs.get(cat.name):
        found.append(f"{_plural(len(files), 'file')} under {LOG_DIR}/{cat.name}/")
    if found:
        detail = f"kept in memory only, yet found on disk: {', '.join(found)}"
        return CategoryVerdict(cat.name, cat.storage, None, None, 0, "violation", detail)
    return CategoryVerdict(cat.name, cat.storage, None, None, 0, "memory only", "nothing on disk")


def _undeclared_places(policy: Policy, disk: _Disk) -> Iterator[CategoryVerdict]:
    """Tables and log files that no category of the policy accounts for."""
    memory = {c.name for c in policy.stored(Storage.MEMORY)}
    known = {table_name(c.name) for c in stored_categories(policy)}
    known |= {table_name(name) for name in memory}  # reported by the memory verdict
    for table in sorted(disk.tables - known):
        detail = f"table {table} belongs to no database category of the policy"
        yield CategoryVerdict(
            table.removeprefix("c_"), Storage.DATABASE, None, None, 0, "violation", detail
        )
    logs = {c.name for c in policy.stored(Storage.LOG)}
    for name, files in sorted(disk.log_dirs.items()):
        if files and name not in logs | memory:
            detail = f"{_plural(len(files), 'file')} under {LOG_DIR}/{name}/, no log category"
            yield CategoryVerdict(name, Storage.LOG, None, None, 0, "violation", detail)
    for path in disk.log_strays:
        detail = f"{LOG_DIR}/{path.name} lies outside every category's directory"
        yield CategoryVerdict(path.name, Storage.LOG, None, None, 0, "violation", detail)


def _purge_verdict(state: PurgeState) -> CategoryVerdict:
    """Whether deleted rows left the table's files within the bound: "deleted:<table>"."""
    name = f"{PURGE_PREFIX}{state.table}"
    limit = 0 if state.within is None else int(state.within)
    facts: list[str] = []
    late = False
    if state.within is not None:
        if state.pending_age is None:
            facts.append("none waiting")
        else:
            late = state.pending_age >= state.within
            bound = "longer than" if late else "within"
            facts.append(
                f"deleted rows waiting {human_duration(state.pending_age)}"
                f" ({bound} {format_duration(limit)})"
            )
        if state.purged_age is not None:
            facts.append(f"last rewrite {human_duration(state.purged_age)} ago")
    if state.dead_rows is not None:
        # The server's own figures: a plain vacuum empties these counts, not the files.
        vacuumed = "never" if state.vacuum_age is None else human_duration(state.vacuum_age)
        facts.append(
            f"{_plural(state.dead_rows, 'dead row version')}, plain vacuum {vacuumed}"
            + ("" if state.vacuum_age is None else " ago")
        )
    detail = "; ".join([state.method, *facts])
    return CategoryVerdict(
        name,
        Storage.DATABASE,
        None,
        state.pending_age,
        limit,
        "violation" if late else "ok",
        detail,
    )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _survey(data_dir: Path, tables: frozenset[str]) -> _Disk:
    log_dirs: dict[str, list[Path]] = {}
    strays: list[Path] = []
    root = data_dir / LOG_DIR
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                log_dirs[entry.name] = list(_regular_files(entry))
            else:
                strays.append(entry)
    return _Disk(tables, log_dirs, strays)


def _file_day(path: Path) -> date | None:
    match = _DAY_FILE.match(path.name)
    if match is None:
        return None
    try:
        return date.fromisoformat(match.group(1))
    except ValueError:  # 2026-02-30.jsonl: shaped like a day, but none
        return None


def _day_start(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


# --- canary scan ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Needle:
    value: str
    encoding: str
    pattern: bytes
    folded: bool  # searched in the ASCII-lowercased bytes (case-insensitive)


def check_canaries(values: Sequence[str]) -> None:
    """Raise ValueError for a value too short to search for, before any work is done."""
    for value in values:
        _needles(value)


def scan_for_canaries(
    data_dir: Path,
    values: Sequence[str],
    *,
    also: Sequence[Path] = (),
    chunk_bytes: int = CHUNK_BYTES,
) -> list[CanaryHit]:
    """Every (value, file, encoding) found under data_dir and in `also` (captured stdout
    and stderr of the service, say: files, or directories searched like data_dir); each
    file read in bounded chunks, each searched once however often it is named."""
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be at least 1")
    needles = _all_needles(values)
    if not needles:
        return []
    # A match that straddles two chunks lies entirely within the overlap plus the next chunk.
    overlap = max(len(n.pattern) for n in needles) - 1
    hits: list[CanaryHit] = []
    seen: set[Path] = set()
    for path in _files_to_scan(data_dir, also):
        if (real := path.resolve()) in seen:
            continue
        seen.add(real)
        found = _shadowed_utf16_dropped(_scan_file(path, needles, chunk_bytes, overlap))
        hits.extend(CanaryHit(n.value, path, n.encoding) for n in needles if n in found)
    return hits


def _files_to_scan(data_dir: Path, also: Sequence[Path]) -> Iterator[Path]:
    yield from _regular_files(data_dir)
    for path in also:
        # Named by the operator: a symlink given on the command line is meant.
        if path.is_dir():
            yield from _regular_files(path)
        else:
            yield path


async def scan_sealed(store: Store, values: Sequence[str]) -> SealedScan:
    """Decrypt every encrypted value of the store (expired records included) and search
    the plaintext as the files are searched; hits name category and field only."""
    needles = _all_needles(values)
    records: dict[tuple[_Needle, str, str], int] = {}
    unopened: dict[str, int] = {}
    searched = 0
    async for opened in store.opened_values():
        if opened.plaintext is None:
            place = f"{opened.category}.{opened.field}"
            unopened[place] = unopened.get(place, 0) + 1
            continue
        searched += 1
        for needle in _found_in(opened, needles):
            key = (needle, opened.category, opened.field)
            records[key] = records.get(key, 0) + 1
    hits = [
        SealedHit(needle.value, category, field, count, needle.encoding)
        for (needle, category, field), count in records.items()
    ]
    return SealedScan(hits, searched, unopened)


def _found_in(opened: Opened, needles: list[_Needle]) -> list[_Needle]:
    assert opened.plaintext is not None
    plain = opened.plaintext
    folded = plain.lower()
    found = {n: at for n in needles if (at := (folded if n.folded else plain).find(n.pattern)) >= 0}
    return list(_shadowed_utf16_dropped(found))


def _all_needles(values: Sequence[str]) -> list[_Needle]:
    return [needle for value in dict.fromkeys(values) for needle in _needles(value)]


def _scan_file(
    path: Path, needles: list[_Needle], chunk_bytes: int, overlap: int
) -> dict[_Needle, int]:
    """The needles found in the file, each with the offset of its first match."""
    found: dict[_Needle, int] = {}
    tail = b""
    start = 0  # file offset of the window's first byte
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(chunk_bytes):
                window = tail + chunk
                folded = window.lower()
                for needle in needles:
                    if needle in found:
                        continue
                    at = (folded if needle.folded else window).find(needle.pattern)
                    if at >= 0:
                        found[needle] = start + at
                if len(found) == len(needles):
                    break
                tail = window[-overlap:] if overlap else b""
                start += len(window) - len(tail)
    except FileNotFoundError:  # the WAL or its index went away between listing and reading
        return {}
    return found


def _shadowed_utf16_dropped(found: dict[_Needle, int]) -> dict[_Needle, int]:
    """UTF-16 text of ASCII contains its other byte order one byte along ("a\0b\0c\0" holds
    "\0b\0c"), so one leak matches both; keep the order whose first match is at an even
    offset, as a UTF-16 file's code units are."""
    by_value: dict[str, dict[str, _Needle]] = {}
    for needle in found:
        by_value.setdefault(needle.value, {})[needle.encoding] = needle
    for named in by_value.values():
        le, be = named.get("utf-16-le"), named.get("utf-16-be")
        if le is not None and be is not None and (found[le] - found[be]) % 2:
            del found[le if found[le] % 2 else be]
    return found


def _needles(value: str) -> list[_Needle]:
    if len(value) < MIN_CANARY_CHARS:
        raise ValueError(
            f"a canary of {len(value)} characters is too short to be meaningful"
            f" (at least {MIN_CANARY_CHARS}): it would match by chance"
        )
    raw = value.encode()
    plain = raw.lower()
    encoded: list[tuple[str, bytes]] = [
        ("utf-16-le", value.encode("utf-16-le")),
        ("utf-16-be", value.encode("utf-16-be")),
        ("url", urllib.parse.quote(value, safe="").encode()),
        ("hex", binascii.hexlify(raw)),
        ("hex-upper", binascii.hexlify(raw).upper()),
        ("json", orjson.dumps(value)[1:-1]),
        # orjson writes non-ASCII as UTF-8; the stdlib and most others escape it as \uXXXX.
        ("json-ascii", json.dumps(value).encode()[1:-1]),
    ]
    if len(raw) >= MIN_BASE64_BYTES:
        encoded += [("base64", p) for p in _base64_middles(raw, base64.b64encode)]
        encoded += [("base64url", p) for p in _base64_middles(raw, base64.urlsafe_b64encode)]
    needles = [_Needle(value, "utf-8", plain, folded=True)]
    seen = {plain}
    for encoding, pattern in encoded:
        # The same bytes under two names (plain ASCII is its own URL and JSON form) are
        # searched once and reported under the first, plainest name.
        if pattern in seen or pattern.lower() == plain:
            continue
        seen.add(pattern)
        needles.append(_Needle(value, encoding, pattern, folded=False))
    return needles


def _base64_middles(raw: bytes, encode: Callable[[bytes], bytes]) -> list[bytes]:
    """The characters of raw's base64 that do not depend on what precedes or follows it.

    Base64 encodes 3-byte groups, so raw shows differently at each of the 3 offsets it
    may start at. For each offset k, encode k zero bytes + raw and keep only the
    characters whose 6 bits all come from raw.
    """
    middles: list[bytes] = []
    for k in range(3):
        encoded = encode(b"\0" * k + raw)
        first = -(-8 * k // 6)  # ceil: the first character holding no bit of the prefix
        end = 8 * (k + len(raw)) // 6  # floor: characters wholly inside raw
        middles.append(encoded[first:end])
    return middles


def _regular_files(root: Path) -> Iterator[Path]:
    """Regular files under root, sorted, without following symlinks (they could leave
    the data directory, or loop)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                mode = path.lstat().st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISREG(mode):
                yield path


# --- reports --------------------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """'3d 4h', '2h', '45s': the largest unit and the next one, rounded down."""
    sign = "-" if seconds < 0 else ""
    left = int(abs(seconds))
    for i, (unit, size) in enumerate(_UNITS):
        if left >= size or unit == "s":
            text = f"{left // size}{unit}"
            if i + 1 < len(_UNITS):
                sub_unit, sub_size = _UNITS[i + 1]
                if sub := left % size // sub_size:
                    text += f" {sub}{sub_unit}"
            return sign + text
    raise AssertionError("unreachable: the last unit always matches")


def format_report(verdicts: Sequence[CategoryVerdict]) -> str:
    header = ("category", "storage", "records", "oldest", "limit", "verdict", "detail")
    rows = [header] + [
        (
            v.category,
            v.storage.value,
            "-" if v.records is None else str(v.records),
            "-" if v.oldest_age_seconds is None else human_duration(v.oldest_age_seconds),
            "-"
            if v.storage is Storage.MEMORY or not v.limit_seconds
            else format_duration(v.limit_seconds),
            v.verdict.upper() if v.verdict == "violation" else v.verdict,
            v.detail,
        )
        for v in verdicts
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    ]
    violations = sum(v.verdict == "violation" for v in verdicts)
    summary = _plural(violations, "violation") if violations else "no violations"
    return "\n".join([line.rstrip() for line in lines] + ["", summary]) + "\n"


def format_hits(hits: Sequence[CanaryHit], sealed: SealedScan | None = None) -> str:
    """Files first, then encrypted fields; a value no key opens is reported too, as the
    scan could not look inside it."""
    lines = [f"{hit.path}: {hit.value!r} as {hit.encoding}" for hit in hits]
    count = len(hits)
    tail: list[str] = []
    if sealed is not None:
        for s in sealed.hits:
            records = _plural(s.records, "record")
            lines.append(
                f"{s.category}.{s.field} (encrypted, {records}): {s.value!r} as {s.encoding}"
            )
        count += len(sealed.hits)
        tail.append(f"searched {_plural(sealed.searched, 'encrypted value')} of the store")
        for place, unopened in sorted(sealed.unopened.items()):
            tail.append(
                f"{place}: {_plural(unopened, 'encrypted value')} did not open"
                " (tampered, moved between records, or its key is gone): not searched"
            )
    summary = _plural(count, "canary hit") if count else "no canary found"
    return "\n".join([*lines, *([""] if lines else []), *tail, summary]) + "\n"


__all__ = [
    "PURGE_PREFIX",
    "CanaryHit",
    "CategoryVerdict",
    "SealedHit",
    "SealedScan",
    "Verdict",
    "audit",
    "check_canaries",
    "format_hits",
    "format_report",
    "human_duration",
    "scan_for_canaries",
    "scan_sealed",
]
