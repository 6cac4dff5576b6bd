"""`softrelay serve --workers N` as an operator runs it (softrelay/workers.py): the
workers share the SIP and HTTP ports, connections reach each of them, SIGTERM stops
them all in order, a worker killed is started again while the port keeps answering,
and without [cluster] the command is refused."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from softrelay.workers import RESTART_CAP, STABLE_AFTER, Slot, describe_status
from tests.cluster.serves import (
    metrics_ports,
    printed_port,
    running_workers,
    spawn_workers,
    started,
    two_free_ports,
    worker_pids,
    workers_config,
)
from tests.peers import STARTUP_TIMEOUT, STEP_TIMEOUT, Server, run_cli

CONNECTIONS = 32  # all on one worker by chance: 2 ** -31


@pytest.fixture
async def workers(tmp_path: Path, redis_url: str) -> AsyncIterator[Server]:
    config = workers_config(tmp_path, cluster=True, internal_base=two_free_ports())
    async with running_workers(config, tmp_path / "var", redis_url) as server:
        yield server


def _sockets(pid: int) -> set[int]:
    """The inodes of the sockets process `pid` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if match := re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd)):
                inodes.add(int(match.group(1)))
    return inodes


def _bound(table: str, port: int, state: str | None) -> set[int]:
    """Inodes of the /proc/net/<table> sockets on local `port` (in `state`: 0A listening)."""
    inodes = set()
    for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and (state is None or fields[3] == state):
            inodes.add(int(fields[9]))
    return inodes


def _listening(pid: int, http: int, sip: int) -> dict[str, bool]:
    held = _sockets(pid)
    return {
        "http": bool(held & _bound("tcp", http, "0A")),
        "sip tcp": bool(held & _bound("tcp", sip, "0A")),
        "sip udp": bool(held & _bound("udp", sip, None)),
    }


async def _tcp_flows(session: aiohttp.ClientSession, metrics_port: int) -> float:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    async with session.get(url) as response:
        assert response.status == 200
        text = await response.text()
    (value,) = re.findall(r'^softrelay_sip_flows\{transport="tcp"\} (\S+)$', text, re.M)
    return float(value)


def _set(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _gone(pid: int) -> bool:
    """The process ended (a zombie no init reaps counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def _heartbeats(redis_url: str) -> dict[str, str]:
    """Node id -> internal SIP address, from the nodes' heartbeat keys in Redis."""
    client = Redis.from_url(redis_url)
    try:
        values = []
        for key in sorted(await client.keys("nodes:*")):
            value = await client.get(key)
            assert value is not None
            values.append(orjson.loads(value))
    finally:
        await client.aclose()
    return {value["node"]: value["internal"] for value in values}


async def test_each_worker_is_a_node_with_its_own_id_and_internal_port(
    workers: Server, redis_url: str, tmp_path: Path
) -> None:
    """Node ids "<node_id>-<index>", internal links on internal_listen's port + index;
    the supervisor is no node."""
    config = (tmp_path / "softrelay.toml").read_text()
    (base,) = map(int, re.findall(r'internal_listen = "127\.0\.0\.1:(\d+)"', config))
    expected = {"test-0": f"127.0.0.1:{base}", "test-1": f"127.0.0.1:{base + 1}"}
    async with asyncio.timeout(STEP_TIMEOUT):
        while True:  # each beats once its internal link listens
            beats = await _heartbeats(redis_url)
            if beats == expected:
                break
            await asyncio.sleep(0.05)
    assert await workers.stop() == 0
    assert await _heartbeats(redis_url) == {}, "a clean stop deletes each node's heartbeat"


def test_a_dying_worker_waits_longer_each_time_until_it_stays_up() -> None:
    """At once, then 1, 2, 4 ... s, at most RESTART_CAP; up STABLE_AFTER: at once again."""
    slot = Slot(0)
    delays = []
    for death in range(8):
        slot.started = death * 10.0  # each lived 10 s
        delays.append(slot.restart_delay(death * 10.0 + 10.0))
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, RESTART_CAP, RESTART_CAP]
    slot.started = 100.0
    assert slot.restart_delay(100.0 + STABLE_AFTER) == 0.0
    slot.started = 200.0  # started again, and died at once
    assert slot.restart_delay(201.0) == 1.0


