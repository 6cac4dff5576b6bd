"""asyncpg against psycopg 3 (+ psycopg-pool) for the store's shape of work on PostgreSQL.

    .venv/bin/pip install -e '.[bench]'   # psycopg and psycopg-pool, the other driver
    .venv/bin/python bench/pg_drivers.py --dsn postgresql://postgres@127.0.0.1:PORT/postgres
        [--rows N] [--concurrency C] [--pool P] [--repeat R]

How the PostgreSQL backend's driver was chosen (docs/design.md, "PostgreSQL"). For each
driver, on the same registration rows as bench/store.py, from C asyncio tasks on uvloop
sharing a pool of P connections:

raw     the rows in plaintext, one INSERT per row (autocommit), into the table the store
        lays out (same columns and indexes, unique key included);
store   what `PostgresBackend.put` does per row: the policy check, AES-GCM sealing and
        blind indexes (the store's own encode path), then one statement: the upsert
        `ON CONFLICT … RETURNING id` and the subject's activity upsert in a CTE;
many    put_many's shape: the encoded rows in batches of C, one executemany each.

Runs are interleaved (driver by driver, measurement by measurement) R times; the median
and the spread (min-max) of writes/s are printed. Timing uses `time.perf_counter` only.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: bench.*

from bench.store import CATEGORY, PROFILE, registration_rows
from privacy.backend import Row
from privacy.clock import SystemClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.sqlite import SQLiteBackend
from privacy.store import DATABASE_FILE, Store, table_spec

try:  # the driver not chosen: a bench extra, imported by name so lint needs it not
    psycopg: Any = importlib.import_module("psycopg")
    psycopg_pool: Any = importlib.import_module("psycopg_pool")
except ImportError:
    raise SystemExit("bench/pg_drivers.py needs psycopg: pip install -e '.[bench]'") from None

_PG_TYPE = {"TEXT": "TEXT", "INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION", "BLOB": "BYTEA"}
Put = Callable[[list[Any], bytes | None, float], Awaitable[None]]


def _ddl(name: str) -> list[str]:
    table = table_spec(load_policy(PROFILE).category(CATEGORY))
    fields = ", ".join(f"{c.name} {_PG_TYPE[c.sqltype]}" for c in table.columns)
    return [
        f"DROP TABLE IF EXISTS {name}",
        "DROP TABLE IF EXISTS bench_subjects",
        f"CREATE TABLE {name} (id BIGSERIAL PRIMARY KEY, subject BYTEA, "
        f"created_at DOUBLE PRECISION NOT NULL, last_used_at DOUBLE PRECISION NOT NULL, "
        f"rid BYTEA, {fields})",
        f"CREATE INDEX ON {name}({table.basis})",
        f"CREATE INDEX ON {name}(subject)",
        *(f"CREATE INDEX ON {name}({c.name})" for c in table.columns if c.indexed),
        f"CREATE UNIQUE INDEX ON {name}({', '.join(table.unique)})",
        "CREATE TABLE bench_subjects (subject BYTEA PRIMARY KEY, "
        "last_used_at DOUBLE PRECISION NOT NULL)",
    ]


def _columns() -> list[str]:
    table = table_spec(load_policy(PROFILE).category(CATEGORY))
    return ["subject", "created_at", "last_used_at", *(c.name for c in table.columns)]


def _sql(marker: Callable[[int], str]) -> tuple[str, str, str]:
    table = table_spec(load_policy(PROFILE).category(CATEGORY))
    columns = _columns()
    values = ", ".join(marker(i + 1) for i in range(len(columns)))
    insert = f"INSERT INTO bench_t ({', '.join(columns)}) VALUES ({values})"
    updates = ", ".join(
        f"{c} = excluded.{c}" for c in columns if c not in table.unique and c != "created_at"
    )
    upsert = f"{insert} ON CONFLICT ({', '.join(table.unique)}) DO UPDATE SET {updates}"
    # The backend's put: the subject's activity in the same statement (privacy/postgres.py).
    put = (
        f"WITH put AS ({upsert} RETURNING id), active AS ("
        f"INSERT INTO bench_subjects VALUES ({marker(1)}, {marker(len(columns) + 1)}) "
        "ON CONFLICT (subject) DO UPDATE SET last_used_at = "
        "greatest(bench_subjects.last_used_at, excluded.last_used_at)) SELECT id FROM put"
    )
    return insert, upsert, put


def _plain(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    columns = _columns()
    now = time.time()
    out = []
    for fields in rows:
        values: dict[str, Any] = {
            "subject": f"{fields['sip_username']}\x1f{fields['pbx_serial']}".encode(),
            "created_at": now,
            "last_used_at": now,
        }
        for name in columns:
            if name.endswith("__bidx"):
                values[name] = str(fields[name.removesuffix("__bidx")]).encode()
            elif name in fields:
                values[name] = fields[name]
        # Encrypted columns are BYTEA: plaintext bytes in the raw run.
        for c in table_spec(load_policy(PROFILE).category(CATEGORY)).columns:
            if c.sqltype == "BLOB" and isinstance(values.get(c.name), str):
                values[c.name] = values[c.name].encode()
        out.append([values.get(name) for name in columns])
    return out


class Encoder:
    """The store's own encode path (policy check, sealing, blind indexes, subject)."""

    def __init__(self) -> None:
        self.policy = load_policy(PROFILE)
        self.cat = self.policy.category(CATEGORY)
        unopened = SQLiteBackend(Path(DATABASE_FILE))  # never opened: no I/O
        self.store = Store(self.policy, Keyring.generate(), unopened, SystemClock())
        self.columns = _columns()

    def row(self, fields: dict[str, Any], now: float) -> tuple[list[Any], bytes | None]:
        self.store._check_fields(self.cat, fields)
        subject = self.store._subject_of(self.cat, fields)
        built: Row = {
            **self.store._encode(self.cat, fields, subject)(),
            "subject": subject,
            "created_at": now,
            "last_used_at": now,
        }
        return [built.get(name) for name in self.columns], subject


