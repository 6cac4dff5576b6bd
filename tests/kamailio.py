"""A real Kamailio registrar and proxy for tests, started in a temporary directory.

`Kamailio(...).start()` runs Debian's kamailio with the peer config copied into the
repository (tests/peers/kamailio/kamailio-registrar.cfg, its README says what it does)
on a free loopback port, UDP and TCP, with a db_text folder of its own: the `version`
table copied, the `subscriber` table written from the accounts the test gives, as HA1
rows only (`ha1` = H(user:realm:password), `ha1b` = H(user@domain:realm:password), MD5
or, with `sha256=True` (`-A WITH_SHA256`), SHA-256; the `password` column empty).

Kamailio runs in its own process group: SIGTERM to its main process ends it; when a
worker failed to start, the main process ignores SIGTERM, so the group is killed then.
Ready means it answered an OPTIONS to its domain (200 without authentication).

Registrations live in Kamailio's memory only; tests see them by sending requests
through it to a user (`options_to`): 200 from our contact when registered, 480 when
the user has no contact. Plain library code (no pytest).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.limits import LONGEST_WAIT
from tests.pgserver import fast_temp_dir

PEER_DIR = Path(__file__).resolve().parent / "peers" / "kamailio"
CONFIG = PEER_DIR / "kamailio-registrar.cfg"
DOMAIN = "provider.test"
BINARY_ENV = "SOFTRELAY_KAMAILIO"
DEBIAN_BINARY = Path("/usr/sbin/kamailio")
_START_ATTEMPTS = 3


class KamailioUnavailable(RuntimeError):
    """Kamailio cannot run here: the binary is missing."""


class KamailioError(RuntimeError):
    """Kamailio did not start, stop or answer."""


def find_binary() -> Path | None:
    configured = os.environ.get(BINARY_ENV)
    binary = Path(configured) if configured else DEBIAN_BINARY
    if binary.is_file():
        return binary
    found = shutil.which("kamailio")
    return Path(found) if found and not configured else None


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


class Kamailio:
    """One Kamailio in its own directory; see the module docstring."""

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
        self.binary = binary
        self.subscribers = list(subscribers)
        self.sha256 = sha256
        self.min_expires = min_expires
        self.defines = defines
        self.wait = wait
        self.root: Path | None = None
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._atexit = False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def db_dir(self) -> Path:
        assert self.root is not None
        return self.root / "db"

    @property
    def log_file(self) -> Path:
        assert self.root is not None
        return self.root / "kamailio.log"

    # --- life cycle -------------------------------------------------------------------

    def start(self) -> int:
        """Start (on its first port again after `stop()`); the SIP port."""
        if self.running:
            assert self.port is not None
            return self.port
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="softrelay-kamailio-", dir=fast_temp_dir()))
            self.db_dir.mkdir()
            shutil.copy(PEER_DIR / "db" / "version", self.db_dir / "version")
            self._write_subscribers()
            for attempt in range(_START_ATTEMPTS):
                self.port = free_udp_tcp_port()
                try:
                    self._launch()
                    break
                except KamailioError:
                    if attempt + 1 == _START_ATTEMPTS or "bind" not in self._log_tail():
                        raise
            if not self._atexit:
                atexit.register(self.close)
                self._atexit = True
        else:
            self._launch()
        assert self.port is not None
        return self.port

    def stop(self) -> None:
        """SIGTERM to the main process (it stops its workers); the group is killed if
        that does not end it. The port is kept for `start()`."""
        process = self._process
        if process is None:
            return
        self._process = None
        if process.poll() is None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(self.wait / 4)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # workers left behind, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(self.wait / 4)
        self._wait_port_free()

    def close(self) -> None:
        self.stop()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _launch(self) -> None:
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
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.root,
                start_new_session=True,  # its own process group, killed as one
            )
        deadline = time.monotonic() + self.wait / 2
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                raise KamailioError(f"kamailio exited at start\n{self._log_tail()}")
            if self._answers():
                return
            time.sleep(0.05)
        self.stop()
        raise KamailioError(f"kamailio did not answer\n{self._log_tail()}")

    def _answers(self) -> bool:
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

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except (FileNotFoundError, AssertionError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
