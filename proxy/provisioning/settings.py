"""The `[provisioning]` section: sizes, timeouts and rate limits of the provisioning relay.

Which PBXs exist, their secrets and their `provisioning_url` come from `[[sip.pbx]]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tomlsections.reader import Section
from webapi.ratelimit import RateLimit, parse_rate


@dataclass(frozen=True, slots=True)
class ProvisioningSettings:
    max_request_body: int = 1024 * 1024  # what a phone may upload (a POST, a PUT)
    max_response_body: int = 256 * 1024 * 1024  # a firmware image, at most
    timeout: float = 30  # seconds until the PBX's response head arrives
    read_timeout: float = 30  # seconds between two chunks of a body
    max_streams: int = 32  # requests in flight through one PBX's tunnel
    rate: RateLimit = field(default_factory=RateLimit)


def parse_provisioning(sec: Section) -> ProvisioningSettings:
    d = ProvisioningSettings()
    settings = ProvisioningSettings(
        max_request_body=sec.integer("max_request_body", d.max_request_body, minimum=0),
        max_response_body=sec.integer("max_response_body", d.max_response_body, minimum=1),
        timeout=_seconds(sec, "timeout", "30s"),
        read_timeout=_seconds(sec, "read_timeout", "30s"),
        max_streams=sec.integer("max_streams_per_tunnel", d.max_streams, minimum=1),
        rate=parse_rate(sec, d.rate),
    )
    sec.finish()
    return settings


def _seconds(sec: Section, key: str, default: str) -> int:
    value = sec.duration(key, default)
    if value < 1:
        raise sec.error(key, "must be at least 1s")
    return value