async def _drive(
    rows: Sequence[Any], concurrency: int, one: Callable[[Any], Awaitable[None]]
) -> float:
    pending = iter(rows)

    async def writer() -> None:
        for item in pending:
            await one(item)

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(writer())
    return time.perf_counter() - start


async def _asyncpg(
    dsn: str, rows: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, float]:
    insert, upsert, put_sql = _sql(lambda i: f"${i}")
    pool = await asyncpg.create_pool(dsn, min_size=args.pool, max_size=args.pool)
    assert pool is not None
    encoder = Encoder()
    result: dict[str, float] = {}
    try:

        async def reset() -> None:
            async with pool.acquire() as c:
                for stmt in _ddl("bench_t"):
                    await c.execute(stmt)

        await reset()
        plain = _plain(rows)

        async def raw(values: list[Any]) -> None:
            async with pool.acquire() as c:
                await c.execute(insert, *values)

        result["raw"] = await _drive(plain, args.concurrency, raw)
        await reset()

        async def put(fields: dict[str, Any]) -> None:
            values, _ = encoder.row(fields, time.time())
            async with pool.acquire() as c:
                await c.fetchval(put_sql, *values, values[1])

        result["store"] = await _drive(rows, args.concurrency, put)
        await reset()
        batches = [rows[i : i + args.concurrency] for i in range(0, len(rows), args.concurrency)]
        many_sql = upsert

        async def many(batch: list[dict[str, Any]]) -> None:
            now = time.time()
            encoded = [encoder.row(fields, now)[0] for fields in batch]
            async with pool.acquire() as c, c.transaction():
                await c.executemany(many_sql, encoded)

        result["many"] = await _drive(batches, args.pool, many)
    finally:
        await pool.close()
    return result


async def _psycopg(
    dsn: str, rows: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, float]:
    # Positional: the CTE's two markers take the subject and the time again.
    insert, upsert, put_sql = _sql(lambda i: "%s")
    # Autocommit, as asyncpg's: one statement, one round trip; batches take a transaction.
    pool = psycopg_pool.AsyncConnectionPool(
        dsn, min_size=args.pool, max_size=args.pool, open=False, kwargs={"autocommit": True}
    )
    await pool.open(wait=True)
    encoder = Encoder()
    result: dict[str, float] = {}
    try:

        async def reset() -> None:
            async with pool.connection() as c:
                for stmt in _ddl("bench_t"):
                    await c.execute(stmt)

        await reset()
        plain = _plain(rows)

        async def raw(values: list[Any]) -> None:
            async with pool.connection() as c:
                await c.execute(insert, values)

        result["raw"] = await _drive(plain, args.concurrency, raw)
        await reset()

        async def put(fields: dict[str, Any]) -> None:
            values, subject = encoder.row(fields, time.time())
            async with pool.connection() as c:
                await c.execute(put_sql, [*values, subject, values[1]])

        result["store"] = await _drive(rows, args.concurrency, put)
        await reset()
        batches = [rows[i : i + args.concurrency] for i in range(0, len(rows), args.concurrency)]
        many_sql = upsert

        async def many(batch: list[dict[str, Any]]) -> None:
            now = time.time()
            encoded = [encoder.row(fields, now)[0] for fields in batch]
            async with pool.connection() as c, c.transaction(), c.cursor() as cur:
                await cur.executemany(many_sql, encoded)

        result["many"] = await _drive(batches, args.pool, many)
    finally:
        await pool.close()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--pool", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    rows = registration_rows(args.rows)
    drivers = {"asyncpg": _asyncpg, "psycopg": _psycopg}
    seconds: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeat):
        for name, run in drivers.items():
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                for what, s in runner.run(run(args.dsn, rows, args)).items():
                    seconds.setdefault((name, what), []).append(s)
    print(
        f"{args.rows} rows, {args.concurrency} tasks, pool {args.pool}, {args.repeat} runs "
        f"interleaved; asyncpg {asyncpg.__version__}, psycopg {psycopg.__version__}"
    )
    print(f"{'':18}{'median w/s':>12}{'min':>10}{'max':>10}")
    for (name, what), runs in seconds.items():
        rates = [args.rows / s for s in runs]
        print(
            f"{name + ' ' + what:18}{statistics.median(rates):>12,.0f}"
            f"{min(rates):>10,.0f}{max(rates):>10,.0f}"
        )
    for name in drivers:
        store = statistics.median(args.rows / s for s in seconds[(name, "store")])
        raw = statistics.median(args.rows / s for s in seconds[(name, "raw")])
        print(f"{name}: store/raw = {store / raw:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
