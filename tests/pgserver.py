"""A real PostgreSQL server for tests and benchmarks, started in a temporary directory.

`PostgresServer.start()` runs Debian's `initdb` and `pg_ctl` (PostgreSQL 15) on a free
loopback port and answers a DSN with a password for a test role, so the backend under
test connects over TCP as production does. PostgreSQL refuses to run as root, and CI
runs as root: then the server runs as the `postgres` system user (the Debian package
creates it), and its directory belongs to that user.

Only the server's own superuser can connect through the unix socket, which sits in the
server's directory (mode 0700); it has trust there and is used for administration
(creating the role and the databases), never by the code under test. Over TCP every
role needs its password (scram-sha-256); the test role owns the databases it is given
and is not a superuser, as a deployment's role would not be.

Each test gets a database of its own: `create_database` copies a template (an empty one,
or one migrated once per session) and `drop_database` removes it with the connections a
test left open. The server lives on /dev/shm when that has room: the copy is then ~10 ms
instead of ~150 ms on disk. `stop()` then `start()` keeps the data and the port, for the
tests that stop the database under a running softrelay.

Plain library code (no pytest): `bench/` imports it too.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
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

# Debian's postgresql-15 package; SOFTRELAY_PG_BINDIR names another build's bin dir.
DEBIAN_BINDIR = Path("/usr/lib/postgresql/15/bin")
BINDIR_ENV = "SOFTRELAY_PG_BINDIR"
SERVER_USER = "postgres"  # who runs the server when we are root
ADMIN = "postgres"  # the server's superuser (unix socket only)
ROLE = "softrelay"  # the role the code under test connects as (TCP, password)
TEMPLATE = "softrelay_template"
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# Memory-backed: CREATE DATABASE copies its template's files, 180 ms on this disk and
# 9 ms on tmpfs. Used when it has room for the server and some hundred databases.
SHM_DIR = Path("/dev/shm")
SHM_MIN_FREE = 512 << 20
_START_ATTEMPTS = 3  # a free port can be taken by someone else before the server binds it
# What a test server need not do: survive a crash (fsync, full pages) or keep much memory.
_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    # Bounds the WAL kept between checkpoints, on a tmpfs of a few hundred MiB.
    "min_wal_size": "32MB",
    "max_wal_size": "96MB",
    "max_connections": "200",
    "log_min_messages": "warning",
    "log_connections": "off",
}


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot run here: binaries missing, or root without a user to run as."""


class PostgresError(RuntimeError):
    """The server did not start, stop, or answer an administrative command."""


@dataclass(frozen=True, slots=True)
class _RunAs:
    uid: int
    gid: int
    name: str
    home: str


def find_bindir() -> Path | None:
    """The directory with initdb, pg_ctl and psql, or None when PostgreSQL is missing."""
    configured = os.environ.get(BINDIR_ENV)
    bindir = Path(configured) if configured else DEBIAN_BINDIR
    tools = ("initdb", "pg_ctl", "psql", "postgres")
    return bindir if all((bindir / tool).is_file() for tool in tools) else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def fast_temp_dir() -> Path | None:
    """/dev/shm when it is a writable tmpfs with room; None: the system's temp dir."""
    try:
        stats = os.statvfs(SHM_DIR)
    except OSError:
        return None
    roomy = stats.f_bavail * stats.f_frsize >= SHM_MIN_FREE
    return SHM_DIR if roomy and os.access(SHM_DIR, os.W_OK | os.X_OK) else None


