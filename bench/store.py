"""Write throughput of the policy-enforcing store against raw writes, on SQLite and on
PostgreSQL, on this machine.

    .venv/bin/python bench/store.py [--rows N] [--concurrency C] [--repeat R]
        [--backends sqlite,postgresql] [--pool P] [--processes 1,2] [--profile] [--out FILE]

On SQLite, three measurements on the same registration rows, each in a fresh temporary
directory:

(a) raw sqlite3: the rows in plaintext, into the table the store's own backend creates
    (same columns, blind-index columns holding the plaintext, same indexes including the
    unique key, same pragmas), one BEGIN IMMEDIATE/INSERT/COMMIT per row in a tight loop
    on one thread: the store's transaction semantics without policy, crypto or asyncio.
(b) the store: `Store.put("registration", row)` from C concurrent asyncio tasks: checked
    against the policy, AES-GCM encrypted, blind indexed, committed before it returns.
(c) the CPU cost of the store's encode path alone (`_check_fields`, `_encode` and the
    subject's blind index), no I/O.

On PostgreSQL (bench/store_pg.py, a server started for the run by tests/pgserver.py):
raw asyncpg INSERTs against `Store.put` on the same rows through the same pool, the
backend's put of pre-sealed rows between them, `Store.put` with the backend's group commit
off (one put per transaction, as before it), and the writes/s of 1 and 2 processes, each
with its own `Store`, on one database.

Each is run `--repeat` times, interleaved, so drift hits all alike. The issue's target,
per backend: policy check and encryption cost at most 25% of write throughput, that is
1 - store/raw <= 0.25, judged on the median of the per-round ratios (min-max given too).
Durations use `time.perf_counter`; the worker processes stamp `time.monotonic`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: bench.*

from bench.harness import spread, write_result
from bench.profiling import positive_ints
from bench.store_pg import CATEGORY as CATEGORY  # one definition; bench/pg_drivers.py
from bench.store_pg import PROFILE as PROFILE  # imports both from here
from bench.store_pg import Postgres
from privacy.clock import SystemClock
from privacy.database import BACKENDS, StoreSettings
from privacy.keys import Keyring
from privacy.policy import Policy, load_policy
from privacy.sqlite import SQLiteBackend
from privacy.store import DATABASE_FILE, Store, Value, table_spec
from tests.pgserver import find_bindir

TARGET_COST = 0.25
ENCODE_ROWS = 5000  # (c) is CPU only and steady per row: a sample keeps the run short
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "store.json"
# Read from the store's own connection and set on the raw one, so they cannot drift.
PRAGMAS = ("journal_mode", "synchronous", "secure_delete", "busy_timeout")

Fields = dict[str, Value]


@dataclass(frozen=True, slots=True)
class Result:
    """One measurement: every run's seconds and the best run's rate."""

    runs_s: list[float]
    rows: int

    @property
    def best_s(self) -> float:
        return min(self.runs_s)

    @property
    def per_s(self) -> float:
        return self.rows / self.best_s

    @property
    def us_per_row(self) -> float:
        return self.best_s / self.rows * 1e6

    def to_json(self) -> dict[str, Any]:
        return {
            "writes_per_s": round(self.per_s, 1),
            "us_per_row": round(self.us_per_row, 2),
            "best_s": round(self.best_s, 4),
            "runs_s": [round(s, 4) for s in self.runs_s],
        }


def registration_rows(count: int, seed: int = 5626) -> list[Fields]:
    """Registrations shaped like tests/test_store.py's sample, each a distinct key.

    Every row has its own instance (so each put is an insert, never a replace); two
    devices per SIP user, users spread over 100 PBXs. Instance ids (UUIDv4) and push
    tokens (32 bytes) are random and rows arrive in random order, as in the field: in
    counting order the plaintext indexes of (a) would only ever append, flattering it.
    Seeded, so every run writes the same rows.
    """
    rng = random.Random(seed)
    serials = [f"{rng.randrange(10**7):07d}" for _ in range(100)]
    users = [f"{rng.randbytes(4).hex()}-{n}" for n in range((count + 1) // 2)]
    rows: list[Fields] = []
    for i in range(count):
        user = i // 2
        rows.append(
            {
                "pbx_serial": serials[user % len(serials)],
                "sip_username": users[user],
                "instance": f"urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}",
                "phone_ip": f"198.51.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                "phone_port": rng.randrange(1024, 65536),
                "pbx_ip": f"203.0.113.{user % 100}",
                "pbx_port": 5061,
                "push_provider": rng.choice(("apns", "fcm")),
                "push_token": rng.randbytes(32).hex(),
                "push_app_id": "com.example.phone.voip",
            }
        )
    rng.shuffle(rows)
    return rows


# --- (a) raw SQLite --------------------------------------------------------------------


def make_schema(data_dir: Path, policy: Policy) -> tuple[Path, dict[str, Any]]:
    """The category table, created by the store's own backend so its shape is the store's,
    and the pragmas that backend's connection runs with."""
    path = data_dir / DATABASE_FILE

    async def create() -> dict[str, Any]:
        backend = await SQLiteBackend.create(path, [table_spec(policy.category(CATEGORY))])
        try:
            return await backend._run(read_pragmas, backend)
        finally:
            await backend.close()

    return path, asyncio.run(create())


