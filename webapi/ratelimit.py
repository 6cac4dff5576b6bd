"""Token buckets: every rate limit of softrelay, and what a per-client limit counts
(HTTP and SIP alike).

    limiter = RateLimiter(RateLimit(per_minute=60, burst=20), clock)
    wait = limiter.check(request.remote)   # per client: 0.0, or seconds to wait
    wait = limiter.take("project-1")       # any key: a crash project, a DSR subject
    wait = limiter.wait(key)               # as take, but nothing is taken
    wait = limiter.take(key, cost=500)     # a batch: 500 tokens at once, or none

The endpoints do not build their limiters: the composition root hands each a
`Limiters` (softrelay/app.py), and the endpoint asks it for one by name:

    limiter = limiters("usage", RateLimit(...))    # a `Limiter`: await limiter.check(...)

`LocalLimiters` gives buckets in this process's memory (one process alone, the default);
`SharedLimiters` gives buckets in Redis that every node of a cluster takes from
(`[cluster]`), so a client cannot multiply its allowance by the number of nodes. The
endpoints cannot tell them apart; a shared one may raise `ClusterUnavailable`, which
the HTTP middleware answers with 503.

A bucket holds `burst` tokens, refilled at `per_minute`; each request takes one. Its
users: the web relays and the usage ping (per client), crash ingest (per project), and
the DSR's failed identity proofs (`take` per failure, `wait` before each attempt: at
most `burst` failures at once, then one per `60 / per_minute` seconds).

The table is kept in last-use order, and an entry whose bucket would be full again is
dropped at the next request, so no key stays in memory longer than it takes to refill
its bucket (`burst` / `per_minute` minutes), and never more than `max_tracked` of them
at once (the least recent go first: forgetting a bucket can only be generous).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network
from typing import Protocol

from cluster.redis import ClusterUnavailable, Script, SharedRedis
from privacy.clock import Clock
from tomlsections.reader import Section


@dataclass(frozen=True, slots=True)
class RateLimit:
    per_minute: float = 60  # 0: no limit
    burst: int = 20
    max_tracked: int = 100_000  # keys tracked at once; the least recent go first

    @classmethod
    def per_window(cls, count: int, seconds: float, max_tracked: int = 100_000) -> RateLimit:
        """`count` at once, refilled at `count` per `seconds` (`count` 0: no limit)."""
        return cls(count * 60 / seconds, max(1, count), max_tracked)


def parse_rate(sec: Section, default: RateLimit) -> RateLimit:
    """`rate_per_minute` (0: no limit) and `rate_burst` of a configuration section."""
    return RateLimit(
        per_minute=sec.integer("rate_per_minute", default.per_minute, minimum=0),
        burst=sec.integer("rate_burst", default.burst, minimum=1),
    )


class RateLimiter:
    """A token bucket per key (see the module doc)."""

    def __init__(self, limit: RateLimit, clock: Clock) -> None:
        self._limit = limit
        self._clock = clock
        self._rate = limit.per_minute / 60.0  # tokens per second
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, address: str | None) -> float:
        """Take one token for the client at `address` (counted by `client_key`)."""
        return self.take(client_key(address))

    def take(self, key: str, cost: int = 1) -> float:
        """Take `cost` tokens for `key`: 0.0 if there were, else the seconds until there
        are (and nothing is taken). A cost above the burst can never be paid: ValueError."""
        if self._rate <= 0:
            return 0.0
        _check_cost(cost, self._limit)
        now = self._clock.now()
        tokens = self._tokens(key, now)
        self._buckets.pop(key, None)
        if tokens >= cost:
            self._buckets[key] = (tokens - cost, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (cost - tokens) / self._rate
        while len(self._buckets) > self._limit.max_tracked:
            self._buckets.popitem(last=False)
        return wait

    def wait(self, key: str) -> float:
        """The seconds until `key` has a token (0.0: now), taking none."""
        if self._rate <= 0:
            return 0.0
        tokens = self._tokens(key, self._clock.now())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._rate

    def _tokens(self, key: str, now: float) -> float:
        self._forget_refilled(now)
        burst = float(self._limit.burst)
        tokens, when = self._buckets.get(key, (burst, now))
        return min(burst, tokens + max(0.0, now - when) * self._rate)

    def _forget_refilled(self, now: float) -> None:
        refill = self._limit.burst / self._rate
        while self._buckets:
            key, (_, when) = next(iter(self._buckets.items()))
            if when + refill > now:
                return
            del self._buckets[key]


def _check_cost(cost: int, limit: RateLimit) -> None:
    if not 1 <= cost <= limit.burst:
        raise ValueError(f"a cost of {cost} cannot be taken from a bucket of {limit.burst}")


def client_key(address: str | None) -> str:
    """What a per-client limit counts, over HTTP and SIP alike: an IPv4 address itself
    (/32); an IPv6 one by its /64, as `2001:db8:1:2::/64` (a host holds a whole /64 and
    picks any address of it at will, so single addresses would not limit it), without
    the zone of a link-local one; an IPv4-mapped IPv6 one as its IPv4 address. "" when
    unknown; anything that is no address, as it is."""
    if not address:
        return ""
    if ":" not in address:
        return address  # IPv4 as the socket gives it: parsing it costs more than the check
    try:
        parsed = IPv6Address(address.partition("%")[0])
    except ValueError:
        return address
    if parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(IPv6Network((parsed, 64), strict=False))


# One token bucket in Redis, taken atomically. `now` is the caller's clock (the nodes'
# clocks, or a test's), never Redis's TIME: a bucket refills as the callers' time says.
# A node whose clock is behind refills nothing (the stored time only moves forward).
# The key lives until the bucket would be full again, plus a minute (EXPIRE runs on
# Redis's clock), so Redis holds no counter longer than it counts (policy:
# cluster_limits). Returns the wait as a string: Lua numbers become integers in replies.
_TAKE_LUA = """
local now = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local take = ARGV[4] == "1"
local cost = tonumber(ARGV[5])
local state = redis.call("HMGET", KEYS[1], "t", "w")
local tokens = tonumber(state[1])
local when = tonumber(state[2])
if tokens == nil or when == nil then
  tokens = burst
  when = now
