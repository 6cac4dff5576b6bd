"""(5) Idle flows: a fresh `softrelay serve` per count and kind while client connections
that send nothing are held to it: TCP connections to the SIP port (`tcp`), TLS
connections to the SIP TLS port (`tls`: a root -> intermediate -> leaf chain from
`bench/tls_chain.py`, every handshake verified against the root, the server's TLS
settings as `serve` makes them), or WebSockets to /sip on the HTTP port with the
subprotocol `sip` (`ws`, RFC 7118), each upgraded and then silent. The server's VmRSS is
read from /proc before and after; memory per flow is the delta / N. Kernel socket
buffers are not in RSS. The clients run in this process, the server in its own.

Both processes need a descriptor per flow: `bench/relay.py` (and `main` here) raise the
open-file limit (`bench.harness.raise_nofile`) and, where the hard limit cannot be
raised, cap the count to fit. Targets per idle flow (issue 21): TLS <= 16 KiB,
WebSocket <= 6 KiB, TCP <= 3 KiB; the older goal: 50,000 flows at under 10 KiB each.

Run alone (`python bench/relay_idle.py`), it measures `--rounds` rounds, the kinds
interleaved within each, and with `--baseline TREE` the same against another checkout
(the commit before a change) in the same rounds; `--trace` adds one traced server per
kind (`bench/relay_idle_trace.py`): bytes per flow by allocating line and objects per
flow by type. Results in bench/results/relay_idle.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import secrets
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Run as `python bench/relay_idle.py`, this file's folder comes first on sys.path: the
# repository root goes first instead, so that `bench.*` imports.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import aiohttp  # noqa: E402 - after the sys.path fix above
from aiohttp.connector import AddrInfoType  # noqa: E402

from bench import relay_idle_trace  # noqa: E402
from bench.harness import (  # noqa: E402
    HOST,
    ROOT,
    Processes,
    Softrelay,
    free_port,
    metric_values,
    raise_nofile,
    spread,
    start_softrelay,
    status_kib,
    write_result,
)
from bench.relay_sipp import relay_config  # noqa: E402
from bench.tls_chain import KEY_KINDS, Chain, make_chain  # noqa: E402

# TCP to the SIP port; TLS to the SIP TLS port; WebSocket to /sip on the HTTP port.
IDLE_KINDS = ("tcp", "tls", "ws")
IDLE_GOAL = 50_000  # flows held by one process...
IDLE_GOAL_BYTES = 10 * 1024  # ...at under this many bytes each
# Issue 21's targets, bytes per idle flow.
TARGETS = {"tcp": 3 * 1024, "tls": 16 * 1024, "ws": 6 * 1024}
# Kamailio's figures as issue 21 gives them, bytes per connection (4.5 KiB TCP, ~61 KiB
# TLS with OpenSSL); kamailio/kamailio#3803 measured 52,104 B per TLS connection (776 B
# its tcp_connection, 6,000 B its read buffer, the rest OpenSSL's, 32 KiB of that the two
# 16 KiB BIO buffers). Kamailio has no WebSocket figure of its own.
KAMAILIO = {"tcp": 4.5 * 1024, "tls": 61 * 1024}
NOFILE_RESERVE = 1024  # descriptors the server needs besides its idle flows
PER_SOURCE = 20_000  # idle connections per source address (ephemeral ports: ~28,000)
CONNECTING = 64  # idle connections being opened at once (the listen backlog is 100)
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h; not in Python's socket module


@dataclass(frozen=True, slots=True)
class Idle:
    kind: str  # "tcp", "tls" or "ws"
    wanted: int
    opened: int  # connections this process holds
    held: int  # flows of that kind the server counted (softrelay_sip_flows{transport=kind})
    rss_before_kib: int
    rss_after_kib: int
    hwm_kib: int  # the server's peak RSS
    connect_s: float
    errors: dict[str, int]
    tree: str = "this"  # "this", or "baseline": the --baseline checkout
    trace: dict[str, Any] = field(default_factory=dict)  # relay_idle_trace.summary
    tls_versions: dict[str, int] = field(default_factory=dict)  # what the clients negotiated
    rss_middle_kib: int = 0  # once the first half of the flows was held
    opened_first_half: int = 0

    @property
    def marginal_bytes_per_flow(self) -> float:
        """The second half's RSS growth per flow of it: the cost of one more flow."""
        more = self.opened - self.opened_first_half
        return (self.rss_after_kib - self.rss_middle_kib) * 1024 / more if more > 0 else 0

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
            "rss_middle_kib": self.rss_middle_kib,
            "marginal_bytes_per_flow": round(self.marginal_bytes_per_flow),
            "connect_s": round(self.connect_s, 2),
            "connect_errors": self.errors,
            "goal_50000_under_10_kib": self.goal,
            "target_bytes": TARGETS[self.kind],
            "target_met": self.bytes_per_flow <= TARGETS[self.kind],
            "tree": self.tree,
            **({"tls_versions": self.tls_versions} if self.tls_versions else {}),
            **({"trace": self.trace} if self.trace else {}),
        }


