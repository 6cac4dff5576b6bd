"""Issue 14, point 1: crash reports are scrubbed off the event loop.

The whole app (`build_app`: SIP over UDP, /healthz, the crash ingest) runs in this
process. A scrubbing step of the test holds the chain inside the worker (a process of
the pool, or a thread) until the test releases it: while an envelope is held there,
/healthz and a SIP OPTIONS are answered, so the loop is free whatever the engine's
speed. Nothing waits on time: the step signals an event when it is entered, and waits
for another that the test sets.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from crashreports.budget import UNLIMITED, Deadline
from crashreports.scrubber import Chain, Event, compile_chain
from crashreports.service import INGEST
from crashreports.settings import CrashSettings, Project
from privacy.keys import Keyring
from privacy.policy import load_policy
from proxy.sip.message import Response
from proxy.sip.parser import parse
from push.apps import PushSettings
from softrelay.app import SIP_TRANSPORTS, STORE, Services, build_app
from tests.conftest import START

KEY = "0123456789abcdef0123456789abcdef"
WAIT = 30.0  # seconds for any one step (spawning a worker process included)
EMBEDDED_PUSH = PushSettings(
    apps=(), max_in_flight=10, max_attempts=2, embedded_app_id="com.example.test"
)


@dataclass(frozen=True)
class Hold:
    """A first step that holds the event in the worker (a process or a thread) until the
    test says so: it connects to the test's port (entered), then waits for a byte
    (released). A socket, so that the same step works in a worker process."""

    port: int

    def __call__(self, event: Event, deadline: Deadline = UNLIMITED) -> Event:
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as conn:
            conn.sendall(b"E")
            assert conn.recv(1) == b"G", "the test never released the scrubber"
        return event


class Gate:
    """The test's side of `Hold`: `entered` is set when the step has the event."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(1) == b"E"
        self.entered.set()
        await self.release.wait()
        writer.write(b"G")
        await writer.drain()
        writer.close()
        await writer.wait_closed()


def _options(call_id: str) -> bytes:
    return (
        "OPTIONS sip:relay.test SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-offloop-1;rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:probe@relay.test>;tag=probe1\r\n"
        "To: <sip:relay.test>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.answers.put_nowait(data)


def _held_world(
    tmp_path: Path, gate_port: int, *, scrub_mode: str, sip: bool = False, max_in_flight: int = 64
) -> Services:
    """The app's services with one crash project whose chain starts with `Hold`."""
    from privacy.clock import ManualClock

    chain = compile_chain(opt_in=None)
    held = Chain((Hold(gate_port), *chain.steps), chain.budget)
    crash = CrashSettings(
        projects=(Project("1", KEY, "dsn", held),),
        scrub_mode=scrub_mode,
        max_in_flight=max_in_flight,
    )
    return Services(
        load_policy("auerproxy"),
        Keyring.generate(),
        tmp_path,
        ManualClock(START),
        sweep_interval=3600,
        push=EMBEDDED_PUSH,
        sip_listen=("127.0.0.1", 0) if sip else None,
        crash=crash,
    )


@pytest.mark.parametrize("mode", ["process", "thread"])
async def test_health_and_sip_are_answered_while_an_envelope_is_held_in_scrubbing(
    tmp_path: Path, mode: str
) -> None:
    gate = Gate()
    gate_server = await asyncio.start_server(gate.handle, "127.0.0.1", 0)
    gate_port = gate_server.sockets[0].getsockname()[1]
    services = _held_world(tmp_path, gate_port, scrub_mode=mode, sip=True)
    app = build_app(services)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    loop = asyncio.get_running_loop()
    transport, udp = await loop.create_datagram_endpoint(_Udp, local_addr=("127.0.0.1", 0))
    try:
        base = f"http://127.0.0.1:{server.port}"
        sip_port = next(port for kind, (_, port) in app[SIP_TRANSPORTS].addresses if kind == "udp")
        event = {"message": "held call to +49 151 23456789", "event_id": "a" * 32}
        payload = orjson.dumps(event)
        body = b"{}\n" + orjson.dumps({"type": "event", "length": len(payload)}) + b"\n" + payload
        headers = {"X-Sentry-Auth": f"Sentry sentry_version=7, sentry_key={KEY}"}
        async with aiohttp.ClientSession() as session:
            posting = asyncio.ensure_future(
                session.post(f"{base}/api/1/envelope/", data=body, headers=headers)
            )
            try:
                async with asyncio.timeout(WAIT):
                    # The scrubbing step has the envelope now, and holds it.
                    await gate.entered.wait()
                    async with session.get(f"{base}/healthz") as health:
                        assert health.status == 200
                        assert (await health.json())["status"] == "ok"
                    transport.sendto(_options("offloop-1"), ("127.0.0.1", sip_port))
                    answer = parse(await udp.answers.get())
                assert isinstance(answer, Response)
                assert answer.get("Call-ID") == "offloop-1"
                assert not posting.done()  # still held: the answers came from a free loop
            finally:
                gate.release.set()
            async with asyncio.timeout(WAIT):
                response = await posting
                assert response.status == 200
                assert await response.json() == {"id": "a" * 32}
                response.release()
        workers = [p.proc for p in app[INGEST].scrubbers._processes]
        assert len(workers) == (1 if mode == "process" else 0)
        (record,) = await app[STORE].find("crash_report")
        stored = record.fields["event"]
        assert isinstance(stored, dict)
        assert stored["message"] == "held call to [phone]"
    finally:
        transport.close()
        await server.close()
        gate_server.close()
        await gate_server.wait_closed()
    # The app's cleanup ended the worker: its input closed, it exited by itself.
    assert [w.returncode for w in workers] == [0] * len(workers)


async def test_reports_past_max_in_flight_get_429_while_one_is_held(tmp_path: Path) -> None:
    """A flood of reports that each take their whole CPU budget queues no further than
    `max_in_flight`: past it the SDK is told to back off (429 + Retry-After), and the
    held report still completes."""
    gate = Gate()
    gate_server = await asyncio.start_server(gate.handle, "127.0.0.1", 0)
    gate_port = gate_server.sockets[0].getsockname()[1]
    services = _held_world(tmp_path, gate_port, scrub_mode="thread", max_in_flight=1)
    server = TestServer(build_app(services), host="127.0.0.1", port=0)
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}/api/1/envelope/"
    headers = {"X-Sentry-Auth": f"Sentry sentry_version=7, sentry_key={KEY}"}

    def body(event_id: str) -> bytes:
        payload = orjson.dumps({"message": "flood", "event_id": event_id})
        return b"{}\n" + orjson.dumps({"type": "event", "length": len(payload)}) + b"\n" + payload

    try:
        async with aiohttp.ClientSession() as session:
            first = asyncio.ensure_future(session.post(url, data=body("a" * 32), headers=headers))
            try:
                async with asyncio.timeout(WAIT):
                    await gate.entered.wait()
                    async with session.post(url, data=body("b" * 32), headers=headers) as busy:
                        assert busy.status == 429
                        assert busy.headers["Retry-After"] == "1"
                        assert "X-Sentry-Rate-Limits" in busy.headers
                        assert await busy.json() == {"detail": "too many crash reports in progress"}
            finally:
                gate.release.set()
            async with asyncio.timeout(WAIT):
                response = await first
                assert response.status == 200
                response.release()
        (record,) = await server.app[STORE].find("crash_report")
        assert record.fields["event_id"] == "a" * 32
    finally:
        await server.close()
        gate_server.close()
        await gate_server.wait_closed()
