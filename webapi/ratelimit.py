"""Per-client rate limits of the web relays, held in memory only.

A token bucket per client address: `burst` requests at once, refilled at `per_minute`.
IPv6 clients are counted per /64, since one host holds a whole /64 and would
otherwise get a fresh bucket per address. The table is kept in last-use order, and
an entry whose bucket would be full again is dropped at the next request, so no
address stays in memory longer than it takes to refill its bucket (`burst` /
`per_minute` minutes), and never more than `max_tracked` of them at once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network, ip_address

from privacy.clock import Clock
from tomlsections.reader import Section


@dataclass(frozen=True, slots=True)
class RateLimit:
    per_minute: float = 60  # 0: no limit
    burst: int = 20
    max_tracked: int = 100_000  # addresses tracked at once; the least recent go first


def parse_rate(sec: Section, default: RateLimit) -> RateLimit:
    """`rate_per_minute` (0: no limit) and `rate_burst` of a configuration section."""
    return RateLimit(
        per_minute=sec.integer("rate_per_minute", default.per_minute, minimum=0),
        burst=sec.integer("rate_burst", default.burst, minimum=1),
    )


class RateLimiter:
    def __init__(self, limit: RateLimit, clock: Clock) -> None:
        self._limit = limit
        self._clock = clock
        self._rate = limit.per_minute / 60.0  # tokens per second
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, address: str | None) -> float:
        """Take one token for `address`: 0.0 if allowed, else the seconds to wait."""
        if self._rate <= 0:
            return 0.0
        now = self._clock.now()
        self._forget_refilled(now)
        key = client_key(address)
        tokens, when = self._buckets.pop(key, (float(self._limit.burst), now))
        tokens = min(float(self._limit.burst), tokens + max(0.0, now - when) * self._rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self._rate
        while len(self._buckets) > self._limit.max_tracked:
            self._buckets.popitem(last=False)
        return wait

    def _forget_refilled(self, now: float) -> None:
        refill = self._limit.burst / self._rate
        while self._buckets:
            key, (_, when) = next(iter(self._buckets.items()))
            if when + refill > now:
                return
            del self._buckets[key]


def client_key(address: str | None) -> str:
    """What a per-client limit counts: the address, an IPv6 one by its /64 (one host
    holds a whole /64), an IPv4-mapped one as IPv4; "" when unknown."""
    if not address:
        return ""
    if ":" not in address:
        return address  # IPv4 as the socket gives it: parsing it costs more than the check
    try:
        parsed = ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, IPv6Address) and parsed.ipv4_mapped is None:
        return str(IPv6Network((parsed, 64), strict=False).network_address)
    return str(parsed.ipv4_mapped if isinstance(parsed, IPv6Address) else parsed)
