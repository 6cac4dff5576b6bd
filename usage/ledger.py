"""The month's keyed ids: what a ping leaves in the store, and the distinct counts.

Every incoming pid is keyed again with a random secret of its month before it is
stored: `HMAC-SHA256(month_secret, tenant ‖ pid)`, truncated to 128 bits. The secret
is a `usage_key` record (AES-GCM at rest, like every encrypted field) created at the
month's first ping and deleted when the month is closed (`usage.closing`). Once it is
gone, nobody — not the operator, not someone who later learns an app's install secret
— can compute which stored id belongs to which install.

The ids seen this month are also held in memory per tenant, so a repeated ping writes
nothing and the per-tenant cap reads a distinct count without a query. The store stays
the source of truth: the sets are rebuilt from it when a month is first used after a
start, and every close-job interval (`refresh`).

Several processes on one database (PostgreSQL) count as one: the month's secret is
created with an insert that keeps a secret already stored (`Store.put_new`), so every
process keys a pid alike, and an id is a row unique on (tenant, period, keyed pid), so
an install seen by two processes is one row. A process's own sets see the ids it took
and those it read: its cap check may flag late, never falsely; the close counts the
database's rows (`usage.closing`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from privacy.batches import Batches
from privacy.store import Store

USAGE = "usage"
USAGE_KEY = "usage_key"
USAGE_CLOSE = "usage_close"
USAGE_COUNT = "usage_count"
SECRET_BYTES = 32
KEYED_BYTES = 16


class PeriodClosed(Exception):
    """The month was closed: its secret is gone and its count is final."""


@dataclass(slots=True)
class _Month:
    secret: bytes = field(repr=False)
    seen: dict[str, set[bytes]] = field(default_factory=dict)  # tenant -> keyed ids
    # Keyed once, copied per ping: setting up an HMAC costs more than using it.
    mac: hmac.HMAC = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.mac = hmac.new(self.secret, digestmod=hashlib.sha256)

    def keyed(self, tenant: str, pid: bytes) -> bytes:
        mac = self.mac.copy()
        mac.update(tenant.encode() + b"\x1f" + pid)
        return mac.digest()[:KEYED_BYTES]


class Ledger:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._months: dict[str, _Month] = {}
        self._opening = asyncio.Lock()  # one month's secret is created once
        # New ids of concurrent pings are committed together; each ping is answered only
        # once its id is on disk, so an invoice counts only ids stored before their 202.
        self._batches = Batches(store, USAGE)

    async def record(self, tenant: str, period: str, pid: bytes) -> int | None:
        """Count a ping; the tenant's distinct ids this month if it was new, None if the
        id was already counted (nothing is written then)."""
        month = self._months.get(period) or await self._open(period)
        keyed = month.keyed(tenant, pid)
        seen = month.seen.setdefault(tenant, set())
        if keyed in seen:
            return None
        # Upsert on (tenant, period, pid): two concurrent first pings of one id both
        # write the same row, and the set below counts it once.
        await self._batches.write({"tenant": tenant, "period": period, "pid": keyed.hex()})
        seen.add(keyed)
        return len(seen)

    async def drain(self) -> None:
        """Let the commit under way finish (at shutdown, before the store closes)."""
        await self._batches.drain()

    def distinct(self, tenant: str, period: str) -> int:
        month = self._months.get(period)
        return len(month.seen.get(tenant, ())) if month else 0

    def forget(self, period: str) -> None:
        """Drop a closed month's secret and ids from memory."""
        self._months.pop(period, None)

    async def _open(self, period: str) -> _Month:
        async with self._opening:
            month = self._months.get(period)
            if month is not None:
                return month
            if await self._store.find(USAGE_CLOSE, period=period):
                raise PeriodClosed(period)
            found = await self._store.find(USAGE_KEY, period=period)
            if not found:
                # Another process may be creating the month's secret at this moment: only
                # one insert wins, and every process reads that one back.
                fresh = base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()
                await self._store.put_new(USAGE_KEY, {"period": period, "secret": fresh})
                found = await self._store.find(USAGE_KEY, period=period)
                if not found:  # closed by another process in between: its secret is gone
                    raise PeriodClosed(period)
            secret_text = found[0].fields["secret"]
            assert isinstance(secret_text, str)
            month = _Month(base64.b64decode(secret_text))
            await self._read_ids(period, month)
            self._months[period] = month
            return month

    async def refresh(self) -> None:
        """Add the ids other processes stored to the open months' sets (the close job
        calls it every interval): a fleet's cap check lags by at most that."""
        for period, month in list(self._months.items()):
            await self._read_ids(period, month)

    async def _read_ids(self, period: str, month: _Month) -> None:
        for record in await self._store.find(USAGE, period=period):
            tenant, pid = record.fields["tenant"], record.fields["pid"]
            assert isinstance(tenant, str)
            assert isinstance(pid, str)
            month.seen.setdefault(tenant, set()).add(bytes.fromhex(pid))
