"""(5) Idle flows: a fresh `softrelay serve` per count and kind while the bench process
holds that many connections to it that send nothing: TCP connections to the SIP port
(`tcp`), or WebSockets to /sip on the HTTP port with the subprotocol `sip` (`ws`, RFC
7118), each upgraded and then silent. The server's VmRSS is read from /proc before and
after; memory per flow is the delta / N. Kernel socket buffers are not in RSS.

Both processes need a descriptor per flow: `bench/relay.py` raises the open-file limit
(`bench.harness.raise_nofile`) and, where the hard limit cannot be raised, caps the count
to fit. The goal: one process holds 50,000 idle flows at under 10 KiB each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.connector import AddrInfoType

from bench.harness import HOST, Processes, Softrelay, metric_values, start_softrelay, status_kib
from bench.relay_sipp import relay_config

IDLE_KINDS = ("tcp", "ws")  # TCP to the SIP port; WebSocket to /sip on the HTTP port
IDLE_GOAL = 50_000  # flows held by one process...
IDLE_GOAL_BYTES = 10 * 1024  # ...at under this many bytes each
NOFILE_RESERVE = 1024  # descriptors the server needs besides its idle flows
PER_SOURCE = 20_000  # idle connections per source address (ephemeral ports: ~28,000)
CONNECTING = 64  # idle connections being opened at once (the listen backlog is 100)
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h; not in Python's socket module


@dataclass(frozen=True, slots=True)
class Idle:
    kind: str  # "tcp" or "ws"
    wanted: int
    opened: int  # connections this process holds
    held: int  # flows of that kind the server counted (softrelay_sip_flows{transport=kind})
    rss_before_kib: int
    rss_after_kib: int
    hwm_kib: int  # the server's peak RSS
    connect_s: float
    errors: dict[str, int]

    @property
    def bytes_per_flow(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) * 1024 / self.held if self.held else 0

    @property
    def goal(self) -> bool:
        return self.held >= IDLE_GOAL and self.bytes_per_flow < IDLE_GOAL_BYTES

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "wanted": self.wanted,
            "opened": self.opened,
            "held_by_server": self.held,
            "rss_before_kib": self.rss_before_kib,
            "rss_after_kib": self.rss_after_kib,
            "rss_peak_kib": self.hwm_kib,
            "bytes_per_flow": round(self.bytes_per_flow),
            "connect_s": round(self.connect_s, 2),
            "connect_errors": self.errors,
            "goal_50000_under_10_kib": self.goal,
        }


IDLE_NAMES = {"tcp": "TCP", "ws": "WebSocket"}
# Connections/s an idle step's time budget allows for: well under what was measured
# (TCP ~1,800/s, WebSocket ~1,100/s on 2 cores).
IDLE_RATE = {"tcp": 500, "ws": 250}


async def sip_flows(server: Softrelay, kind: str) -> int:
    values = metric_values(await server.metrics(), "softrelay_sip_flows")
    return int(values.get(f'{{transport="{kind}"}}', 0))


class TcpIdle:
    """Idle TCP connections to the SIP port, from many source addresses."""

    def __init__(self, server: Softrelay) -> None:
        self.port = server.ports["tcp"]
        self.sockets: list[socket.socket] = []

    @property
    def opened(self) -> int:
        return len(self.sockets)

    async def open(self, number: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            # Many sources: one pair of addresses has ~28,000 ephemeral ports.
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((f"127.0.0.{1 + number // PER_SOURCE}", 0))
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, (HOST, self.port)), 10)
        except BaseException:
            sock.close()
            raise
        self.sockets.append(sock)

    async def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


class WsIdle:
    """Idle SIP WebSockets (RFC 7118): /sip on the HTTP port with the subprotocol `sip`,
    upgraded, then silent (no pings either way). One client session per source address."""

    def __init__(self, server: Softrelay) -> None:
        self.url = f"ws://{HOST}:{server.ports['http']}/sip"
        self.sessions: dict[str, aiohttp.ClientSession] = {}
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []

    @property
    def opened(self) -> int:
        return len(self.sockets)

    def _session(self, source: str) -> aiohttp.ClientSession:
        session = self.sessions.get(source)
        if session is None:
            connector = aiohttp.TCPConnector(limit=0, socket_factory=bound_socket(source))
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
            session = self.sessions[source] = aiohttp.ClientSession(
                connector=connector, timeout=timeout
            )
        return session

    async def open(self, number: int) -> None:
        session = self._session(f"127.0.0.{1 + number // PER_SOURCE}")
        ws = await asyncio.wait_for(
            session.ws_connect(self.url, protocols=("sip",), autoping=False, compress=0), 10
        )
        if ws.protocol != "sip":
            await ws.close()
            raise RuntimeError(f"the server chose the subprotocol {ws.protocol!r}")
        self.sockets.append(ws)

    async def close(self) -> None:
        """Every connection at once: closing the sessions closes their transports."""
        self.sockets.clear()
        for session in self.sessions.values():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.close(), 30)
        self.sessions.clear()


def bound_socket(source: str) -> Callable[[AddrInfoType], socket.socket]:
    """Sockets bound to `source`, their port chosen at connect (as for TCP above)."""

    def make(addr_info: AddrInfoType) -> socket.socket:
        family, kind, proto, _, _ = addr_info
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        except OSError:
            sock.close()
            raise
        return sock

    return make


async def idle_flows(
    procs: Processes, work: Path, kind: str, count: int, secret_file: Path
) -> Idle:
    """`count` idle flows of `kind` to a fresh softrelay; its RSS before and after."""
    # Room for `count` flows from one address: a WebSocket counts against both the HTTP
    # and the SIP cap, a TCP flow against SIP's only. Caps far above that would be cut,
    # both, to fit the server's open-file limit.
    room = count + CONNECTING
    http = room if kind == "ws" else CONNECTING
    config = relay_config(work, None, secret_file, http_connections=http, sip_connections=room)
    server = await start_softrelay(procs, work, config)
    clients = TcpIdle(server) if kind == "tcp" else WsIdle(server)
    try:
        pid = server.proc.pid
        # The first scrape and the first flow allocate too: not counted.
        await clients.open(0)
        await clients.close()
        async with asyncio.timeout(10):
            while await sip_flows(server, kind):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        before = status_kib(pid, "VmRSS")
        errors: Counter[str] = Counter()
        numbers = iter(range(count))
        budget = max(30.0, count / IDLE_RATE[kind])
        deadline = time.monotonic() + budget
        started = time.perf_counter()

        async def connect() -> None:
            for number in numbers:
                if time.monotonic() > deadline:
                    errors["budget"] += 1
                    continue
                try:
                    await clients.open(number)
                except (OSError, TimeoutError, RuntimeError, aiohttp.ClientError) as exc:
                    errors[type(exc).__name__] += 1

        async with asyncio.TaskGroup() as group:
            for _ in range(CONNECTING):
                group.create_task(connect())
        connect_s = time.perf_counter() - started
        # Accepted by the kernel is not yet accepted by the server: wait for its count.
        held = 0
        async with asyncio.timeout(max(30.0, count / 1000)):
            while (held := await sip_flows(server, kind)) < clients.opened:  # noqa: ASYNC110
                await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        after, hwm = status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM")
        held = await sip_flows(server, kind)
        opened = clients.opened
        return Idle(kind, count, opened, held, before, after, hwm, connect_s, dict(errors))
    finally:
        await clients.close()
        await server.stop(procs)


def idle_line(idle: Idle) -> str:
    errors = f", errors {idle.errors}" if idle.errors else ""
    return (
        f"{idle.held:>6,} of {idle.wanted:,} {IDLE_NAMES[idle.kind]} flows held, RSS "
        f"{idle.rss_before_kib / 1024:.1f} -> {idle.rss_after_kib / 1024:.1f} MiB: "
        f"{idle.bytes_per_flow / 1024:.2f} KiB per flow "
        f"(connected in {idle.connect_s:.1f} s{errors})"
    )


def parse_kinds(text: str) -> list[str]:
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    if set(kinds) - set(IDLE_KINDS) or not kinds:
        raise argparse.ArgumentTypeError(f"kinds are {', '.join(IDLE_KINDS)}; got {text!r}")
    return list(dict.fromkeys(kinds))