def _run_as() -> _RunAs | None:
    """Whom to run the server as: None for ourselves, the `postgres` user when root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root and there is no {SERVER_USER!r} user to run PostgreSQL as"
        ) from None
    return _RunAs(entry.pw_uid, entry.pw_gid, entry.pw_name, entry.pw_dir)


class PostgresServer:
    """One PostgreSQL server in its own temporary directory; see the module docstring."""

    def __init__(self, *, wait: float = LONGEST_WAIT, base_dir: Path | None = None) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise PostgresUnavailable(
                f"PostgreSQL 15 not found: no initdb, pg_ctl, psql and postgres in "
                f"{os.environ.get(BINDIR_ENV) or DEBIAN_BINDIR} (Debian package "
                f"postgresql-15, or {BINDIR_ENV} naming another bin directory)"
            )
        self.bindir = bindir
        self.wait = wait
        self._base_dir = base_dir or fast_temp_dir()
        self._run_as = _run_as()
        self.password = secrets.token_urlsafe(18)
        self.root: Path | None = None
        self.port: int | None = None
        self.running = False
        self._databases = 0
        self._atexit = False

    # --- paths ------------------------------------------------------------------------

    @property
    def _dir(self) -> Path:
        if self.root is None:
            raise PostgresError("the server was never started")
        return self.root

    @property
    def data_dir(self) -> Path:
        return self._dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self._dir / "socket"

    @property
    def log_file(self) -> Path:
        return self._dir / "server.log"

    def dsn(self, database: str = "postgres") -> str:
        """The DSN of the test role for a database (password inside, loopback TCP)."""
        if self.port is None:
            raise PostgresError("the server was never started")
        return f"postgresql://{ROLE}:{self.password}@127.0.0.1:{self.port}/{database}"

    # --- life cycle -------------------------------------------------------------------

    def start(self) -> str:
        """Start the server (set it up on the first call); the DSN of the test role.

        A later call after `stop()` starts the same data directory on the same port."""
        if self.running:
            return self.dsn()
        if self.root is None:
            self._setup()
        else:
            self._pg_ctl_start()
        return self.dsn()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server, keeping its data and port (`pg_ctl stop -m fast|immediate`).

        When pg_ctl cannot stop it in time the postmaster is killed, so a test never
        leaves a server behind."""
        if not self.running:
            return
        try:
            self._tool(
                "pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w",
                "-t", str(int(self.wait)),
            )  # fmt: skip
        except PostgresError:
            self._kill()
        self.running = False

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _setup(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="softrelay-pg-", dir=self._base_dir))
        # The unix socket path must stay within 107 bytes.
        if len(str(self.socket_dir / ".s.PGSQL.65535")) > 107:
            raise PostgresError(f"{self.root} is too long a path for a unix socket")
        self.socket_dir.mkdir()
        pwfile = self.root / "superuser.pw"
        pwfile.write_text(secrets.token_urlsafe(18) + "\n")
        pwfile.chmod(0o600)
        if self._run_as is not None:
            for path in (self.root, self.socket_dir, pwfile):
                os.chown(path, self._run_as.uid, self._run_as.gid)
        self.root.chmod(0o700)
        self.socket_dir.chmod(0o700)
        self._tool(
            "initdb", "-D", str(self.data_dir), "-U", ADMIN, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        pwfile.unlink()
        for attempt in range(_START_ATTEMPTS):
            self.port = free_port()
            self._write_settings()
            try:
                self._pg_ctl_start()
                break
            except PostgresError:
                if attempt + 1 == _START_ATTEMPTS or "in use" not in self._log_tail():
                    raise
        self._admin(
            f"CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{self.password}'",
            f"CREATE DATABASE {TEMPLATE} OWNER {ROLE} TEMPLATE template0 IS_TEMPLATE true",
        )
        if not self._atexit:
            # A session ended by an error skips fixture teardown; the server goes anyway.
            atexit.register(self.close)
            self._atexit = True

    def _write_settings(self) -> None:
        settings = {
            **_SETTINGS,
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
        }
        # postgresql.auto.conf is read last, so these win over initdb's defaults.
        auto = self.data_dir / "postgresql.auto.conf"
        auto.write_text("".join(f"{key} = {value}\n" for key, value in settings.items()))
        if self._run_as is not None:
            os.chown(auto, self._run_as.uid, self._run_as.gid)

    def _pg_ctl_start(self) -> None:
        # -w: pg_ctl waits until the postmaster reports it accepts connections.
        self._tool(
            "pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
            "-t", str(int(self.wait)),
        )  # fmt: skip
        self.running = True

    def _kill(self) -> None:
        pidfile = self.data_dir / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(pidfile.read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + self.wait
            while time.monotonic() < deadline:
                os.kill(pid, 0)  # raises ProcessLookupError once it is gone
                time.sleep(0.01)

    # --- databases --------------------------------------------------------------------

    def create_database(self, name: str | None = None, template: str = TEMPLATE) -> str:
        """A fresh database owned by the test role, a copy of `template`: by default an
        empty one; any database nobody is connected to (one a test session migrated once,
        say) copies with its schema in the same time. Its DSN."""
        if name is None:
            self._databases += 1
            name = f"test_{os.getpid()}_{self._databases}"
        self._check_name(name)
        self._check_name(template)
        # FILE_COPY copies the template's few files; WAL_LOG (15's default) writes every
        # block of it to the WAL, slower for a database this small.
        self._admin(f"CREATE DATABASE {name} OWNER {ROLE} TEMPLATE {template} STRATEGY FILE_COPY")
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, ending the connections still open to it."""
        self._check_name(name)
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    # --- files, for tests that look at what reached the disk ------------------------

    def checkpoint(self) -> None:
        """Write every changed page to the data files (and start a new WAL record)."""
        self._admin("CHECKPOINT")

    def database_files(self, name: str) -> list[Path]:
        """The files of one database's tables and indexes (base/<oid>/)."""
        self._check_name(name)
        oid = self._admin(f"SELECT oid FROM pg_database WHERE datname = '{name}'").strip()
        if not oid.isdigit():
            raise PostgresError(f"no database {name!r}")
        return sorted(p for p in (self.data_dir / "base" / oid).iterdir() if p.is_file())

    def wal_files(self) -> list[Path]:
        """The server's write-ahead log segments (all databases: it is one log)."""
        return sorted(p for p in (self.data_dir / "pg_wal").iterdir() if p.is_file())

    @staticmethod
    def _check_name(name: str) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"not a plain database name: {name!r}")

    def _admin(self, *statements: str) -> str:
        """Run statements as the superuser over the unix socket, each in a transaction
        of its own (CREATE DATABASE cannot run in one with others); their output."""
        if not self.running:
            raise PostgresError("the server is not running")
        commands = [arg for sql in statements for arg in ("-c", sql)]
        return self._tool(
            "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
            "-p", str(self.port), "-U", ADMIN, "-d", "postgres", *commands,
            as_server=False,
        )  # fmt: skip

    # --- processes --------------------------------------------------------------------

    def _tool(self, tool: str, *args: str, as_server: bool = True) -> str:
        run_as = self._run_as if as_server else None
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        if run_as is not None:
            env |= {"HOME": run_as.home, "USER": run_as.name}
        try:
            done = subprocess.run(
                [str(self.bindir / tool), *args],
                capture_output=True,
                text=True,
                env=env,
                cwd=self._dir,
                user=run_as.uid if run_as else None,
                group=run_as.gid if run_as else None,
                extra_groups=[] if run_as else None,
                timeout=self.wait,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise PostgresError(f"{tool} {args[0]}: no answer within {self.wait:.0f} s") from exc
        if done.returncode != 0:
            raise PostgresError(
                f"{tool} {args[0]} failed ({done.returncode}): {done.stderr.strip()}"
                f"\n--- server log ---\n{self._log_tail()}"
            )
        return done.stdout

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
