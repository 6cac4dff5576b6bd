"""In a cluster each SIPIS account is registered by exactly one node: the holder of its
lease in Redis.

    leases = Leases(shared, secret, ttl=30.0, clock=clock)
    keeper = LeaseKeeper(leases, accounts, registrations)
    await keeper.turn()          # every ttl/3 (`run_forever`): renew, take, let go
    await leases.holder(account_id)   # the live node holding it now, if any

A lease is the key `sipis:lease:<keyed hash of the account id>` (the cluster secret
keys the hash: Redis never sees the account id, which is the user part of the Contact
registered at the provider) holding `<node id> <expires at>`. One Lua script per turn
takes, for every account the store says must be registered, the leases that are free,
expired (by the caller's clock, so tests move time) or already ours, and renews ours;
the key's Redis TTL (twice the lease) only clears what nobody renews.

Each turn the node's registrar engine is brought in line: an account whose lease it
now holds is added (within the start spread: a dead node's accounts are taken over
without a burst), one whose lease it lost is dropped WITHOUT un-REGISTER (the new
holder's REGISTER replaces the binding; an un-REGISTER would cut it off). A node that
stops releases its leases, so another node takes them over at its next turn instead of
after the TTL; one that dies holds them until they expire. When Redis is unreachable
the node keeps what it registers (its leases cannot be taken either while Redis is
out of everyone's reach) and tries again at the next turn.

Policy: the lease key holds a keyed hash and a node id, category `location` (memory
only, Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from collections.abc import Collection

from cluster.redis import NODES_PREFIX, ClusterUnavailable, SharedRedis
from privacy.clock import Clock
from sipis.accounts import Accounts
from sipis.registrar import Registrations

log = logging.getLogger("softrelay.sipis")

LEASE_PREFIX = "sipis:lease:"

# KEYS: the leases; ARGV: node id, now, lease seconds, Redis TTL (ms). For each key:
# 1 when this node holds it afterwards (taken or renewed), else 0.
_CLAIM = """
local held = {}
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  local take = not value
  if value then
    local node, expires = string.match(value, '^(%S+) (%S+)$')
    take = node == ARGV[1] or not expires or tonumber(expires) <= tonumber(ARGV[2])
  end
  if take then
    redis.call('SET', key, ARGV[1] .. ' ' .. (tonumber(ARGV[2]) + tonumber(ARGV[3])),
               'PX', ARGV[4])
    held[i] = 1
  else
    held[i] = 0
  end
end
return held
"""

# KEYS: the leases; ARGV: node id. Deletes those this node holds.
_RELEASE = """
local n = 0
for _, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if value and string.match(value, '^(%S+) ') == ARGV[1] then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
"""
# KEYS: the lease; ARGV: now, the prefix of the nodes' heartbeat keys. The holder's node
# id while its lease runs and its heartbeat lives, else false.
_HOLDER = """
local value = redis.call('GET', KEYS[1])
if not value then return false end
local node, expires = string.match(value, '^(%S+) (%S+)$')
if not node or not tonumber(expires) or tonumber(expires) <= tonumber(ARGV[1]) then
  return false
end
if redis.call('EXISTS', ARGV[2] .. node) == 0 then return false end
return node
"""
_BATCH = 500  # keys per script call: one call must not hold Redis for long


class Leases:
    """This node's side of the account leases (module docstring)."""

    def __init__(self, shared: SharedRedis, secret: str, ttl: float, clock: Clock) -> None:
        self.node_id = shared.node_id
        self.ttl = ttl
        self._clock = clock
        self._key = hashlib.sha256(b"softrelay sipis lease\0" + secret.encode()).digest()
        self._claim = shared.script(_CLAIM)
        self._release = shared.script(_RELEASE)
        self._holder = shared.script(_HOLDER)

    def key(self, account_id: str) -> str:
        digest = hmac.digest(self._key, account_id.encode(), "sha256")[:16].hex()
        return LEASE_PREFIX + digest

    async def claim(self, account_ids: Collection[str]) -> set[str]:
        """Take or renew the leases of these accounts; the ones this node holds now."""
        ids = list(account_ids)
        held: set[str] = set()
        now = self._clock.now()
        for start in range(0, len(ids), _BATCH):
            batch = ids[start : start + _BATCH]
            answer = await self._claim(
                "sipis lease",
                [self.key(account_id) for account_id in batch],
                [self.node_id, repr(now), repr(self.ttl), int(self.ttl * 2000)],
            )
            assert isinstance(answer, list)
            held.update(a for a, ok in zip(batch, answer, strict=True) if int(ok) == 1)
        return held

    async def holder(self, account_id: str) -> str | None:
        """The node that holds the account's lease now (this one included), if its lease
        runs and its heartbeat lives: where the account's calls and texts arrive, and so
        where its app's connection belongs (sipis/appleg.py). ClusterUnavailable when
        Redis cannot say."""
        answer = await self._holder(
            "sipis lease holder", [self.key(account_id)], [repr(self._clock.now()), NODES_PREFIX]
        )
        if isinstance(answer, bytes):
            return answer.decode()
        return answer if isinstance(answer, str) else None

    async def release(self, account_ids: Collection[str]) -> None:
        ids = list(account_ids)
        for start in range(0, len(ids), _BATCH):
            keys = [self.key(account_id) for account_id in ids[start : start + _BATCH]]
            await self._release("sipis lease release", keys, [self.node_id])


class LeaseKeeper:
    """Keeps this node's registrar engine to the accounts whose lease it holds."""

    def __init__(self, leases: Leases, accounts: Accounts, engine: Registrations) -> None:
        self.leases = leases
        self.accounts = accounts
        self.engine = engine
        self.held: set[str] = set()
        self._turned = asyncio.Event()  # set, and replaced, at the end of each turn

    async def turn(self) -> None:
        """One round: which accounts must be registered (the store), which of them this
        node holds (Redis), and the engine brought in line."""
        active = {account.account_id: account for account in await self.accounts.list_active()}
        held = await self.leases.claim(active)
        for account_id in list(self.engine.account_ids()):
            if account_id not in held and account_id in active:
                # Lost (another node took it while we could not renew): stop quietly,
                # the holder's REGISTER replaces our binding.
                await self.engine.remove(account_id, unregister=False)
        for account_id in held:
            if self.engine.status(account_id) is None:
                self.engine.add(active[account_id])
        self.held = held
        turned, self._turned = self._turned, asyncio.Event()
        turned.set()

    async def next_turn(self) -> None:
        """Until the end of the turn under way or the next one (tests)."""
        await self._turned.wait()

    async def run_forever(self) -> None:
        while True:
            try:
                await self.turn()
            except ClusterUnavailable as exc:
                log.warning("sipis.lease_unavailable", extra={"fields": {"error": str(exc)}})
            await asyncio.sleep(self.leases.ttl / 3)

    async def close(self) -> None:
        """Let go of this node's leases (a clean stop): another node takes them at its
        next turn. The bindings stay at the providers until the new holder registers."""
        with contextlib.suppress(ClusterUnavailable):  # else they expire
            await self.leases.release(self.held)
        self.held = set()
