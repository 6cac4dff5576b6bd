"""Each SIPIS account is registered by one node of a cluster (sipis/lease.py), on a real
Redis and a real Kamailio: two nodes (each its registrar engine and lease keeper) see
the same stored account, only the lease holder registers it; the holder dies (its
engine closed, its lease not released) and the other node takes over once the lease
expired - by the lease clock, which the test moves - and registers it again; a node
that stops cleanly releases its leases and the other takes them at its next turn.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from cluster.redis import SharedRedis
from cluster.settings import ClusterSettings
from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.store import Store
from sipis.accounts import Accounts
from sipis.lease import LEASE_PREFIX, LeaseKeeper, Leases
from tests.kamailio import Kamailio
from tests.sipis.test_registrar_kamailio import (
    ALICE,
    World,
    account,
    ask,
    kamailio,  # noqa: F401 - the fixture
    make_world,
    registered,
    registers_logged,
)

SECRET = "lease-secret-" + "x" * 16
TTL = 30.0
Node = tuple[World, LeaseKeeper, SharedRedis]  # one node: its world, lease keeper, Redis


@contextlib.asynccontextmanager
async def node(
    redis_url: str, name: str, accounts: Accounts, clock: ManualClock
) -> AsyncIterator[Node]:
    settings = ClusterSettings(redis_url=redis_url, secret=SECRET, node_id=name, timeout=2.0)
    shared = await SharedRedis.create(settings)
    try:
        async with make_world() as world:
            leases = Leases(shared, SECRET, TTL, clock)
            yield world, LeaseKeeper(leases, accounts, world.regs), shared
    finally:
        await shared.close()


@contextlib.asynccontextmanager
async def two_nodes(
    redis_url: str, accounts: Accounts, clock: ManualClock
) -> AsyncIterator[tuple[Node, Node]]:
    """Nodes A and B on the same Redis, store and lease clock."""
    async with (
        node(redis_url, "node-a", accounts, clock) as a,
        node(redis_url, "node-b", accounts, clock) as b,
    ):
        yield a, b


async def alice_stored(server: Kamailio, store: Store) -> tuple[Accounts, str, ManualClock]:
    """ALICE's account stored for the nodes to share (its id), and their lease clock."""
    accounts = Accounts(store, Keyring.generate())
    stored, _ = await accounts.create(account(server, ALICE))
    return accounts, stored.account_id, ManualClock(1_800_000_000.0)


async def test_one_node_registers_and_the_other_takes_over_when_it_dies(
    kamailio: Kamailio,  # noqa: F811
    redis_url: str,
    store: Store,
) -> None:
    accounts, account_id, clock = await alice_stored(kamailio, store)
    async with two_nodes(redis_url, accounts, clock) as ((a, keeper_a, shared), (b, keeper_b, _)):
        await keeper_a.turn()
        await keeper_b.turn()
        assert keeper_a.held == {account_id}
        assert keeper_b.held == set()
        assert b.regs.account_ids() == []
        await a.until(account_id, registered)
        assert await ask(kamailio, "OPTIONS", ALICE.user) == 200
        # Redis holds a keyed hash of the id, never the id.
        found = await shared.client.keys(LEASE_PREFIX + "*")
        keys = [k.decode() if isinstance(k, bytes) else k for k in found]
        assert keys == [keeper_a.leases.key(account_id)]
        assert account_id not in keys[0]
        first = set(registers_logged(kamailio))
        # Renewed by its holder: still A's after more than a lease's time.
        for _ in range(3):
            clock.advance(TTL / 2)
            await keeper_a.turn()
            await keeper_b.turn()
        assert (keeper_a.held, keeper_b.held) == ({account_id}, set())

        # A dies: its engine stops, its lease is not released.
        await a.regs.close()
        clock.advance(TTL - 1)
        await keeper_b.turn()
        assert keeper_b.held == set()  # not before the lease lapsed
        clock.advance(2)
        await keeper_b.turn()
        assert keeper_b.held == {account_id}
        await b.until(account_id, registered)
        assert set(registers_logged(kamailio)) - first  # from B's own socket
        assert await ask(kamailio, "OPTIONS", ALICE.user) == 200


async def test_a_clean_stop_hands_the_lease_over_at_the_next_turn(
    kamailio: Kamailio,  # noqa: F811
    redis_url: str,
    store: Store,
) -> None:
    accounts, account_id, clock = await alice_stored(kamailio, store)
    async with node(redis_url, "node-b", accounts, clock) as (b, keeper_b, _):
        async with node(redis_url, "node-a", accounts, clock) as (a, keeper_a, _):
            await keeper_a.turn()
            await keeper_b.turn()
            await a.until(account_id, registered)
            await keeper_a.close()
        await keeper_b.turn()  # no time passed
        assert keeper_b.held == {account_id}
        await b.until(account_id, registered)


async def test_a_node_that_lost_its_lease_stops_without_unregistering(
    kamailio: Kamailio,  # noqa: F811
    redis_url: str,
    store: Store,
) -> None:
    accounts, account_id, clock = await alice_stored(kamailio, store)
    async with two_nodes(redis_url, accounts, clock) as ((a, keeper_a, _), (b, keeper_b, _)):
        await keeper_a.turn()
        await a.until(account_id, registered)
        clock.advance(TTL + 1)  # A could not renew (paused, cut off from Redis)
        await keeper_b.turn()
        await b.until(account_id, registered)
        await keeper_a.turn()  # A sees it lost the lease
        assert keeper_a.held == set()
        assert a.regs.account_ids() == []
        assert a.sent("unregistered") == 0  # B's binding is not cut off
        assert await ask(kamailio, "OPTIONS", ALICE.user) == 200
