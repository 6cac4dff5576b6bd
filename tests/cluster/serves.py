"""`softrelay serve` processes of one cluster, as an operator runs them, for the tests
on real processes (signals, kills, shared ports): single-process nodes (`start_serve`)
and `serve --workers N` (`spawn_workers`), their printed ports and pids, and their
/metrics read back.

Every wait is for a printed line or a scraped value, bounded by STEP_TIMEOUT or
STARTUP_TIMEOUT; nothing sleeps to let things happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.peers import DOMAIN, SERIAL, STARTUP_TIMEOUT, STEP_TIMEOUT, Server, _drain, start_server
from tests.sip.test_wake_e2e import CallingPbx

StartServe = Callable[..., Awaitable[Server]]  # (name, more lines of [cluster])
PBX_SECRET = "serves-pbx-secret"


@pytest.fixture
async def start_serve(tmp_path: Path, redis_url: str, store_toml: str) -> AsyncIterator[StartServe]:
    """Starts `serve` as node `name` of one cluster, with `more` lines in its [cluster]:
    the PBX SERIAL with PBX_SECRET, the store of the test's backend (on PostgreSQL the
    nodes share one database, as a deployment does; on SQLite each keeps its own); all
    are killed after the test."""
    (tmp_path / "redis.url").write_text(redis_url + "\n", encoding="utf-8")
    (tmp_path / "cluster.secret").write_text(secrets.token_hex(16) + "\n", encoding="utf-8")
    started: list[Server] = []

    async def start(name: str, more: str = "") -> Server:
        home = tmp_path / name
        home.mkdir()
        cluster = (
            f'[cluster]\nredis = "file:{tmp_path / "redis.url"}"\n'
            f'secret = "file:{tmp_path / "cluster.secret"}"\nnode_id = "node-{name}"\n'
            f"{more}\n{store_toml}"
        )
        server = await start_server(home, cluster, secret=PBX_SECRET)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.kill()


async def linked(server: Server) -> CallingPbx:
    """The PBX SERIAL linked on `server` over TCP."""
    pbx = await CallingPbx.connect(server.ports["tcp"])
    assert await pbx.link(PBX_SECRET) == 200, pbx.last()
    return pbx


# --- serve --workers N --------------------------------------------------------------------


def two_free_ports() -> int:
    """A port P with P + 1 free too (TCP, loopback): the base of per-worker ports."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            base = int(first.getsockname()[1])
            try:
                second.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
            return base
    raise RuntimeError("no two free ports in a row")


def workers_config(tmp_path: Path, cluster: bool, internal_base: int = 0, more: str = "") -> Path:
    """softrelay.toml for `serve --workers`: /metrics on a port of its own (each worker
    takes that port + its index), the PBX SERIAL, `more` TOML, and with `cluster` the
    [cluster] on SOFTRELAY_REDIS_URL (node id "test")."""
    secret = tmp_path / "pbx.secret"
    secret.write_text(f"pbx-secret-{secrets.token_hex(8)}\n", encoding="utf-8")
    cluster_secret = tmp_path / "cluster.secret"
    cluster_secret.write_text(secrets.token_hex(16) + "\n", encoding="utf-8")
    cluster_secret.chmod(0o600)
    text = (
        '[server]\nmetrics_listen = "127.0.0.1:0"\n\n'
        f'[sip]\ndomain = "{DOMAIN}"\n\n'
        f'[[sip.pbx]]\nserial = "{SERIAL}"\nsecret = "file:{secret}"\n\n{more}\n'
    )
    if cluster:
        text += (
            '[cluster]\nredis = "env:SOFTRELAY_REDIS_URL"\n'
            f'secret = "file:{cluster_secret}"\nnode_id = "test"\n'
            f'internal_listen = "127.0.0.1:{internal_base}"\n'
        )
    config = tmp_path / "softrelay.toml"
    config.write_text(text, encoding="utf-8")
    return config


async def spawn_workers(config: Path, data_dir: Path, redis_url: str, workers: int = 2) -> Server:
    """`serve --workers N` on ports 0, its output read as it comes."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "softrelay.cli",
        "serve",
        "--config",
        str(config),
        "--data-dir",
        str(data_dir),
        "--http-port",
        "0",
        "--sip-port",
        "0",
        "--workers",
        str(workers),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SOFTRELAY_CONFIG": "", "SOFTRELAY_REDIS_URL": redis_url},
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    server = Server(proc, config, data_dir, "", {})
    server.drains.append(asyncio.create_task(_drain(proc.stdout, server.output, server.grew)))
    server.drains.append(asyncio.create_task(_drain(proc.stderr, server.output, server.grew)))
    return server


@contextlib.asynccontextmanager
async def running_workers(
    config: Path, data_dir: Path, redis_url: str, workers: int = 2
) -> AsyncIterator[Server]:
    """`serve --workers N`, once every worker is ready; at the end every process of it
    is killed (a test that stopped it has nothing left to kill) and its output read to
    the end before the loop closes (the workers hold the pipes too)."""
    server = await spawn_workers(config, data_dir, redis_url, workers)
    try:
        await started(server, rf"^softrelay: {workers} workers ready$")
        yield server
    finally:
        for pid in [server.proc.pid, *worker_pids(server).values()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await server.proc.wait()
        await asyncio.wait_for(asyncio.gather(*server.drains), STEP_TIMEOUT)


async def started(server: Server, pattern: str) -> None:
    """Wait for a line of a process start (a worker starts a whole relay)."""
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT):
            while not any(re.search(pattern, line) for line in server.output):
                server.grew.clear()
                await server.grew.wait()
    except TimeoutError:
        raise AssertionError(f"no line {pattern!r} yet:\n{server.log()}") from None


def worker_pids(server: Server) -> dict[int, int]:
    """Worker index -> pid of its latest process, as the supervisor printed them."""
    pids: dict[int, int] = {}
    for line in server.output:
        if match := re.match(r"softrelay: worker (\d+) pid (\d+) node ", line):
            pids[int(match.group(1))] = int(match.group(2))
    return pids


def printed_port(server: Server, pattern: str) -> int:
    """The one port the lines matching `pattern` (its group 1) name."""
    ports = {int(m.group(1)) for line in server.output if (m := re.match(pattern, line))}
    assert len(ports) == 1, (pattern, server.log())
    return ports.pop()


def metrics_ports(server: Server) -> dict[int, int]:
    """Worker index -> the port of its own /metrics, as each worker printed it."""
    return {
        int(m.group(1)): int(m.group(2))
        for line in server.output
        if (m := re.match(r"softrelay worker (\d): http://127\.0\.0\.1:(\d+)/metrics", line))
    }


# --- /metrics -----------------------------------------------------------------------------


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(session: aiohttp.ClientSession, port: int) -> Samples:
    """Every sample of the /metrics on `port`: (name, labels) -> value."""
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when it was never counted (a labelled counter starts absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)
