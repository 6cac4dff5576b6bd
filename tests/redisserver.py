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

import secrets
import socket
from pathlib import Path

from tests.limits import LONGEST_WAIT
from tests.pgserver import free_port
from tests.serverprocess import ServerProcess
from tests.serverprocess import find_binary as _find_binary

# Debian's redis-server package; SOFTRELAY_REDIS_SERVER names another build's binary.
BINARY_ENV = "SOFTRELAY_REDIS_SERVER"
DEBIAN_BINARY = Path("/usr/bin/redis-server")


class RedisUnavailable(RuntimeError):
    """Redis cannot run here: the binary is missing."""


class RedisError(RuntimeError):
    """The server did not start, stop or answer."""


def find_binary() -> Path | None:
    """The redis-server binary, or None when Redis is missing."""
    return _find_binary(BINARY_ENV, DEBIAN_BINARY, "redis-server")


class RedisServer(ServerProcess):
    """One redis-server in its own temporary directory; see the module docstring."""

    name = "redis-server"
    error = RedisError
    dir_prefix = "softrelay-redis-"
    log_name = "redis.log"
    port_taken = "in use"

    def __init__(self, *, wait: float = LONGEST_WAIT, base_dir: Path | None = None) -> None:
        binary = find_binary()
        if binary is None:
            raise RedisUnavailable(
                "redis-server not found (Debian package redis-server, or "
                f"{BINARY_ENV} naming the binary)"
            )
        super().__init__(binary, wait=wait, base_dir=base_dir)
        self.password = secrets.token_urlsafe(18)

    def url(self, db: int = 0) -> str:
        """The URL a client connects with (password inside, loopback TCP)."""
        if self.port is None:
            raise RedisError("the server was never started")
        return f"redis://:{self.password}@127.0.0.1:{self.port}/{db}"

    # --- life cycle (tests/serverprocess.py) ------------------------------------------

    def start(self) -> str:
        """Start the server (on its first port again after `stop()`); its URL."""
        self._start()
        return self.url()

    def restart(self) -> str:
        """Stop, then start on the same port: an empty server at the same address."""
        self.stop()
        return self.start()

    def _prepare(self) -> None:
        assert self.root is not None
        self.root.chmod(0o700)

    def _free_port(self) -> int:
        return free_port()

    def _args(self) -> list[str]:
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
        return [str(self.binary), str(conf)]

    def _ready(self) -> bool:
        try:
            return self.command("PING") == b"+PONG"
        except OSError:
            return False

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


def _encode(*args: str) -> bytes:
    """A command in RESP, the protocol's array of bulk strings."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(f"${len(data)}\r\n".encode() + data + b"\r\n")
    return b"".join(parts)