IDLE_NAMES = {"tcp": "TCP", "tls": "TLS", "ws": "WebSocket"}
# Connections/s an idle step's time budget allows for: well under what was measured
# (TCP ~1,800/s, WebSocket ~1,100/s on 2 cores; TLS handshakes cost both sides CPU).
IDLE_RATE = {"tcp": 500, "tls": 100, "ws": 250}


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


class TlsIdle:
    """Idle TLS connections to the SIP TLS port, each handshake done and verified.

    The client side is a non-blocking `ssl.SSLSocket` per connection (OpenSSL on the
    descriptor, SSL_MODE_RELEASE_BUFFERS as CPython sets it), not an asyncio transport:
    asyncio's and uvloop's TLS transports keep a 256 KiB read buffer each, which 20,000
    client connections in this process could not afford."""

    def __init__(self, port: int, chain: Chain) -> None:
        self.port = port
        self.context = ssl.create_default_context(cafile=str(chain.root))
        self.sockets: list[ssl.SSLSocket] = []
        self.versions: Counter[str] = Counter()

    @property
    def opened(self) -> int:
        return len(self.sockets)

    async def open(self, number: int) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((f"127.0.0.{1 + number // PER_SOURCE}", 0))
            await asyncio.wait_for(loop.sock_connect(sock, (HOST, self.port)), 10)
            tls = self.context.wrap_socket(
                sock, server_hostname="localhost", do_handshake_on_connect=False
            )
        except BaseException:
            sock.close()
            raise
        try:
            async with asyncio.timeout(10):
                await _handshake(loop, tls)
        except BaseException:
            tls.close()
            raise
        self.versions[str(tls.version())] += 1
        self.sockets.append(tls)

    async def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


async def _handshake(loop: asyncio.AbstractEventLoop, tls: ssl.SSLSocket) -> None:
    """Drive a non-blocking handshake, waiting on the descriptor as OpenSSL asks."""
    fd = tls.fileno()
    while True:
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            add, remove = loop.add_reader, loop.remove_reader
        except ssl.SSLWantWriteError:
            add, remove = loop.add_writer, loop.remove_writer
        else:
            return
        ready: asyncio.Future[None] = loop.create_future()
        add(fd, _set_once, ready)
        try:
            await ready
        finally:
            remove(fd)


