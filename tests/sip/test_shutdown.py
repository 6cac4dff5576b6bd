"""SIGTERM to `softrelay serve` during a burst of calls: once shutdown has begun no new
INVITE is taken on, every parked call gets its final answer, and the process exits 0.

The parties are real sockets on loopback: the PBX of tests/peers.py linked over TCP,
three phones that registered with RFC 8599 push parameters through it and then slept
(closed their connections), and the push stand-ins `serve` runs in-process. The PBX
calls the sleeping phones; the relay parks each INVITE (100, push, 180 Push-Status).

Calls keep coming after the signal; each is parked or refused. Once the relay's log
says `sip.stopped_accepting`, a new INVITE on the PBX's open flow gets no 100 and no
180: a bare 503 while the flow is open (or nothing, should the flow already be closing),
the same over UDP from a new address, and a new TCP connection is refused. A reader of
the push stand-ins' delivery feed (a WebSocket) is closed with 1001. What happens within
the process is asserted once it has ended: nothing can arrive later.

tests/sip/test_wake.py holds the same steps in one process, where each is certain to
run while the flows are open.

Every wait is on a message, a log line or the process, bounded by STEP_TIMEOUT; none is
paced by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import aiohttp
from aiohttp import WSCloseCode, WSMsgType

from mockphone.sipwire import PONG, Keepalive, NameAddr, Response, parse
from tests.peers import (
    PHONE_DOMAIN,
    PHONE_IP,
    SDP,
    STEP_TIMEOUT,
    Pbx,
    Server,
    StreamPeer,
    sip_message,
)

PN_PARAM = "ABCDE12345.com.example.softphone.voip"  # team id, `serve`'s embedded app id
USERS = ("alice", "bob", "carol")
BURST = 6  # calls parked before the signal: two per phone (a phone may have 4 parked)
RACING = 4  # calls sent after the signal until the relay stops accepting, at most


class SleepyPhone(StreamPeer):
    """A softphone on TCP from PHONE_IP with its own push token; it registers, then
    sleeps: FIN, and the relay's close of its side, so the flow is gone."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, user: str
    ) -> None:
        super().__init__(reader, writer)
        self.user = user
        self.port: int = writer.get_extra_info("sockname")[1]
        token = secrets.token_hex(32)
        self.contact = (
            f"<sip:{user}@{PHONE_IP}:{self.port};transport=tcp;"
            f"pn-provider=apns;pn-prid={token};pn-param={PN_PARAM}>"
        )

    @classmethod
    async def connect(cls, port: int, user: str) -> SleepyPhone:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(PHONE_IP, 0)), STEP_TIMEOUT
        )
        return cls(reader, writer, user)

    def via(self) -> str:
        sent_by = f"{PHONE_IP}:{self.port}"
        return f"Via: SIP/2.0/TCP {sent_by};branch=z9hG4bK-ph-{secrets.token_hex(6)}"

    async def sleep(self) -> None:
        self.writer.write_eof()
        rest = await asyncio.wait_for(self.reader.read(), STEP_TIMEOUT)
        assert rest == b"", rest
        await self.close()


@dataclass
class Asleep:
    """What the PBX keeps of a sleeping phone: its Contact and the Path to it."""

    user: str
    contact: NameAddr
    path: NameAddr


async def register_and_sleep(server: Server, pbx: Pbx, user: str) -> Asleep:
    phone = await SleepyPhone.connect(server.ports["tcp"], user)
    try:

        async def pbx_side() -> Asleep:
            register = await pbx.request("REGISTER")
            (contact,) = register.contacts
            (path,) = register.paths
            await pbx.accept(register, contact)
            return Asleep(user, contact, path)

        async with asyncio.TaskGroup() as group:
            registered = group.create_task(
                phone.digest_register(user, PHONE_DOMAIN, None, tag=user)
            )
            accepted = group.create_task(pbx_side())
        _, ok = registered.result()
        assert ok.status == 200, phone.last()
    finally:
        await phone.sleep()
    return accepted.result()


