"""The per-tenant cap on distinct ids per month, which flags and never drops. (The
per-IP rate of the ping endpoint is `webapi.ratelimit`'s, like every web relay's.)"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Gauge

from usage.settings import Tenant

log = logging.getLogger("softrelay.usage")


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