end
if now > when then
  tokens = math.min(burst, tokens + (now - when) * rate)
  when = now
end
local wait = 0
if tokens >= cost then
  if take then
    tokens = tokens - cost
  end
else
  wait = (cost - tokens) / rate
end
if take then
  redis.call("HSET", KEYS[1], "t", tostring(tokens), "w", tostring(when))
  redis.call("PEXPIRE", KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 60000)
end
return tostring(wait)
"""


class Limiter(Protocol):
    """A rate limit as an endpoint sees it: `RateLimiter`'s methods, awaited."""

    async def check(self, address: str | None) -> float: ...

    async def take(self, key: str, cost: int = 1) -> float: ...

    async def wait(self, key: str) -> float: ...


class Limiters(Protocol):
    """Where an app's rate limits keep their buckets: `limiters(name, limit)` is the
    limiter `name` (unique per app: it names the buckets) with `limit`."""

    def __call__(self, name: str, limit: RateLimit) -> Limiter: ...


class LocalLimiter:
    """A `RateLimiter` in this process's memory, behind the awaited `Limiter` methods."""

    def __init__(self, limit: RateLimit, clock: Clock) -> None:
        self.buckets = RateLimiter(limit, clock)

    async def check(self, address: str | None) -> float:
        return self.buckets.take(client_key(address))  # RateLimiter.check, one call less

    async def take(self, key: str, cost: int = 1) -> float:
        return self.buckets.take(key, cost)

    async def wait(self, key: str) -> float:
        return self.buckets.wait(key)


class LocalLimiters:
    """Buckets in memory: one process alone (no `[cluster]`)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def __call__(self, name: str, limit: RateLimit) -> LocalLimiter:
        return LocalLimiter(limit, self._clock)


class SharedLimiters:
    """Buckets in Redis, shared by every node of the cluster. The limiters are made
    when the app is built, the Redis connection is opened later (the app's cluster
    context `connect`s it): until then, and after `disconnect`, a limiter raises
    ClusterUnavailable (a limit that protects fails closed)."""

    def __init__(self, clock: Clock, shared: SharedRedis | None = None) -> None:
        self._clock = clock
        self._connection: tuple[SharedRedis, Script, bytes] | None = None
        if shared is not None:
            self.connect(shared)

    def connect(self, shared: SharedRedis) -> None:
        # Keys are hashed under a key derived from the cluster secret, which every node
        # shares: the same client has the same bucket on every node.
        hash_key = hashlib.sha256(shared.settings.secret.encode()).digest()
        self._connection = (shared, shared.script(_TAKE_LUA), hash_key)

    def disconnect(self) -> None:
        self._connection = None

    def __call__(self, name: str, limit: RateLimit) -> SharedRateLimiter:
        return SharedRateLimiter(limit, self._clock, self, name)

    def connection(self) -> tuple[SharedRedis, Script, bytes]:
        if self._connection is None:
            raise ClusterUnavailable("this node has no connection to the cluster's Redis")
        return self._connection


class SharedRateLimiter:
    """The token buckets of `RateLimiter`, kept in Redis so that every node of a cluster
    takes from the same allowance: a client cannot multiply it by the number of nodes.

    The same methods, awaited (a Redis round trip). A key is stored as a keyed hash
    (BLAKE2b under the cluster secret, which every node shares): Redis never holds a
    client's address or a subject's name. Redis unreachable: `ClusterUnavailable`, which
    the HTTP middleware answers with 503 and Retry-After (webapi/errors.py): a limit that
    protects fails closed, never lets a request through uncounted.
    """

    def __init__(self, limit: RateLimit, clock: Clock, limiters: SharedLimiters, name: str) -> None:
        self._limit = limit
        self._clock = clock
        self._rate = limit.per_minute / 60.0
        self._limiters = limiters
        self._prefix = f"ratelimit:{name}:"

    async def check(self, address: str | None) -> float:
        return await self.take(client_key(address))

    async def take(self, key: str, cost: int = 1) -> float:
        """As RateLimiter.take, on the bucket all nodes share."""
        _check_cost(cost, self._limit)
        return await self._run(key, take=True, cost=cost)

    async def wait(self, key: str) -> float:
        """As RateLimiter.wait, on the bucket all nodes share."""
        return await self._run(key, take=False)

    def bucket(self, key: str) -> str:
        """The Redis key of `key`'s bucket: a keyed hash, never the key itself."""
        hash_key = self._limiters.connection()[2]
        digest = hashlib.blake2b(key.encode(), key=hash_key, digest_size=16).hexdigest()
        return self._prefix + digest

    async def _run(self, key: str, *, take: bool, cost: int = 1) -> float:
        if self._rate <= 0:
            return 0.0
        script = self._limiters.connection()[1]
        args: list[str | float | int] = [
            repr(self._clock.now()),
            repr(self._rate),
            self._limit.burst,
            "1" if take else "0",
            cost,
        ]
        reply = await script("rate limit", [self.bucket(key)], args)
        if not isinstance(reply, bytes | str):
            raise ClusterUnavailable(f"the rate limit script answered {type(reply).__name__}")
        return float(reply)