def test_exit_statuses_read_as_an_operator_would() -> None:
    assert describe_status(0) == "exit 0"
    assert describe_status(2) == "exit 2"
    assert describe_status(-9) == "signal 9 (SIGKILL)"


async def test_two_workers_bind_the_same_ports_and_each_takes_connections(
    workers: Server,
) -> None:
    """Both workers listen on the one SIP UDP/TCP port and the one HTTP port (the
    supervisor holds its sockets bound but listens on none), and connections to the SIP
    port are spread over both: each worker's /metrics counts some, together all."""
    http = printed_port(workers, r"softrelay: http://127\.0\.0\.1:(\d+) \(healthz; metrics")
    sip = printed_port(workers, r"softrelay: sip udp\+tcp 127\.0\.0\.1:(\d+)$")
    for kind in ("udp", "tcp"):
        assert printed_port(workers, rf"softrelay worker \d: sip {kind} 127\.0\.0\.1:(\d+)$") == sip
    assert printed_port(workers, r"softrelay worker \d: http://127\.0\.0\.1:(\d+) \(") == http
    pids = worker_pids(workers)
    assert sorted(pids) == [0, 1]
    for pid in pids.values():
        assert _listening(pid, http, sip) == {"http": True, "sip tcp": True, "sip udp": True}
    assert workers.proc.pid not in pids.values()
    held = _listening(workers.proc.pid, http, sip)
    assert held == {"http": False, "sip tcp": False, "sip udp": False}
    metrics = metrics_ports(workers)
    assert sorted(metrics) == [0, 1]
    assert metrics[0] != metrics[1]

    streams = [await asyncio.open_connection("127.0.0.1", sip) for _ in range(CONNECTIONS)]
    try:
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(STEP_TIMEOUT):
                while True:  # until both workers have accepted every connection
                    counts = [await _tcp_flows(session, metrics[i]) for i in (0, 1)]
                    if sum(counts) == CONNECTIONS:
                        break
                    await asyncio.sleep(0.05)
            assert all(count > 0 for count in counts), counts
            async with session.get(f"http://127.0.0.1:{http}/healthz") as response:
                assert response.status == 200
    finally:
        for _, writer in streams:
            writer.close()
    assert await workers.stop() == 0


async def test_sigterm_stops_every_worker_in_order_and_the_supervisor_exits_0(
    workers: Server,
) -> None:
    pids = worker_pids(workers)
    assert await workers.stop() == 0
    out = workers.log()
    for index in (0, 1):
        assert f"softrelay worker {index}: stopping\n" in out
        assert _gone(pids[index])
    assert "softrelay: workers stopped: exit 0, exit 0\n" in out


async def test_a_killed_worker_is_started_again_and_the_port_keeps_answering(
    workers: Server,
) -> None:
    http = printed_port(workers, r"softrelay: http://127\.0\.0\.1:(\d+) \(healthz; metrics")
    sip = printed_port(workers, r"softrelay: sip udp\+tcp 127\.0\.0\.1:(\d+)$")
    killed = worker_pids(workers)[1]
    os.kill(killed, signal.SIGKILL)
    await workers.line(
        r"^softrelay: worker 1 ended \(signal 9 \(SIGKILL\)\); starting it again in 0 s$"
    )
    # Worker 0 alone takes every new connection meanwhile (one per request: no keep-alive).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for _ in range(8):
            async with session.get(f"http://127.0.0.1:{http}/healthz") as response:
                assert response.status == 200
        await started(workers, r"^softrelay: worker 1 ready again$")
        again = worker_pids(workers)[1]
        assert again != killed
        assert _listening(again, http, sip) == {"http": True, "sip tcp": True, "sip udp": True}
        # A new process is a new node: what the dead one held expires with its heartbeat.
        assert re.search(rf"softrelay: worker 1 pid {again} node test-1\.1\n", workers.log())
        async with session.get(f"http://127.0.0.1:{http}/healthz") as response:
            assert response.status == 200
    assert await workers.stop() == 0


