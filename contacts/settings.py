"""The `[contacts]` section: the address book's limits and Smart Contacts' quota.

On by default wherever the store is: the routes answer only a proven owner, and an
owner who never uploads a book or opts in leaves nothing stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tomlsections.reader import Section
from webapi.ratelimit import RateLimit, parse_rate

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ContactsSettings:
    enabled: bool = True
    # One account's book, all chunks: a 5,000-contact book encrypts to well under 1 MiB.
    max_book_bytes: int = 4 * MIB
    # One request's body: a whole book up to this size in one PUT, else chunked uploads.
    max_chunk_bytes: int = 512 * 1024
    # An upload not committed within this long is dropped with its chunks.
    upload_ttl: int = 3600
    # New numbers (blinded elements) one owner may have evaluated per UTC day: the bound
    # on what an account can learn (docs/design.md, "Contacts"); 0 turns discovery off
    # (every evaluation gets 429 until the setting changes).
    quota_per_day: int = 2000
    max_elements_per_request: int = 1000
    # Numbers (blinded elements) evaluated for all owners together, per minute (a bucket
    # holding a tenth of it, at least one request's worth; shared by the nodes of a
    # cluster): the bound on what many accounts together can learn; 429 past it.
    global_elements_per_minute: int = 20_000
    # The OPRF key changes every this many seconds (an epoch); stored points are
    # re-keyed without the numbers (contacts/discovery.py), apps check again.
    key_epoch: int = 90 * 86400
    # A SIP user name is a phone number when it parses as one: international (+ or 00)
    # always, national only with this region (ISO 3166-1 alpha-2; "": none).
    default_region: str = ""
    # The routes per client address, before any proof is checked.
    rate: RateLimit = field(default_factory=lambda: RateLimit(per_minute=120, burst=60))


def parse_contacts(sec: Section) -> ContactsSettings:
    default = ContactsSettings()
    enabled = sec.flag("enabled", True)
    max_book = sec.integer("max_book_bytes", default.max_book_bytes, minimum=1024)
    max_chunk = sec.integer("max_chunk_bytes", default.max_chunk_bytes, minimum=1024)
    upload_ttl = sec.duration("upload_ttl", "1h")
    quota = sec.integer("quota_per_day", default.quota_per_day, minimum=0)
    per_request = sec.integer(
        "max_elements_per_request", default.max_elements_per_request, minimum=1
    )
    global_rate = sec.integer(
        "global_elements_per_minute", default.global_elements_per_minute, minimum=1
    )
    epoch = sec.duration("key_epoch", "90d")
    region = sec.text("default_region", "")
    rate = parse_rate(sec, default.rate)
    sec.finish()
    if max_chunk > max_book:
        raise sec.error("max_chunk_bytes", "must not exceed max_book_bytes")
    if max_book > 64 * MIB:
        raise sec.error("max_book_bytes", "must be at most 64 MiB")
    if not 60 <= upload_ttl <= 86400:
        raise sec.error("upload_ttl", "must be between 1m and 1d")
    if per_request > 10_000:
        raise sec.error("max_elements_per_request", "must be at most 10000")
    if epoch < 86400:
        raise sec.error("key_epoch", "must be at least 1d")
    if region and not (len(region) == 2 and region.isascii() and region.isupper()):
        raise sec.error("default_region", "expected an ISO 3166-1 alpha-2 code like 'DE', or ''")
    return ContactsSettings(
        enabled=enabled,
        max_book_bytes=max_book,
        max_chunk_bytes=max_chunk,
        upload_ttl=upload_ttl,
        quota_per_day=quota,
        max_elements_per_request=per_request,
        global_elements_per_minute=global_rate,
        key_epoch=epoch,
        default_region=region,
        rate=rate,
    )