def read_pragmas(source: sqlite3.Connection | SQLiteBackend) -> dict[str, Any]:
    db = source.db if isinstance(source, SQLiteBackend) else source
    return {name: db.execute(f"PRAGMA {name}").fetchone()[0] for name in PRAGMAS}


def plaintext_row(fields: Fields, columns: Sequence[str], now: float) -> tuple[Any, ...]:
    """The row as the store would lay it out, every protected value left in plaintext."""
    values: dict[str, Any] = {
        "subject": f"{fields['sip_username']}\x1f{fields['pbx_serial']}",
        "created_at": now,
        "last_used_at": now,
    }
    for name in columns:
        if name.endswith("__bidx"):
            values[name] = fields.get(name.removesuffix("__bidx"))
        elif name in fields:
            values[name] = fields[name]
    return tuple(values.get(name) for name in columns)


def run_raw(
    rows: Sequence[Fields], policy: Policy, parent: Path | None, batch: int = 1
) -> tuple[float, dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="bench-raw-", dir=parent) as tmp:
        path, pragmas = make_schema(Path(tmp), policy)
        db = sqlite3.connect(path, isolation_level=None)
        try:
            for name, value in pragmas.items():
                db.execute(f"PRAGMA {name}={value}")
            if read_pragmas(db) != pragmas:
                raise SystemExit(f"raw sqlite3: pragmas {read_pragmas(db)}, store {pragmas}")
            table = table_spec(policy.category(CATEGORY))
            columns = ["subject", "created_at", "last_used_at", *(c.name for c in table.columns)]
            sql = (
                f"INSERT INTO {table.name} ({', '.join(columns)}) "
                f"VALUES ({', '.join('?' * len(columns))})"
            )
            now = time.time()
            params = [plaintext_row(fields, columns, now) for fields in rows]
            execute = db.execute
            start = time.perf_counter()
            for first in range(0, len(params), batch):
                execute("BEGIN IMMEDIATE")
                for values in params[first : first + batch]:
                    execute(sql, values)
                execute("COMMIT")
            elapsed = time.perf_counter() - start
            (written,) = db.execute(f"SELECT count(*) FROM {table.name}").fetchone()
        finally:
            db.close()
    _check_written(written, len(rows), "raw sqlite3")
    return elapsed, pragmas


# --- (b) the store ---------------------------------------------------------------------


async def _store_puts(
    rows: Sequence[Fields], policy: Policy, concurrency: int, data_dir: Path
) -> tuple[float, int]:
    store = await Store.create(policy, Keyring.generate(), data_dir, SystemClock())
    try:
        pending = iter(rows)

        async def writer() -> None:
            for fields in pending:
                await store.put(CATEGORY, fields)

        start = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(writer())
        elapsed = time.perf_counter() - start
        written = (await store.stats())[CATEGORY].rows
    finally:
        await store.close()
    return elapsed, written


def run_store(
    rows: Sequence[Fields], policy: Policy, concurrency: int, parent: Path | None
) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=parent) as tmp:
        elapsed, written = asyncio.run(_store_puts(rows, policy, concurrency, Path(tmp)))
    _check_written(written, len(rows), "store")
    return elapsed


# --- (c) the encode path alone ---------------------------------------------------------


