"""The ledger's batched commits: every new id on disk before its ping is answered."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac

import pytest

from privacy.store import Store
from usage.ledger import Ledger, _Month

# Each test with a store runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends


async def test_ledger_commits_concurrent_new_ids_together_and_counts_each(store: Store) -> None:
    ledger = Ledger(store)
    pids = [bytes([i]) * 16 for i in range(40)]
    counts = await asyncio.gather(*(ledger.record("acme", "2026-11", pid) for pid in pids))
    assert sorted(c for c in counts if c is not None) == list(range(1, 41))
    # Exactly the keyed ids under the month's stored secret, one row each, nothing else.
    (key,) = await store.find("usage_key", period="2026-11")
    secret = base64.b64decode(str(key.fields["secret"]))
    expected = sorted(_Month(secret).keyed("acme", pid).hex() for pid in pids)
    rows = await store.find("usage", period="2026-11")
    assert sorted((r.fields["tenant"], r.fields["pid"]) for r in rows) == [
        ("acme", keyed) for keyed in expected
    ]
    assert await ledger.record("acme", "2026-11", pids[0]) is None, "a repeat writes nothing"
    assert len(await store.find("usage", period="2026-11")) == 40


def test_the_stored_id_is_the_hmac_of_tenant_and_pid_under_the_month_secret() -> None:
    secret, pid = b"s" * 32, b"p" * 16
    expected = hmac.digest(secret, b"acme\x1f" + pid, hashlib.sha256)[:16]
    assert _Month(secret).keyed("acme", pid) == expected
    assert _Month(b"t" * 32).keyed("acme", pid) != expected, "another month, another id"
