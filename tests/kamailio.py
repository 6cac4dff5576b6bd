"""A real Kamailio registrar and proxy for tests, started in a temporary directory.

`Kamailio(...).start()` runs Debian's kamailio with the peer config copied into the
repository (tests/peers/kamailio/kamailio-registrar.cfg, its README says what it does)
on a free loopback port, UDP and TCP, with a db_text folder of its own: the `version`
table copied, the `subscriber` table written from the accounts the test gives, as HA1
rows only (`ha1` = H(user:realm:password), `ha1b` = H(user@domain:realm:password), MD5
or, with `sha256=True` (`-A WITH_SHA256`), SHA-256; the `password` column empty).
`KamailioTls` listens for SIP over TLS too (`-A WITH_TLS`, tls.so from Debian's
kamailio-tls-modules), serving a certificate the test gives.

Kamailio runs in its own process group (tests/serverprocess.py): SIGTERM to its main
process ends it; when a worker failed to start, the main process ignores SIGTERM, so
the group is killed then.
Ready means it answered an OPTIONS to its domain (200 without authentication).

Registrations live in Kamailio's memory only; tests see them by sending requests
through it to a user (`options_to`): 200 from our contact when registered, 480 when
the user has no contact. Plain library code (no pytest).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.limits import LONGEST_WAIT
from tests.serverprocess import ServerProcess
from tests.serverprocess import find_binary as _find_binary

PEER_DIR = Path(__file__).resolve().parent / "peers" / "kamailio"
CONFIG = PEER_DIR / "kamailio-registrar.cfg"
DOMAIN = "provider.test"
BINARY_ENV = "SOFTRELAY_KAMAILIO"
DEBIAN_BINARY = Path("/usr/sbin/kamailio")


class KamailioUnavailable(RuntimeError):
    """Kamailio cannot run here: the binary is missing."""


class KamailioError(RuntimeError):
    """Kamailio did not start, stop or answer."""


def find_binary() -> Path | None:
    return _find_binary(BINARY_ENV, DEBIAN_BINARY, "kamailio")


@dataclass(frozen=True, slots=True)
class Subscriber:
    """An account at the provider; the password never leaves the test."""

    user: str
    password: str

    def ha1(self, sha256: bool = False, realm: str = DOMAIN) -> str:
        return _hash(f"{self.user}:{realm}:{self.password}", sha256)

    def ha1b(self, sha256: bool = False, realm: str = DOMAIN) -> str:
        return _hash(f"{self.user}@{DOMAIN}:{realm}:{self.password}", sha256)


def _hash(text: str, sha256: bool) -> str:
    return (hashlib.sha256 if sha256 else hashlib.md5)(text.encode()).hexdigest()


def free_udp_tcp_port() -> int:
    """A loopback port free for both UDP and TCP right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise KamailioError("no free UDP+TCP port")


class Kamailio(ServerProcess):
    """One Kamailio in its own directory; see the module docstring."""

    name = "kamailio"
    error = KamailioError
    dir_prefix = "softrelay-kamailio-"
    log_name = "kamailio.log"
    port_taken = "bind"
    output_to_log = True
    poll_interval = 0.05
    log_lines = 30

    def __init__(
        self,
        subscribers: list[Subscriber],
        *,
        sha256: bool = False,
        min_expires: int | None = None,
        defines: tuple[str, ...] = (),
        wait: float = LONGEST_WAIT,
    ) -> None:
        binary = find_binary()
        if binary is None:
            raise KamailioUnavailable(
                f"kamailio not found (Debian package kamailio, or {BINARY_ENV} naming it)"
            )
        super().__init__(binary, wait=wait, base_dir=None)
        self.subscribers = list(subscribers)
        self.sha256 = sha256
        self.min_expires = min_expires
        self.defines = defines

    @property
    def db_dir(self) -> Path:
        assert self.root is not None
        return self.root / "db"

    # --- life cycle (tests/serverprocess.py) ------------------------------------------

    def start(self) -> int:
        """Start (on its first port again after `stop()`); the SIP port."""
        self._start()
        assert self.port is not None
        return self.port

    def _prepare(self) -> None:
        self.db_dir.mkdir()
        shutil.copy(PEER_DIR / "db" / "version", self.db_dir / "version")
        self._write_subscribers()

    def _free_port(self) -> int:
        return free_udp_tcp_port()

    def _args(self) -> list[str]:
        assert self.root is not None
        assert self.port is not None
        args = [
            str(self.binary),
            "-f",
            str(CONFIG),
            "-DD",
            "-E",
            "-w",
            str(self.root),
            "-P",
            str(self.root / "kamailio.pid"),
            "-m",
            "64",
            "-M",
            "8",
            "-A",
            f"SIP_PORT={self.port}",
            "-A",
            f'DB_URL="text://{self.db_dir}"',
            "-A",
            f'SIP_DOMAIN="{DOMAIN}"',
        ]
        if self.sha256:
            args += ["-A", "WITH_SHA256"]
        if self.min_expires is not None:
            args += ["-A", f"MIN_EXPIRES={self.min_expires}"]
        for define in self.defines:
            args += ["-A", define]
        return args

    def _stopped(self) -> None:
        self._wait_port_free()

    def _ready(self) -> bool:
        """An OPTIONS to the domain got its 200 (Kamailio is ready)."""
        assert self.port is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(0.2)
            local = sock.getsockname()[1]
            branch = "z9hG4bK" + secrets.token_hex(6)
            options = (
                f"OPTIONS sip:{DOMAIN} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch={branch}\r\n"
                "Max-Forwards: 70\r\n"
                f"From: <sip:probe@other.test>;tag={secrets.token_hex(4)}\r\n"
                f"To: <sip:{DOMAIN}>\r\n"
                f"Call-ID: {secrets.token_hex(8)}\r\n"
                "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
            )
            try:
                sock.sendto(options.encode(), ("127.0.0.1", self.port))
                data = sock.recv(65536)
            except OSError:
                return False
            return data.startswith(b"SIP/2.0 200")

    def _wait_port_free(self) -> None:
        if self.port is None:
            return
        deadline = time.monotonic() + self.wait / 4
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", self.port))
                except OSError:
                    time.sleep(0.02)
                    continue
                return

    # --- accounts ---------------------------------------------------------------------

    def _write_subscribers(self) -> None:
        lines = [
            "id(int,auto) username(string) domain(string) password(string) ha1(string) "
            "ha1b(string) "
        ]
        for number, sub in enumerate(self.subscribers, start=1):
            ha1, ha1b = sub.ha1(self.sha256), sub.ha1b(self.sha256)
            # HA1-only rows: the password column stays empty.
            lines.append(f"{number}:{sub.user}:{DOMAIN}::{ha1}:{ha1b}")
        (self.db_dir / "subscriber").write_text("\n".join(lines) + "\n")


