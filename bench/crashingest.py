"""The ingest mode of `bench/crashreports.py`: `softrelay serve` in a process of its own,
and a client in another, posting gzip envelopes as the stock SDK sends them.

The client is this module run as a script (`--client`), so its CPU is not on the
server's event loop; both still share the machine's cores, as they would on a one-box
deployment. The client waits for a line on stdin between its warm-up and its timed part,
so that the parent reads the server's CPU time at the start of the timed part.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    # The client process: the repository first, and not this folder, whose crashreports.py
    # would hide the package (as in bench/crashreports.py).
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import orjson

from bench.crashevents import SIZES, gzip_sdk, sdk_envelopes
from bench.harness import (
    Processes,
    cpu_seconds,
    process_tree,
    start_softrelay,
    write_file,
)

KEY = "0123456789abcdef0123456789abcdef"
# The server's side, as an operator writes it; no rate limit to speak of: the bench
# measures the ingest, not its 429s.
CONFIG = f"""[crashreports]
rate_limit = 1000000000

[[crashreports.project]]
id = "1"
key = "{KEY}"
"""


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU of a process (its threads included), and of it with all its
    descendants alive now (the scrubbing worker processes): (process, tree)."""
    return cpu_seconds([pid]), cpu_seconds(process_tree(pid))


def _pack(bodies: list[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(b)) + b for b in bodies)


def _unpack(data: bytes) -> list[bytes]:
    bodies, pos = [], 0
    while pos < len(data):
        (size,) = struct.unpack_from(">I", data, pos)
        bodies.append(data[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return bodies


async def _client(url: str, bodies: list[bytes], concurrency: int, warmup: int) -> None:
    """Posts every body from `concurrency` connections, the first `warmup` untimed."""
    import aiohttp

    headers = {
        "X-Sentry-Auth": f"Sentry sentry_version=7, sentry_key={KEY}, sentry_client=bench",
        "Content-Encoding": "gzip",
        "Content-Type": "application/x-sentry-envelope",
    }
    statuses: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post_all(queue: list[bytes]) -> None:
            async def worker() -> None:
                while queue:
                    body = queue.pop()
                    try:
                        async with session.post(url, data=body, headers=headers) as resp:
                            await resp.read()
                            status = str(resp.status)
                    except aiohttp.ClientError as exc:
                        status = type(exc).__name__
                    statuses[status] = statuses.get(status, 0) + 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))

        await post_all(bodies[:warmup][::-1])
        print("warm", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        cpu, start = time.process_time(), time.perf_counter()
        await post_all(bodies[warmup:][::-1])
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(orjson.dumps({"elapsed": elapsed, "cpu": cpu, "statuses": statuses}).decode())


def _config(tmp: Path, options: tuple[str, ...]) -> Path:
    """The server's config; `options` are lines added to its `[crashreports]`."""
    lines = CONFIG.splitlines()
    lines[1:1] = options
    return write_file(tmp / "softrelay.toml", "\n".join(lines) + "\n")


async def _stored(data_dir: Path) -> int:
    from privacy.clock import SystemClock
    from privacy.keys import load_keyring
    from privacy.policy import load_policy
    from privacy.store import Store

    store = await Store.create(
        load_policy("auerproxy"), load_keyring("", data_dir), data_dir, SystemClock()
    )
    try:
        return (await store.stats())["crash_report"].rows
    finally:
        await store.close()


async def ingest_round(
    bodies: list[bytes], concurrency: int, options: tuple[str, ...], tmp: Path
) -> dict[str, Any]:
    warmup = len(bodies) // 11
    (tmp / "bodies").write_bytes(_pack(bodies))
    procs = Processes()
    # `softrelay serve` of this tree on ports 0, its log in tmp/serve.log; it stops the
    # server if it does not start.
    server = await start_softrelay(procs, tmp, _config(tmp, options))
    url = f"{server.http_url}/api/1/envelope/"
    try:
        client = await asyncio.create_subprocess_exec(
            *(sys.executable, __file__, "--client", url, str(tmp / "bodies")),
            *(str(concurrency), str(warmup)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert client.stdin is not None
        assert client.stdout is not None
        if await asyncio.wait_for(client.stdout.readline(), 300) != b"warm\n":
            raise RuntimeError("the client failed in its warm-up")
        load, before = load_average(), _cpu_seconds(server.proc.pid)
        client.stdin.write(b"go\n")
        await client.stdin.drain()
        result = orjson.loads(await asyncio.wait_for(client.stdout.readline(), 600))
        after = _cpu_seconds(server.proc.pid)
        await client.wait()
    finally:
        await server.stop(procs, 60)
    timed = len(bodies) - warmup
    return {
        "envelopes_per_s": round(timed / result["elapsed"]),
        # The serve process (its event loop, the store's thread) and its whole process
        # tree (with the scrubbing workers, when they are processes).
        "server_cpu_us_per_envelope": round((after[0] - before[0]) / timed * 1e6),
        "server_tree_cpu_us_per_envelope": round((after[1] - before[1]) / timed * 1e6),
        "client_cpu_us_per_envelope": round(result["cpu"] / timed * 1e6),
        "statuses": result["statuses"],
        "stored": await _stored(server.data_dir),
        "posted": len(bodies),
        "load_before": load,
    }


def ingest(
    events: int, rounds: int, concurrency: int, options: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Per size, `rounds` fresh servers each taking `events` timed envelopes."""
    results = []
    for label, full in SIZES:
        # Every envelope its own event (planted values, ids): a server that remembers
        # what it scrubbed gains only on what recurs between events.
        bodies = [gzip_sdk(e) for e in sdk_envelopes(events + events // 10, full)]
        runs: list[dict[str, Any]] = []
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    runs.append(asyncio.run(ingest_round(bodies, concurrency, options, Path(tmp))))
                except (RuntimeError, OSError, TimeoutError, ValueError) as exc:
                    # The server's own log (policy-filtered JSON lines) says why.
                    tail = (Path(tmp) / "serve.log").read_text(errors="replace")[-2000:]
                    runs.append({"error": repr(exc), "serve_log_tail": tail})
        rates = [r["envelopes_per_s"] for r in runs if "error" not in r]
        results.append(
            {
                "label": label,
                "mean_gzip_bytes": round(sum(map(len, bodies)) / len(bodies)),
                "median_envelopes_per_s": round(statistics.median(rates)) if rates else None,
                "rounds": runs,
            }
        )
    return results


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--client":
    import uvloop

    _bodies = _unpack(Path(sys.argv[3]).read_bytes())
    uvloop.run(_client(sys.argv[2], _bodies, int(sys.argv[4]), int(sys.argv[5])))
