"""The `[usage]` section: tenants and their keys, the month's windows, limits.

Parsed once at start. A tenant key never sits in the configuration itself: it comes
from `env:NAME` or `file:PATH`, like the PBX secrets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tomlsections.reader import Section

DAY = 86400
_TENANT = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
MIN_KEY_CHARS = 16
# The longest month, for checking that the windows fit inside the policy's retention.
LONGEST_MONTH = 31 * DAY


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    key: str = field(repr=False)  # the bearer key its apps ping with
    # Distinct installs per month in its contract; past it the tenant is flagged, never
    # dropped. 0: no cap.
    max_installs: int = 0


@dataclass(frozen=True, slots=True)
class UsageSettings:
    tenants: tuple[Tenant, ...] = ()
    # After a month ends, pings for it are still taken this long (apps that were
    # offline); then the month is closed.
    grace: int = 3 * DAY
    # After the close, the month's raw ids stay this long for disputes, then only the
    # counts remain.
    dispute_window: int = 30 * DAY
    max_body: int = 1024  # bytes of one ping
    # Per source IP, in memory only: a bucket of `ip_burst` pings refilled at
    # `ip_burst` per `ip_window`. ip_burst 0 turns it off (behind a load balancer).
    ip_burst: int = 20
    ip_window: int = 3600
    max_tracked_ips: int = 100_000
    source: str = "<defaults>"  # the configuration file, for errors found later

    def tenant(self, tenant_id: str) -> Tenant | None:
        for tenant in self.tenants:
            if tenant.id == tenant_id:
                return tenant
        return None


def parse_usage(sec: Section) -> UsageSettings:
    grace = sec.duration("grace", "3d")
    dispute = sec.duration("dispute_window", "30d")
    max_body = sec.integer("max_body", 1024, minimum=256)
    ip_burst = sec.integer("ip_burst", 20, minimum=0)
    ip_window = sec.duration("ip_window", "1h")
    if ip_window < 1:
        raise sec.error("ip_window", "must be at least 1s")
    max_ips = sec.integer("max_tracked_ips", 100_000, minimum=1)
    tenants = tuple(_parse_tenant(t) for t in sec.sections("tenant"))
    sec.finish()
    if grace > 28 * DAY:
        raise sec.error("grace", "must be at most 28d (a month is still open in the next one)")
    seen: set[str] = set()
    for index, tenant in enumerate(tenants):
        if tenant.id in seen:
            raise sec.error(f"tenant[{index}].id", f"tenant {tenant.id!r} is declared twice")
        seen.add(tenant.id)
    return UsageSettings(
        tenants, grace, dispute, max_body, ip_burst, ip_window, max_ips, str(sec.file)
    )


def check_retention(settings: UsageSettings, retention: int, policy_file: Path | str) -> str | None:
    """Why the windows cannot work under the policy's `usage` retention, or None.

    A ping of the 1st must outlive the month, the grace window and the dispute window,
    or the sweeper would delete ids before the month is counted."""
    needed = LONGEST_MONTH + settings.grace + settings.dispute_window
    if needed > retention:
        return (
            f"31 days + grace + dispute_window is {needed // DAY}d, longer than the "
            f"policy's usage retention of {retention // DAY}d ({policy_file})"
        )
    return None


def _parse_tenant(sec: Section) -> Tenant:
    tenant_id = sec.text("id")
    if not _TENANT.match(tenant_id):
        raise sec.error("id", "lower-case letters, digits, '.', '_' and '-', at most 64")
    key = sec.secret("key")
    cap = sec.integer("max_installs", 0, minimum=0)
    sec.finish()
    if len(key) < MIN_KEY_CHARS:
        raise sec.error("key", f"a tenant key needs at least {MIN_KEY_CHARS} characters")
    return Tenant(tenant_id, key, cap)
