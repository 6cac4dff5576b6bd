"""The PostgreSQL server the tests start themselves (tests/pgserver.py): what the store's
suites rely on when they run on PostgreSQL."""

from __future__ import annotations

import os
import subprocess
from urllib.parse import urlsplit

from tests.pgserver import ROLE, PostgresServer


def psql(server: PostgresServer, dsn: str, sql: str) -> subprocess.CompletedProcess[str]:
    """A query through the DSN as a client sees it (TCP, the role's password)."""
    return subprocess.run(
        [str(server.bindir / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1", dsn, "-c", sql],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", ""), "PGCONNECT_TIMEOUT": "10"},
        timeout=server.wait,
        check=False,
    )


def test_dsn_connects_over_loopback_as_a_role_that_is_not_superuser(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    parts = urlsplit(postgres_dsn)
    assert parts.hostname == "127.0.0.1"
    assert parts.port == postgres_server.port
    done = psql(
        postgres_server,
        postgres_dsn,
        "SELECT current_user, usesuper, version() FROM pg_user WHERE usename = current_user",
    )
    assert done.returncode == 0, done.stderr
    user, superuser, version = done.stdout.strip().split("|")
    assert (user, superuser) == (ROLE, "f")
    assert version.startswith("PostgreSQL 15.")


def test_a_wrong_password_is_refused(postgres_server: PostgresServer, postgres_dsn: str) -> None:
    wrong = postgres_dsn.replace(f":{postgres_server.password}@", ":not-the-password@")
    done = psql(postgres_server, wrong, "SELECT 1")
    assert done.returncode != 0
    assert "password authentication failed" in done.stderr


def test_each_test_gets_an_empty_database_its_role_owns(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    created = psql(
        postgres_server, postgres_dsn, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)"
    )
    assert created.returncode == 0, created.stderr
    other = postgres_server.create_database("test_pgserver_other")
    try:
        done = psql(
            postgres_server, other, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        )
        assert done.stdout.strip() == "0"
    finally:
        postgres_server.drop_database("test_pgserver_other")


def test_stop_and_start_keep_the_data_and_the_port(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    assert (
        psql(
            postgres_server, postgres_dsn, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)"
        ).returncode
        == 0
    )
    port = postgres_server.port
    postgres_server.stop()
    down = psql(postgres_server, postgres_dsn, "SELECT 1")
    assert down.returncode != 0
    assert "Connection refused" in down.stderr
    postgres_server.start()
    assert postgres_server.port == port
    done = psql(postgres_server, postgres_dsn, "SELECT x FROM kept")
    assert done.stdout.strip() == "7", done.stderr
