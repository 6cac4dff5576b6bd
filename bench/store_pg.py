"""The PostgreSQL half of bench/store.py: the store's writes against raw asyncpg inserts,
and writes/s of one and of two processes sharing one database.

A real PostgreSQL 15 is started for the run by `tests/pgserver.py` (the tests' own
server: a temporary directory, /dev/shm when it has room, a free loopback port, the
`postgres` user when we are root, fsync and synchronous_commit off). Every measurement
gets a fresh database, migrated by `Store.migrate` as `softrelay db migrate` does, so
every table has the store's own shape and indexes, unique key included.

One round measures, on uvloop (as `serve` runs), from `concurrency` asyncio tasks
through one pool of `pool` connections (the backend's own, from `Store.create`):

raw     the rows in plaintext (blind-index columns holding the plaintext bytes), one
        INSERT per row, autocommit: the driver and the server, no policy, no crypto;
sealed  `PostgresBackend.put` of rows sealed before the clock starts: the store's SQL
        (upserts and subjects' activity, group committed as `put` does) without its CPU;
store   `Store.put`: policy check, AES-GCM sealing, blind indexes, then that SQL, the puts
        of one loop turn committed together (the backend's group commit);
unbatched `Store.put` with that group commit off (every batch one put, one statement
        without BEGIN/COMMIT): the backend's put as it was before it.

So store - sealed is the policy and crypto on the event loop, sealed - raw the subject
row and the upsert (both batched), unbatched - store what the group commit gains.
The CPU of the bench process and of the server's processes (from
/proc) is read around each, per row: the two share the machine's cores.

`processes` runs N worker processes at once (this module with `--worker`), each with
its own `Store` on the same database, writing its own rows; they start together on a
line on stdin and report their own rate; the total is all rows over the span from the
first start to the last end (time.monotonic, one clock for all processes on Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: bench.*

from bench.harness import cpu_seconds, process_tree
from bench.profiling import Stats, own_time
from privacy.backend import TableSpec
from privacy.clock import SystemClock
from privacy.database import StoreSettings
from privacy.keys import Keyring, parse_keyring
from privacy.policy import Policy, load_policy
from privacy.postgres import PostgresBackend
from privacy.store import Store, Value, table_spec
from tests.pgserver import PostgresServer

CATEGORY = "registration"
PROFILE = "auerproxy"
DSN_ENV = "BENCH_STORE_DSN"  # how a worker gets the DSN: never on a command line
WORKER = str(Path(__file__).resolve())  # this module, run with --worker
WORKER_WAIT = 60.0  # s for a worker to connect, or to finish its rows
MEASURES = ("raw", "sealed", "store", "unbatched")
Fields = dict[str, Value]
T = TypeVar("T")
# cProfile's own time per layer (bench/profiling.py): the first needle found names it.
PROFILE_FILES = (
    ("privacy/store.py", "policy + encode (privacy/store.py)"),
    ("privacy/crypto.py", "sealing, blind indexes (privacy/crypto.py)"),
    ("cryptography", "sealing, blind indexes (privacy/crypto.py)"),
    ("privacy/postgres.py", "backend (privacy/postgres.py)"),
    ("asyncpg", "asyncpg (driver, pool)"),
    ("uvloop", "event loop"),
    ("asyncio", "event loop"),
)
PROFILE_BUILTINS = (
    ("AESGCM", "sealing, blind indexes (privacy/crypto.py)"),
    ("_hashlib", "sealing, blind indexes (privacy/crypto.py)"),
    ("hmac", "sealing, blind indexes (privacy/crypto.py)"),
    ("asyncpg", "asyncpg (driver, pool)"),
    ("uvloop", "event loop"),
)


@dataclass(slots=True)
class Run:
    """One measurement: wall seconds, and CPU seconds of the client and of the server."""

    seconds: float
    client_cpu: float
    server_cpu: float


@dataclass(slots=True)
class Workers:
    """One run of N processes at once: each one's rows and seconds, and their span."""

    rows: list[int]
    seconds: list[float]
    span: float

    @property
    def total_per_s(self) -> float:
        return sum(self.rows) / self.span

    def to_json(self) -> dict[str, Any]:
        return {
            "per_process_writes_per_s": [
                round(n / s, 1) for n, s in zip(self.rows, self.seconds, strict=True)
            ],
            "total_writes_per_s": round(self.total_per_s, 1),
            "span_s": round(self.span, 4),
        }


