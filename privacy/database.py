"""Which database the store keeps its rows in: the `[store]` section.

    [store]
    backend = "sqlite"               # the embedded default: one file under data_dir
    # backend = "postgresql"         # a database several softrelay processes share
    # dsn = "env:SOFTRELAY_DSN"      # where the DSN is: env:NAME or file:PATH, never the
    #                                # DSN itself (it holds the password)
    # pool_size = 10                 # connections per process
    # statement_timeout = "30s"      # a statement running longer is cancelled
    # vacuum_within = "2h"           # postgresql: deleted rows rewritten out of the
    #                                # table files within this (the audit's bound)

The DSN is a secret: it is read when a command opens the store (config.py's `Deferred`),
kept out of every repr, and no message ever quotes it, only the host and port it names.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from tomlsections.reader import Section

BackendName = Literal["sqlite", "postgresql"]
BACKENDS: tuple[BackendName, ...] = get_args(BackendName)
DATABASE_FILE = "softrelay.db"
DSN_KEY = "store.dsn"
# A pool beyond this only queues at the server: PostgreSQL runs one process per connection.
MAX_POOL_SIZE = 100


@dataclass(frozen=True, slots=True)
class StoreSettings:
    backend: BackendName = "sqlite"
    dsn: str = field(default="", repr=False)  # the secret itself, read from its source
    pool_size: int = 10
    statement_timeout: float = 30.0  # seconds
    # The configuration file the settings came from: errors name it and `store.dsn`.
    source: str = "<defaults>"
    # Seconds a deleted row may stay in PostgreSQL's table files before the audit calls
    # it a violation: the sweep purges what was deleted since the last one, so at least
    # the sweep interval; an erasure is purged at once.
    vacuum_within: float = 7200.0


def parse_store(sec: Section) -> StoreSettings:
    """The `[store]` section; reads the DSN from its `env:`/`file:` source now."""
    chosen = sec.choice("backend", BACKENDS, "sqlite")
    backend = next(name for name in BACKENDS if name == chosen)  # as its Literal
    # A literal DSN in the file is refused by `secret` (it must be env: or file:).
    dsn = sec.secret("dsn", "")
    default = StoreSettings()
    pool_size = sec.integer("pool_size", default.pool_size, minimum=1)
    if pool_size > MAX_POOL_SIZE:
        raise sec.error("pool_size", f"must be at most {MAX_POOL_SIZE}, got {pool_size}")
    timeout = sec.duration("statement_timeout", "30s")
    if timeout < 1:
        raise sec.error("statement_timeout", "must be at least 1s")
    vacuum_within = sec.duration("vacuum_within", "2h")
    if vacuum_within < 60:
        raise sec.error("vacuum_within", "must be at least 1m")
    sec.finish()
    if backend == "postgresql" and not dsn:
        raise sec.error("dsn", "backend 'postgresql' needs a dsn ('env:NAME' or 'file:PATH')")
    if backend == "sqlite" and dsn:
        raise sec.error("dsn", "only for backend 'postgresql' (SQLite lives under data_dir)")
    return StoreSettings(
        backend, dsn, pool_size, float(timeout), str(sec.file), float(vacuum_within)
    )


def describe(settings: StoreSettings, data_dir: Path) -> str:
    """Where the store is, for messages: the SQLite file, or the PostgreSQL server and
    database (never the DSN's user, password or options)."""
    if settings.backend == "sqlite":
        return str(data_dir / DATABASE_FILE)
    return f"PostgreSQL at {dsn_target(settings.dsn)}"


def dsn_target(dsn: str) -> str:
    """host:port/database of a DSN, for messages."""
    try:
        parsed = urllib.parse.urlsplit(dsn)
        host = parsed.hostname or "localhost"
        port = parsed.port or 5432
    except ValueError:
        return "the configured server"
    host = f"[{host}]" if ":" in host else host
    database = parsed.path.lstrip("/")
    return f"{host}:{port}/{database}" if database else f"{host}:{port}"


__all__ = [
    "BACKENDS",
    "DATABASE_FILE",
    "StoreSettings",
    "describe",
    "dsn_target",
    "parse_store",
]