def run_encode(rows: Sequence[Fields], policy: Policy) -> dict[str, float]:
    """Seconds for the policy check, the field encryption and the subject's blind index
    over `rows`, each step timed in its own loop (no I/O, no event loop)."""
    cat = policy.category(CATEGORY)
    # The encode path never reaches the backend: this one is never opened, so no disk I/O.
    unopened = SQLiteBackend(Path(DATABASE_FILE))
    store = Store(policy, Keyring.generate(), unopened, SystemClock())
    steps: dict[str, Callable[[Fields], object]] = {
        "check_fields": lambda fields: store._check_fields(cat, fields),
        "encode": lambda fields: store._encode(cat, fields, None)(),
        "subject_index": lambda fields: store._subject_of(cat, fields),
    }
    seconds: dict[str, float] = {}
    for name, step in steps.items():
        start = time.perf_counter()
        for fields in rows:
            step(fields)
        seconds[name] = time.perf_counter() - start
    return seconds


def _check_written(written: int, expected: int, what: str) -> None:
    if written != expected:
        raise SystemExit(f"{what}: {written} rows in the table, expected {expected}")


# --- report ----------------------------------------------------------------------------


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Per round: rate of the first over rate of the second, from their seconds."""
    return [den / num for num, den in zip(numerators, denominators, strict=True)]


def verdict(cost: float) -> str:
    return "PASS" if cost <= TARGET_COST else "FAIL"


def sqlite_json(
    args: argparse.Namespace,
    raw_s: list[float],
    batched_s: list[float],
    store_s: list[float],
    encode_s: list[dict[str, float]],
    pragmas: dict[str, Any],
) -> dict[str, Any]:
    raw, batched, store = (
        Result(raw_s, args.rows),
        Result(batched_s, args.rows),
        Result(store_s, args.rows),
    )
    sample = min(args.rows, ENCODE_ROWS)
    steps = {name: Result([run[name] for run in encode_s], sample) for name in encode_s[0]}
    encode_us = sum(step.us_per_row for step in steps.values())
    per_round = ratios(store_s, raw_s)
    cost = 1 - statistics.median(per_round)
    return {
        "sqlite": sqlite3.sqlite_version,
        "pragmas": pragmas,
        "raw_sqlite": raw.to_json(),
        "raw_sqlite_batched": {
            **batched.to_json(),
            "rows_per_transaction": args.concurrency,
            "note": "reference only: the store's group commit batches at most this many",
        },
        "cost_vs_batched": round(1 - store.per_s / batched.per_s, 4),
        "store": store.to_json(),
        "encode_only": {
            "rows": sample,
            "us_per_row": round(encode_us, 2),
            "steps_us_per_row": {name: round(step.us_per_row, 2) for name, step in steps.items()},
            "share_of_store_write": round(encode_us / store.us_per_row, 3),
        },
        "ratio_b_over_a_rounds": [round(r, 4) for r in per_round],
        "ratio_b_over_a": spread(per_round, 4),
        "ratio_b_over_a_best_runs": round(store.per_s / raw.per_s, 4),
        "cost": round(cost, 4),
        "target_cost": TARGET_COST,
        "pass": cost <= TARGET_COST,
    }


def postgres_json(args: argparse.Namespace, pg: Postgres) -> dict[str, Any]:
    rows = args.rows
    seconds = {what: [run.seconds for run in runs] for what, runs in pg.runs.items()}
    per_round = ratios(seconds["store"], seconds["raw"])
    cost = 1 - statistics.median(per_round)
    measured: dict[str, Any] = {}
    for what, runs in pg.runs.items():
        measured[what] = {
            "writes_per_s": spread([rows / run.seconds for run in runs], 1),
            "client_cpu_us_per_row": spread([run.client_cpu / rows * 1e6 for run in runs], 1),
            "server_cpu_us_per_row": spread([run.server_cpu / rows * 1e6 for run in runs], 1),
            "runs_s": [round(run.seconds, 4) for run in runs],
        }
    return {
        "postgresql": pg.version,
        "server": "tests/pgserver.py: loopback TCP, fsync off, synchronous_commit off "
        "(SQLite's synchronous=NORMAL in WAL mode does not flush at commit either)",
        "pool": args.pool,
        "loop": "uvloop",
        "raw_asyncpg": {
            **measured["raw"],
            "what": "plaintext INSERT per row, autocommit, through the store backend's own pool",
        },
        "sealed_backend_put": {
            **measured["sealed"],
            "what": "PostgresBackend.put of rows "
            "sealed before the clock: the store's SQL without its CPU",
        },
        "store": {**measured["store"], "what": "Store.put: policy, sealing, blind indexes, SQL"},
        "store_unbatched": {
            **measured["unbatched"],
            "what": "Store.put with the backend's group commit off (batches of one put, one "
            "statement each): what the group commit gains",
        },
        "ratio_store_over_raw_rounds": [round(r, 4) for r in per_round],
        "ratio_store_over_raw": spread(per_round, 4),
        "ratio_sealed_over_raw": spread(ratios(seconds["sealed"], seconds["raw"]), 4),
        "ratio_store_over_sealed": spread(ratios(seconds["store"], seconds["sealed"]), 4),
        "ratio_unbatched_over_raw": spread(ratios(seconds["unbatched"], seconds["raw"]), 4),
        "cost": round(cost, 4),
        "target_cost": TARGET_COST,
        "pass": cost <= TARGET_COST,
        "processes": {
            str(count): {
                "rows_per_process": rows // count,
                "total_writes_per_s": spread([w.total_per_s for w in found], 1),
                "rounds": [w.to_json() for w in found],
            }
            for count, found in pg.workers.items()
        },
    }


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (5 min {five:.2f})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000, help="rows per run (default 20000)")
    parser.add_argument("--concurrency", type=int, default=32, help="store writer tasks (32)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds, interleaved (5)")
    parser.add_argument(
        "--backends", type=parse_backends, default=list(BACKENDS), help="sqlite,postgresql"
    )
    parser.add_argument(
        "--pool", type=int, default=StoreSettings().pool_size, help="PostgreSQL pool size (10)"
    )
    parser.add_argument(
        "--processes",
        type=positive_ints,
        default=[1, 2],
        help="PostgreSQL: store processes at once on one database, --rows split among them (1,2)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile a PostgreSQL store run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    parser.add_argument("--tmpdir", type=Path, default=None, help="parent of the temp dirs")
    args = parser.parse_args(argv)
    if min(args.rows, args.concurrency, args.repeat, args.pool) < 1:
        parser.error("--rows, --concurrency, --repeat and --pool must be at least 1")

    if "postgresql" in args.backends and find_bindir() is None:
        parser.error(
            "PostgreSQL 15 not found (apt-get install postgresql-15, or SOFTRELAY_PG_BINDIR);"
            " --backends sqlite measures SQLite alone"
        )
    policy = load_policy(PROFILE)
    rows = registration_rows(args.rows)
    raw_s: list[float] = []
    batched_s: list[float] = []
    pragmas: dict[str, Any] = {}
    store_s: list[float] = []
    encode_s: list[dict[str, float]] = []
    loads = [load()]
    result: dict[str, Any] = {
        "benchmark": "store write throughput",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "category": CATEGORY,
        "profile": PROFILE,
        "rows": args.rows,
        "concurrency": args.concurrency,
        "repeat": args.repeat,
        "statistic": f"{args.repeat} interleaved rounds: the verdict on the median of the "
        "per-round ratios; best run and min-max given too",
    }
    with contextlib.ExitStack() as stack:
        pg = None
        if "postgresql" in args.backends:
            pg = stack.enter_context(Postgres.started(policy, args.pool, args.concurrency))
            keyring = Keyring.generate()
            # The worker processes share the keyring, as a fleet's processes do.
            keyring_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.tmpdir)))
            keyring_file = keyring_dir / "keyring.json"
            keyring_file.write_bytes(keyring.to_json())
        for turn in range(args.repeat):  # interleaved: a slow patch hits every measurement
            if "sqlite" in args.backends:
                elapsed, pragmas = run_raw(rows, policy, args.tmpdir)
                raw_s.append(elapsed)
                batched_s.append(run_raw(rows, policy, args.tmpdir, batch=args.concurrency)[0])
                store_s.append(run_store(rows, policy, args.concurrency, args.tmpdir))
                encode_s.append(run_encode(rows[:ENCODE_ROWS], policy))
            if pg is not None:
                pg.round(rows, keyring, turn)
                for count in args.processes:
                    pg.processes(count, args.rows // count, keyring_file, seed=turn * 100)
            loads.append(load())
            print(f"round {turn + 1}/{args.repeat} done, load {loads[-1]}", flush=True)
        result["load_average"] = loads
        if "sqlite" in args.backends:
            result |= sqlite_json(args, raw_s, batched_s, store_s, encode_s, pragmas)
        if pg is not None:
            result["postgresql"] = postgres_json(args, pg)
            if args.profile or not result["postgresql"]["pass"]:
                result["postgresql"]["profile"] = pg.profile(rows, keyring)
    result["pass"] = all(
        part["pass"] for part in (result, result.get("postgresql")) if part and "cost" in part
    )
    write_result(args.out, result)
    report(args, result)
    return 0 if result["pass"] else 1


def report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    print(
        f"{args.rows} {CATEGORY} rows, {args.repeat} rounds interleaved, fresh temp dir or "
        f"database each; Python {result['python']}, {result['cpus']} CPUs; "
        f"load {', '.join(result['load_average'])}"
    )
    if "cost" in result:
        print(f"\nSQLite {result['sqlite']}{'':29}{'best w/s':>12}{'µs/write':>11}")
        rows = [
            ("(a) raw sqlite3, 1 thread, 1 tx per row", result["raw_sqlite"]),
            (f"(a2) raw sqlite3, {args.concurrency} rows per tx", result["raw_sqlite_batched"]),
            (f"(b) Store.put, {args.concurrency} asyncio tasks", result["store"]),
        ]
        for label, part in rows:
            print(f"{label:44}{part['writes_per_s']:>12,.0f}{part['us_per_row']:>11.1f}")
        encode = result["encode_only"]
        print(f"{'(c) check + encode + subject, CPU only':44}{'':>12}{encode['us_per_row']:>11.1f}")
        for name, us in encode["steps_us_per_row"].items():
            print(f"{'      ' + name:44}{'':>12}{us:>11.1f}")
        ratio = result["ratio_b_over_a"]
        print(
            f"b/a median {ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})   "
            f"cost {result['cost']:.1%}   target <= {TARGET_COST:.0%}: {verdict(result['cost'])}"
            f"   (against (a2): {result['cost_vs_batched']:.1%})"
        )
    pg = result.get("postgresql")
    if pg:
        print(
            f"\nPostgreSQL {pg['postgresql']}, asyncpg, pool {pg['pool']}, "
            f"{args.concurrency} tasks, uvloop"
        )
        print(f"{'':40}{'median w/s':>11}{'min-max':>16}{'client µs':>11}{'server µs':>11}")
        for key, label in (
            ("raw_asyncpg", "(p) raw INSERT, plaintext"),
            ("sealed_backend_put", "(q) backend put, pre-sealed rows"),
            ("store", "(r) Store.put"),
            ("store_unbatched", "(s) Store.put, group commit off"),
        ):
            part = pg[key]
            rate = part["writes_per_s"]
            span = f"{rate['min']:,.0f}-{rate['max']:,.0f}"
            print(
                f"{label:40}{rate['median']:>11,.0f}{span:>16}"
                f"{part['client_cpu_us_per_row']['median']:>11.1f}"
                f"{part['server_cpu_us_per_row']['median']:>11.1f}"
            )
        for key, label in (
            ("ratio_store_over_raw", "r/p"),
            ("ratio_sealed_over_raw", "q/p"),
            ("ratio_store_over_sealed", "r/q"),
            ("ratio_unbatched_over_raw", "s/p"),
        ):
            r = pg[key]
            print(f"{label} median {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})")
        print(
            f"cost = 1 - r/p = {pg['cost']:.1%}   target <= {TARGET_COST:.0%}: "
            f"{verdict(pg['cost'])}"
        )
        for count, part in pg["processes"].items():
            total = part["total_writes_per_s"]
            each = "; ".join(
                "/".join(f"{x:,.0f}" for x in r["per_process_writes_per_s"]) for r in part["rounds"]
            )
            print(
                f"{count} process(es), {part['rows_per_process']} rows each: total "
                f"{total['median']:,.0f}/s ({total['min']:,.0f}-{total['max']:,.0f}); "
                f"per process by round: {each}"
            )
        if "profile" in pg:
            print("profile of one Store.put run (bench process, own time, µs per row):")
            for layer, us in pg["profile"]["layers_us_per_row"].items():
                print(f"  {layer:48}{us:>8.1f}")
    print(f"\nwrote {args.out}")


def parse_backends(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    if not chosen or set(chosen) - set(BACKENDS):
        raise argparse.ArgumentTypeError(f"backends are {', '.join(BACKENDS)}; got {text!r}")
    return chosen


if __name__ == "__main__":
    sys.exit(main())
