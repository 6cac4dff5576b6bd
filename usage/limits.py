"""Limits of the ping endpoint: a per-IP rate held only in memory, and the per-tenant
cap on distinct ids per month, which flags and never drops.

The addresses in the buckets live in this process's memory only: never stored, never
logged, gone at restart, and the oldest bucket is evicted past `max_tracked_ips`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from prometheus_client import CollectorRegistry, Gauge

from privacy.clock import Clock
from usage.settings import Tenant

log = logging.getLogger("softrelay.usage")


class IpBuckets:
    """A token bucket per source address: `burst` pings, refilled at `burst` per
    `window` seconds. A burst of 0 turns the limit off."""

    def __init__(self, burst: int, window: float, max_tracked: int, clock: Clock) -> None:
        self._burst = float(burst)
        self._rate = burst / window
        self._max = max_tracked
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # ip -> tokens, at

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, ip: str) -> float:
        """0 if the ping may go on, else the seconds until the next token."""
        if not self._burst:
            return 0.0
        now = self._clock.now()
        tokens, at = self._buckets.pop(ip, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if tokens < 1.0:
            self._buckets[ip] = (tokens, now)
            return (1.0 - tokens) / self._rate
        self._buckets[ip] = (tokens - 1.0, now)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)  # least recently seen
        return 0.0


class CapWatch:
    """Flags a tenant whose distinct ids this month pass its contract: once per month
    in the service log, and as a gauge for alerting. Its pings are still counted."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._flagged: set[tuple[str, str]] = set()
        self.over_cap = Gauge(
            "softrelay_usage_over_cap",
            "1 while a tenant has more distinct installs this month than its contract",
            ["tenant", "period"],
            registry=registry,
        )

    def check(self, tenant: Tenant, period: str, distinct: int) -> bool:
        if not tenant.max_installs or distinct <= tenant.max_installs:
            return False
        if (tenant.id, period) not in self._flagged:
            self._flagged.add((tenant.id, period))
            self.over_cap.labels(tenant.id, period).set(1)
            log.warning(
                "usage tenant over its contracted installs",
                extra={"fields": {"tenant": tenant.id, "period": period, "count": distinct}},
            )
        return True

    def forget(self, period: str) -> None:
        for key in [k for k in self._flagged if k[1] == period]:
            self._flagged.discard(key)
            self.over_cap.remove(*key)
