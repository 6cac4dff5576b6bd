"""The `[sip]` section: the relay's domain, its PBXs and their secrets, limits."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from privacy.declaration import Section

_SERIAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")


@dataclass(frozen=True, slots=True)
class PbxSettings:
    serial: str
    secret: str = field(repr=False)  # the digest secret the PBX registers with


@dataclass(frozen=True, slots=True)
class SipSettings:
    # Phones register sip:<user>@<serial>.<domain>; PBXs register sip:<serial>@<domain>.
    domain: str = "relay.invalid"
    pbxs: tuple[PbxSettings, ...] = ()
    # A binding's last use is written at most this often while it keeps refreshing.
    last_use_interval: int = 3600

    def pbx(self, serial: str) -> PbxSettings | None:
        for pbx in self.pbxs:
            if pbx.serial == serial:
                return pbx
        return None


def parse_sip(sec: Section) -> SipSettings:
    domain = sec.text("domain", "relay.invalid").lower()
    if not re.fullmatch(r"[a-z0-9.-]+", domain):
        raise sec.error("domain", f"expected a host name, got {domain!r}")
    pbxs = tuple(_parse_pbx(pbx) for pbx in sec.sections("pbx"))
    serials = [p.serial for p in pbxs]
    for serial in serials:
        if serials.count(serial) > 1:
            raise sec.error("pbx", f"serial {serial!r} is configured twice")
    settings = SipSettings(
        domain=domain,
        pbxs=pbxs,
        last_use_interval=sec.duration("last_use_interval", "1h"),
    )
    sec.finish()
    return settings


def _parse_pbx(sec: Section) -> PbxSettings:
    serial = sec.text("serial")
    if not _SERIAL.match(serial):
        raise sec.error("serial", "letters, digits and dashes only")
    source = sec.text("secret")
    sec.finish()
    return PbxSettings(serial, _secret(sec, source))


def _secret(sec: Section, source: str) -> str:
    """`env:NAME` or `file:PATH`: a secret never sits in the configuration itself."""
    if source.startswith("env:"):
        value = os.environ.get(source[4:], "")
        if not value:
            raise sec.error("secret", f"environment variable {source[4:]} is not set")
        return value
    if source.startswith("file:"):
        try:
            value = Path(source[5:]).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise sec.error("secret", f"cannot read {source[5:]}: {exc.strerror}") from None
        if not value:
            raise sec.error("secret", f"{source[5:]} is empty")
        return value
    raise sec.error("secret", "must be 'env:NAME' or 'file:PATH'")
