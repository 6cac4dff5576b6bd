"""Server configuration: `config/softrelay.toml`, parsed once at start into frozen objects.

Every key has a default fit for the embedded mode (SQLite under `var/`, loopback
listeners, generated secrets), so the shipped file documents rather than requires.
An unknown key or a bad value raises `ConfigError` naming the file and the key.
Relative paths are taken from the current directory, as a command line user expects.

The sections whose parsing reads secrets (`[push]` key files, `[sip]` PBX secrets and
TLS files, `[oauth]` client secrets, `[usage]` tenant keys, `[crashreports]` project
keys given as `env:`/`file:`, `[http] metrics_token`,
`[dsr] admin_token`, `[console] admin_token`, `[store] dsn`, `[cluster] redis` and
`secret`) are checked to be tables at load and parsed when a command first uses them (`Deferred`):
`policy render` needs none of them, `serve` reads them all at its start
(`read_secrets`), and a missing one stops that command with the file and the key.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from cluster.settings import ClusterSettings, check_cluster_sources, parse_cluster
from console.settings import ConsoleSettings, parse_console
from contacts.settings import ContactsSettings, parse_contacts
from crashreports.settings import CrashSettings, parse_crashreports
from dsr.service import DsrSettings, parse_dsr
from privacy.database import StoreSettings, parse_store
from privacy.notice import Controller, parse_controller
from privacy.policy import PROFILES_DIR
from proxy.oauth.settings import OAuthSettings, parse_oauth
from proxy.provisioning.settings import ProvisioningSettings, parse_provisioning
from proxy.sip.settings import SipSettings, parse_sip
from push.apps import PushSettings, parse_push
from sipis.settings import SipisSettings, parse_sipis
from tomlsections.reader import (
    ConfigError,
    Deferred,
    Section,
    load_toml,
    shipped,
)
from usage.settings import UsageSettings, parse_usage
from webapi.connections import HttpLimits

# The sample config/softrelay.toml, in the checkout or an install (package data).
DEFAULT_CONFIG = shipped("softrelay.toml")
_LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class Listen:
    http_host: str
    http_port: int
    sip_host: str
    sip_port: int
    # A listener for /metrics alone; None: /metrics is on the HTTP port.
    metrics: tuple[str, int] | None = None


# The sections parsed at first use, since parsing them reads secrets.
SecretSection = Literal[
    "push",
    "sip",
    "oauth",
    "usage",
    "crashreports",
    "metrics_token",
    "dsr_admin_token",
    "store",
    "cluster",
    "console",
]
SECRET_SECTIONS: tuple[SecretSection, ...] = get_args(SecretSection)


@dataclass(frozen=True, slots=True)
class Config:
    source: Path | None
    data_dir: Path
    listen: Listen
    profile: str
    policy_override: Path | None
    controller: Controller
    keyring: str  # env:NAME, file:PATH, or "" for a keyring generated under data_dir
    sweep_interval: int
    log_level: str
    log_console: bool
    dsr: DsrSettings
    provisioning: ProvisioningSettings
    http: HttpLimits
    # SIPIS mode (registering on behalf of sleeping apps); off unless `enabled`.
    sipis: SipisSettings
    # Contacts: the encrypted address book and Smart Contacts (`[contacts]`).
    contacts: ContactsSettings
    # Parsed at first use, reading their secrets then (the module docstring says why).
    deferred_push: Deferred[PushSettings] = field(repr=False, compare=False)
    deferred_sip: Deferred[SipSettings] = field(repr=False, compare=False)
    deferred_oauth: Deferred[OAuthSettings] = field(repr=False, compare=False)
    deferred_usage: Deferred[UsageSettings] = field(repr=False, compare=False)
    deferred_crashreports: Deferred[CrashSettings] = field(repr=False, compare=False)
    deferred_metrics_token: Deferred[str] = field(repr=False, compare=False)
    # Checked here so that serve's start names file and key; the DSR API reads it itself.
    deferred_dsr_admin_token: Deferred[str] = field(repr=False, compare=False)
    # The database: parsed when a command opens the store, as its DSN is a secret.
    deferred_store: Deferred[StoreSettings] = field(repr=False, compare=False)
    # `[cluster]`: None without the section (one process, nothing shared); its Redis URL
    # and secret are read when a command opens the cluster.
    deferred_cluster: Deferred[ClusterSettings | None] = field(repr=False, compare=False)
    # `[console]`: its admin token is read when `serve` starts.
    deferred_console: Deferred[ConsoleSettings] = field(repr=False, compare=False)

    @property
    def console(self) -> ConsoleSettings:
        return self.deferred_console.get()

    @property
    def cluster(self) -> ClusterSettings | None:
        return self.deferred_cluster.get()

    @property
    def store(self) -> StoreSettings:
        return self.deferred_store.get()

    @property
    def push(self) -> PushSettings:
        return self.deferred_push.get()

    @property
    def sip(self) -> SipSettings:
        return self.deferred_sip.get()

    @property
    def oauth(self) -> OAuthSettings:
        return self.deferred_oauth.get()

    @property
    def usage(self) -> UsageSettings:
        return self.deferred_usage.get()

    @property
    def crashreports(self) -> CrashSettings:
        return self.deferred_crashreports.get()

    @property
    def metrics_token(self) -> str:
        """The secret itself, read from its env:/file: source; "" when none is set."""
        return self.deferred_metrics_token.get()

    def read_secrets(self, sections: Iterable[SecretSection] = SECRET_SECTIONS) -> None:
        """Parse these sections now, so that a command stops at its start, before
        anything runs, when a secret it uses is missing or bad."""
        deferred: dict[SecretSection, Deferred[Any]] = {
            "push": self.deferred_push,
            "sip": self.deferred_sip,
            "oauth": self.deferred_oauth,
            "usage": self.deferred_usage,
            "crashreports": self.deferred_crashreports,
            "metrics_token": self.deferred_metrics_token,
            "dsr_admin_token": self.deferred_dsr_admin_token,
            "store": self.deferred_store,
            "cluster": self.deferred_cluster,
            "console": self.deferred_console,
        }
        for name in sections:
            deferred[name].get()


def config_path(cli_value: str | None) -> Path | None:
    """--config, else SOFTRELAY_CONFIG, else the shipped sample if it is there."""
    chosen = cli_value or os.environ.get("SOFTRELAY_CONFIG")
    if chosen:
        return Path(chosen)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_config(path: Path | None, *, read_secrets: bool = True) -> Config:
    """The configuration at `path` (None: every default). With `read_secrets`, every
    section is parsed now, secrets read; without, those that read secrets are parsed
    when first used (`Config.read_secrets` names them)."""
    root = load_toml(path) if path is not None else Section({}, Path("<defaults>"), "")
    server = root.section("server", {})
    listen = Listen(
        http_host=_host(server, "http_host"),
        http_port=_port(server, "http_port", 8080),
        sip_host=_host(server, "sip_host"),
        sip_port=_port(server, "sip_port", 5060),
        metrics=server.address("metrics_listen", ""),
    )
    data_dir = Path(server.text("data_dir", "var"))
    server.finish()

    pol = root.section("policy", {})
    profile = pol.choice("profile", _profiles(), "auerproxy")
    override_text = pol.text("override", "")
    pol.finish()

    controller = parse_controller(root.section("controller", {}))

    sec = root.section("secrets", {})
    keyring = sec.text("keyring", "")
    if keyring and not keyring.startswith(("env:", "file:")):
        raise sec.error(
            "keyring", "must be 'env:NAME', 'file:PATH' or empty (generated under data_dir)"
        )
    sec.finish()

    ret = root.section("retention", {})
    sweep_interval = ret.duration("sweep_interval", "1h")
    if sweep_interval < 60:
        raise ret.error("sweep_interval", "must be at least 1m")
    ret.finish()

    logging_sec = root.section("logging", {})
    log_level = logging_sec.choice("level", _LOG_LEVELS, "info")
    log_console = logging_sec.flag("console", True)
    logging_sec.finish()
    push = Deferred(root.section("push", {}), parse_push)
    sip = Deferred(root.section("sip", {}), parse_sip)
    crashreports = Deferred(root.section("crashreports", {}), parse_crashreports)
    dsr_section = root.section("dsr", {})
    dsr = parse_dsr(dsr_section)
    provisioning = parse_provisioning(root.section("provisioning", {}))
    sipis = parse_sipis(root.section("sipis", {}))
    contacts = parse_contacts(root.section("contacts", {}))
    oauth = Deferred(root.section("oauth", {}), parse_oauth)
    usage = Deferred(root.section("usage", {}), parse_usage)
    http_section = root.section("http", {})
    http = _parse_http(http_section)
    metrics_token = Deferred(http_section, _metrics_token)
    store_section = root.section("store", {})
    # Only the DSN's source now (a DSN written into the file is refused at once); it is
    # read when a command opens the store.
    store_section.secret_source("dsn", "")
    store = Deferred(store_section, parse_store)
    cluster = _cluster(root)
    console_section = root.section("console", {})
    console_section.secret_source("admin_token", "")  # the source now, the token at start
    root.finish()

    config = Config(
        source=path,
        data_dir=data_dir,
        listen=listen,
        profile=profile,
        policy_override=Path(override_text) if override_text else None,
        controller=controller,
        keyring=keyring,
        sweep_interval=sweep_interval,
        log_level=log_level,
        log_console=log_console,
        dsr=dsr,
        provisioning=provisioning,
        http=http,
        sipis=sipis,
        contacts=contacts,
        deferred_push=push,
        deferred_sip=sip,
        deferred_oauth=oauth,
        deferred_usage=usage,
        deferred_crashreports=crashreports,
        deferred_metrics_token=metrics_token,
        deferred_dsr_admin_token=Deferred(dsr_section, _dsr_admin_token),
        deferred_store=store,
        deferred_cluster=cluster,
        deferred_console=Deferred(console_section, functools.partial(_console, listen)),
    )
    if read_secrets:
        config.read_secrets()
    return config


def with_overrides(
    config: Config,
    *,
    data_dir: str | None = None,
    http_port: int | None = None,
    sip_port: int | None = None,
) -> Config:
    """Apply command-line flags, which win over the file."""
    listen = config.listen
    if http_port is not None:
        listen = replace(listen, http_port=http_port)
    if sip_port is not None:
        listen = replace(listen, sip_port=sip_port)
    return replace(config, listen=listen, data_dir=Path(data_dir) if data_dir else config.data_dir)


def _console(listen: Listen, sec: Section) -> ConsoleSettings:
    """`[console]`; its listener must be apart from the public HTTP port."""
    console = parse_console(sec)
    own = console.listen
    if console.enabled and own[1] != 0 and own[1] in (listen.http_port, listen.sip_port):
        raise sec.error("listen", "the console needs a port of its own, not HTTP's or SIP's")
    return console


def _cluster(root: Section) -> Deferred[ClusterSettings | None]:
    """`[cluster]`, when present: its secrets' sources checked now, read at first use."""
    if not root.has("cluster"):
        root.section("cluster", {})  # marks the key read: absent is no error
        return Deferred(root, lambda _: None)
    section = root.section("cluster")
    check_cluster_sources(section)
    return Deferred(section, parse_cluster)


