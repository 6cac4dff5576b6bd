"""The app side of contacts (issue 19), over HTTP: the end-to-end encrypted book and
Smart Contacts discovery, as an app does them against softrelay's /contacts/v1.

    token = await prove_device(session, base, sip_username="+4930901820",
                               pbx_serial=serial, password=sip_password)
    book = BookClient(session, base, token, passphrase)
    contacts = await book.read() or []           # GET + ETag (304: the copy held)
    await book.save([*contacts, Contact("Bob", ("030 555",))])  # If-Match; 412: merge

    discovery = DiscoveryClient(session, base, token)
    await discovery.opt_in()                     # discoverable under the proved number
    found = await discovery.discover(numbers)    # .matched: the discoverable ones

Who asks: a device the PBX digest proof registered (`prove_device`: the PBX's challenge
answered with the SIP password, which softrelay never sees; a "cd." device token back),
or a SIPIS app's account (`sipis_token`: its account id and device secret).

The book leaves the device only as an envelope (mockphone/book.py). A body up to
`max_chunk_bytes` is one PUT; a larger one goes up in chunks (POST .../uploads, PUT
each part, POST .../commit with the whole envelope's SHA-256). Every write names the
version it replaces (If-Match) or that there is none (If-None-Match: *); a 412 means
another device wrote first: the client reads that book, merges its own edit into it
(book.merge: three-way, by contact id) and writes again, a bounded number of times.

Discovery: each number in E.164 (contacts/numbers.py, as the server does), blinded
(RFC 9497 OPRF, contacts/oprf.py: the server sees a random group element), evaluated
by the server with its key of the epoch, unblinded to N = k*H(number), whose 8-byte tag
is looked up in the set of discoverable tags the app downloaded. The server learns
neither the number nor whether it matched. The unblinded points are kept per epoch,
so a number checked once is never sent again until the key changes (it costs no
quota); the set is kept current with `?since=<version>` deltas (304 when unchanged).
Numbers and points stay in memory on the device, and nothing here logs them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from contacts import oprf
from contacts.numbers import e164
from contacts.settings import ContactsSettings
from mockphone import digest
from mockphone.book import BookKey, Contact, KdfParams, merge, open_envelope

PREFIX = "/contacts/v1"
BOOK = f"{PREFIX}/book"
UPLOADS = f"{PREFIX}/book/uploads"
DISCOVERABLE = f"{PREFIX}/discoverable"
SET = f"{PREFIX}/discovery/set"
EVALUATE = f"{PREFIX}/discovery/evaluate"
SAVE_ATTEMPTS = 5  # writes after 412s before the save gives up
_DEFAULTS = ContactsSettings()
SET_MAGIC = b"SRD1"
_SET_HEADER = struct.Struct(">4sIBII")
MAX_SET_BYTES = 256 * 1024 * 1024  # 32 million tags: past any deployment's set


class ContactsRefused(Exception):
    """softrelay answered a contacts request with an error: `status` and its `error`
    code; `retry_after` (seconds) when it said when to come back."""

    def __init__(self, status: int, error: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {error}")
        self.status = status
        self.error = error
        self.retry_after = retry_after


class VersionConflict(ContactsRefused):
    """412: another device wrote the book since this one read it."""


class DamagedSet(ValueError):
    """The discovery set is not one softrelay writes; nothing of it is used."""


def sipis_token(account_id: str, device_secret: str) -> str:
    """The Bearer token of a SIPIS app: its account id and device secret."""
    return f"sipis.{account_id}.{device_secret}"


async def prove_device(
    session: aiohttp.ClientSession,
    base_url: str,
    *,
    sip_username: str,
    pbx_serial: str,
    password: str,
) -> str:
    """Register this device for contacts with the PBX's digest proof: the PBX's
    challenge, answered here with the SIP password (which never leaves the device), then
    the device token softrelay issues for it."""
    subject = {"sip_username": sip_username, "pbx_serial": pbx_serial}
    base = base_url.rstrip("/")
    async with session.post(f"{base}{PREFIX}/challenge", json=subject) as response:
        challenge = await _answer(response, 200)
    offered = [str(c) for c in challenge.get("www_authenticate", [])]
    if not offered:
        raise ContactsRefused(502, "no_challenge")
    # The strongest the PBX offers: SHA-256 where it does, else MD5 (RFC 8760).
    www = next((c for c in offered if "SHA-256" in c), offered[0])
    authorization = digest.answer(
        www,
        username=sip_username,
        password=password,
        method=str(challenge.get("method", "REGISTER")),
        uri=str(challenge["uri"]),
    ).header
    body = subject | {"challenge_id": challenge["challenge_id"], "authorization": authorization}
    async with session.post(f"{base}{PREFIX}/devices", json=body) as response:
        answer = await _answer(response, 201)
    return str(answer["device_token"])


async def revoke_device(session: aiohttp.ClientSession, base_url: str, token: str) -> int:
    """DELETE /contacts/v1/devices/self: the token no longer opens anything."""
    url = f"{base_url.rstrip('/')}{PREFIX}/devices/self"
    async with session.delete(url, headers=_bearer(token)) as response:
        return response.status


# --- the book ---------------------------------------------------------------------------


@dataclass(slots=True)
class BookCounters:
    reads: int = 0
    not_modified: int = 0  # 304: the copy held was current
    writes: int = 0  # successful
    conflicts: int = 0  # 412s, each followed by a read and a merge
    chunked: int = 0  # writes that went up in chunks


class BookClient:
    """One device's view of its account's book (see the module docstring). `params`:
    the scrypt cost for a book this device creates (a second device uses the cost the
    envelope names)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        token: str,
        passphrase: str,
        *,
        params: KdfParams | None = None,
        max_chunk_bytes: int = _DEFAULTS.max_chunk_bytes,
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._passphrase = passphrase
        self.params = params
        self.max_chunk_bytes = max_chunk_bytes
        self.key: BookKey | None = None
        self.version: str | None = None  # the ETag of the book last read or written
        self.base: list[Contact] = []  # its contacts: what a merge starts from
        self.counters = BookCounters()

    async def read(self, owner: str | None = None) -> list[Contact] | None:
        """The book (None: there is none). `owner`: another subject's (sip:user@domain),
        which softrelay refuses (403) unless it is the caller's own."""
        headers = _bearer(self._token)
        if owner is None and self.version is not None:
            headers["If-None-Match"] = _quoted(self.version)
        params = {"owner": owner} if owner is not None else None
        self.counters.reads += 1
        async with self.session.get(f"{self.base_url}{BOOK}", headers=headers, params=params) as r:
            if r.status == 304:
                self.counters.not_modified += 1
                return list(self.base)
            if r.status == 404 and owner is None:
                await _answer(r, 404, allow=("no_book",))
                self.version, self.base = None, []
                return None
            if r.status != 200:
                await _answer(r, 200)
            envelope = await r.read()
            version = _etag(r)
        # Off the event loop, as an app keeps it off its UI thread: scrypt takes a
        # third of a second, a large book's decryption some milliseconds.
        if self.key is not None and self.key.opens(envelope):
            contacts = await asyncio.to_thread(self.key.unseal, envelope)
        else:
            # A book another device made, or rewrapped under a new passphrase: the
            # passphrase opens it (one scrypt).
            self.key, contacts = await asyncio.to_thread(open_envelope, envelope, self._passphrase)
        if owner is None:
            self.version, self.base = version, list(contacts)
        return contacts

    async def write(self, contacts: Sequence[Contact]) -> str:
        """One attempt to replace the book read last (or create it); its new version.
        VersionConflict when another device wrote first."""
        if self.key is None:
            self.key = await asyncio.to_thread(BookKey.new, self._passphrase, self.params)
        envelope = await asyncio.to_thread(self.key.seal, list(contacts))
        headers = _bearer(self._token)
        if self.version is None:
            headers["If-None-Match"] = "*"
        else:
            headers["If-Match"] = _quoted(self.version)
        if len(envelope) <= self.max_chunk_bytes:
            headers["Content-Type"] = "application/octet-stream"
            url = f"{self.base_url}{BOOK}"
            async with self.session.put(url, data=envelope, headers=headers) as response:
                version = await _written(response)
        else:
            version = await self._upload(envelope, headers)
        self.counters.writes += 1
        self.version, self.base = version, list(contacts)
        return version

    async def save(self, contacts: Sequence[Contact], attempts: int = SAVE_ATTEMPTS) -> str:
        """Write `contacts` (this device's edit of the book it read last); after a 412,
        read the other device's book, merge this edit into it and write again. The
        version written; VersionConflict after `attempts` writes all lost."""
        local = list(contacts)
        for attempt in range(attempts):
            try:
                return await self.write(local)
            except VersionConflict:
                self.counters.conflicts += 1
                if attempt == attempts - 1:
                    raise
                base = self.base
                remote = await self.read()
                local = merge(base, local, remote or [])
        raise AssertionError("unreachable")  # the loop returns or raises

    async def delete(self) -> int:
        url = f"{self.base_url}{BOOK}"
        async with self.session.delete(url, headers=_bearer(self._token)) as response:
            if response.status == 204:
                self.version, self.base = None, []
            return response.status

    async def _upload(self, envelope: bytes, preconditions: dict[str, str]) -> str:
        """The envelope in chunks of the size softrelay names, then the commit."""
        auth = _bearer(self._token)
        async with self.session.post(f"{self.base_url}{UPLOADS}", headers=auth) as response:
            started = await _answer(response, 201)
        upload_id = str(started["upload_id"])
        size = int(started.get("max_chunk_bytes", self.max_chunk_bytes))
        if size < 1:
            raise ContactsRefused(502, "bad_chunk_size")
        parts = -(-len(envelope) // size)
        url = f"{self.base_url}{UPLOADS}/{upload_id}"
        octets = auth | {"Content-Type": "application/octet-stream"}
        for i in range(parts):
            piece = envelope[i * size : (i + 1) * size]
            async with self.session.put(f"{url}/{i}", data=piece, headers=octets) as response:
                if response.status not in (200, 201, 204):
                    await _answer(response, 200)
        body = {"parts": parts, "sha256": hashlib.sha256(envelope).hexdigest()}
        async with self.session.post(f"{url}/commit", json=body, headers=preconditions) as r:
            version = await _written(r)
        self.counters.chunked += 1
        return version


# --- discovery --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetUpdate:
    """One answer of GET .../discovery/set: a full set, or a delta on the one held."""

    epoch: int
    delta: bool
    added: frozenset[bytes]
    removed: frozenset[bytes]


def parse_set(body: bytes) -> SetUpdate:
    """b"SRD1" | epoch u32 | kind u8 (0 full, 1 delta) | added u32 | removed u32 | the
    added tags | the removed tags (8 bytes each); any other shape is a DamagedSet."""
    if len(body) > MAX_SET_BYTES:
        raise DamagedSet("the set is larger than any deployment's")
    if len(body) < _SET_HEADER.size:
        raise DamagedSet("the set is shorter than its header")
    magic, epoch, kind, added, removed = _SET_HEADER.unpack_from(body)
    if magic != SET_MAGIC or kind not in (0, 1):
        raise DamagedSet("not a discovery set (SRD1, kind 0 or 1)")
    if len(body) != _SET_HEADER.size + oprf.TAG_BYTES * (added + removed):
        raise DamagedSet("the set's length does not match its counts")
    if kind == 0 and removed:
        raise DamagedSet("a full set removes nothing")
    tags = body[_SET_HEADER.size :]
    split = oprf.TAG_BYTES * added

    def chop(data: bytes) -> frozenset[bytes]:
        return frozenset(data[i : i + oprf.TAG_BYTES] for i in range(0, len(data), oprf.TAG_BYTES))

    return SetUpdate(epoch, kind == 1, chop(tags[:split]), chop(tags[split:]))


@dataclass(slots=True)
class Discovered:
    """One discovery run's outcome."""

    matched: set[str] = field(default_factory=set)  # E.164 numbers that are discoverable
    checked: int = 0  # distinct valid numbers looked up
    sent: int = 0  # of them, evaluated by the server in this run (the rest were cached)
    not_numbers: int = 0  # entries that are no valid phone number: never sent
    deferred: list[str] = field(default_factory=list)  # left for later: quota reached
    retry_after: float | None = None  # when the quota allows more, per softrelay


@dataclass(slots=True)
class DiscoveryCounters:
    evaluated: int = 0  # numbers sent (blinded) over all runs
    requests: int = 0
    full_sets: int = 0
    deltas: int = 0
    not_modified: int = 0
    stale_epochs: int = 0


class DiscoveryClient:
    """Smart Contacts for one device (see the module docstring). `region`: how the
    address book's national numbers read (ISO 3166-1 alpha-2; "": international only)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        token: str,
        *,
        region: str = "",
        max_elements: int = _DEFAULTS.max_elements_per_request,
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.region = region
        self.max_elements = max_elements
        self.epoch: int | None = None
        self.version: str | None = None
        self.tags: set[bytes] = set()
        # E.164 -> the unblinded point k_epoch * H(number), for this epoch only.
        self._points: dict[str, bytes] = {}
        self.counters = DiscoveryCounters()

    # --- being discoverable -------------------------------------------------------------

    async def opt_in(self) -> str:
        """Become discoverable under the proved number; that number."""
        async with self.session.put(
            f"{self.base_url}{DISCOVERABLE}", headers=_bearer(self._token)
        ) as response:
            answer = await _answer(response, 200)
        return str(answer.get("number", ""))

    async def opt_out(self) -> None:
        async with self.session.delete(
            f"{self.base_url}{DISCOVERABLE}", headers=_bearer(self._token)
        ) as response:
            if response.status != 204:
                await _answer(response, 204)

    async def discoverable(self) -> bool:
        async with self.session.get(
            f"{self.base_url}{DISCOVERABLE}", headers=_bearer(self._token)
        ) as response:
            answer = await _answer(response, 200)
        return answer.get("discoverable") is True

    # --- discovering ----------------------------------------------------------------------

    async def refresh(self) -> None:
        """The set brought up to date: a delta since the version held, a full set when
        softrelay has no delta from it (or the epoch changed), nothing on 304. A new
        epoch drops the points of the old one (its key is gone)."""
        headers = _bearer(self._token)
        params = None
        if self.version is not None:
            headers["If-None-Match"] = _quoted(self.version)
            params = {"since": self.version}
        async with self.session.get(f"{self.base_url}{SET}", headers=headers, params=params) as r:
            if r.status == 304:
                self.counters.not_modified += 1
                return
            if r.status != 200:
                await _answer(r, 200)
            body, version = await r.read(), _etag(r)
        update = parse_set(body)
        if update.delta:
            if update.epoch != self.epoch:
                raise DamagedSet("a delta on another epoch than the set held")
            self.tags -= update.removed
            self.tags |= update.added
            self.counters.deltas += 1
        else:
            self.tags = set(update.added)
            self.counters.full_sets += 1
        if update.epoch != self.epoch:
            self._points.clear()
        self.epoch, self.version = update.epoch, version

    async def discover(self, numbers: Iterable[str]) -> Discovered:
        """Which of `numbers` (as the address book has them) are discoverable. Numbers
        checked before in this epoch are answered from the points held; the others
        go to softrelay blinded, `max_elements` a request, until its quota says stop
        (they are then `deferred`, with its Retry-After)."""
        result = Discovered()
        wanted: dict[str, None] = {}
        for text in numbers:
            number = e164(text, self.region)
            if number is None:
                result.not_numbers += 1
            else:
                wanted[number] = None
        result.checked = len(wanted)
        await self.refresh()
        for _ in range(2):  # once more after the key changed under the run
            try:
                await self._evaluate([n for n in wanted if n not in self._points], result)
                break
            except ContactsRefused as exc:
                if exc.error != "stale_epoch":
                    raise
                self.counters.stale_epochs += 1
                await self.refresh()
        result.matched = {
            n for n, point in self._points.items() if n in wanted and oprf.tag(point) in self.tags
        }
        return result

    async def _evaluate(self, new: list[str], result: Discovered) -> None:
        for start in range(0, len(new), self.max_elements):
            batch = new[start : start + self.max_elements]
            blinds = [oprf.blind(number.encode()) for number in batch]
            body = {
                "epoch": self.epoch,
                "blinded": [base64.b64encode(blinded).decode() for _, blinded in blinds],
            }
            self.counters.requests += 1
            url = f"{self.base_url}{EVALUATE}"
            async with self.session.post(url, json=body, headers=_bearer(self._token)) as r:
                if r.status == 429:
                    refusal = await _refusal(r)
                    if refusal.error != "quota_exhausted":
                        raise refusal
                    result.deferred = new[start:]
                    result.retry_after = refusal.retry_after
                    return
                answer = await _answer(r, 200)
            evaluated = answer.get("evaluated")
            if not isinstance(evaluated, list) or len(evaluated) != len(batch):
                raise ContactsRefused(502, "bad_evaluation")
            for number, (blind, _), value in zip(batch, blinds, evaluated, strict=True):
                point = oprf.unblind(blind, base64.b64decode(str(value), validate=True))
                self._points[number] = point
            self.counters.evaluated += len(batch)
            result.sent += len(batch)


# --- HTTP -----------------------------------------------------------------------------


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _quoted(version: str) -> str:
    return f'"{version}"'


def _etag(response: aiohttp.ClientResponse) -> str:
    etag = response.headers.get("ETag", "")
    if etag.startswith("W/"):
        etag = etag[2:]
    version = etag.strip('"')
    if not version:
        raise ContactsRefused(502, "no_etag")
    return version


async def _written(response: aiohttp.ClientResponse) -> str:
    """The new version of a PUT or commit (200 or 201); VersionConflict on 412."""
    if response.status == 412:
        refusal = await _refusal(response)
        raise VersionConflict(412, refusal.error, refusal.retry_after)
    if response.status not in (200, 201):
        await _answer(response, 200)
    return _etag(response)


async def _answer(
    response: aiohttp.ClientResponse, expected: int, allow: Sequence[str] = ()
) -> dict[str, Any]:
    """The JSON of an `expected` answer; ContactsRefused for any other status (unless
    its error code is in `allow`)."""
    if response.status != expected:
        refusal = await _refusal(response)
        if refusal.error not in allow:
            raise refusal
    try:
        answer = await response.json(content_type=None)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


async def _refusal(response: aiohttp.ClientResponse) -> ContactsRefused:
    try:
        answer = await response.json(content_type=None)
    except ValueError:
        answer = {}
    error = str(answer.get("error", "")) if isinstance(answer, dict) else ""
    retry = response.headers.get("Retry-After")
    retry_after = float(retry) if retry is not None and retry.isdigit() else None
    return ContactsRefused(response.status, error or f"http_{response.status}", retry_after)
