"""The store's database read and changed behind its back, on either backend.

Tests look at what a store really wrote (a ciphertext's key id, a row count, the dump of
every table) and tamper with it (a column a careless migration added, a ciphertext moved
into another row). They do it through the database's own client, not the store: SQLite's
`sqlite3` on the file, and for PostgreSQL `psql` from the server's bin directory over the
test role's DSN, so no driver of the backend under test is in the way.

SQL given here must be valid on both: plain statements with literals (the tests' own
values), no bound parameters.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path
from typing import Protocol

from privacy.store import DATABASE_FILE
from tests.limits import LONGEST_WAIT
from tests.pgserver import PostgresServer

_SEP = "\x1f"  # between the columns of psql's unaligned output


class RawDatabase(Protocol):
    def execute(self, *statements: str) -> None:
        """Run statements and commit them."""
        ...

    def count(self, table: str) -> int:
        """The rows of a table."""
        ...

    def blobs(self, query: str) -> list[bytes]:
        """The first column of a query over a BLOB (SQLite) / bytea (PostgreSQL) column."""
        ...

    def text(self, query: str) -> str:
        """A query's rows as text, for checks that a value is absent."""
        ...

    def dump(self) -> str:
        """Every table's definition and rows as text (SQLite's iterdump, pg_dump)."""
        ...

    def blob(self, data: bytes) -> str:
        """Bytes as an SQL literal of the database's binary type, to write a BLOB/bytea."""
        ...


class SQLiteRaw:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / DATABASE_FILE

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path)

    def execute(self, *statements: str) -> None:
        with closing(self._connect()) as db:
            for statement in statements:
                db.execute(statement)
            db.commit()

    def count(self, table: str) -> int:
        with closing(self._connect()) as db:
            count: int = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        return count

    def blobs(self, query: str) -> list[bytes]:
        with closing(self._connect()) as db:
            values = [row[0] for row in db.execute(query)]
        assert all(isinstance(v, bytes) for v in values), query
        return values

    def text(self, query: str) -> str:
        with closing(self._connect()) as db:
            return repr(db.execute(query).fetchall())

    def dump(self) -> str:
        with closing(self._connect()) as db:
            return "\n".join(db.iterdump())

    def blob(self, data: bytes) -> str:
        return f"X'{data.hex()}'"


class PostgresRaw:
    def __init__(self, server: PostgresServer, dsn: str) -> None:
        self.server = server
        self.dsn = dsn

    def _run(self, tool: str, *args: str) -> str:
        done = subprocess.run(
            [str(self.server.bindir / tool), *args],
            capture_output=True,
            text=True,
            env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"},
            timeout=LONGEST_WAIT,
            check=False,
        )
        assert done.returncode == 0, f"{tool}: {done.stderr}"
        return done.stdout

    def _psql(self, *statements: str) -> str:
        commands = [arg for statement in statements for arg in ("-c", statement)]
        return self._run(
            "psql", "-X", "-q", "-A", "-t", "-F", _SEP, "-v", "ON_ERROR_STOP=1", self.dsn,
            *commands,
        )  # fmt: skip

    def execute(self, *statements: str) -> None:
        # Each -c commits on its own, as SQLite's statements do before the final commit.
        self._psql(*statements)

    def count(self, table: str) -> int:
        return int(self._psql(f"SELECT count(*) FROM {table}").strip())

    def blobs(self, query: str) -> list[bytes]:
        # bytea prints as \x and its hex digits.
        lines = self._psql(query).splitlines()
        assert all(line.startswith("\\x") for line in lines), query
        return [bytes.fromhex(line[2:]) for line in lines]

    def text(self, query: str) -> str:
        return self._psql(query)

    def dump(self) -> str:
        return self._run("pg_dump", "--no-owner", self.dsn)

    def blob(self, data: bytes) -> str:
        return f"'\\x{data.hex()}'::bytea"