@dataclass(slots=True)
class Postgres:
    """The server of the run and what is measured on it."""

    server: PostgresServer
    policy: Policy
    pool: int
    concurrency: int
    tmp: Path
    runs: dict[str, list[Run]] = field(default_factory=dict)
    workers: dict[int, list[Workers]] = field(default_factory=dict)

    @classmethod
    @contextlib.contextmanager
    def started(cls, policy: Policy, pool: int, concurrency: int) -> Iterator[Postgres]:
        server = PostgresServer()
        with tempfile.TemporaryDirectory(prefix="bench-store-pg-") as tmp:
            try:
                server.start()
                yield cls(server, policy, pool, concurrency, Path(tmp))
            finally:
                server.close()

    @property
    def version(self) -> str:
        return (self.server.data_dir / "PG_VERSION").read_text().strip()

    def server_pids(self) -> list[int]:
        """The postmaster and its children now (one backend process per connection)."""
        postmaster = int((self.server.data_dir / "postmaster.pid").read_text().split()[0])
        return process_tree(postmaster)

    @contextlib.contextmanager
    def database(self) -> Iterator[StoreSettings]:
        """A fresh database with the store's schema, as `softrelay db migrate` leaves it."""
        dsn = self.server.create_database()
        settings = StoreSettings("postgresql", dsn, pool_size=self.pool)
        try:
            _run(Store.migrate(self.policy, self.tmp, settings))
            yield settings
        finally:
            self.server.drop_database(dsn.rsplit("/", 1)[1])

    def round(self, rows: Sequence[Fields], keyring: Keyring, turn: int) -> None:
        """raw, sealed, store and unbatched, each on a fresh database; the order turns each round,
        so a slow patch of the machine does not always hit the same one."""
        order = MEASURES[turn % len(MEASURES) :] + MEASURES[: turn % len(MEASURES)]
        for what in order:
            with self.database() as settings:
                run = self._measure(what, rows, keyring, settings)
            self.runs.setdefault(what, []).append(run)

    def _measure(
        self, what: str, rows: Sequence[Fields], keyring: Keyring, settings: StoreSettings
    ) -> Run:
        async def measure() -> tuple[float, int]:
            store = await Store.create(self.policy, keyring, self.tmp, SystemClock(), settings)
            try:
                one = _writer(what, store, rows)
                items = list(range(len(rows)))
                before = self._cpu()
                elapsed = await _drive(items, self.concurrency, one)
                after = self._cpu()
                cpu[0], cpu[1] = after[0] - before[0], after[1] - before[1]
                written = (await store.stats())[CATEGORY].rows
            finally:
                await store.close()
            return elapsed, written

        cpu = [0.0, 0.0]
        elapsed, written = _run(measure())
        if written != len(rows):
            raise SystemExit(
                f"postgresql {what}: {written} rows in the table, expected {len(rows)}"
            )
        return Run(elapsed, cpu[0], cpu[1])

    def _cpu(self) -> tuple[float, float]:
        return time.process_time(), cpu_seconds(self.server_pids())

    def profile(self, rows: Sequence[Fields], keyring: Keyring) -> dict[str, Any]:
        """cProfile of one `Store.put` run in this process: own time per layer, per row."""
        # CPU time, not wall time: on shared cores a wall-clock profile charges whatever
        # runs when the process is descheduled, or waits on the server.
        profiler = cProfile.Profile(time.process_time)

        async def measure() -> None:
            store = await Store.create(self.policy, keyring, self.tmp, SystemClock(), settings)
            try:
                one = _writer("store", store, rows)
                profiler.enable()
                await _drive(list(range(len(rows))), self.concurrency, one)
                profiler.disable()
            finally:
                await store.close()

        with self.database() as settings:
            _run(measure())
        table: Stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]  # untyped
        layers, functions = own_time(table, PROFILE_FILES, PROFILE_BUILTINS)
        per_row = 1e6 / len(rows)
        return {
            "rows": len(rows),
            "note": "cProfile own CPU time (process_time) in the bench process only (the "
            "server's is not in it); the profiler inflates Python's cost",
            "layers_us_per_row": {name: round(s * per_row, 1) for name, s in layers.most_common()},
            "top_functions": [
                {"us_per_row": round(s * per_row, 2), "calls": calls, "function": where}
                for s, calls, where in functions[:20]
            ],
        }

    def processes(self, count: int, rows_each: int, keyring_file: Path, seed: int) -> None:
        """`count` worker processes writing `rows_each` rows each, at once, on one fresh
        database."""
        with self.database() as settings:
            found = _run(_workers(count, rows_each, self.concurrency, settings, keyring_file, seed))
        self.workers.setdefault(count, []).append(found)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _writer(what: str, store: Store, rows: Sequence[Fields]) -> Callable[[int], Awaitable[Any]]:
    """The write of row i for one measurement."""
    cat = store.policy.category(CATEGORY)
    backend = store.backend
    assert isinstance(backend, PostgresBackend)
    table = table_spec(cat)
    if what == "store":
        return lambda i: store.put(CATEGORY, rows[i])
    if what == "unbatched":
        backend._puts._limit = 1  # every put a batch of its own: one statement, no BEGIN
        return lambda i: store.put(CATEGORY, rows[i])
    now = time.time()
    if what == "sealed":
        subjects = [store._subject_of(cat, fields) for fields in rows]
        sealed = [store._encode(cat, fields, subjects[i])() for i, fields in enumerate(rows)]

        def put(i: int) -> Awaitable[int]:
            row = sealed[i]
            return backend.put(table, lambda: row, subject=subjects[i], now=now)

        return put
    columns, params = plaintext_rows(rows, table, now)
    insert = (
        f"INSERT INTO {table.name} ({', '.join(columns)}) "
        f"VALUES ({', '.join(f'${i}' for i in range(1, len(columns) + 1))})"
    )
    pool = backend._pool

    async def raw(i: int) -> None:
        async with pool.acquire() as conn:
            await conn.execute(insert, *params[i])

    return raw


