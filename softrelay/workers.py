"""`softrelay serve --workers N`: N processes on one host that share its ports.

The process the operator started becomes the supervisor: it serves nothing itself.

- **Ports.** Every worker binds the same HTTP, SIP UDP, SIP TCP (and TLS) ports with
  SO_REUSEPORT; the kernel spreads new connections and datagrams over the workers by
  a hash of the peer's address, and a flow stays with the worker that accepted it.
  Before any worker starts, the supervisor binds those ports itself (`reserve_ports`):
  a port in use stops the start once, with one line, rather than in N workers; port 0
  becomes a real port that every worker then binds (SIP gets one port free for both UDP
  and TCP). The supervisor keeps its TCP sockets bound, never listening, for its whole
  life, so no other program takes a port while a worker restarts; a socket that does
  not listen is in no accept queue, so it takes no connection. A UDP socket would take
  its share of the datagrams, so the UDP probe is closed at once (the one window in which
  another program could take the UDP port, before the first worker binds it).
- **Per-worker ports.** `[server] metrics_listen` is required with N > 1 and worker i
  serves /metrics on its port + i (0: each its own free port, printed): on the shared
  HTTP port a scrape would reach one worker at random, and Prometheus needs one target
  per process. `[cluster] internal_listen` is spread the same way.
- **Lifeline.** Each worker gets one end of a socket pair: it writes `ready` there once
  it listens, and stops by itself (its ordered shutdown, as on SIGTERM) when it reads
  the end of the stream, which is what it reads if the supervisor dies, even by SIGKILL.
- **Signals.** SIGTERM or SIGINT to the supervisor is forwarded as SIGTERM to every
  worker; each does its own ordered shutdown (softrelay/app.py); the supervisor waits
  for all and exits 0 if every one exited 0, else 1.
- **Restarts.** A worker that ends while the supervisor is not stopping (a SIGKILL, the
  OOM killer, a crash) is started again: at once the first time, then after 1 s, 2 s,
  4 s ... at most RESTART_CAP; a worker that stayed up STABLE_AFTER starts over at once.
  The others keep serving meanwhile. At the first start, a worker that ends before it
  is ready (a configuration it cannot use, a port it cannot bind) stops the supervisor
  and every other worker: exit 2, after the worker's own line on stderr.

Each worker is a node of the cluster with its own node id, so it needs `[cluster]`:
without Redis a worker would not see the flows the others hold, and serve refuses
N > 1 (`check_workers`). What each process caps (connections per IP, in all, the
descriptor fit of webapi/connections.py) is per worker, so a host takes N times each.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import orjson

from cluster.settings import ClusterSettings
from proxy.sip.settings import SipSettings
from softrelay.config import Listen

log = logging.getLogger("softrelay.workers")

RESTART_CAP = 30.0  # seconds, the longest wait before a worker is started again
STABLE_AFTER = 60.0  # seconds up after which a worker's next restart is immediate again
# A worker's ordered shutdown is bounded by its own steps (STOP_GRACE each); past this
# the supervisor kills what is left, so that it never hangs on a wedged worker.
STOP_WAIT = 60.0
_PORT_ATTEMPTS = 20  # tries to find one port free for both SIP UDP and TCP
READY = b"ready\n"
# A worker's node id is the configured one (or <hostname>-<pid> of the supervisor) with
# "-<index>", and ".<restart>" after a restart: room left for those under NODE_ID's 63.
MAX_BASE_NODE_ID = 50


def check_workers(
    count: int, cluster: ClusterSettings | None, listen: Listen, source: str
) -> str | None:
    """Why `serve --workers count` cannot run with this configuration, or None."""
    if count < 2:
        return None
    if cluster is None:
        return (
            f"serve --workers {count}: {source} has no [cluster] (Redis): a worker would not"
            " see the flows and PBX links the others hold; configure [cluster], or run one"
            " process (no --workers)"
        )
    if listen.metrics is None:
        return (
            f"serve --workers {count}: {source}: server.metrics_listen is empty: each worker"
            " serves /metrics on its own port (metrics_listen's port + worker index), since"
            " a scrape of the shared HTTP port would reach one worker at random"
        )
    for key, (_, base) in (
        ("server.metrics_listen", listen.metrics),
        ("cluster.internal_listen", cluster.internal_listen),
    ):
        if base and base + count - 1 > 65535:
            return f"serve --workers {count}: {source}: {key}: port {base} + {count - 1} > 65535"
    if len(cluster.node_id) > MAX_BASE_NODE_ID:
        return (
            f"serve --workers {count}: {source}: cluster.node_id: at most {MAX_BASE_NODE_ID}"
            " characters with --workers (each worker adds -<index>)"
        )
    return None


def node_id(base: str, index: int, restarts: int) -> str:
    """Worker `index`'s node id. A restarted worker gets a new one: the flows the location
    service still names under the dead process's id are not this process's, and they
    expire with its heartbeat instead of being taken for ours."""
    return f"{base}-{index}" if restarts == 0 else f"{base}-{index}.{restarts}"


def for_worker(listen: Listen, sip: SipSettings, spec: WorkerSpec) -> tuple[Listen, SipSettings]:
    """A worker's listeners: the shared ports with SO_REUSEPORT, its own metrics port."""
    metrics = listen.metrics
    if metrics is not None and spec.metrics_port is not None:
        metrics = (metrics[0], spec.metrics_port)
    listen = replace(listen, http_port=spec.http_port, sip_port=spec.sip_port, metrics=metrics)
    return listen, replace(sip, tls_port=spec.tls_port, reuse_port=True)