def _profiles() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in PROFILES_DIR.glob("*.toml")))


def _host(sec: Section, key: str) -> str:
    host = sec.text(key, "127.0.0.1")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise sec.error(key, f"expected an IP address to listen on, got {host!r}") from None
    return host


def _parse_http(sec: Section) -> HttpLimits:
    default = HttpLimits()
    timeouts = {
        key: sec.duration(key, text)
        for key, text in (
            ("header_timeout", "10s"),
            ("idle_timeout", "60s"),
            ("body_timeout", "60s"),
            ("write_timeout", "30s"),
        )
    }
    for key, value in timeouts.items():
        if value < 1:
            raise sec.error(key, "must be at least 1s")
    limits = HttpLimits(
        max_connections=sec.integer("max_connections", default.max_connections, minimum=1),
        max_connections_per_ip=sec.integer(
            "max_connections_per_ip", default.max_connections_per_ip, minimum=0
        ),
        **timeouts,
    )
    # Only the token's source now: the secret is read by the commands that use it.
    sec.secret_source("metrics_token", "")
    sec.finish()
    return limits


def _dsr_admin_token(sec: Section) -> str:
    token = sec.secret("admin_token", "")
    if token and len(token) < 16:
        raise sec.error("admin_token", "the admin token must be at least 16 characters")
    return token


def _metrics_token(sec: Section) -> str:
    token = sec.secret("metrics_token", "")
    if token and len(token) < 16:
        raise sec.error("metrics_token", "the token must be at least 16 characters")
    return token


def _port(sec: Section, key: str, default: int) -> int:
    port = sec.integer(key, default, minimum=0)
    if port > 65535:
        raise sec.error(key, f"must be a port number (0 picks a free one), got {port}")
    return port


__all__ = ["Config", "ConfigError", "Listen", "config_path", "load_config", "with_overrides"]