def _set_once(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


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
    procs: Processes,
    work: Path,
    kind: str,
    count: int,
    secret_file: Path,
    *,
    tree: Path | None = None,
    trace: bool = False,
    chain: Chain | None = None,
) -> Idle:
    """`count` idle flows of `kind` to a fresh softrelay; its RSS before and after.
    `tree`: the server runs that checkout's code; `trace`: under tracemalloc, and the
    result says where the memory went (its RSS is then not comparable)."""
    # Room for `count` flows from one address: a WebSocket counts against both the HTTP
    # and the SIP cap, a TCP or TLS flow against SIP's only. Caps far above that would
    # be cut, both, to fit the server's open-file limit.
    room = count + CONNECTING
    http = room if kind == "ws" else CONNECTING
    config = relay_config(work, None, secret_file, http_connections=http, sip_connections=room)
    tls_port = 0
    if kind == "tls":
        chain = chain or make_chain(work / "tls")
        tls_port = free_port()
        with config.open("a", encoding="utf-8") as f:
            f.write(
                f'\n[sip.tls]\nport = {tls_port}\ncert = "{chain.chain}"\nkey = "{chain.key}"\n'
            )
    out = work / "trace"
    command = None
    if tree is not None or trace:
        out.mkdir(parents=True, exist_ok=True)
        wrapper = relay_idle_trace.SERVE_FROM
        command = (sys.executable, "-c", wrapper, str(tree or "-"), str(out) if trace else "-")
    server = (
        await start_softrelay(procs, work, config)
        if command is None
        else await start_softrelay(procs, work, config, command=command)
    )
    clients: TcpIdle | TlsIdle | WsIdle
    if kind == "tls":
        assert chain is not None
        clients = TlsIdle(tls_port, chain)
    else:
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
        if trace:
            await _snapshot(server, signal.SIGUSR1, out / "before.json")
        before = status_kib(pid, "VmRSS")
        errors: Counter[str] = Counter()
        budget = max(30.0, count / IDLE_RATE[kind])
        deadline = time.monotonic() + budget
        started = time.perf_counter()

        async def open_all(numbers: range) -> int:
            """Open `numbers`' connections; once the server counts them all, its RSS."""
            pending = iter(numbers)

            async def connect() -> None:
                for number in pending:
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
            # Accepted by the kernel is not yet accepted by the server: wait for its count.
            async with asyncio.timeout(max(30.0, count / 1000)):
                while await sip_flows(server, kind) < clients.opened:  # noqa: ASYNC110
                    await asyncio.sleep(0.5)
            await asyncio.sleep(1.0)
            return status_kib(pid, "VmRSS")

        # In two halves: the second half's growth is the marginal cost of a flow, after
        # the first has used up what the heap held free at the start.
        middle = await open_all(range(count // 2))
        half = clients.opened
        after = await open_all(range(count // 2, count))
        connect_s = time.perf_counter() - started
        hwm = status_kib(pid, "VmHWM")
        held = await sip_flows(server, kind)
        opened = clients.opened
        found: dict[str, Any] = {}
        if trace:
            await _snapshot(server, signal.SIGUSR2, out / "after.json")
            found = relay_idle_trace.summary(out, held)
        versions = dict(clients.versions) if isinstance(clients, TlsIdle) else {}
        return Idle(
            kind,
            count,
            opened,
            held,
            before,
            after,
            hwm,
            connect_s,
            dict(errors),
            tree="this" if tree is None else "baseline",
            trace=found,
            tls_versions=versions,
            rss_middle_kib=middle,
            opened_first_half=half,
        )
    finally:
        await clients.close()
        await server.stop(procs)


async def _snapshot(server: Softrelay, sig: signal.Signals, done: Path) -> None:
    """Have the traced server write a snapshot; its signal handler runs on the next
    Python code the server runs, which a metrics scrape provides."""
    server.proc.send_signal(sig)
    async with asyncio.timeout(300):
        while not done.exists():  # noqa: ASYNC240 (a stat, once per half second)
            # While it writes the snapshot the server answers nothing: a scrape may time out.
            with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                await server.metrics()
            await asyncio.sleep(0.5)


def idle_line(idle: Idle) -> str:
    errors = f", errors {idle.errors}" if idle.errors else ""
    return (
        f"{idle.held:>6,} of {idle.wanted:,} {IDLE_NAMES[idle.kind]} flows held, RSS "
        f"{idle.rss_before_kib / 1024:.1f} -> {idle.rss_after_kib / 1024:.1f} MiB: "
        f"{idle.bytes_per_flow / 1024:.2f} KiB per flow, second half "
        f"{idle.marginal_bytes_per_flow / 1024:.2f} "
        f"(connected in {idle.connect_s:.1f} s{errors})"
    )


def parse_kinds(text: str) -> list[str]:
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    if set(kinds) - set(IDLE_KINDS) or not kinds:
        raise argparse.ArgumentTypeError(f"kinds are {', '.join(IDLE_KINDS)}; got {text!r}")
    return list(dict.fromkeys(kinds))


# --- run alone: rounds, a baseline tree, traces ---------------------------------------------

TLS_SETTINGS = (
    "the server's context as serve makes it (proxy/sip/tls.py: ssl.create_default_context"
    " for client auth, TLS 1.2 minimum; OpenSSL's defaults otherwise): TLS 1.3 negotiated,"
    " 2 stateless session tickets sent per handshake (num_tickets 2, no OP_NO_TICKET), the"
    " server-side session cache on at OpenSSL's default size (with stateless TLS 1.3"
    " tickets it stores nothing), SSL_MODE_RELEASE_BUFFERS set by CPython on every context"
    " (read and write buffers freed while idle); clients resume no session"
)


async def _json_of(script: str, *args: str) -> dict[str, Any]:
    """A bench script that prints one JSON object, in a process of its own."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(_HERE / script), *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    if proc.returncode:
        return {"error": f"{script}: exit status {proc.returncode}"}
    found: dict[str, Any] = json.loads(out)
    return found


async def openssl_share(chain: Chain, n: int) -> dict[str, Any]:
    """Where an idle TLS flow's memory goes, apart from softrelay: OpenSSL's bytes per
    idle server connection without an event loop and the TLS settings it found
    (relay_idle_openssl.py), the same by allocation site (relay_idle_openssl_sites.py,
    a few hundred connections suffice), and bare uvloop servers holding TLS flows each
    way one can (relay_idle_tls_designs.py)."""
    directory = str(chain.chain.parent)
    found = await _json_of("relay_idle_openssl.py", directory, str(n))
    found["by_site"] = await _json_of("relay_idle_openssl_sites.py", directory, str(min(n, 500)))
    found["designs"] = (await _json_of("relay_idle_tls_designs.py", directory, str(n))).get(
        "designs", []
    )
    return found


async def run(
    args: argparse.Namespace, procs: Processes, tmp: Path
) -> tuple[list[Idle], dict[str, Any]]:
    secret_file = tmp / "pbx.secret"
    secret_file.write_text(secrets.token_hex(16) + "\n", encoding="utf-8")
    chain = make_chain(tmp / "tls", args.tls_key)
    trees: list[Path | None] = [None] if args.baseline is None else [None, args.baseline]
    found: list[Idle] = []
    for round_no in range(args.rounds):
        # Each round alternates which tree goes first, so neither always meets the
        # machine in the same state.
        order = trees if round_no % 2 == 0 else trees[::-1]
        for kind in args.kinds:
            for tree in order:
                for count in args.flows:
                    name = "this" if tree is None else "baseline"
                    work = tmp / f"r{round_no}-{kind}-{name}-{count}"
                    idle = await idle_flows(
                        procs, work, kind, count, secret_file, tree=tree, chain=chain
                    )
                    found.append(idle)
                    print(f"  round {round_no + 1} {name:8} {idle_line(idle)}", flush=True)
    if args.trace:
        for kind in args.kinds:
            for tree in trees:
                name = "this" if tree is None else "baseline"
                work = tmp / f"trace-{kind}-{name}"
                count = min(args.flows)
                idle = await idle_flows(
                    procs, work, kind, count, secret_file, tree=tree, trace=True, chain=chain
                )
                found.append(idle)
                traced = idle.trace["traced_bytes_per_flow"]
                print(f"  traced   {name:8} {IDLE_NAMES[kind]}: {traced:,} B per flow", flush=True)
    openssl: dict[str, Any] = {}
    if "tls" in args.kinds:
        openssl = await openssl_share(chain, min(args.flows))
        print(f"  OpenSSL alone: {openssl.get('bytes_per_idle_server_connection')} B", flush=True)
    return found, openssl


def verdicts(found: list[Idle]) -> dict[str, Any]:
    """Per kind: bytes per flow of each tree over the untraced rounds (median, min-max),
    the target, Kamailio's figure, and this tree over the baseline round by round."""
    table: dict[str, Any] = {}
    for kind in IDLE_KINDS:
        rounds = [i for i in found if i.kind == kind and not i.trace]
        if not rounds:
            continue
        ours = [i.bytes_per_flow for i in rounds if i.tree == "this"]
        base = [i.bytes_per_flow for i in rounds if i.tree == "baseline"]
        marginal = [i.marginal_bytes_per_flow for i in rounds if i.tree == "this"]
        base_marginal = [i.marginal_bytes_per_flow for i in rounds if i.tree == "baseline"]
        row: dict[str, Any] = {
            "bytes_per_flow": spread(ours, 0),
            "marginal_bytes_per_flow": spread(marginal, 0),
            "target_bytes": TARGETS[kind],
            # On the larger of the two readings: neither flatters.
            "target_met": max(statistics.median(ours), statistics.median(marginal))
            <= TARGETS[kind],
            "kamailio_bytes": KAMAILIO.get(kind),
        }
        if base:
            row["baseline_bytes_per_flow"] = spread(base, 0)
            row["baseline_marginal_bytes_per_flow"] = spread(base_marginal, 0)
            row["this_over_baseline"] = spread([a / b for a, b in zip(ours, base, strict=False)])
        traces = {i.tree: i.trace for i in found if i.kind == kind and i.trace}
        if traces:
            row["trace"] = traces
        table[kind] = row
    return table


def report(
    args: argparse.Namespace, found: list[Idle], openssl: dict[str, Any], wall: float
) -> dict[str, Any]:
    table = verdicts(found)
    print()
    print("bytes per idle flow, median (min-max) of the rounds: delta/N | second half")

    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        return f"{value['median']:,.0f} ({value['min']:,.0f}-{value['max']:,.0f})"

    for kind, row in table.items():
        kam = row["kamailio_bytes"]
        verdict = "MET" if row["target_met"] else "NOT MET"
        print(
            f"{IDLE_NAMES[kind]:10} this {cell(row, 'bytes_per_flow')}"
            f" | {cell(row, 'marginal_bytes_per_flow')};"
            f" baseline {cell(row, 'baseline_bytes_per_flow')}"
            f" | {cell(row, 'baseline_marginal_bytes_per_flow')};"
            f" target {row['target_bytes']:,}; Kamailio {'-' if kam is None else f'{kam:,.0f}'}:"
            f" {verdict}"
        )
    sites = openssl.get("by_site", {}).get("idle_after_handshake")
    if sites:
        print(f"\nOpenSSL by site, {sites['chunk_bytes_per_connection']:,} B per idle connection:")
        for site in sites["sites"][:12]:
            print(f"  {site['chunk_bytes']:>6,} B  {site['what']} ({site['site']})")
        on_socket = openssl["by_site"].get("idle_on_socket_bio", {})
        print(
            f"  on a socket BIO (no memory BIOs): {on_socket.get('chunk_bytes_per_connection')} B"
        )
    for design in openssl.get("designs", []):
        churn = f", after {design['churn_bytes']:,} B churn" if design.get("churn_bytes") else ""
        churn += ", mmap threshold pinned" if design.get("pinned_mmap_threshold") else ""
        print(
            f"  bare server, {design['design']:11}{churn}: {design['bytes_per_flow']:>7,} B"
            f" per flow | {design['marginal_bytes_per_flow']:,}"
        )
    for kind, row in table.items():
        for tree, trace in row.get("trace", {}).items():
            print(
                f"\n{IDLE_NAMES[kind]} ({tree}), traced {trace['traced_bytes_per_flow']:,} B/flow:"
            )
            for line in trace["by_line"][:8]:
                print(f"  {line['bytes_per_flow']:>7,} B  {line['where']}")
            for obj in trace["gc_objects"][:8]:
                print(f"  {obj['per_flow']:>5} x {obj['type']} ({obj['bytes_per_flow']:,} B)")
    return {
        "benchmark": "idle SIP flows: memory per flow of the relay process",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "platform": platform.platform(),
        "flows": args.flows,
        "rounds": args.rounds,
        "baseline": None if args.baseline is None else str(args.baseline),
        "tls_chain": f"root -> intermediate -> leaf, {args.tls_key}; clients trust the root",
        "tls_settings": TLS_SETTINGS,
        "method": "VmRSS of serve before and after N idle flows, delta / N; the clients in"
        " this process, the server in its own, loopback; kernel socket buffers not in RSS",
        "kinds": table,
        "openssl_share": openssl,
        "results": [i.to_json() for i in found],
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=lambda t: [int(x) for x in t.split(",")], default=[5000])
    parser.add_argument("--kinds", type=parse_kinds, default=list(IDLE_KINDS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="a checkout to measure alike (before)")
    parser.add_argument("--trace", action="store_true", help="one traced server per kind")
    parser.add_argument("--tls-key", choices=KEY_KINDS, default="p256")
    parser.add_argument("--quick", action="store_true", help="2,000 flows, 1 round, traced")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/relay_idle.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.flows, args.rounds, args.trace = [2000], 1, True
    if args.rounds < 1 or min(args.flows) < 1:
        parser.error("--rounds and --flows must be at least 1")
    if args.baseline is not None and not (args.baseline / "softrelay/cli.py").exists():
        parser.error(f"--baseline {args.baseline}: no softrelay/cli.py there")
    nofile, why = raise_nofile(max(args.flows) + 4096)
    if max(args.flows) > nofile - NOFILE_RESERVE:
        parser.error(f"--flows {max(args.flows)} does not fit the open-file limit: {why}")
    started = time.perf_counter()
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        try:
            found, openssl = asyncio.run(run(args, procs, Path(tmp)))
        finally:
            procs.kill_all()
    result = report(args, found, openssl, time.perf_counter() - started)
    write_result(args.out, result)
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
