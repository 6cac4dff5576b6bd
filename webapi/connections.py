"""Connection limits of the HTTP port, as the SIP port has them (proxy/sip/transports.py).

aiohttp's server bounds how long a connection may sit idle between requests (its
keep-alive timeout) but not how many connections one address holds, nor how many there
are in all, nor how long a request head may take to arrive: a client that sends one
header line every 20 s keeps its connection for ever, and 20,000 of them took every
file descriptor of the process, SIP's included. `HttpGuard` adds what is missing
around aiohttp's own protocol, which it wraps in the listener's protocol factory
(`GuardedSite`):

- a connection over the total cap, or over the cap of its address (an IPv6 client's
  /64), is closed at once, before aiohttp sees a byte of it;
- the whole request head must arrive within `header_timeout` of the connection's
  start, or of the first byte after the previous answer; the reaper aborts it when not;
- a request's body (Content-Length or chunked) must arrive whole within `body_timeout`
  of its head: a client that trickles a byte every few seconds of a large declared
  body is cut, whether or not its handler is reading;
- an answer the client does not read (its transport's buffer stays over the
  high-water mark, so aiohttp's writes wait) is cut after `write_timeout`: a phone
  that never reads a firmware image holds no handler, no upstream stream and no
  tunnel slot for longer than that;
- between requests, aiohttp's keep-alive timeout (`idle_timeout`) closes it.

A connection is in a handler from the moment the guard's middleware sees its request
until the handler returns, and no head timeout runs meanwhile. A WebSocket (SIP at
/sip, the provisioning tunnel) upgrades on a request without a body, so no body
timeout runs for it either: it stays in its handler for its whole life, reaped by
its own keep-alives (the SIP transports, the tunnel's heartbeat), and here only when
it stops reading what it is sent. Upgraded or not, a connection holds a descriptor of
this port and counts against the caps.

Each timeout is kept in a queue ordered by start, so the reaper stops at the first
entry still in time; all run on the injected clock.

Every cap and the descriptor fit are a process's: under `serve --workers N` each worker
has its own guard and open-file limit, so a host takes N times `max_connections` and one
address up to N times `max_connections_per_ip` (the kernel spreads its connections over
the workers by port). Rate limits that must hold across processes live in Redis.

Nothing here logs an address: the metrics count by reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import sys
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import cast

from aiohttp import StreamReader, web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as MetricCounter
from yarl import URL

from privacy.clock import Clock
from webapi.ratelimit import client_key

log = logging.getLogger("softrelay.http")


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """`[http]` of softrelay.toml: the connection limits of the HTTP port."""

    max_connections: int = 10_000  # on the HTTP port in all, WebSockets included
    max_connections_per_ip: int = 100  # 0 turns it off (everyone behind a load balancer)
    header_timeout: float = 10.0  # seconds for a whole request head to arrive
    idle_timeout: float = 60.0  # seconds a kept-alive connection may wait for a request
    body_timeout: float = 60.0  # seconds for a request's whole body, from its head
    write_timeout: float = 30.0  # seconds an answer may wait for the client to read

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.max_connections_per_ip < 0:
            raise ValueError("max_connections_per_ip must be 0 (off) or more")
        if min(self.header_timeout, self.idle_timeout, self.body_timeout, self.write_timeout) <= 0:
            raise ValueError("timeouts must be positive")

    @property
    def reap_interval(self) -> float:
        return max(0.5, min(self.header_timeout, self.body_timeout, self.write_timeout) / 4)


# Descriptors kept out of the connection caps: the database and its WAL, log files,
# listeners, upstream and push connections, crash-scrubbing worker pipes.
RESERVED_DESCRIPTORS = 1024
# Connections the kernel holds for a listener until it accepts them (the kernel caps it
# at net.core.somaxconn). asyncio's default of 100 (aiohttp's 128) overflows when many
# phones connect at once, after a node restart or a network flap: the kernel then
# drops their SYNs, each retried 1, 3, 7 s later, and phones whose registration timed
# out connect again, adding to the burst (bench/phones.py at 60,000 phones).
LISTEN_BACKLOG = 4096


@dataclass(frozen=True, slots=True)
class DescriptorFit:
    """How the HTTP cap and SIP's connection cap fit the process's open-file limit."""

    limits: HttpLimits  # with max_connections clamped when it had to be
    sip_connections: int  # SIP's TCP/TLS/WebSocket cap, clamped alike
    soft_limit: int  # RLIMIT_NOFILE, after raising it towards the hard limit
    warning: str | None  # a sentence for the operator when the caps did not fit


def fit_descriptors(
    limits: HttpLimits, sip_connections: int, soft: int, hard: int
) -> DescriptorFit:
    """`max_connections` of the HTTP port and SIP's TCP/TLS/WebSocket cap must fit under
    the open-file limit together, or a flood of one port takes the descriptors the
    other needs (20,000 slow HTTP connections once stopped SIP; a SIP cap above the
    limit would do the same to HTTP). The soft limit is raised towards the hard one as
    far as the caps need; when that is not enough both caps are cut to their share of
    what is left (in their configured ratio), and a warning says which keys to lower.
    A WebSocket counts in both, so the sum is an upper bound."""
    wanted = limits.max_connections + sip_connections + RESERVED_DESCRIPTORS
    if soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else max(soft, min(hard, wanted))
    available = max(2, soft - RESERVED_DESCRIPTORS)
    total = limits.max_connections + sip_connections
    if total <= available:
        return DescriptorFit(limits, sip_connections, soft, None)
    http = max(1, available * limits.max_connections // total)
    sip = max(1, available - http)
    warning = (
        f"the open-file limit ({soft}) cannot hold [http] max_connections"
        f" ({limits.max_connections}) and [sip.limits] max_connections ({sip_connections})"
        f" beside {RESERVED_DESCRIPTORS} reserved: the HTTP port takes at most {http}"
        f" connections and SIP at most {sip}; lower both caps or raise the limit (ulimit -n)"
    )
    return DescriptorFit(replace(limits, max_connections=http), sip, soft, warning)


def fit_process_descriptors(limits: HttpLimits, sip_connections: int) -> DescriptorFit:
    """`fit_descriptors` for this process: raises its soft limit, says when the caps
    did not fit (stderr and the service log)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fit = fit_descriptors(limits, sip_connections, soft, hard)
    if fit.soft_limit != soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (fit.soft_limit, hard))
    if fit.warning is not None:
        # The sentence is for the operator at the console (it names config keys, no
        # client); the service log keeps the event and the caps, its declared fields.
        print(f"softrelay: warning: {fit.warning}", file=sys.stderr, flush=True)
        log.warning(
            "http.descriptors_short", extra={"fields": {"count": fit.limits.max_connections}}
        )
    return fit


