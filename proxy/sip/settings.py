"""The `[sip]` section: the relay's domain, its PBXs and their secrets, limits."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from proxy.sip.overload import OverloadSettings
from proxy.sip.transport_settings import TransportLimits, TransportSettings
from proxy.sip.wake import WakeSettings
from tomlsections.reader import Section, resolve_secret

_SERIAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")


class PbxAuth(StrEnum):
    """How a PBX that dials out proves its serial when it REGISTERs."""

    DIGEST = "digest"  # the digest secret configured for its serial
    MTLS = "mtls"  # a client certificate naming its serial, on a TLS flow
    BOTH = "both"  # the certificate, then the digest secret as well

    @property
    def needs_certificate(self) -> bool:
        return self is not PbxAuth.DIGEST

    @property
    def needs_digest(self) -> bool:
        return self is not PbxAuth.MTLS


@dataclass(frozen=True, slots=True)
class PbxSettings:
    serial: str
    secret: str = field(repr=False)  # the digest secret the PBX registers with
    # A PBX that cannot dial out, reached over UDP at this address instead (tests, labs).
    static: tuple[str, int] | None = None
    auth: PbxAuth = PbxAuth.DIGEST
    # The PBX's provisioning server when it is reachable by URL; else its tunnel serves.
    provisioning_url: str = ""


@dataclass(frozen=True, slots=True)
class SipSettings:
    # Phones register sip:<user>@<serial>.<domain>; PBXs register sip:<serial>@<domain>.
    domain: str = "relay.invalid"
    pbxs: tuple[PbxSettings, ...] = ()
    # A binding's last use is written at most this often while it keeps refreshing.
    last_use_interval: int = 3600
    # The host peers reach us at (Via, Path, Record-Route); empty: the listen address.
    public_host: str = ""
    tls_port: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # The CA of PBX client certificates (mutual TLS); phones may still connect without.
    tls_client_ca: Path | None = None
    limits: TransportLimits = field(default_factory=TransportLimits)
    overload: OverloadSettings = field(default_factory=OverloadSettings)
    wake: WakeSettings = field(default_factory=WakeSettings)
    # Not a key: set by `serve --workers N`, whose workers share the listeners' ports.
    reuse_port: bool = False


def parse_sip(sec: Section) -> SipSettings:
    domain = sec.text("domain", "relay.invalid").lower()
    if not re.fullmatch(r"[a-z0-9.-]+", domain):
        raise sec.error("domain", f"expected a host name, got {domain!r}")
    pbx_sections = sec.sections("pbx")
    pbxs = tuple(_parse_pbx(pbx) for pbx in pbx_sections)
    serials = [p.serial for p in pbxs]
    for serial in serials:
        if serials.count(serial) > 1:
            raise sec.error("pbx", f"serial {serial!r} is configured twice")
    public_host = sec.text("public_host", "")
    tls = sec.section("tls", {})
    cert, key = tls.text("cert", ""), tls.text("key", "")
    tls_port = tls.integer("port", 5061, minimum=0) if cert else None
    client_ca = tls.text("client_ca", "")
    for name, path in (("cert", cert), ("key", key), ("client_ca", client_ca)):
        if path and not Path(path).is_file():
            raise tls.error(name, f"cannot read {path}")
    if client_ca:
        if not cert:
            raise tls.error("client_ca", "needs cert: client certificates need a TLS listener")
        _check_ca(tls, client_ca)
    tls.finish()
    for pbx_sec, pbx in zip(pbx_sections, pbxs, strict=True):
        if pbx.auth.needs_certificate and not client_ca:
            raise pbx_sec.error(
                "auth", f"{pbx.auth.value!r} needs [sip.tls] client_ca, the CA of PBX certificates"
            )
    settings = SipSettings(
        domain=domain,
        pbxs=pbxs,
        last_use_interval=sec.duration("last_use_interval", "1h"),
        public_host=public_host,
        tls_port=tls_port,
        tls_cert=Path(cert) if cert else None,
        tls_key=Path(key) if key else None,
        tls_client_ca=Path(client_ca) if client_ca else None,
        limits=_parse_limits(sec.section("limits", {})),
        overload=_parse_overload(sec.section("overload", {})),
        wake=_parse_wake(sec.section("wake", {}), serials),
    )
    sec.finish()
    return settings


def _parse_limits(sec: Section) -> TransportLimits:
    d = TransportLimits()
    limits = TransportLimits(
        max_message_size=sec.integer("max_message_size", d.max_message_size, minimum=1024),
        max_connections=sec.integer("max_connections", d.max_connections, minimum=1),
        max_connections_per_ip=sec.integer(
            "max_connections_per_ip", d.max_connections_per_ip, minimum=0
        ),
        max_udp_flows=sec.integer("max_udp_flows", d.max_udp_flows, minimum=1),
        idle_timeout=sec.duration("idle_timeout", "5m"),
        write_stall_timeout=sec.duration("write_stall_timeout", "30s"),
        write_buffer=sec.integer("write_buffer", d.write_buffer, minimum=4096),
        max_pending=sec.integer("max_pending", d.max_pending, minimum=1),
    )
    sec.finish()
    return limits


def _parse_wake(sec: Section, serials: list[str]) -> WakeSettings:
    d = WakeSettings()
    debug = sec.text_list("debug_serials", [])
    for serial in debug:
        if serial not in serials:
            raise sec.error("debug_serials", f"serial {serial!r} is not a configured [[sip.pbx]]")
    wake = WakeSettings(
        timeout=sec.duration("timeout", "30s"),
        max_parked=sec.integer("max_parked", d.max_parked, minimum=1),
        answer_timeout=sec.duration("answer_timeout", "2s"),  # "0s": off
        max_per_binding=sec.integer("max_per_binding", d.max_per_binding, minimum=1),
        retry_after=sec.duration("retry_after", "5s"),
        reregister_before=sec.duration("reregister_before", "10m"),  # "0s": off
        debug_serials=frozenset(debug),
    )
    sec.finish()
    return wake


def _parse_overload(sec: Section) -> OverloadSettings:
    overload = OverloadSettings(
        lag=sec.integer("lag_ms", 100, minimum=0) / 1000,
        retry_after=sec.duration("retry_after", "5s"),
        late_probes=sec.integer("late_probes", 3, minimum=1),
    )
    sec.finish()
    return overload


def transport_settings(sip: SipSettings, host: str, port: int) -> TransportSettings:
    """Where the SIP transports listen: UDP and TCP on `port`, TLS when configured."""
    return TransportSettings(
        host=host,
        udp_port=port,
        tcp_port=port,
        tls_port=sip.tls_port,
        tls_cert=sip.tls_cert,
        tls_key=sip.tls_key,
        tls_client_ca=sip.tls_client_ca,
        limits=sip.limits,
        reuse_port=sip.reuse_port,
    )


def _parse_pbx(sec: Section) -> PbxSettings:
    serial = sec.text("serial")
    if not _SERIAL.match(serial):
        raise sec.error("serial", "letters, digits and dashes only")
    static_text = sec.text("static", "")
    source = sec.text("secret", "")
    auth = PbxAuth(sec.choice("auth", tuple(PbxAuth), PbxAuth.DIGEST.value))
    provisioning_url = sec.text("provisioning_url", "")
    if provisioning_url and not re.match(r"^https?://[^/\s]+(/\S*)?$", provisioning_url):
        raise sec.error("provisioning_url", f"expected an http(s) URL, got {provisioning_url!r}")
    sec.finish()
    static = _static(sec, static_text) if static_text else None
    if auth is PbxAuth.MTLS and source:
        raise sec.error("secret", "is not used with auth = 'mtls' (use 'both' for both)")
    if static is None and auth.needs_digest and not source:
        raise sec.error("secret", "is missing: a PBX that dials out needs one (or set static)")
    secret = resolve_secret(source, sec.file, sec.key("secret")) if source else ""
    return PbxSettings(serial, secret, static, auth, provisioning_url)


def _check_ca(sec: Section, path: str) -> None:
    """Load the CA file once now, so a bad one stops the start with its key named."""
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:
        raise sec.error("client_ca", f"{path} holds no usable PEM certificate") from exc


def _static(sec: Section, text: str) -> tuple[str, int]:
    """`udp:HOST:PORT`: the only static transport, since we never dial a stream out."""
    kind, _, rest = text.partition(":")
    host, _, port = rest.rpartition(":")
    if kind != "udp" or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise sec.error("static", f"expected 'udp:HOST:PORT', got {text!r}")
    return host.strip("[]"), int(port)
