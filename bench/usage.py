"""Usage pings accepted per second, against a bare aiohttp handler in the same run; and
`serve --workers 2` against one `serve` process.

    .venv/bin/python bench/usage.py [--seconds 5] [--connections 64] [--repeat 5]
        [--serve-repeat 3] [--no-serve] [--profile] [--quick] [--out FILE]

(1) The route against the limit. Two servers, each one process on uvloop on 127.0.0.1,
    without an access log (as `serve`):

    (a) softrelay: the `/usage/v1/ping` route of `usage.service.add_usage` behind serve's
        `refusals` middleware, on the policy's store (SQLite under a fresh temporary
        directory): rate limiter (on, with a burst no client reaches), strict validation,
        tenant key, the month secret's HMAC, the store's upsert committed before the 202.
        Every ping carries a new pid, so every ping is a database write: the worst case,
        and most of a month's real pings.
    (b) the limit: a bare aiohttp handler that reads the body, parses the JSON and
        answers 202.

    `--repeat` rounds, each runs (a) and (b) (the order alternating), so a slow patch of
    the shared machine hits both; the verdict is on the median of the per-round ratios
    (a)/(b), their min-max is the spread. Goal (from the issue): >= 60%.

(2) Workers (skipped with `--no-serve`): `softrelay serve` as an operator runs it (every
    middleware, SQLite in its data dir, the rate limit with a burst no client reaches):
    (s) one process without [cluster], (c) one process with [cluster] (its rate limit in
    Redis: what the cluster costs per ping), (w) `serve --workers 2` with [cluster] (the
    workers share one SQLite file and the Redis limit; each keeps its own month's id set
    and commits its own pings before their 202). `--serve-repeat` rounds, interleaved;
    per round w/c and w/s.

The load generator is a separate process: `--connections` keep-alive HTTP/1.1
connections written over raw asyncio streams (cheaper per request than an HTTP client
library, so the servers are what is measured), each sending the next ping when the
answer to the last has come. CPU per ping is read from /proc for the server (all its
threads; its main thread apart) and the load generator over the timed window. After
each softrelay run the store is counted: every ping answered 202 has its row (each has
a new pid), so no 202 went out for an id that was not stored. The machine has 2 cores,
shared by the load generator and the servers (and by whatever else runs on it).

`--profile`: one more run of (a) under cProfile (the server's main thread, CPU time),
own time per layer and the top functions. `--trace`: one more run of (a) with its commit
pipeline timed (`_Trace`): how long a ping waits in the ledger, and where: for its batch
to start, the writer thread to take it, the transaction (its statements, its COMMIT),
the hand-back to the loop. `--quick` (`make bench`): 2 s runs, 3 rounds, 2 serve rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing
import os
import platform
import pstats
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    Processes,
    cpu_seconds,
    metric_values,
    process_tree,
    spread,
    start_softrelay,
    write_file,
    write_result,
)
from bench.profiling import own_time
from bench.relay_cluster import Cluster, Workers, start_workers
from bench.relay_sipp import relay_config
from privacy import batches, dbthread
from privacy.clock import SystemClock
from privacy.database import DATABASE_FILE
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.store import Store, table_name
from usage.endpoint import PING_PATH
from usage.ledger import USAGE
from usage.period import period_of
from usage.service import add_usage
from usage.settings import Tenant, UsageSettings
from webapi.errors import refusals
from webapi.ratelimit import LocalLimiters

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "usage.json"
KEY = "bench-tenant-key-0123456789abcdef"
KEY_ENV = "SOFTRELAY_BENCH_USAGE_KEY"  # the serve config names the key: never on disk
GOAL = 0.60
WORKERS = 2
STORE = web.AppKey("store", Store)
REGISTRY = web.AppKey("registry", CollectorRegistry)
CLK_TCK = os.sysconf("SC_CLK_TCK")
LAYERS_FILES = (
    ("/usage/", "ours: usage"),
    ("/webapi/", "ours: webapi"),
    ("/privacy/", "ours: privacy (store, batches)"),
    ("/aiohttp/", "aiohttp"),
    ("/multidict/", "aiohttp"),
    ("/yarl/", "aiohttp"),
    ("/prometheus_client/", "prometheus_client"),
    ("/asyncio/", "asyncio"),
    ("/uvloop/", "asyncio"),
)
LAYERS_BUILTINS = (
    ("orjson", "orjson"),
    ("_hashlib", "hmac"),
    ("hmac", "hmac"),
    ("method 'send' of 'coroutine'", "asyncio"),
    ("run_until_complete", "asyncio"),
)
LABELS = {
    "bare": "(b) bare aiohttp: read JSON, answer 202",
    "softrelay": "(a) softrelay /usage/v1/ping (new id each)",
    "serve": "(s) serve, 1 process, no [cluster]",
    "serve_cluster": "(c) serve, 1 process, [cluster] (Redis)",
    "workers": f"(w) serve --workers {WORKERS}, [cluster]",
}


# --- the commit pipeline's times (--trace), in the server's process ------------------------

TRACE_STAGES = {
    "ledger_wait": "a ping in the ledger: its write submitted to its return (ms)",
    "to_batch": "its write submitted to its batch's task starting (ms)",
    "batch_size": "pings per batch",
    "to_writer": "a batch's task starting to the writer thread taking it (ms)",
    "batches_per_transaction": "batches the writer joined in one transaction",
    "statements": "a transaction: BEGIN and its statements (ms)",
    "commit": "a transaction: its COMMIT (ms)",
    "hand_back": "a transaction committed to its batch's future set on the loop (ms)",
}


class _Trace:
    """Times of the commit pipeline: wrappers around `privacy.batches.GroupCommit` and
    `privacy.dbthread.DatabaseThread`, installed in the server's process before its app
    is built (the writer thread's wrappers run on that thread)."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {name: [] for name in TRACE_STAGES}
        self._submitted: dict[int, float] = {}  # id(item) -> when its write was submitted
        self._started: dict[int, float] = {}  # id(call's future) -> when its batch started
        self._committed: dict[int, float] = {}  # id(call's future) -> when committed
        self._batch_started = 0.0  # the batch whose task runs now (it submits synchronously)

    def install(self) -> None:
        clock, times = time.perf_counter, self.times
        submit, run = batches.GroupCommit.submit, batches.GroupCommit._run
        together, resolve = dbthread.DatabaseThread._together, dbthread._resolve

        async def timed_submit(commit: Any, item: Any) -> Any:
            start = self._submitted[id(item)] = clock()
            try:
                return await submit(commit, item)
            finally:
                times["ledger_wait"].append(clock() - start)

        async def timed_run(commit: Any, batch: list[tuple[Any, Any]]) -> None:
            now = clock()
            times["batch_size"].append(len(batch))
            for item, _ in batch:
                times["to_batch"].append(now - self._submitted.pop(id(item), now))
            self._batch_started = now
            await run(commit, batch)

        async def timed_submit_call(thread: Any, fn: Any, *, batched: bool) -> Any:
            async with thread._slots:
                loop = asyncio.get_running_loop()
                future: asyncio.Future[Any] = loop.create_future()
                self._started[id(future)] = self._batch_started
                thread._queue.put(dbthread._Call(fn, batched, future, loop))
                return await future

        def timed_together(thread: Any, calls: list[Any]) -> Any:
            taken = clock()
            for call in calls:
                times["to_writer"].append(taken - self._started.pop(id(call.future), taken))
            times["batches_per_transaction"].append(len(calls))
            begin, commit = thread._begin, thread._commit
            marks: dict[str, float] = {}

            def timed_commit() -> None:
                marks["statements"] = clock()
                commit()
                marks["committed"] = clock()

            thread._commit = timed_commit
            try:
                return together(thread, calls)
            finally:
                thread._begin, thread._commit = begin, commit
                if "committed" in marks:
                    times["statements"].append(marks["statements"] - taken)
                    times["commit"].append(marks["committed"] - marks["statements"])
                    for call in calls:
                        self._committed[id(call.future)] = marks["committed"]

        def timed_resolve(outcomes: list[Any]) -> None:
            now = clock()
            for call, _, _ in outcomes:
                committed = self._committed.pop(id(call.future), None)
                if committed is not None:
                    times["hand_back"].append(now - committed)
            resolve(outcomes)

        setattr(batches.GroupCommit, "submit", timed_submit)  # noqa: B010 - a bench's patch
        setattr(batches.GroupCommit, "_run", timed_run)  # noqa: B010
        setattr(dbthread.DatabaseThread, "_submit", timed_submit_call)  # noqa: B010
        setattr(dbthread.DatabaseThread, "_together", timed_together)  # noqa: B010
        setattr(dbthread, "_resolve", timed_resolve)  # noqa: B010

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, values in self.times.items():
            if not values:
                continue
            scale = 1.0 if name in ("batch_size", "batches_per_transaction") else 1e3
            ordered = sorted(v * scale for v in values)
            out[name] = {
                "count": len(ordered),
                "mean": round(statistics.fmean(ordered), 3),
                "p50": round(ordered[len(ordered) // 2], 3),
                "p90": round(ordered[int(len(ordered) * 0.9)], 3),
                "p99": round(ordered[int(len(ordered) * 0.99)], 3),
                "max": round(ordered[-1], 3),
            }
        return out


# --- the servers of part (1), each in its own process ------------------------------------


def _softrelay_app(data_dir: str) -> web.Application:
    clock = SystemClock()
    policy = load_policy("auerproxy")
    app = web.Application(middlewares=[refusals])

    async def store_ctx(app: web.Application) -> Any:
        store = await Store.create(policy, Keyring.generate(), Path(data_dir), clock)
        app[STORE] = store
        yield
        await store.close()

    app.cleanup_ctx.append(store_ctx)
    app[REGISTRY] = CollectorRegistry()
    settings = UsageSettings((Tenant("bench", KEY),), ip_burst=1_000_000_000)
    add_usage(
        app,
        settings,
        policy=policy,
        clock=clock,
        close_interval=3600,
        store=STORE,
        registry=REGISTRY,
        limiters=LocalLimiters(clock),
    )
    return app


def _bare_app() -> web.Application:
    async def ping(request: web.Request) -> web.Response:
        orjson.loads(await request.read())
        return web.Response(body=b'{"status":"accepted"}', status=202)

    app = web.Application()
    app.router.add_post(PING_PATH, ping)
    return app


def _serve(kind: str, data_dir: str, ready: Any, profile: Any, trace: Any = None) -> None:
    """One server of part (1); with `profile` (a pipe), cProfile on CPU time from the
    first request of the timed window (a line on the pipe) to the next; with `trace` (a
    pipe), the commit pipeline timed (`_Trace`), its summary sent when asked."""
    tracer = _Trace() if trace is not None else None
    if tracer is not None:
        tracer.install()

    async def run() -> None:
        app = _softrelay_app(data_dir) if kind == "softrelay" else _bare_app()
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ready.send(runner.addresses[0][1])
        if profile is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, profile.recv)
            profiler = cProfile.Profile(time.process_time)
            profiler.enable()
            await loop.run_in_executor(None, profile.recv)
            profiler.disable()
            profiler.dump_stats(os.path.join(data_dir, "profile.pstats"))
            profile.send("written")
        if tracer is not None:
            await asyncio.get_running_loop().run_in_executor(None, trace.recv)
            trace.send(tracer.summary())
        await asyncio.Event().wait()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())


# --- the load generator -------------------------------------------------------------------


def _request(port: int, period: str) -> bytes:
    body = orjson.dumps(
        {
            "tenant": "bench",
            "period": period,
            "pid": secrets.token_hex(16),
            "platform": "android",
            "app_version": "5.2.1",
        }
    )
    return (
        f"POST {PING_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _connection(port: int, period: str, deadline: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            writer.write(_request(port, period))
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            counts[0 if head.startswith(b"HTTP/1.1 202") else 1] += 1
    finally:
        writer.close()


def _load(port: int, seconds: float, connections: int, out: Any) -> None:
    """Warm up, say "start", load for `seconds`, then send (warm-up 202s, 202s, others,
    elapsed, own CPU seconds)."""

    async def run() -> None:
        period = period_of(time.time())
        warm = [0, 0]
        # Warm-up: connections open and the first pings (month secret, tables) go through.
        await asyncio.gather(
            *(_connection(port, period, time.perf_counter() + 0.5, warm) for _ in range(8))
        )
        counts = [0, 0]
        out.send("start")
        cpu = time.process_time()
        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(
            *(_connection(port, period, deadline, counts) for _ in range(connections))
        )
        elapsed = time.perf_counter() - start
        out.send((warm[0] + warm[1], counts[0], counts[1], elapsed, time.process_time() - cpu))

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())


def _thread_cpu(pids: Sequence[int]) -> tuple[float, float]:
    """CPU seconds so far of these processes: (all threads, their main threads)."""
    total = main = 0.0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            seconds = (int(fields[11]) + int(fields[12])) / CLK_TCK
            total += seconds
            if task.name == str(pid):
                main += seconds
    return total, main


def drive(
    port: int, seconds: float, connections: int, pids: Sequence[int], redis: int | None = None
) -> dict[str, Any]:
    """Load the server on `port` (its processes `pids`; `redis`, the cluster's Redis
    server, counted apart) for `seconds`."""
    ctx = multiprocessing.get_context("spawn")
    out_r, out_w = ctx.Pipe(duplex=False)
    load = ctx.Process(target=_load, args=(port, seconds, connections, out_w), daemon=True)
    load.start()
    try:
        if not out_r.poll(60):
            raise RuntimeError("the load generator did not start")
        out_r.recv()
        before = _thread_cpu(pids)
        redis_before = cpu_seconds([redis]) if redis else 0.0
        if not out_r.poll(seconds + 60):
            raise RuntimeError("the load generator did not finish")
        after = _thread_cpu(pids)
        redis_cpu = (cpu_seconds([redis]) - redis_before) if redis else None
        warm, ok, other, elapsed, load_cpu = out_r.recv()
    finally:
        load.join(10)
        if load.is_alive():
            load.kill()
    per_ping = 1e6 / max(ok, 1)
    if redis_cpu is not None:
        extra = {"redis_cpu_us_per_ping": round(redis_cpu * per_ping, 1)}
    else:
        extra = {}
    return {
        **extra,
        "accepted": ok,
        "refused": other,
        "warm_up": warm,
        "seconds": round(elapsed, 3),
        "per_second": round(ok / elapsed, 1),
        "server_cpu_us_per_ping": round((after[0] - before[0]) * per_ping, 1),
        "server_main_thread_cpu_us_per_ping": round((after[1] - before[1]) * per_ping, 1),
        "load_cpu_us_per_ping": round(load_cpu * per_ping, 1),
    }


def stored_ids(data_dir: Path) -> int:
    db = sqlite3.connect(f"{(data_dir / DATABASE_FILE).as_uri()}?mode=ro", uri=True)
    try:
        (count,) = db.execute(f"SELECT count(*) FROM {table_name(USAGE)}").fetchone()
    finally:
        db.close()
    return int(count)


def check_stored(kind: str, run: dict[str, Any], data_dir: Path) -> None:
    """Every 202 of the run (the warm-up's too, all new pids) has its row."""
    if run["refused"]:
        raise RuntimeError(f"{kind}: {run['refused']} pings were not answered 202")
    run["stored"] = stored_ids(data_dir)
    if run["stored"] < run["accepted"] + run["warm_up"]:
        raise RuntimeError(
            f"{kind}: {run['accepted'] + run['warm_up']} pings answered 202, "
            f"{run['stored']} ids stored"
        )


def measure(
    kind: str, seconds: float, connections: int, profile: bool = False, trace: bool = False
) -> dict[str, Any]:
    """One run of part (1); with `profile`, its cProfile table too (under "profile");
    with `trace`, its commit pipeline's times (under "trace")."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-usage-") as data_dir:
        ready_r, ready_w = ctx.Pipe(duplex=False)
        prof_here, prof_there = ctx.Pipe() if profile else (None, None)
        trace_here, trace_there = ctx.Pipe() if trace else (None, None)
        server = ctx.Process(
            target=_serve, args=(kind, data_dir, ready_w, prof_there, trace_there), daemon=True
        )
        server.start()
        try:
            if not ready_r.poll(30):
                raise RuntimeError(f"{kind} server did not start")
            port = ready_r.recv()
            if prof_here is not None:
                prof_here.send("start")  # on at once: the warm-up is in the profile too
            run = drive(port, seconds, connections, [server.pid or 0])
            if prof_here is not None:
                prof_here.send("stop")
                if not prof_here.poll(30):
                    raise RuntimeError("the profile was not written")
                prof_here.recv()
                run["profile"] = profile_report(Path(data_dir) / "profile.pstats", run)
            if trace_here is not None:
                trace_here.send("summary")
                if not trace_here.poll(30):
                    raise RuntimeError("the trace was not sent")
                run["trace"] = trace_here.recv()
        finally:
            server.terminate()
            server.join(10)
        if kind == "softrelay":
            check_stored(kind, run, Path(data_dir))
        elif run["refused"]:
            raise RuntimeError(f"{kind}: {run['refused']} pings were not answered 202")
    return run


def profile_report(path: Path, run: dict[str, Any]) -> dict[str, Any]:
    table = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]  # untyped in typeshed
    pings = run["accepted"] + run["warm_up"]
    layers, functions = own_time(table, LAYERS_FILES, LAYERS_BUILTINS)
    total = sum(layers.values())
    return {
        "pings": pings,
        "cpu_us_per_ping": round(total * 1e6 / pings, 1),
        "layers_us_per_ping": {
            layer: round(seconds * 1e6 / pings, 1) for layer, seconds in layers.most_common()
        },
        "top": [
            {"function": where, "calls": calls, "own_us_per_ping": round(t * 1e6 / pings, 2)}
            for t, calls, where in functions[:20]
        ],
    }


# --- part (2): serve and serve --workers ---------------------------------------------------


def serve_config(work: Path, cluster: Cluster | None, node_id: str, workers: bool) -> Path:
    secret = write_file(work / "pbx.secret", secrets.token_hex(16) + "\n")
    base = relay_config(work, None, secret, http_connections=4096).read_text(encoding="utf-8")
    usage = (
        f'[usage]\nip_burst = 1000000000\n[[usage.tenant]]\nid = "bench"\nkey = "env:{KEY_ENV}"\n'
    )
    text = base + "\n" + usage
    if cluster is not None:
        text += "\n" + cluster.section(node_id)
        if workers:
            text = '[server]\nmetrics_listen = "127.0.0.1:0"\n\n' + text
    return write_file(work / "softrelay.toml", text)


async def measure_serve(
    kind: str, procs: Processes, work: Path, cluster: Cluster, seconds: float, connections: int
) -> dict[str, Any]:
    await asyncio.to_thread(work.mkdir, parents=True)
    env = {KEY_ENV: KEY, **cluster.env}
    workers: Workers | None = None
    if kind == "workers":
        config = serve_config(work, cluster, f"bench-{work.name}", workers=True)
        workers = await start_workers(procs, work, config, env, WORKERS)
        server = workers.server
    else:
        with_cluster = cluster if kind == "serve_cluster" else None
        config = serve_config(work, with_cluster, f"bench-{work.name}", workers=False)
        server = await start_softrelay(procs, work, config, env=env)
    try:
        pids = process_tree(server.proc.pid)
        redis = _redis_pid(cluster) if kind != "serve" else None
        run = await asyncio.to_thread(
            drive, server.ports["http"], seconds, connections, pids, redis
        )
        run["processes"] = len(pids)
        if workers is not None:
            # Each worker's own count: the kernel spreads the connections over them.
            run["accepted_per_worker"] = [await _accepted(port) for port in workers.metrics_ports]
    finally:
        await server.stop(procs)
    check_stored(kind, run, server.data_dir)
    return run


async def _accepted(metrics_port: int) -> int:
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response,
    ):
        text = await response.text()
    found = metric_values(text, "softrelay_usage_pings_total")
    return int(found.get('{outcome="accepted"}', 0))


def _redis_pid(cluster: Cluster) -> int | None:
    # tests/serverprocess.py keeps its process private; its CPU is part of a ping's cost.
    process = cluster.redis._process
    return process.pid if process is not None else None


async def serve_rounds(
    rounds: int, seconds: float, connections: int
) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {"serve": [], "serve_cluster": [], "workers": []}
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="bench-usage-serve-") as tmp:
        try:
            async with Cluster.started(Path(tmp)) as cluster:
                for index in range(rounds):
                    kinds = list(runs) if index % 2 == 0 else list(reversed(runs))
                    for kind in kinds:
                        work = Path(tmp) / f"{kind}-{index}"
                        runs[kind].append(
                            await measure_serve(kind, procs, work, cluster, seconds, connections)
                        )
        finally:
            await procs.close()
    return runs


# --- report ---------------------------------------------------------------------------------


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {
        kind: {
            "per_second": spread([r["per_second"] for r in results], 0),
            "server_cpu_us_per_ping": spread([r["server_cpu_us_per_ping"] for r in results], 1),
            "server_main_thread_cpu_us_per_ping": spread(
                [r["server_main_thread_cpu_us_per_ping"] for r in results], 1
            ),
            "load_cpu_us_per_ping": spread([r["load_cpu_us_per_ping"] for r in results], 1),
            **(
                {"redis_cpu_us_per_ping": spread([r["redis_cpu_us_per_ping"] for r in results], 1)}
                if "redis_cpu_us_per_ping" in results[0]
                else {}
            ),
        }
        for kind, results in runs.items()
    }


def ratios(runs: dict[str, list[dict[str, Any]]], over: str, under: str) -> list[float]:
    return [a["per_second"] / b["per_second"] for a, b in zip(runs[over], runs[under], strict=True)]


def print_table(title: str, figures: dict[str, dict[str, Any]]) -> None:
    print(title)
    print(f"{'server':<46} {'pings/s median (min-max)':>26} {'CPU us/ping: all / main / load':>32}")
    for kind, row in figures.items():
        rate, cpu = row["per_second"], row["server_cpu_us_per_ping"]
        main, load = row["server_main_thread_cpu_us_per_ping"], row["load_cpu_us_per_ping"]
        rates = f"{rate['median']:,.0f} ({rate['min']:,.0f}-{rate['max']:,.0f})"
        cpus = f"{cpu['median']:.0f} / {main['median']:.0f} / {load['median']:.0f}"
        if "redis_cpu_us_per_ping" in row:
            cpus += f" + Redis {row['redis_cpu_us_per_ping']['median']:.0f}"
        print(f"{LABELS[kind]:<46} {rates:>26} {cpus:>32}")


def print_ratio(name: str, values: dict[str, float]) -> None:
    print(f"{name}: median {values['median']:.2f} ({values['min']:.2f}-{values['max']:.2f})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=None, help="per run (5; quick 2)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=None, help="rounds of (1) (5; quick 3)")
    parser.add_argument("--serve-repeat", type=int, default=None, help="of (2) (3; quick 2)")
    parser.add_argument("--no-serve", action="store_true", help="skip (2), the workers")
    parser.add_argument("--profile", action="store_true", help="cProfile one more run of (a)")
    parser.add_argument("--trace", action="store_true", help="time (a)'s commit pipeline")
    parser.add_argument("--quick", action="store_true", help="short runs (make bench)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    repeat = args.repeat or (3 if args.quick else 5)
    serve_repeat = args.serve_repeat or (2 if args.quick else 3)
    load_before = os.getloadavg()

    runs: dict[str, list[dict[str, Any]]] = {"bare": [], "softrelay": []}
    for index in range(repeat):
        kinds = ("bare", "softrelay") if index % 2 == 0 else ("softrelay", "bare")
        for kind in kinds:
            runs[kind].append(measure(kind, seconds, args.connections))
    per_round = ratios(runs, "softrelay", "bare")
    ratio = spread(per_round)
    verdict = "PASS" if ratio["median"] >= GOAL else "FAIL"
    figures = summary(runs)
    print(
        f"usage pings, {args.connections} connections, {seconds:g} s per run, "
        f"{repeat} rounds interleaved"
    )
    print_table("(1) the route against a bare aiohttp handler", figures)
    print_ratio("(a)/(b) per round", ratio)
    print(f"goal >= {GOAL:.0%}: {verdict}")

    profile = None
    if args.profile:
        profile = measure("softrelay", seconds, args.connections, profile=True)["profile"]
        print(f"\nprofile of (a), main thread, {profile['cpu_us_per_ping']} us CPU per ping:")
        for layer, us in profile["layers_us_per_ping"].items():
            print(f"  {layer:<36} {us:>7.1f} us")
        for row in profile["top"][:12]:
            print(f"  {row['own_us_per_ping']:>7.2f} us  {row['function']}")

    trace = None
    if args.trace:
        traced = measure("softrelay", seconds, args.connections, trace=True)
        trace = {"run": {k: v for k, v in traced.items() if k != "trace"}, **traced["trace"]}
        print(f"\ncommit pipeline of (a), one more run: {traced['per_second']:,.0f} pings/s")
        print(f"  {'':<66} {'mean':>7} {'p50':>7} {'p90':>7} {'p99':>7}")
        for name, label in TRACE_STAGES.items():
            if name in traced["trace"]:
                row = traced["trace"][name]
                print(
                    f"  {label:<66} {row['mean']:>7.2f} {row['p50']:>7.2f}"
                    f" {row['p90']:>7.2f} {row['p99']:>7.2f}"
                )

    serve: dict[str, Any] | None = None
    if not args.no_serve:
        serve_runs = asyncio.run(serve_rounds(serve_repeat, seconds, args.connections))
        serve = {
            "runs": serve_runs,
            "figures": summary(serve_runs),
            "workers_over_cluster": spread(ratios(serve_runs, "workers", "serve_cluster")),
            "workers_over_serve": spread(ratios(serve_runs, "workers", "serve")),
            "cluster_over_serve": spread(ratios(serve_runs, "serve_cluster", "serve")),
        }
        print()
        print_table(f"(2) softrelay serve, {serve_repeat} rounds interleaved", serve["figures"])
        print_ratio("(w)/(c) per round", serve["workers_over_cluster"])
        print_ratio("(w)/(s) per round", serve["workers_over_serve"])
        print_ratio("(c)/(s) per round", serve["cluster_over_serve"])
        shares = [r["accepted_per_worker"] for r in serve_runs["workers"]]
        print(f"(w) pings accepted by each worker, per round: {shares}")

    result = {
        "benchmark": "usage",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "connections": args.connections,
        "seconds": seconds,
        "rounds": repeat,
        "runs": runs,
        "figures": figures,
        "ratio_per_round": [round(r, 3) for r in per_round],
        "ratio": ratio,
        "goal": GOAL,
        "verdict": verdict,
        "profile": profile,
        "trace": trace,
        "serve": serve,
    }
    write_result(args.out, result)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