def for_worker_cluster(cluster: ClusterSettings, spec: WorkerSpec) -> ClusterSettings:
    """A worker's node: its own node id and internal SIP link port."""
    internal = cluster.internal_listen
    if spec.internal_port is not None:
        internal = (internal[0], spec.internal_port)
    return replace(cluster, node_id=spec.node_id, internal_listen=internal)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What the supervisor tells worker `index` (the hidden `serve --worker` option)."""

    index: int
    count: int
    node_id: str
    http_port: int
    sip_port: int  # UDP and TCP
    tls_port: int | None
    metrics_port: int | None
    internal_port: int | None  # the node's internal SIP link ([cluster] internal_listen)
    fd: int  # the worker's end of its socket pair with the supervisor

    def encode(self) -> str:
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def decode(cls, text: str) -> WorkerSpec:
        return cls(**orjson.loads(text))


@dataclass(frozen=True, slots=True)
class SharedPorts:
    """The ports every worker binds, resolved (never 0), and the per-worker bases."""

    http: int
    sip: int
    tls: int | None
    metrics_base: int | None  # worker i: base + i (0: each its own free port)
    internal_base: int | None
    node_base: str  # the configured node id, or <hostname>-<pid> of the supervisor

    def spec(self, index: int, count: int, restarts: int, fd: int) -> WorkerSpec:
        return WorkerSpec(
            index,
            count,
            node_id(self.node_base, index, restarts),
            self.http,
            self.sip,
            self.tls,
            _plus(self.metrics_base, index),
            _plus(self.internal_base, index),
            fd,
        )


def _plus(base: int | None, index: int) -> int | None:
    if base is None or base == 0:
        return base
    return base + index


@dataclass(slots=True)
class Reservation:
    """The supervisor's bound (not listening) TCP sockets on the shared ports."""

    ports: SharedPorts
    held: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for sock in self.held:
            sock.close()
        self.held.clear()