def plaintext_rows(
    rows: Sequence[Fields], table: TableSpec, now: float
) -> tuple[list[str], list[list[Any]]]:
    """The rows as the store lays them out, every protected value in plaintext: bytes
    in the BYTEA columns (encrypted fields, blind indexes, the subject)."""
    columns = ["subject", "created_at", "last_used_at", *(c.name for c in table.columns)]
    blobs = {c.name for c in table.columns if c.sqltype == "BLOB"}
    out: list[list[Any]] = []
    for fields in rows:
        values: dict[str, Any] = {
            "subject": f"{fields['sip_username']}\x1f{fields['pbx_serial']}".encode(),
            "created_at": now,
            "last_used_at": now,
        }
        for name in columns[3:]:
            value = fields.get(name.removesuffix("__bidx"))
            values[name] = str(value).encode() if name in blobs and value is not None else value
        out.append([values[name] for name in columns])
    return columns, out


async def _drive(
    items: Sequence[int], concurrency: int, one: Callable[[int], Awaitable[Any]]
) -> float:
    pending = iter(items)

    async def writer() -> None:
        for item in pending:
            await one(item)

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(writer())
    return time.perf_counter() - start


# --- worker processes --------------------------------------------------------------------


async def _workers(
    count: int,
    rows_each: int,
    concurrency: int,
    settings: StoreSettings,
    keyring_file: Path,
    seed: int,
) -> Workers:
    """Start `count` workers, wait until each has its store open, start them with one
    line each, and collect what they report."""
    env = {**os.environ, DSN_ENV: settings.dsn}
    procs: list[asyncio.subprocess.Process] = []
    try:
        for n in range(count):
            argv = [sys.executable, WORKER, "--worker"]
            argv += ["--rows", str(rows_each), "--seed", str(seed + n)]
            argv += ["--concurrency", str(concurrency), "--pool", str(settings.pool_size)]
            argv += ["--keyring", str(keyring_file)]
            procs.append(
                await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    env=env,
                    start_new_session=True,
                )
            )
        async with asyncio.timeout(WORKER_WAIT):
            for proc in procs:
                await _expect(proc, "ready")
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
            reports = [json.loads(await _expect(proc, "{")) for proc in procs]
            for proc in procs:
                if await proc.wait() != 0:
                    raise SystemExit(f"a store worker ended with status {proc.returncode}")
    finally:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                await proc.wait()
    start = min(r["start"] for r in reports)
    end = max(r["end"] for r in reports)
    return Workers(
        [r["rows"] for r in reports], [r["end"] - r["start"] for r in reports], end - start
    )


async def _expect(proc: asyncio.subprocess.Process, prefix: str) -> str:
    assert proc.stdout is not None
    line = (await proc.stdout.readline()).decode()
    if not line.startswith(prefix):
        raise SystemExit(f"a store worker said {line.strip()!r}, expected {prefix!r}...")
    return line


async def _worker(args: argparse.Namespace) -> None:
    from bench.store import registration_rows

    policy = load_policy(PROFILE)
    keyring = parse_keyring(args.keyring.read_bytes(), str(args.keyring))
    settings = StoreSettings("postgresql", os.environ[DSN_ENV], pool_size=args.pool)
    rows = registration_rows(args.rows, seed=args.seed)
    store = await Store.create(policy, keyring, args.keyring.parent, SystemClock(), settings)
    try:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        start = time.monotonic()
        await _drive(range(len(rows)), args.concurrency, lambda i: store.put(CATEGORY, rows[i]))
        end = time.monotonic()
    finally:
        await store.close()
    print(json.dumps({"rows": len(rows), "start": start, "end": end}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """A worker of `Postgres.processes` (the bench itself is bench/store.py)."""
    parser = argparse.ArgumentParser(description="one store worker of bench/store.py")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--pool", type=int, required=True)
    parser.add_argument("--keyring", type=Path, required=True)
    _run(_worker(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