class HttpGuard:
    """Admits, counts and reaps the connections of the HTTP listener(s) it wraps."""

    def __init__(self, limits: HttpLimits, clock: Clock, registry: CollectorRegistry) -> None:
        self.limits = limits
        self._clock = clock
        self._per_source: Counter[str] = Counter()
        # By aiohttp's protocol of the connection (the middleware finds it by the
        # request's), or by the protocol an upgrade gave it.
        self._by_handler: dict[asyncio.BaseProtocol, _Connection] = {}
        # Connections waiting for a request head, oldest first: the reaper stops at the
        # first one still in time.
        self._heads: OrderedDict[_Connection, float] = OrderedDict()
        # Requests whose body is still arriving, with its reader, from their head on.
        self._bodies: OrderedDict[_Connection, tuple[float, StreamReader]] = OrderedDict()
        # Connections whose writes are paused (the client does not read), since when.
        self._stalls: OrderedDict[_Connection, float] = OrderedDict()
        self.connections = Gauge(
            "softrelay_http_connections", "Open connections of the HTTP port", registry=registry
        )
        self.refused = MetricCounter(
            "softrelay_http_refused",
            "HTTP connections refused: per_ip, total",
            ["reason"],
            registry=registry,
        )
        self.closed = MetricCounter(
            "softrelay_http_closed",
            "HTTP connections the server cut: header_timeout, body_timeout, write_timeout",
            ["reason"],
            registry=registry,
        )

    @property
    def open(self) -> int:
        return len(self._by_handler)

    def protocol(self, server: Callable[[], RequestHandler]) -> asyncio.Protocol:
        """A protocol for one new connection of the listener; `server` is aiohttp's
        protocol factory (the runner's `web.Server`)."""
        return _Connection(self, server)

    # What _Connection calls ----------------------------------------------------------

    def admit(self, connection: _Connection, host: str) -> str | None:
        """Count a new connection in, or the reason it is refused (and count that)."""
        limits = self.limits
        reason: str | None = None
        if len(self._by_handler) >= limits.max_connections:
            reason = "total"
        elif limits.max_connections_per_ip:
            source = client_key(host)
            if self._per_source[source] >= limits.max_connections_per_ip:
                reason = "per_ip"
            else:
                self._per_source[source] += 1
                connection.source = source
        if reason is not None:
            self.refused.labels(reason).inc()
        return reason

    def attach(self, connection: _Connection, handler: RequestHandler) -> None:
        self._by_handler[handler] = connection
        self.connections.inc()
        self.head_started(connection)

    def rekey(
        self, connection: _Connection, old: asyncio.BaseProtocol, new: asyncio.BaseProtocol
    ) -> None:
        """An upgraded connection is known by its new protocol (`_Connection.upgrade`)."""
        self._heads.pop(connection, None)
        if self._by_handler.pop(old, None) is not None:
            self._by_handler[new] = connection

    def detach(self, connection: _Connection, handler: asyncio.BaseProtocol) -> None:
        self._by_handler.pop(handler, None)
        self._heads.pop(connection, None)
        self._bodies.pop(connection, None)
        self._stalls.pop(connection, None)
        self.connections.dec()
        source = connection.source
        if source is not None:
            self._per_source[source] -= 1
            if self._per_source[source] <= 0:
                del self._per_source[source]

    def head_started(self, connection: _Connection) -> None:
        self._heads[connection] = self._clock.now()

    def bytes_arrived(self, connection: _Connection) -> None:
        """Bytes outside a handler: the head of a request, if none was under way."""
        if not connection.in_handler and connection not in self._heads:
            self._heads[connection] = self._clock.now()

    def write_paused(self, connection: _Connection) -> None:
        """The transport's buffer passed its high-water mark: the client is not reading."""
        self._stalls.setdefault(connection, self._clock.now())

    def write_resumed(self, connection: _Connection) -> None:
        self._stalls.pop(connection, None)

    # The request's side --------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Marks the connection as in a handler (its head has arrived) until the
        handler returns, and starts the body timeout of a request whose body is still
        to come. Connections of other sites (a test server) pass untouched."""
        connection = self._by_handler.get(request.protocol)
        if connection is None:
            return await handler(request)
        self._heads.pop(connection, None)
        connection.in_handler = True
        content = request.content
        # A request without a body (every WebSocket upgrade of ours) has an empty
        # payload already at its end: nothing to time.
        if not content.is_eof():
            self._bodies[connection] = (self._clock.now(), content)
        try:
            return await handler(request)
        finally:
            connection.in_handler = False
            # What is left of an unread body aiohttp discards (its lingering time), and
            # bytes past it start a head timeout again (`bytes_arrived`).
            self._bodies.pop(connection, None)

    # Reaping ---------------------------------------------------------------------------

    def reap(self) -> int:
        """Abort connections whose request head or body is overdue, or whose client has
        not read for too long; how many."""
        now = self._clock.now()
        limits = self.limits
        overdue: list[tuple[_Connection, str]] = []
        deadline = now - limits.header_timeout
        for connection, since in self._heads.items():
            if since > deadline:
                break
            overdue.append((connection, "header_timeout"))
        deadline = now - limits.body_timeout
        done: list[_Connection] = []
        for connection, (since, content) in self._bodies.items():
            if since > deadline:
                break
            # A body read to its end before its deadline is no longer timed.
            done.append(connection)
            if not content.is_eof():
                overdue.append((connection, "body_timeout"))
        for connection in done:
            del self._bodies[connection]
        deadline = now - limits.write_timeout
        for connection, since in self._stalls.items():
            if since > deadline:
                break
            overdue.append((connection, "write_timeout"))
        cut: set[_Connection] = set()
        for connection, reason in overdue:
            self._heads.pop(connection, None)
            self._stalls.pop(connection, None)
            if connection not in cut:
                cut.add(connection)
                self.closed.labels(reason).inc()
                connection.abort()
        return len(cut)

    async def reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.limits.reap_interval)
            try:
                self.reap()
            except Exception as exc:
                log.warning("http.reap_failed", extra={"fields": {"error": type(exc).__name__}})

    async def context(self, app: web.Application) -> AsyncIterator[None]:
        """The reaper, owned by the app's cleanup context."""
        task = asyncio.create_task(self.reap_forever(), name="http-reaper")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class _Connection(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, seen by the guard on the way in.

    aiohttp's `RequestHandler` is created only once the connection is admitted, so a
    refused one costs no task and never reaches the server's bookkeeping."""

    __slots__ = ("_factory", "_guard", "handler", "in_handler", "source", "transport", "upgraded")

    def __init__(self, guard: HttpGuard, factory: Callable[[], RequestHandler]) -> None:
        self._guard = guard
        self._factory = factory
        # aiohttp's protocol, or the one an upgrade handed the connection to.
        self.handler: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.source: str | None = None  # counted per source under this key
        self.in_handler = False
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are one.
        transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if self._guard.admit(self, host) is not None:
            transport.close()
            return
        self.transport = transport
        self.handler = handler = self._factory()
        self._guard.attach(self, handler)
        handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        handler = self.handler
        if handler is None:
            return
        if not self.upgraded:
            self._guard.bytes_arrived(self)
        handler.data_received(data)

    def upgrade(self, protocol: asyncio.Protocol) -> None:
        """The connection leaves HTTP: every later event goes to `protocol` (SIP over
        WebSocket takes its connections from aiohttp, proxy/sip/websocket.py). It still
        counts against the caps until it closes and is still cut when it does not read
        (`write_timeout`); its bytes start no header timeout."""
        if self.handler is not None:
            self._guard.rekey(self, self.handler, protocol)
        self.handler = protocol
        self.upgraded = True

    def eof_received(self) -> None:
        if self.handler is not None:
            self.handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        handler = self.handler
        if handler is None:
            return
        self._guard.detach(self, handler)
        self.handler = None
        handler.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.handler is not None:
            self._guard.write_paused(self)
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self._guard.write_resumed(self)
            self.handler.resume_writing()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class GuardedSite(web.BaseSite):
    """`web.TCPSite` with every connection going through an `HttpGuard`."""

    __slots__ = ("_guard", "_host", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: HttpGuard,
        *,
        reuse_port: bool = False,
    ) -> None:
        """`reuse_port`: SO_REUSEPORT, for the workers of `serve --workers N` that share
        the port (the kernel spreads connections over them; each guard caps its own)."""
        super().__init__(runner, backlog=LISTEN_BACKLOG)
        self._host = host
        self._port = port
        self._guard = guard
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self._port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        guard = self._guard
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: guard.protocol(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
        )


HTTP_GUARD = web.AppKey("http_guard", HttpGuard)