def _bound(kind: socket.SocketKind, host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        # Both options as asyncio sets them for the workers' listeners, or they could
        # not bind beside this socket.
        if kind is socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def reserve_ports(
    http: tuple[str, int],
    sip: tuple[str, int],
    tls_port: int | None,
    metrics_base: int | None,
    internal_base: int | None,
    node_base: str,
) -> Reservation:
    """Bind the shared ports as the module docstring says; OSError when one is taken
    (by a program without SO_REUSEPORT, or of another user)."""
    held: list[socket.socket] = []
    try:
        http_sock = _bound(socket.SOCK_STREAM, *http)
        held.append(http_sock)
        sip_host, sip_port = sip
        for attempt in range(_PORT_ATTEMPTS):
            tcp = _bound(socket.SOCK_STREAM, sip_host, sip_port)
            port = tcp.getsockname()[1]
            try:
                _bound(socket.SOCK_DGRAM, sip_host, port).close()
            except OSError:
                tcp.close()
                if sip_port != 0 or attempt + 1 == _PORT_ATTEMPTS:
                    raise
                continue  # port 0 gave a TCP port whose UDP twin is taken: another
            held.append(tcp)
            break
        tls: int | None = None
        if tls_port is not None:
            tls_sock = _bound(socket.SOCK_STREAM, sip_host, tls_port)
            held.append(tls_sock)
            tls = tls_sock.getsockname()[1]
    except BaseException:
        for sock in held:
            sock.close()
        raise
    ports = SharedPorts(
        http_sock.getsockname()[1], port, tls, metrics_base, internal_base, node_base
    )
    return Reservation(ports, held)


# --- the supervisor -------------------------------------------------------------------


@dataclass(slots=True)
class Slot:
    """Worker `index`: its process now, and how often it died lately."""

    index: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    deaths: int = 0  # deaths in a row, each within STABLE_AFTER of its start
    restarts: int = 0  # processes started after the first
    status: int | None = None  # the exit status of its last process

    def restart_delay(self, now: float) -> float:
        """0 for the first death (or one after STABLE_AFTER up), then 1, 2, 4 ... s."""
        if now - self.started >= STABLE_AFTER:
            self.deaths = 0
        self.deaths += 1
        if self.deaths == 1:
            return 0.0
        return float(min(RESTART_CAP, 2 ** (self.deaths - 2)))


def describe_status(status: int) -> str:
    """`exit 3`, or `signal 9 (SIGKILL)` for a negative status of asyncio's."""
    if status >= 0:
        return f"exit {status}"
    try:
        name = signal.Signals(-status).name
    except ValueError:
        return f"signal {-status}"
    return f"signal {-status} ({name})"


class Supervisor:
    """Starts `count` workers, restarts those that die, stops them all on `stop`."""

    def __init__(
        self,
        ports: SharedPorts,
        count: int,
        command: Callable[[WorkerSpec], Sequence[str]],
        *,
        env: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ports = ports
        self.count = count
        self._command = command
        self._env = env
        self._clock = clock
        self._slots = [Slot(i) for i in range(count)]
        self._stop = asyncio.Event()
        self._first: list[asyncio.Future[bool]] = []

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        """Until `stop` (then 0 if every worker exited 0, else 1), or 2 when a worker
        could not start the first time."""
        loop = asyncio.get_running_loop()
        self._first = [loop.create_future() for _ in self._slots]
        keepers = [
            asyncio.create_task(self._keep(slot), name=f"worker-{slot.index}")
            for slot in self._slots
        ]
        started: list[bool] = []
        try:
            started = await asyncio.gather(*self._first)
            if all(started):
                print(f"softrelay: {self.count} workers ready", flush=True)
                log.info("workers.ready", extra={"fields": {"count": self.count}})
                await self._stop.wait()
            else:
                print("softrelay: a worker could not start; stopping the others", flush=True)
            self._stop.set()
            print("softrelay: stopping workers", flush=True)
            self._signal_all(signal.SIGTERM)
            _, pending = await asyncio.wait(keepers, timeout=STOP_WAIT)
            if pending:
                self._signal_all(signal.SIGKILL)
                await asyncio.wait(pending)
        finally:
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
            self._signal_all(signal.SIGKILL)  # only if something above failed
        if not all(started):
            return 2
        statuses = [slot.status for slot in self._slots]
        print(
            "softrelay: workers stopped: "
            + ", ".join(describe_status(s) if s is not None else "-" for s in statuses),
            flush=True,
        )
        return 0 if all(s == 0 for s in statuses) else 1

    def _signal_all(self, sig: signal.Signals) -> None:
        for slot in self._slots:
            process = slot.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)

    async def _keep(self, slot: Slot) -> None:
        """Run worker `slot.index` until the supervisor stops, starting it again when
        it dies (the module docstring says when)."""
        first: asyncio.Future[bool] | None = self._first[slot.index]
        while True:
            ready, status = await self._run_once(slot, first)
            slot.status = status
            if first is not None:
                first = None
                if not ready:
                    return
            if self._stop.is_set():
                return
            delay = slot.restart_delay(self._clock())
            print(
                f"softrelay: worker {slot.index} ended ({describe_status(status)}); "
                f"starting it again in {delay:g} s",
                flush=True,
            )
            log.warning(
                "workers.died",
                extra={"fields": {"count": slot.index, "error": describe_status(status)}},
            )
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                return
            slot.restarts += 1

    async def _run_once(self, slot: Slot, first: asyncio.Future[bool] | None) -> tuple[bool, int]:
        """One process of the worker, from start to end: whether it got ready, and its
        exit status."""
        ours, theirs = socket.socketpair()
        try:
            ours.setblocking(False)
            spec = self.ports.spec(slot.index, self.count, slot.restarts, theirs.fileno())
            process = await asyncio.create_subprocess_exec(
                *self._command(spec),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                env=self._env,
            )
            theirs.close()  # the worker's end lives in the worker only
            slot.process = process
            slot.started = self._clock()
            if self._stop.is_set():  # stopped while it was being started: stop it too
                process.send_signal(signal.SIGTERM)
            print(
                f"softrelay: worker {slot.index} pid {process.pid} node {spec.node_id}",
                flush=True,
            )
            # "ready", or the end of the stream: the worker ended before it listened.
            ready = await _read_ready(ours)
            if first is not None and not first.done():
                first.set_result(ready)
            if ready and first is None:
                print(f"softrelay: worker {slot.index} ready again", flush=True)
            # Our end stays open while the worker runs: closing it tells it to stop.
            status = await process.wait()
            return ready, status
        finally:
            ours.close()
            theirs.close()
            if first is not None and not first.done():
                first.set_result(False)


async def _read_ready(sock: socket.socket) -> bool:
    """Whether the worker wrote READY before its end of the stream."""
    loop = asyncio.get_running_loop()
    got = b""
    while len(got) < len(READY):
        chunk = await loop.sock_recv(sock, len(READY) - len(got))
        if not chunk:
            return False
        got += chunk
    return got == READY


def worker_command(spec: WorkerSpec, config_source: str | None, data_dir: str) -> list[str]:
    """The command line of a worker: `serve` of the same configuration and data."""
    command = [sys.executable, "-m", "softrelay.cli", "serve", "--data-dir", data_dir]
    if config_source is not None:
        command += ["--config", config_source]
    return [*command, "--worker", spec.encode()]


# --- in the worker --------------------------------------------------------------------


class Lifeline:
    """The worker's end of its socket pair: says `ready`, and calls `on_lost` once the
    supervisor's end is gone (it stopped, or died)."""

    def __init__(self, fd: int, on_lost: Callable[[], object]) -> None:
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(False)
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def ready(self) -> None:
        with contextlib.suppress(OSError):  # the supervisor is gone: _readable stops us
            self._sock.send(READY)

    def _readable(self) -> None:
        try:
            data = self._sock.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(self._sock.fileno())
            self._on_lost()

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


def whole_lines() -> None:
    """Each line in one write: the supervisor and its workers share stdout and stderr,
    and an unbuffered stream (PYTHONUNBUFFERED) writes a line's text and its newline
    apart, so another process's line could land between them."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True, write_through=False)


def child_environment(config_source: str | None) -> dict[str, str]:
    """The workers' environment: the supervisor's, with no other config to find."""
    env = dict(os.environ)
    if config_source is None:
        env["SOFTRELAY_CONFIG"] = ""
    return env
