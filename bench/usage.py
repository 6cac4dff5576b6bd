"""Usage pings accepted per second by one process, against a bare aiohttp handler.

    .venv/bin/python bench/usage.py [--seconds 5] [--connections 64] [--repeat 2] [--out FILE]

Two servers, each one process on uvloop on 127.0.0.1, without an access log (as `serve`):

(a) softrelay: the `/usage/v1/ping` route of `usage.service.add_usage` on the policy's
    store (SQLite under a fresh temporary directory): rate limiter (on, with a burst no
    client reaches), strict validation, tenant key, the month secret's HMAC, the store's
    upsert committed before the 202. Every ping carries a new pid, so every ping is a
    database write: the worst case, and most of a month's real pings.
(b) the limit: a bare aiohttp handler that reads the body, parses the JSON and answers
    202.

The load generator is a separate process: `--connections` keep-alive HTTP/1.1
connections written over raw asyncio streams (cheaper per request than an HTTP client
library, so the servers are what is measured), each sending the next ping when the
answer to the last has come. Runs are interleaved `--repeat` times; the best run of each
counts. Goal (from the issue): (a) reaches at least 60% of (b).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import write_result
from privacy.clock import SystemClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.store import Store
from usage.endpoint import PING_PATH
from usage.period import period_of
from usage.service import add_usage
from usage.settings import Tenant, UsageSettings
from webapi.ratelimit import LocalLimiters

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "usage.json"
KEY = "bench-tenant-key-0123456789abcdef"
GOAL = 0.60
STORE = web.AppKey("store", Store)
REGISTRY = web.AppKey("registry", CollectorRegistry)


# --- the servers (each runs in its own process) -----------------------------------------


def _softrelay_app(data_dir: str) -> web.Application:
    clock = SystemClock()
    policy = load_policy("auerproxy")
    app = web.Application()

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


def _bare_app(data_dir: str) -> web.Application:
    async def ping(request: web.Request) -> web.Response:
        orjson.loads(await request.read())
        return web.Response(body=b'{"status":"accepted"}', status=202)

    app = web.Application()
    app.router.add_post(PING_PATH, ping)
    return app


def _serve(kind: str, data_dir: str, ready: Any) -> None:
    async def run() -> None:
        app = _softrelay_app(data_dir) if kind == "softrelay" else _bare_app(data_dir)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ready.send(runner.addresses[0][1])
        await asyncio.Event().wait()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())


# --- the load generator -----------------------------------------------------------------


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
    async def run() -> None:
        period = period_of(time.time())
        counts = [0, 0]
        # Warm-up: connections open and the first pings (month secret, tables) go through.
        await asyncio.gather(
            *(_connection(port, period, time.perf_counter() + 0.5, [0, 0]) for _ in range(8))
        )
        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(
            *(_connection(port, period, deadline, counts) for _ in range(connections))
        )
        out.send((counts[0], counts[1], time.perf_counter() - start))

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())


def measure(kind: str, seconds: float, connections: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-usage-") as data_dir:
        ready_r, ready_w = ctx.Pipe(duplex=False)
        server = ctx.Process(target=_serve, args=(kind, data_dir, ready_w), daemon=True)
        server.start()
        try:
            if not ready_r.poll(30):
                raise RuntimeError(f"{kind} server did not start")
            port = ready_r.recv()
            out_r, out_w = ctx.Pipe(duplex=False)
            load = ctx.Process(target=_load, args=(port, seconds, connections, out_w))
            load.start()
            if not out_r.poll(seconds + 60):
                raise RuntimeError("the load generator did not finish")
            ok, other, elapsed = out_r.recv()
            load.join(10)
        finally:
            server.terminate()
            server.join(10)
    if other:
        raise RuntimeError(f"{kind}: {other} pings were not answered 202")
    return {"accepted": ok, "seconds": elapsed, "per_second": ok / elapsed}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    runs: dict[str, list[dict[str, Any]]] = {"bare": [], "softrelay": []}
    for _ in range(args.repeat):
        for kind in ("bare", "softrelay"):
            runs[kind].append(measure(kind, args.seconds, args.connections))
    best = {kind: max(r["per_second"] for r in results) for kind, results in runs.items()}
    ratio = best["softrelay"] / best["bare"]
    verdict = "PASS" if ratio >= GOAL else "FAIL"

    print(
        f"usage pings, {args.connections} connections, "
        f"{args.seconds:g} s per run, best of {args.repeat}"
    )
    print(f"{'server':<44} {'pings/s':>10}")
    print(f"{'(b) bare aiohttp: read JSON, answer 202':<44} {best['bare']:>10,.0f}")
    print(f"{'(a) softrelay /usage/v1/ping (new id each)':<44} {best['softrelay']:>10,.0f}")
    print(f"(a)/(b) = {ratio:.0%}, goal >= {GOAL:.0%}: {verdict}")

    result = {
        "benchmark": "usage",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "connections": args.connections,
        "seconds": args.seconds,
        "runs": runs,
        "best_per_second": best,
        "ratio": ratio,
        "goal": GOAL,
        "verdict": verdict,
    }
    write_result(args.out, result)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
