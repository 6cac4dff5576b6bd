"""Write throughput of the policy-enforcing store against raw SQLite, on this machine.

    .venv/bin/python bench/store.py [--rows N] [--concurrency C] [--out FILE]

Three measurements on the same registration rows, each in a fresh temporary directory:

(a) raw sqlite3: the rows in plaintext, into the table the store's own backend creates
    (same columns, blind-index columns holding the plaintext, same indexes including the
    unique key, same pragmas), one BEGIN IMMEDIATE/INSERT/COMMIT per row in a tight loop
    on one thread: the store's transaction semantics without policy, crypto or asyncio.
(b) the store: `Store.put("registration", row)` from C concurrent asyncio tasks: checked
    against the policy, AES-GCM encrypted, blind indexed, committed before it returns.
(c) the CPU cost of the store's encode path alone (`_check_fields`, `_encode` and the
    subject's blind index), no I/O.

Each is run `--repeat` times (interleaved, so drift hits all alike) and the best run is
reported. The issue's target: policy check and encryption cost at most 25% of write
throughput, that is 1 - b/a <= 0.25. Timing uses `time.perf_counter` only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sqlite3
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

from bench.harness import write_result
from privacy.clock import SystemClock
from privacy.keys import Keyring
from privacy.policy import Policy, load_policy
from privacy.sqlite import SQLiteBackend
from privacy.store import DATABASE_FILE, Store, Value, table_spec

CATEGORY = "registration"
PROFILE = "auerproxy"
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000, help="rows per run (default 20000)")
    parser.add_argument("--concurrency", type=int, default=32, help="store writer tasks (32)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement, best kept (3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    parser.add_argument("--tmpdir", type=Path, default=None, help="parent of the temp dirs")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.concurrency < 1 or args.repeat < 1:
        parser.error("--rows, --concurrency and --repeat must be at least 1")

    policy = load_policy(PROFILE)
    rows = registration_rows(args.rows)
    raw_s: list[float] = []
    batched_s: list[float] = []
    pragmas: dict[str, Any] = {}
    store_s: list[float] = []
    encode_s: list[dict[str, float]] = []
    for _ in range(args.repeat):  # interleaved: a slow patch of the machine hits all three
        elapsed, pragmas = run_raw(rows, policy, args.tmpdir)
        raw_s.append(elapsed)
        batched_s.append(run_raw(rows, policy, args.tmpdir, batch=args.concurrency)[0])
        store_s.append(run_store(rows, policy, args.concurrency, args.tmpdir))
        encode_s.append(run_encode(rows[:ENCODE_ROWS], policy))

    raw = Result(raw_s, args.rows)
    batched = Result(batched_s, args.rows)
    store = Result(store_s, args.rows)
    sample = min(args.rows, ENCODE_ROWS)
    steps = {name: Result([run[name] for run in encode_s], sample) for name in encode_s[0]}
    encode_us = sum(step.us_per_row for step in steps.values())
    ratio = store.per_s / raw.per_s
    cost = 1 - ratio
    passed = cost <= TARGET_COST

    result = {
        "benchmark": "store write throughput",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "category": CATEGORY,
        "profile": PROFILE,
        "rows": args.rows,
        "concurrency": args.concurrency,
        "repeat": args.repeat,
        "statistic": f"best of {args.repeat} runs",
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
        "ratio_b_over_a": round(ratio, 4),
        "cost": round(cost, 4),
        "target_cost": TARGET_COST,
        "pass": passed,
    }
    write_result(args.out, result)

    print(
        f"{args.rows} {CATEGORY} rows, best of {args.repeat} runs, fresh temp dir each; "
        f"Python {result['python']}, SQLite {result['sqlite']}, {result['cpus']} CPUs"
    )
    print(f"{'':44}{'writes/s':>12}{'µs/write':>11}")
    print(
        f"{'(a) raw sqlite3, 1 thread, 1 tx per row':44}{raw.per_s:>12,.0f}{raw.us_per_row:>11.1f}"
    )
    label = f"(a2) raw sqlite3, {args.concurrency} rows per tx"
    print(f"{label:44}{batched.per_s:>12,.0f}{batched.us_per_row:>11.1f}")
    label = f"(b) Store.put, {args.concurrency} asyncio tasks"
    print(f"{label:44}{store.per_s:>12,.0f}{store.us_per_row:>11.1f}")
    print(f"{'(c) check + encode + subject, CPU only':44}{'':>12}{encode_us:>11.1f}")
    for name, step in steps.items():
        print(f"{'      ' + name:44}{'':>12}{step.us_per_row:>11.1f}")
    verdict = "PASS" if passed else "FAIL"
    print(
        f"b/a = {ratio:.3f}   cost = 1 - b/a = {cost:.1%}   "
        f"target cost <= {TARGET_COST:.0%}: {verdict}"
    )
    print(
        f"for reference, against (a2), raw batches as large as group commit can reach: "
        f"cost = {1 - store.per_s / batched.per_s:.1%}"
    )
    print(f"wrote {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