# --- TLS (Debian package kamailio-tls-modules) -------------------------------------------

TLS_MODULE_PACKAGE = "kamailio-tls-modules"


def find_tls_module(binary: Path) -> Path | None:
    """Kamailio's tls.so in the module folders the binary was built with (`kamailio -I`
    names them), None when it is not installed."""
    try:
        report = subprocess.run(
            [str(binary), "-I"], capture_output=True, text=True, timeout=LONGEST_WAIT / 4
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"Default paths to modules:\s*(\S+)", report)
    if found is None:
        return None
    for folder in found.group(1).split(":"):
        module = Path(folder) / "tls.so"
        if module.is_file():
            return module
    return None


def free_tcp_port(other_than: int) -> int:
    """A loopback TCP port free right now, not `other_than` (the UDP+TCP SIP port)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
        if port != other_than:
            return port
    raise KamailioError("no free TCP port")


class KamailioTls(Kamailio):
    """Kamailio with a SIP over TLS listener as well (`-A WITH_TLS`) on `tls_port`, on
    127.0.0.1 only. `certificate` is one PEM file holding the server certificate (for
    127.0.0.1) and its key, made by the test; it is copied into Kamailio's directory
    and named by the tls module's config (`tls.cfg`) written there: no client
    certificate asked for, TLS 1.2 or newer. KamailioUnavailable when tls.so is not
    installed."""

    def __init__(
        self,
        subscribers: list[Subscriber],
        certificate: Path,
        *,
        sha256: bool = False,
        min_expires: int | None = None,
        defines: tuple[str, ...] = (),
        wait: float = LONGEST_WAIT,
    ) -> None:
        super().__init__(
            subscribers, sha256=sha256, min_expires=min_expires, defines=defines, wait=wait
        )
        if find_tls_module(self.binary) is None:
            raise KamailioUnavailable(
                f"kamailio's TLS module tls.so not found (Debian package {TLS_MODULE_PACKAGE})"
            )
        self.certificate = certificate
        self.tls_port: int | None = None

    @property
    def tls_config(self) -> Path:
        assert self.root is not None
        return self.root / "tls.cfg"

    def _prepare(self) -> None:
        super()._prepare()
        assert self.root is not None
        served = self.root / "tls.pem"
        served.touch(mode=0o600)  # it holds the key
        served.write_bytes(self.certificate.read_bytes())
        # Both from the one PEM file: OpenSSL reads the certificate and the key blocks.
        self.tls_config.write_text(
            "[server:default]\n"
            "method = TLSv1.2+\n"
            "verify_certificate = no\n"
            "require_certificate = no\n"
            f"certificate = {served}\n"
            f"private_key = {served}\n"
        )

    def _free_port(self) -> int:
        # A new pair on every attempt: either port may be the one someone else took.
        port = super()._free_port()
        self.tls_port = free_tcp_port(other_than=port)
        return port

    def _args(self) -> list[str]:
        return [
            *super()._args(),
            "-A",
            "WITH_TLS",
            "-A",
            f"TLS_PORT={self.tls_port}",
            "-A",
            f'TLS_CONFIG="{self.tls_config}"',
        ]
