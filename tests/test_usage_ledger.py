"""The ledger's batched commits: every new id on disk before its ping is answered."""

from __future__ import annotations

import asyncio

from privacy.store import Store
from usage.ledger import Ledger


async def test_ledger_commits_concurrent_new_ids_together_and_counts_each(store: Store) -> None:
    ledger = Ledger(store)
    pids = [bytes([i]) * 16 for i in range(40)]
    counts = await asyncio.gather(*(ledger.record("acme", "2026-11", pid) for pid in pids))
    assert sorted(c for c in counts if c is not None) == list(range(1, 41))
    assert len(await store.find("usage", tenant="acme", period="2026-11")) == 40
    assert await ledger.record("acme", "2026-11", pids[0]) is None, "a repeat writes nothing"
