"""A phone on SIP over WebSocket (RFC 7118) against `softrelay serve`, on loopback.

The scenario of test_sipp.py, with a Python phone in place of SIPp (which has no
WebSocket): the PBX links by serial over TCP (a wrong secret is refused); the phone
opens `ws://127.0.0.1:<http port>/sip` with subprotocol `sip` from 127.0.0.2, so that
its address differs from the relay's, and registers through the relay, answering its
PBX's digest challenge; the PBX calls the phone and the phone calls the PBX, each
INVITE/180/200/ACK/BYE/200; afterwards `softrelay audit --canary` finds neither the
phone's password, nor its Authorization header, nor its address in plain under the
data directory.

The phone follows RFC 7118: its Via sent-by and its Contact name a random `.invalid`
host, with `transport=ws` in the Contact; it knows no address of its own. Every wait
is bounded by a timeout, never paced by sleeping.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import WSMsgType

from mockphone.sipwire import Request, Response, datagram_keepalive
from tests.peers import (
    PHONE_DOMAIN,
    PHONE_IP,
    PHONE_SDP,
    SERIAL,
    STEP_TIMEOUT,
    Pbx,
    PhoneSecrets,
    Server,
    SipPeer,
    audit,
    serve_phone,
    sip_message,
    stored_registration,
)


class WsPhone(SipPeer):
    """A phone with one WebSocket to the relay, connected from PHONE_IP.

    It handles one transaction at a time, in order: over a reliable transport nothing
    is retransmitted, so every message it receives is new.
    """

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse):
        self.session = session
        self.ws = ws
        self.host = f"{secrets.token_hex(6)}.invalid"  # RFC 7118 5.2: no address of its own
        self.contact = f"<sip:alice@{self.host};transport=ws>"
        self.transcript: list[str] = []

    @classmethod
    async def connect(cls, url: str) -> WsPhone:
        connector = aiohttp.TCPConnector(local_addr=(PHONE_IP, 0))
        session = aiohttp.ClientSession(connector=connector)
        try:
            ws = await asyncio.wait_for(
                session.ws_connect(
                    url,
                    protocols=("sip",),
                    autoping=True,
                    timeout=aiohttp.ClientWSTimeout(ws_close=STEP_TIMEOUT),
                ),
                STEP_TIMEOUT,
            )
        except BaseException:
            await session.close()
            raise
        return cls(session, ws)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), STEP_TIMEOUT)
        finally:
            await self.session.close()

    def via(self) -> str:
        return f"Via: SIP/2.0/WS {self.host};branch=z9hG4bK-ws-{secrets.token_hex(6)}"

    async def send(self, message: bytes | Request | Response) -> None:
        data = message if isinstance(message, bytes) else message.serialize()
        self._sent(data)
        await self.ws.send_str(data.decode())  # one SIP message per (text) frame

    async def receive(self) -> Request | Response:
        while True:
            msg = await self.ws.receive(timeout=STEP_TIMEOUT)
            if msg.type is WSMsgType.TEXT:
                data = msg.data.encode()
            elif msg.type is WSMsgType.BINARY:
                data = msg.data
            else:
                raise AssertionError(f"the WebSocket ended ({msg.type.name}):\n{self.last()}")
            if datagram_keepalive(data) is not None:
                continue
            return self._received(data)

    async def responses(self, method: str) -> tuple[list[int], Response]:
        """The statuses of the responses to `method` up to its final one, and that one."""
        seen: list[int] = []
        while True:
            message = await self.receive()
            assert isinstance(message, Response), f"expected a response, got:\n{self.last()}"
            assert message.cseq.method == method, self.last()
            seen.append(message.status)
            if message.status >= 200:
                return seen, message

    # --- the scenario: register, be called, call -----------------------------------

    async def register(self, password: str) -> Response:
        """REGISTER alice through the relay, answering the PBX's digest challenge."""
        challenged, final = await self.digest_register("alice", PHONE_DOMAIN, password, tag="ws")
        assert challenged.status == 401, self.last()
        assert final.status == 200, self.last()
        return final

    async def take_call(self) -> None:
        """The PBX's INVITE: 180, 200 echoing the Record-Route; its ACK; its BYE."""
        invite = await self.request("INVITE")
        assert invite.uri.host == self.host, "the INVITE is for the registered Contact"
        assert not invite.routes, "the relay took the Path's Route off"
        assert invite.record_routes, "the relay Record-Routes the dialog"
        ack, bye = await self.answer(invite, contact=self.contact, tag="ws-in", sdp=PHONE_SDP)
        assert not ack.routes, "the relay took its own Route off"
        assert bye.call_id == invite.call_id

    async def call(self) -> None:
        """INVITE carol at the PBX; ACK and BYE along the route set of the answer."""
        call_id = f"ws-out-{secrets.token_hex(6)}"
        from_ = f"From: <sip:alice@{PHONE_DOMAIN}>;tag=ws-out"
        await self.send(
            sip_message(
                f"INVITE sip:carol@{PHONE_DOMAIN} SIP/2.0",
                self.via(),
                "Max-Forwards: 70",
                from_,
                f"To: <sip:carol@{PHONE_DOMAIN}>",
                f"Call-ID: {call_id}",
                "CSeq: 1 INVITE",
                f"Contact: {self.contact}",
                "Content-Type: application/sdp",
                body=PHONE_SDP,
            )
        )
        statuses, answer = await self.responses("INVITE")
        assert statuses == [180, 200], f"{statuses}:\n{self.last()}"
        assert b"m=audio" in answer.body
        # The UAC's route set: the answer's Record-Route, reversed (RFC 3261 12.1.2).
        route_set = list(reversed(answer.record_routes))
        assert route_set, self.last()
        assert all(r.uri.param("lr") is not None for r in route_set)
        (remote,) = answer.contacts  # the remote target
        in_dialog = [
            *(f"Route: {route}" for route in route_set),
            "Max-Forwards: 70",
            from_,
            f"To: {answer.get('To')}",
            f"Call-ID: {call_id}",
        ]
        # Loose routing (RFC 3261 12.2.1.1): the Request-URI is the remote target.
        await self.send(
            sip_message(f"ACK {remote.uri} SIP/2.0", self.via(), *in_dialog, "CSeq: 1 ACK")
        )
        await self.send(
            sip_message(f"BYE {remote.uri} SIP/2.0", self.via(), *in_dialog, "CSeq: 2 BYE")
        )
        statuses, done = await self.responses("BYE")
        assert statuses == [200], self.last()
        assert done.call_id == call_id


