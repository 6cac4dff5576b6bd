"""`[console]`: the operator console's listener, its admin token and its live figures.

[console]
enabled = true
listen = "127.0.0.1:8081"    # its own listener: never the public HTTP port
admin_token = ""             # "env:NAME" | "file:/path", 16+ chars; "": console off
tls_cert = ""                # both set: TLS on the listener (cookies then Secure)
tls_key = ""
session_ttl = "8h"
tick = "2s"                  # how often live figures are sampled and pushed
history = "30m"              # how far back the charts reach
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from tomlsections.reader import ConfigError, Section

MIN_TOKEN = 16
MAX_POINTS = 10_000  # samples a chart's series holds at most (history / tick)


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    enabled: bool = True
    listen: tuple[str, int] = ("127.0.0.1", 8081)
    admin_token: str = field(default="", repr=False)  # the secret itself, read at start
    tls_cert: Path | None = None
    tls_key: Path | None = None
    session_ttl: int = 8 * 3600
    tick: float = 2.0
    history: int = 30 * 60
    source: str = "<defaults>"  # the configuration file, for messages

    @property
    def serving(self) -> bool:
        """Whether `serve` starts the console: enabled, and a token to log in with."""
        return self.enabled and bool(self.admin_token)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.listen[0]).is_loopback

    def ssl_context(self) -> ssl.SSLContext | None:
        """The listener's TLS context; ConfigError naming the key when a file will not do."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                self.source, "console.tls_cert", f"cannot load the certificate and key: {exc}"
            ) from exc
        return context


def parse_console(sec: Section) -> ConsoleSettings:
    """`[console]`, its admin token read now (an `env:`/`file:` source)."""
    enabled = sec.flag("enabled", True)
    listen = sec.address("listen", "127.0.0.1:8081")
    if listen is None:
        raise sec.error("listen", "needs IP:PORT (disable the console with enabled = false)")
    token = sec.secret("admin_token", "")
    if token and len(token) < MIN_TOKEN:
        raise sec.error("admin_token", f"the admin token must be at least {MIN_TOKEN} characters")
    cert, key = sec.text("tls_cert", ""), sec.text("tls_key", "")
    if bool(cert) != bool(key):
        raise sec.error("tls_cert" if not cert else "tls_key", "set both tls_cert and tls_key")
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        if path and not Path(path).is_file():
            raise sec.error(name, f"no such file: {path}")
    ttl = sec.duration("session_ttl", "8h")
    if not 60 <= ttl <= 7 * 86400:
        raise sec.error("session_ttl", "must be between 1m and 7d")
    tick = sec.duration("tick", "2s")
    if not 1 <= tick <= 60:
        raise sec.error("tick", "must be between 1s and 1m")
    history = sec.duration("history", "30m")
    if history < tick * 2:
        raise sec.error("history", "must hold at least two ticks")
    if history / tick > MAX_POINTS:
        raise sec.error("history", f"holds at most {MAX_POINTS} ticks (history / tick)")
    sec.finish()
    return ConsoleSettings(
        enabled=enabled,
        listen=listen,
        admin_token=token,
        tls_cert=Path(cert) if cert else None,
        tls_key=Path(key) if key else None,
        session_ttl=ttl,
        tick=float(tick),
        history=history,
        source=str(sec.file),
    )


__all__ = ["ConsoleSettings", "parse_console"]
