"""SIPIS mode in a cluster, through the whole app: two nodes on one Redis and one
PostgreSQL, the real registrar engine and lease keeper (softrelay/app.py), a real
Kamailio. An account created on one node is registered by exactly one node, the lease
holder; when that node stops, the other takes the account over and registers it.

The keepers turn every `lease_ttl / 3` seconds of the system clock (3 s leases here):
each wait is for a state of the two nodes, checked after each keeper's turn, bounded,
never a fixed sleep."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

from cluster.settings import ClusterSettings
from privacy.database import StoreSettings
from privacy.keys import Keyring
from sipis.account import State
from softrelay.app import SIPIS_LEASES
from tests.kamailio import Kamailio
from tests.limits import LONGEST_WAIT
from tests.sipis.test_e2e import Running, body_for, kamailio, running, settings
from tests.sipis.test_registrar_kamailio import ALICE, ask

__all__ = ["kamailio"]  # fixture


async def _until(check: Callable[[], bool], *nodes: Running) -> None:
    """Until `check` holds, looked at after each turn of the nodes' lease keepers."""
    async with asyncio.timeout(LONGEST_WAIT):
        while not check():
            async with asyncio.TaskGroup() as group:
                for node in nodes:
                    group.create_task(node.app[SIPIS_LEASES].next_turn())


def _registered(node: Running, account_id: str) -> bool:
    status = node.engine.status(account_id)
    return status is not None and status.state is State.REGISTERED


async def test_an_account_is_registered_by_one_node_and_moves_when_it_stops(
    kamailio: Kamailio, tmp_path: Path, redis_url: str, postgres_store_dsn: str
) -> None:
    keyring, store = Keyring.generate(), StoreSettings(backend="postgresql", dsn=postgres_store_dsn)
    sipis = settings(lease_ttl=3.0)

    def cluster(name: str) -> ClusterSettings:
        return ClusterSettings(redis_url=redis_url, secret="c" * 32, node_id=name)

    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            running(tmp_path / "a", keyring, store, sipis, cluster=cluster("node-a"))
        )
        b_stack = contextlib.AsyncExitStack()
        b = await b_stack.enter_async_context(
            running(tmp_path / "b", keyring, store, sipis, cluster=cluster("node-b"))
        )
        try:
            status, created = await a.call("POST", body=body_for(kamailio))
            assert status == 201, created
            account_id = created["account_id"]
            leases = a.app[SIPIS_LEASES], b.app[SIPIS_LEASES]

            def one_holder() -> bool:
                holders = [account_id in keeper.held for keeper in leases]
                registered = [_registered(node, account_id) for node in (a, b)]
                return holders.count(True) == 1 and registered == holders

            await _until(one_holder, a, b)
            assert await ask(kamailio, "OPTIONS", ALICE.user) == 200
            holder, other = (b, a) if account_id in leases[1].held else (a, b)
            if holder is b:
                await b_stack.aclose()  # a clean stop lets go of its leases
            else:
                await stack.aclose()
            await _until(lambda: _registered(other, account_id), other)
            assert account_id in other.app[SIPIS_LEASES].held
            assert await ask(kamailio, "OPTIONS", ALICE.user) == 200
        finally:
            await b_stack.aclose()