async def test_websocket_phone_registers_and_calls_both_ways_and_leaves_no_secret(
    start_server: Callable[[], Awaitable[Server]],
    tmp_path: Path,
) -> None:
    server = await start_server()
    pbx = await Pbx.connect(server.ports["tcp"])
    phone_secrets = PhoneSecrets(password=f"pw-canary-{secrets.token_hex(8)}")
    try:
        assert await pbx.link("not-the-secret") == 403, "a wrong secret is refused"
        assert await pbx.link(server.secret) == 200, server.log()

        phone = await WsPhone.connect(f"ws://127.0.0.1:{server.http_port()}/sip")
        try:
            assert phone.ws.protocol == "sip", "the relay accepted the subprotocol sip"

            async def phone_side() -> None:
                await phone.register(phone_secrets.password)
                await phone.take_call()
                await phone.call()

            async with asyncio.TaskGroup() as group:
                group.create_task(serve_phone(pbx, phone_secrets, contact_host=phone.host))
                group.create_task(phone_side())
        except BaseException:
            print("\n".join(phone.transcript[-20:]))
            print("\n".join(pbx.transcript[-20:]))
            print(server.log())
            raise
        finally:
            await phone.close()
    finally:
        await pbx.close()
    assert await server.stop() == 0, server.log()

    # With the server stopped: nothing of the phone's secrets or address in plain...
    status, report = await audit(server, *phone_secrets.canaries(), server.secret, clear=[PHONE_IP])
    assert status == 0, report
    assert "no canary found" in report
    # ...while the scan does read the data: the serial is stored in plain.
    status, report = await audit(server, SERIAL)
    assert status == 1, report
    # ...and the binding keeps the address the WebSocket came from, encrypted.
    binding = await stored_registration(server)
    assert binding.fields["phone_ip"] == PHONE_IP
