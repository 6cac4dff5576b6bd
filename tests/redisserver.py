"""A real Redis server for tests and benchmarks, started in a temporary directory.

`RedisServer.start()` runs Debian's `redis-server` on a free loopback port with a
password (`requirepass`), so the code under test authenticates as production does, and
answers its URL (`redis://:<password>@127.0.0.1:<port>/0`). Nothing persists: no RDB
snapshots, no append-only file; the data lives in the server's memory only, as a
cluster's shared state does. The settings go in a file of the server's directory (mode
0700), never on its command line, so `ps` shows no password.

`stop()` then `start()` (or `restart()`) keeps the port, so the clients under test
reconnect to the address they know: the tests of what nodes do when Redis restarts. A
restarted server is empty, as one without persistence is.

Plain library code (no pytest): `bench/` imports it too.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.limits import LONGEST_WAIT
from tests.pgserver import fast_temp_dir, free_port

# Debian's redis-server package; SOFTRELAY_REDIS_SERVER names another build's binary.
BINARY_ENV = "SOFTRELAY_REDIS_SERVER"
DEBIAN_BINARY = Path("/usr/bin/redis-server")
_START_ATTEMPTS = 3  # a free port can be taken by someone else before the server binds it


class RedisUnavailable(RuntimeError):
    """Redis cannot run here: the binary is missing."""


class RedisError(RuntimeError):
    """The server did not start, stop or answer."""


def find_binary() -> Path | None:
    """The redis-server binary, or None when Redis is missing."""
    configured = os.environ.get(BINARY_ENV)
    binary = Path(configured) if configured else DEBIAN_BINARY
    if binary.is_file():
        return binary
    found = shutil.which("redis-server")
    return Path(found) if found and not configured else None


class RedisServer:
    """One redis-server in its own temporary directory; see the module docstring."""

    def __init__(self, *, wait: float = LONGEST_WAIT, base_dir: Path | None = None) -> None:
        binary = find_binary()
        if binary is None:
            raise RedisUnavailable(
                "redis-server not found (Debian package redis-server, or "
                f"{BINARY_ENV} naming the binary)"
            )
        self.binary = binary
        self.wait = wait
        self._base_dir = base_dir or fast_temp_dir()
        self.password = secrets.token_urlsafe(18)
        self.root: Path | None = None
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._atexit = False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_file(self) -> Path:
        if self.root is None:
            raise RedisError("the server was never started")
        return self.root / "redis.log"

    def url(self, db: int = 0) -> str:
        """The URL a client connects with (password inside, loopback TCP)."""
        if self.port is None:
            raise RedisError("the server was never started")
        return f"redis://:{self.password}@127.0.0.1:{self.port}/{db}"

    # --- life cycle -------------------------------------------------------------------

    def start(self) -> str:
        """Start the server (on its first port again after `stop()`); its URL."""
        if self.running:
            return self.url()
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="softrelay-redis-", dir=self._base_dir))
            self.root.chmod(0o700)
            for attempt in range(_START_ATTEMPTS):
                self.port = free_port()
                try:
                    self._launch()
                    break
                except RedisError:
                    if attempt + 1 == _START_ATTEMPTS or "in use" not in self._log_tail():
                        raise
            if not self._atexit:
                # A session ended by an error skips fixture teardown; the server goes anyway.
                atexit.register(self.close)
                self._atexit = True
        else:
            self._launch()
        return self.url()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers), keeping its port."""
        process = self._process
        if process is None:
            return
        self._process = None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(self.wait)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(self.wait)

    def kill(self) -> None:
        """End the server at once (SIGKILL), as a crash would; the port is kept."""
        process = self._process
        if process is None:
            return
        self._process = None
        process.kill()
        process.wait(self.wait)

    def restart(self) -> str:
        """Stop, then start on the same port: an empty server at the same address."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _launch(self) -> None:
        assert self.root is not None
        conf = self.root / "redis.conf"
        conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            "protected-mode yes\n"
            f"dir {self.root}\n"
            f"logfile {self.log_file}\n"
            'save ""\n'
            "appendonly no\n"
            "daemonize no\n"
            f"requirepass {self.password}\n"
            # Keyspace events are off, as in production; tests watch keys themselves.
            "maxmemory 64mb\n"
        )
        conf.chmod(0o600)
        self._process = subprocess.Popen(
            [str(self.binary), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.root,
        )
        deadline = time.monotonic() + self.wait
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                raise RedisError(f"redis-server exited at start\n--- log ---\n{self._log_tail()}")
            with contextlib.suppress(OSError):
                if self.command("PING") == b"+PONG":
                    return
            time.sleep(0.01)
        self.stop()
        raise RedisError(f"redis-server did not answer within {self.wait:.0f} s")

    # --- administration (a plain socket: independent of the client under test) -------

    def command(self, *args: str) -> bytes:
        """Run one command after AUTH; its first reply line (`+OK`, `:1`, `$-1`...)."""
        if self.port is None:
            raise RedisError("the server was never started")
        with socket.create_connection(("127.0.0.1", self.port), timeout=self.wait) as sock:
            sock.sendall(_encode("AUTH", self.password) + _encode(*args))
            reader = sock.makefile("rb")
            auth = reader.readline().rstrip(b"\r\n")
            if auth != b"+OK":
                raise RedisError(f"AUTH answered {auth!r}")
            return reader.readline().rstrip(b"\r\n")

    def flushall(self) -> None:
        reply = self.command("FLUSHALL")
        if reply != b"+OK":
            raise RedisError(f"FLUSHALL answered {reply!r}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except (FileNotFoundError, RedisError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _encode(*args: str) -> bytes:
    """A command in RESP, the protocol's array of bulk strings."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(f"${len(data)}\r\n".encode() + data + b"\r\n")
    return b"".join(parts)