@dataclass
class Calls:
    """The INVITE responses the PBX receives, by Call-ID, read off its connection until
    the relay closes it."""

    pbx: Pbx
    responses: dict[str, list[Response]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False

    async def read(self) -> None:
        pbx = self.pbx
        while data := await pbx.reader.read(65536):
            for item in pbx.framer.feed(data):
                if item is Keepalive.PING:
                    pbx.writer.write(PONG)
                elif isinstance(item, bytes):
                    message = parse(item)
                    pbx.transcript.append(f"<<< {item.decode(errors='replace')}")
                    assert isinstance(message, Response), pbx.last()
                    assert message.cseq.method == "INVITE", pbx.last()
                    self.responses.setdefault(message.call_id, []).append(message)
            self.changed.set()
        self.closed = True
        self.changed.set()

    async def until(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(STEP_TIMEOUT):
            while not done():
                assert not self.closed, "the relay closed the PBX's flow"
                self.changed.clear()
                await self.changed.wait()

    def statuses(self, call_id: str) -> list[int]:
        return [r.status for r in self.responses.get(call_id, [])]


async def invite(pbx: Pbx, callee: Asleep, call_id: str) -> None:
    """The PBX calls the registered Contact along its Path, as RFC 8599 has it."""
    await pbx.send(
        sip_message(
            f"INVITE {callee.contact.uri} SIP/2.0",
            pbx.via(),
            f"Route: {callee.path}",
            "Max-Forwards: 70",
            f"From: <sip:dave@{PHONE_DOMAIN}>;tag=pbx-{call_id}",
            f"Call-ID: {call_id}",
            f"To: <sip:{callee.user}@{PHONE_DOMAIN}>",
            "CSeq: 1 INVITE",
            f"Contact: {pbx.contact}",
            "Content-Type: application/sdp",
            body=SDP,
        )
    )


class UdpCaller(asyncio.DatagramProtocol):
    """A caller from an address the relay has not heard from: the datagrams it gets
    (read once the relay's process has ended, when no more can come)."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's datagram transport does not subclass asyncio's.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.received.append(data)

    def error_received(self, exc: Exception) -> None:
        pass  # port unreachable, once the relay has gone

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def udp_invite(port: int, callee: Asleep) -> UdpCaller:
    """An INVITE over UDP from a fresh socket; the caller, to read its answers later."""
    loop = asyncio.get_running_loop()
    transport, caller = await loop.create_datagram_endpoint(
        UdpCaller, local_addr=("127.0.0.1", 0), remote_addr=("127.0.0.1", port)
    )
    sent_by = "127.0.0.1:{}".format(transport.get_extra_info("sockname")[1])
    transport.sendto(
        sip_message(
            f"INVITE {callee.contact.uri} SIP/2.0",
            f"Via: SIP/2.0/UDP {sent_by};branch=z9hG4bK-udp-{secrets.token_hex(6)}",
            "Max-Forwards: 70",
            f"From: <sip:erin@{PHONE_DOMAIN}>;tag=udp",
            "Call-ID: after-udp",
            f"To: <sip:{callee.user}@{PHONE_DOMAIN}>",
            "CSeq: 1 INVITE",
            "Content-Type: application/sdp",
            body=SDP,
        )
    )
    return caller


async def test_sigterm_during_a_burst_takes_no_new_invite_answers_every_parked_call_exits_0(
    start_server: Callable[[], Awaitable[Server]],
) -> None:
    server = await start_server()
    pbx = await Pbx.connect(server.ports["tcp"])
    calls = Calls(pbx)
    reading: asyncio.Task[None] | None = None
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STEP_TIMEOUT))
    try:
        assert await pbx.link(server.secret) == 200, server.log()
        phones = [await register_and_sleep(server, pbx, user) for user in USERS]
        reading = asyncio.create_task(calls.read())
        feed = await session.ws_connect(
            f"http://127.0.0.1:{server.http_port()}/stand-ins/v1/deliveries"
        )

        # The burst: each call parked, its phone pushed (100, 180 Push-Status).
        burst = [f"burst-{i}" for i in range(BURST)]
        for i, call_id in enumerate(burst):
            await invite(pbx, phones[i % len(phones)], call_id)
        await calls.until(lambda: all(calls.statuses(c) == [100, 180] for c in burst))
        assert all(calls.responses[c][1].get("Push-Status") == "delivered" for c in burst)
        # The feed's handler is in its loop: it sent a push of the burst.
        assert (await feed.receive()).type is WSMsgType.TEXT

        server.proc.send_signal(signal.SIGTERM)

        # The burst goes on while shutdown begins: each call parked or refused.
        racing: list[str] = []
        for i in range(RACING):
            if any("sip.stopped_accepting" in line for line in server.output):
                break
            racing.append(f"racing-{i}")
            await invite(pbx, phones[i % len(phones)], racing[-1])
            await calls.until(lambda: bool(calls.statuses(racing[-1])) or calls.closed)
        await server.line("sip.stopped_accepting")

        # From here on, nothing new is taken on.
        with contextlib.suppress(ConnectionError):  # the flow may be gone already
            await invite(pbx, phones[0], "after-tcp")
        udp = await udp_invite(server.ports["udp"], phones[1])
        refused = False
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", server.ports["tcp"])
            writer.close()
        except ConnectionRefusedError:
            refused = True
        # The feed's shutdown hook closes it: going away.
        while (message := await feed.receive()).type is WSMsgType.TEXT:
            pass  # deliveries of the racing calls' pushes
        assert message.type is WSMsgType.CLOSE, message
        assert message.data == WSCloseCode.GOING_AWAY

        assert await asyncio.wait_for(server.proc.wait(), STEP_TIMEOUT) == 0, server.log()
        await asyncio.wait_for(reading, STEP_TIMEOUT)  # all the PBX got, to the end
        udp.close()
        parked_line = await server.line("sip.parked_answered")
    except BaseException:
        print("\n".join(pbx.transcript[-30:]))
        print(server.log())
        raise
    finally:
        if reading is not None:
            reading.cancel()
        await session.close()
        await pbx.close()

    # Not taken on: no 100, no 180; a 503 with Retry-After, unless the flow was closing.
    assert calls.statuses("after-tcp") in ([503], []), calls.statuses("after-tcp")
    assert all(r.get("Retry-After") for r in calls.responses.get("after-tcp", []))
    udp_answers = [parse(data) for data in udp.received]
    assert [(r.status if isinstance(r, Response) else r) for r in udp_answers] in ([503], [])
    assert refused, "the TCP listener was closed"

    # Every call taken on (a 100) has its final answer: 503 with the shutdown's reason.
    everyone = [*burst, *racing]
    parked = [c for c in everyone if calls.statuses(c)[:1] == [100]]
    assert set(burst) <= set(parked)
    for call_id in everyone:
        if call_id not in parked and not calls.statuses(call_id):
            continue  # a racing call sent as the flow closed: never taken on
        finals = [r for r in calls.responses[call_id] if r.status >= 200]
        assert [r.status for r in finals] == [503], (call_id, calls.statuses(call_id))
        assert finals[0].get("Retry-After"), call_id
        if call_id in parked:
            # A racing call may be answered before its push was.
            assert calls.statuses(call_id) in ([100, 180, 503], [100, 503]), call_id
            assert "relay shutting down" in (finals[0].get("Reason") or ""), call_id
        else:  # refused at the door
            assert calls.statuses(call_id) == [503], call_id
    assert json.loads(parked_line)["count"] == len(parked)
    assert calls.closed, "the relay closed the PBX's flow as it stopped"
