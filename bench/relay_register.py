"""(4) REGISTER/s through softrelay. A PBX (a client in the bench process) links serial
0078 over TCP with its SHA-256 digest secret and answers each forwarded REGISTER with
200. SIPp (`bench/sipp/register.xml`) registers a new user for every REGISTER, so each
one stores a binding. The climb is the calls' (`bench/relay_sipp.py`).

`Stores` gives each REGISTER round's softrelay its store: SQLite under its data dir, or
a fresh database on one PostgreSQL 15 started for the run by `tests/pgserver.py` (the
tests' own server, on this machine's cores), migrated by `softrelay db migrate` as an
operator would, its DSN handed to `serve` in an environment variable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import HOST, NO_CONFIG, ROOT, SERVE, Processes, Softrelay, write_file
from bench.relay_sipp import DOMAIN, REGISTER, REGISTER_SERIAL, Sipp, Step, climb
from mockphone.pbx import LinkRegistration
from proxy.sip.framing import PONG, Keepalive, StreamFramer
from proxy.sip.message import Request, Response
from proxy.sip.parser import parse
from proxy.sip.responses import make_response
from proxy.sip.syntax import SipParseError
from tests.pgserver import PostgresServer

STORES = ("sqlite", "postgresql")
DSN_ENV = "SOFTRELAY_BENCH_DSN"  # the config says dsn = "env:SOFTRELAY_BENCH_DSN"
MIGRATE_TIMEOUT = 60.0  # s for `softrelay db migrate`

LABEL = "REGISTER: SIPp -> softrelay -> PBX"
NOTE = (
    "PBX linked by SHA-256 digest over TCP answers 200 at once; a new user per "
    "REGISTER, so each stores a binding"
)


@dataclass(slots=True)
class Registers:
    """The REGISTER climb, why it was cut short if it was, what the PBX answered."""

    steps: list[Step] = field(default_factory=list)
    note: str = ""
    pbx_answered: int = 0


async def registers(
    sipp: Sipp,
    server: Softrelay,
    secret: str,
    rates: Sequence[int],
    refine: int,
    *,
    pids: Sequence[int] | None = None,
) -> Registers:
    """The climb of REGISTERs through a running `server`, its PBX linked with `secret`;
    `pids` the relay's processes (default: the one `serve`)."""
    done = Registers()
    try:
        pbx = await Pbx.link(server.ports["tcp"], secret)
    except (OSError, RuntimeError, AssertionError, TimeoutError, KeyError, SipParseError) as exc:
        done.note = f"skipped: the PBX could not link ({type(exc).__name__}: {exc})"
        return done
    try:
        target = f"{HOST}:{server.ports['udp']}"
        relay_pids = [server.proc.pid] if pids is None else pids

        def measure(rate: int) -> Awaitable[Step]:
            # A new user for every REGISTER: each stores a binding (no coalesced refresh).
            keys = {"domain": f"{REGISTER_SERIAL}.{DOMAIN}", "prefix": f"r{rate}"}
            return sipp.step(REGISTER, target, rate, keys, relay_pids)

        done.steps = await climb(measure, rates, refine, "register", relay_pids)
    finally:
        done.pbx_answered = pbx.answered
        if pbx.error:
            done.note = f"the PBX stopped answering: {pbx.error}"
        await pbx.close()
    return done


# --- where the store is ------------------------------------------------------------------


class Stores:
    """The PostgreSQL server of the run, if a round needs one; a store per round."""

    def __init__(self, server: PostgresServer | None) -> None:
        self.server = server
        self.version = ""

    @classmethod
    @contextlib.asynccontextmanager
    async def started(cls, stores: Sequence[str]) -> AsyncIterator[Stores]:
        server = PostgresServer() if "postgresql" in stores else None
        try:
            if server is not None:
                await asyncio.to_thread(server.start)
            found = cls(server)
            if server is not None:
                found.version = (server.data_dir / "PG_VERSION").read_text().strip()
            yield found
        finally:
            if server is not None:
                await asyncio.to_thread(server.close)

    async def environment(
        self, store: str, procs: Processes, config: Path, work: Path
    ) -> dict[str, str]:
        """What `serve --config config` needs in its environment to run on `store`: for
        PostgreSQL, a fresh database, migrated, its DSN in DSN_ENV."""
        if store == "sqlite":
            return {}
        assert self.server is not None
        env = {DSN_ENV: await asyncio.to_thread(self.server.create_database)}
        argv = [*SERVE, "db", "migrate", "--config", str(config), "--data-dir", str(work)]
        log = write_file(work / "migrate.log", "")
        proc = await procs.start(argv, log, cwd=ROOT, env={**os.environ, **env, **NO_CONFIG})
        if await procs.wait(proc, MIGRATE_TIMEOUT) != 0:
            raise RuntimeError(f"softrelay db migrate failed; see {log}")
        return env


# --- the PBX client: links by digest, answers REGISTERs -----------------------------------


class Pbx:
    """A PBX linked to softrelay over one TCP connection: it answers the relay's digest
    challenge with its secret, then answers every phone REGISTER it is sent with 200."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.framer = StreamFramer()
        self.inbox: deque[bytes] = deque()
        self.answered = 0
        self.error = ""  # why it stopped answering, if it did before the end
        self.task: asyncio.Task[None] | None = None
        host, port = writer.get_extra_info("sockname")[:2]
        self.contact = f"<sip:{REGISTER_SERIAL}@{host}:{port};transport=tcp>"
        self.via_host = f"{host}:{port}"

    @classmethod
    async def link(cls, port: int, secret: str) -> Pbx:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
        pbx = cls(reader, writer)
        try:
            async with asyncio.timeout(10):
                status = await pbx._register(secret)
        except BaseException:
            writer.close()
            raise
        if status != 200:
            writer.close()
            raise RuntimeError(f"the PBX link was refused: {status}")
        pbx.task = asyncio.create_task(pbx._serve())
        return pbx

    async def _next(self) -> bytes:
        while not self.inbox:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("softrelay closed the PBX link")
            for item in self.framer.feed(data):
                if item is Keepalive.PING:
                    self.writer.write(PONG)
                elif isinstance(item, bytes):
                    self.inbox.append(item)
        return self.inbox.popleft()

    async def _register(self, secret: str) -> int:
        """Link as REGISTER_SERIAL: the mock parties' PBX link (`LinkRegistration`)."""
        registration = LinkRegistration(REGISTER_SERIAL, DOMAIN, self.contact, expires=3600)

        def via() -> str:
            return f"SIP/2.0/TCP {self.via_host};branch=z9hG4bK-{secrets.token_hex(6)}"

        self.writer.write(registration.request(via()).serialize())
        challenge = parse(await self._next())
        assert isinstance(challenge, Response), challenge
        assert challenge.status == 401, challenge.status
        answer = registration.answer(challenge.get("WWW-Authenticate") or "", secret)
        self.writer.write(registration.request(via(), answer).serialize())
        final = parse(await self._next())
        assert isinstance(final, Response)
        return final.status

    async def _serve(self) -> None:
        try:
            while True:
                message = parse(await self._next())
                if isinstance(message, Request) and message.method == "REGISTER":
                    contact = message.get("Contact") or self.contact
                    headers = [("Contact", f"{contact};expires=600"), ("Expires", "600")]
                    self.writer.write(make_response(message, 200, headers=headers).serialize())
                    self.answered += 1
                    await self.writer.drain()  # TCP back-pressure, as a real PBX has
        except (ConnectionError, SipParseError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.writer.close()
        with contextlib.suppress(OSError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)