async def test_workers_stop_by_themselves_when_the_supervisor_is_killed(
    workers: Server,
) -> None:
    """The supervisor's end of each lifeline closes with it: no worker outlives it."""
    pids = worker_pids(workers)
    # A pidfd turns readable when its process ends: the workers are not our children.
    loop = asyncio.get_running_loop()
    ended: list[asyncio.Future[None]] = []
    pidfds = [os.pidfd_open(pid) for pid in pids.values()]
    try:
        for fd in pidfds:
            future: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _set, future)
            ended.append(future)
        workers.proc.kill()
        await workers.proc.wait()
        await asyncio.wait_for(asyncio.gather(*ended), STEP_TIMEOUT)
    finally:
        for fd in pidfds:
            loop.remove_reader(fd)
            os.close(fd)
    assert all(_gone(pid) for pid in pids.values())
    out = workers.log()
    for index in (0, 1):
        assert f"softrelay worker {index}: stopping\n" in out


async def test_workers_without_a_cluster_are_refused(tmp_path: Path) -> None:
    config = workers_config(tmp_path, cluster=False)
    status, out = await run_cli(
        "serve", "--config", str(config), "--data-dir", str(tmp_path / "var"), "--workers", "2"
    )
    assert status == 2
    assert out == (
        f"softrelay: serve --workers 2: {config} has no [cluster] (Redis): a worker would not"
        " see the flows and PBX links the others hold; configure [cluster], or run one"
        " process (no --workers)\n"
    )


async def _cli(*args: str, redis_url: str) -> tuple[int | None, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "softrelay.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "SOFTRELAY_CONFIG": "", "SOFTRELAY_REDIS_URL": redis_url},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), STARTUP_TIMEOUT)
    return proc.returncode, out.decode()


async def test_workers_need_a_metrics_port_of_their_own(tmp_path: Path) -> None:
    config = workers_config(tmp_path, cluster=True)
    config.write_text(config.read_text().replace('metrics_listen = "127.0.0.1:0"', ""))
    status, out = await _cli(
        "serve",
        *("--config", str(config), "--data-dir", str(tmp_path / "var"), "--workers", "2"),
        redis_url="redis://:unused@127.0.0.1:1/0",  # refused before anything connects
    )
    assert status == 2
    assert out == (
        f"softrelay: serve --workers 2: {config}: server.metrics_listen is empty: each"
        " worker serves /metrics on its own port (metrics_listen's port + worker index),"
        " since a scrape of the shared HTTP port would reach one worker at random\n"
    )


async def test_a_port_in_use_stops_the_start_once(tmp_path: Path, redis_url: str) -> None:
    """The supervisor binds the shared ports before any worker starts: a port taken by
    another program is one line and exit 2, and no worker ever runs."""
    config = workers_config(tmp_path, cluster=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        status, out = await _cli(
            "serve",
            *("--config", str(config), "--data-dir", str(tmp_path / "var")),
            *("--http-port", port, "--sip-port", "0", "--workers", "2"),
            redis_url=redis_url,
        )
    assert status == 2
    lines = [line for line in out.splitlines() if not line.startswith("{")]  # the log
    assert lines == ["softrelay: cannot start: [Errno 98] Address already in use"]


async def test_a_worker_that_cannot_start_stops_them_all_with_exit_2(
    tmp_path: Path, redis_url: str
) -> None:
    """Worker 0's metrics port is taken: it ends before it is ready, with its own line,
    and the supervisor stops worker 1 too and exits 2, restarting nothing."""
    config = workers_config(tmp_path, cluster=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config.write_text(
            config.read_text().replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"', 1), encoding="utf-8"
        )
        server = await spawn_workers(config, tmp_path / "var", redis_url)
        try:
            status = await asyncio.wait_for(server.proc.wait(), STARTUP_TIMEOUT)
            await asyncio.wait_for(asyncio.gather(*server.drains), STEP_TIMEOUT)
        finally:
            await server.kill()
    out = server.log()
    assert status == 2, out
    # Worker 0's own line, from the command's handler of a port in use.
    assert re.search(
        rf"^softrelay: cannot start: \[Errno 98\] .*'127\.0\.0\.1', {port}\).*in use$", out, re.M
    ), out
    assert "softrelay: a worker could not start; stopping the others\n" in out
    assert "starting it again" not in out
