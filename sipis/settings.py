"""The `[sipis]` section: SIPIS mode on or off, the accounts API's limits, and the
registrar engine's timing (registrar.py reads those).

Off by default: without `enabled = true` nothing of SIPIS mode runs, no route is added,
no account is read, and `softrelay serve` behaves as it did before.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from tomlsections.reader import Section, parse_duration
from webapi.ratelimit import RateLimit, parse_rate

# Sub-second durations (the SIP timer T1 is 500 ms); the other keys take parse_duration's.
_MILLIS = re.compile(r"^\s*(\d+)\s*ms\s*$")
_PERCENT = re.compile(r"^\s*(\d{1,3})\s*%\s*$")
MAX_BODY = 16 * 1024  # an account's JSON: a URI, names, two HA1s, a push token


@dataclass(frozen=True, slots=True)
class SipisSettings:
    enabled: bool = False
    # REGISTER: the Expires asked for (the provider may grant less, or answer 423).
    expires: int = 600
    # Re-REGISTER when this fraction of the time the provider granted has passed.
    refresh: float = 0.85
    # After a start, the accounts' first REGISTERs are spread at random over this long,
    # so a thousand accounts do not register in the same second.
    start_spread: int = 60
    rate_per_registrar: int = 20  # REGISTERs per second to one registrar host, at most
    backoff_first: int = 5  # seconds before the first retry of a failed registration
    backoff_cap: int = 600  # the longest wait between retries (the backoff doubles up to it)
    t1: float = 0.5  # SIP timer T1 (RFC 3261 17.1.1.1): retransmissions over UDP
    # The host (or IP) and port of the Contact softrelay registers, when the provider
    # cannot reach the address it sends from (NAT); "" and 0: the socket's own.
    contact_host: str = ""
    contact_port: int = 0
    # `POST /sipis/v1/accounts` and the account's routes, per client address.
    rate: RateLimit = field(default_factory=lambda: RateLimit(per_minute=30, burst=10))
    max_body: int = MAX_BODY
    # An app names the registrar the server sends REGISTERs to: by default no loopback,
    # private, link-local or unspecified address (nor a name resolving to one), so an
    # app cannot point the server at hosts inside its network. A deployment whose
    # providers are on its own network (or a test's Kamailio on 127.0.0.1) allows them.
    allow_private_registrars: bool = False
    # Each registration is held by one node of a cluster (sipis/lease.py): the lease
    # lapses this long after its holder stops renewing it (renewed at a third of it).
    lease_ttl: float = 30.0
    # How long a call for a sleeping app waits for it to connect after the push (SIPIS
    # waits two minutes); then the caller gets 480 with a reason (sipis/calls.py).
    wake_timeout: float = 120.0
    # TLS to registrars: trust this PEM CA file instead of the system's (a provider
    # with a private CA); None: the system's.
    registrar_ca: Path | None = None


def parse_sipis(sec: Section) -> SipisSettings:
    default = SipisSettings()
    enabled = sec.flag("enabled", False)
    expires = sec.duration("expires", "600s")
    refresh = _fraction(sec, "refresh", "85%")
    spread = sec.duration("start_spread", "60s")
    rate = sec.integer("rate_per_registrar", default.rate_per_registrar, minimum=1)
    first = sec.duration("backoff_first", "5s")
    cap = sec.duration("backoff_cap", "10m")
    t1 = _seconds(sec, "t1", "500ms")
    contact_host = sec.text("contact_host", "")
    contact_port = sec.integer("contact_port", 0, minimum=0)
    api_rate = parse_rate(sec, default.rate)
    allow_private = sec.flag("allow_private_registrars", False)
    lease_ttl = sec.duration("lease_ttl", "30s")
    wake_timeout = sec.duration("wake_timeout", "2m")
    registrar_ca = sec.text("registrar_ca", "")
    if registrar_ca:
        try:  # loaded once now, so a bad file stops the start with its key named
            ssl.create_default_context(cafile=registrar_ca)
        except (ssl.SSLError, OSError) as exc:
            raise sec.error("registrar_ca", f"{registrar_ca} holds no usable PEM CA") from exc
    sec.finish()
    if not 5 <= wake_timeout <= 600:
        raise sec.error("wake_timeout", "must be between 5s and 10m")
    if not 3 <= lease_ttl <= 600:
        raise sec.error("lease_ttl", "must be between 3s and 10m")
    if not 60 <= expires <= 86400:
        raise sec.error("expires", "must be between 60s and 1d")
    if not 0.1 <= refresh <= 0.95:
        raise sec.error("refresh", "must be between 10% and 95% of the granted time")
    if contact_port > 65535:
        raise sec.error("contact_port", "must be a port number (0: the socket's own)")
    if first < 1:
        raise sec.error("backoff_first", "must be at least 1s")
    if cap < first:
        raise sec.error("backoff_cap", "must be at least backoff_first")
    if not 0.05 <= t1 <= 10:
        raise sec.error("t1", "must be between 50ms and 10s")
    if any(c.isspace() for c in contact_host) or any(c in contact_host for c in "<>;@"):
        raise sec.error("contact_host", "expected a host name or an IP address")
    return SipisSettings(
        enabled=enabled,
        expires=expires,
        refresh=refresh,
        start_spread=spread,
        rate_per_registrar=rate,
        backoff_first=first,
        backoff_cap=cap,
        t1=t1,
        contact_host=contact_host,
        contact_port=contact_port,
        rate=api_rate,
        allow_private_registrars=allow_private,
        lease_ttl=float(lease_ttl),
        wake_timeout=float(wake_timeout),
        registrar_ca=Path(registrar_ca) if registrar_ca else None,
    )


def _seconds(sec: Section, key: str, default: str) -> float:
    """A duration that may be given in milliseconds ("500ms") or as parse_duration takes."""
    text = sec.text(key, default)
    millis = _MILLIS.match(text)
    if millis is not None:
        return int(millis.group(1)) / 1000
    return float(parse_duration(text, sec.file, sec.key(key)))


def _fraction(sec: Section, key: str, default: str) -> float:
    """A share written as a percentage ("85%")."""
    text = sec.text(key, default)
    match = _PERCENT.match(text)
    if match is None:
        raise sec.error(key, f"expected a percentage like '85%', got {text!r}")
    return int(match.group(1)) / 100
