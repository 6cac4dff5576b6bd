"""Waking a sleeping phone over real sockets: `softrelay serve` with its embedded push
stand-ins, the Python PBX of tests/peers.py (`Pbx`) as the caller, and a Python phone.

The PBX links by serial over TCP. The phone connects over TCP from 127.0.0.2, so that
its address differs from the relay's, and registers through the PBX with RFC 8599 push
parameters in its Contact (`pn-provider=apns`, a 64-hex `pn-prid`, and a `pn-param`
naming the app `serve` runs its stand-ins for). Then it sleeps: it closes its
connection. The PBX calls the registered Contact along the Path it was given, as RFC
8599 has it; the relay parks the INVITE, answers `100`, pushes, and answers `180` with
`Push-Status: delivered`. The phone reconnects on a new connection, registers again
with the same `pn-prid`, and receives the INVITE from the relay's memory; the call is
answered, acknowledged and hung up along the Record-Route.

How the phone learns that its push arrived: the stand-ins run inside `serve`, so this
test cannot see their deliveries. The relay sends that `180 Push-Status: delivered`
only once the stand-in has accepted the push (the provider's 200), so the PBX side
hands it on to the phone as its "push arrived" signal (`push_arrived`), and the phone
reconnects the moment it is set. A real phone hears it from its OS; the order of
events at the relay is the same.

The phone's sleep is a half-close: it sends FIN and waits for the relay to close its
side, which the relay does as it drops the flow (`eof_received`). So the PBX calls
only once the relay has seen the phone go, and the INVITE is parked, not written to
a dead connection.

Every wait is bounded by a timeout (STEP_TIMEOUT), never paced by sleeping.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Awaitable, Callable

import aiohttp

from mockphone import digest
from mockphone.sipwire import NameAddr, Request, Response
from tests.peers import (
    DOMAIN,
    PHONE_DOMAIN,
    PHONE_IP,
    PHONE_SDP,
    SERIAL,
    STEP_TIMEOUT,
    Pbx,
    Server,
    StreamPeer,
    audit,
    sip_message,
)

TOKEN = secrets.token_hex(32)  # the APNs device token: 64 hex digits
PN_PARAM = "ABCDE12345.com.example.softphone.voip"  # team id, `serve`'s embedded app id
CALLER_NAME = "Carol Caller-canary"
CALLEE_NAME = "Alice Callee-canary"
SDP_CANARY = "o=carol 4711 4711 IN IP4 sdp-canary.example"
SDP = f"v=0\r\n{SDP_CANARY}\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
SDP += "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"


class CallingPbx(Pbx):
    """The PBX of tests/peers.py, receiving every message: over TCP nothing repeats, and
    the relay's `180 Push-Status` and the phone's own 180 share Call-ID, CSeq and
    branch."""

    async def receive(self) -> Request | Response:
        return await StreamPeer.receive(self)

    async def accept_register(self, password: str | None) -> tuple[Request, NameAddr, NameAddr]:
        """A phone's REGISTER, challenged first when `password` is set, then accepted:
        the accepted REGISTER, its Contact and the Path back to the phone."""
        register = await self.request("REGISTER")
        if password is not None:
            nonce = await self.challenge(register)
            register = await self.request("REGISTER")
            creds = register.get("Authorization") or ""
            given = digest.params(creds)
            assert (given["realm"], given["nonce"], given["uri"]) == (
                f"pbx.{DOMAIN}",
                nonce,
                f"sip:{PHONE_DOMAIN}",
            ), creds
            assert digest.proves(creds, username="alice", password=password, method="REGISTER"), (
                creds
            )
        (path,) = register.paths
        assert "ft=" in str(path), str(path)
        (contact,) = register.contacts
        push = contact.push
        assert push is not None, "the Contact's push parameters reach the PBX"
        assert (push.provider, push.prid, push.param) == ("apns", TOKEN, PN_PARAM)
        await self.accept(register, contact)
        return register, contact, path

    async def invite(self, contact: NameAddr, path: NameAddr, call_id: str) -> list[str]:
        """INVITE the registered Contact along the Path (RFC 8599: the Request-URI is the
        Contact with its pn- parameters); the headers of the dialog, for ACK and BYE."""
        dialog = [f'From: "{CALLER_NAME}" <sip:carol@{PHONE_DOMAIN}>;tag=pbx-{call_id}']
        dialog.append(f"Call-ID: {call_id}")
        await self.send(
            sip_message(
                f"INVITE {contact.uri} SIP/2.0",
                self.via(),
                f"Route: {path}",
                "Max-Forwards: 70",
                *dialog,
                f'To: "{CALLEE_NAME}" <sip:alice@{PHONE_DOMAIN}>',
                "CSeq: 1 INVITE",
                f"Contact: {self.contact}",
                "Content-Type: application/sdp",
                body=SDP,
            )
        )
        return dialog

    async def provisional(self) -> Response:
        message = await self.receive()
        assert isinstance(message, Response), self.last()
        assert message.cseq.method == "INVITE", self.last()
        assert message.status < 200, self.last()
        return message


class TcpPhone(StreamPeer):
    """A softphone on one TCP connection from PHONE_IP, one transaction at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.port: int = writer.get_extra_info("sockname")[1]
        self.contact = (
            f"<sip:alice@{PHONE_IP}:{self.port};transport=tcp;"
            f"pn-provider=apns;pn-prid={TOKEN};pn-param={PN_PARAM}>"
        )

    @classmethod
    async def connect(cls, port: int) -> TcpPhone:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(PHONE_IP, 0)), STEP_TIMEOUT
        )
        return cls(reader, writer)

    def via(self) -> str:
        sent_by = f"{PHONE_IP}:{self.port}"
        return f"Via: SIP/2.0/TCP {sent_by};branch=z9hG4bK-ph-{secrets.token_hex(6)}"

    async def register(self, password: str | None) -> Response:
        """REGISTER alice with the push parameters, answering a digest challenge."""
        _, answer = await self.digest_register("alice", PHONE_DOMAIN, password, tag="ph")
        assert answer.status == 200, self.last()
        return answer

    async def sleep(self) -> None:
        """The app goes to the background: FIN, then wait until the relay closes its
        side, which it does as it drops the flow; then the socket is gone."""
        self.writer.write_eof()
        rest = await asyncio.wait_for(self.reader.read(), STEP_TIMEOUT)
        assert rest == b"", rest
        await self.close()

    async def take_call(self) -> Request:
        """The parked INVITE: 180 and 200 echoing the Record-Route; its ACK and BYE."""
        invite = await self.request("INVITE")
        contact = f"<sip:alice@{PHONE_IP}:{self.port};transport=tcp>"
        _, bye = await self.answer(invite, contact=contact, tag="ph-in", sdp=PHONE_SDP)
        assert bye.call_id == invite.call_id
        return invite


async def _metric(server: Server, name: str) -> float:
    """One sample of `serve`'s /metrics, 0 when absent."""
    url = f"http://127.0.0.1:{server.http_port()}/metrics"
    timeout = aiohttp.ClientTimeout(total=STEP_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as answer:
        text = await answer.text()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def _linked_pbx(server: Server) -> CallingPbx:
    pbx = await CallingPbx.connect(server.ports["tcp"])
    assert await pbx.link(server.secret) == 200, server.log()
    return pbx


async def _asleep(
    server: Server, pbx: CallingPbx, password: str | None
) -> tuple[int, NameAddr, NameAddr]:
    """A phone registered through the PBX, then slept: the port it had, and the Contact
    and Path the PBX keeps for it."""
    phone = await TcpPhone.connect(server.ports["tcp"])
    try:
        async with asyncio.TaskGroup() as group:
            registered = group.create_task(phone.register(password))
            accepted = group.create_task(pbx.accept_register(password))
        ok = registered.result()
        assert '+sip.pns="apns,apns.dev,fcm"' in (ok.get("Feature-Caps") or ""), phone.last()
    finally:
        await phone.sleep()
    _, contact, path = accepted.result()
    return phone.port, contact, path


async def test_sleeping_phone_is_woken_by_a_push_and_takes_the_call_on_a_new_connection(
    start_server: Callable[[], Awaitable[Server]],
) -> None:
    """(a) The call is parked, pushed (100, 180 Push-Status: delivered), delivered to the
    phone's new connection once its PBX accepts its re-REGISTER, and completes; (c)
    afterwards the caller's and callee's names, the SDP, the push token and the phone's
    address are nowhere in plain under the data directory."""
    server = await start_server()
    pbx = await _linked_pbx(server)
    password = f"pw-{secrets.token_hex(8)}"
    push_arrived = asyncio.Event()
    phones: list[TcpPhone] = []
    try:
        first_port, contact, path = await _asleep(server, pbx, password)

        async def caller() -> None:
            dialog = await pbx.invite(contact, path, "wake-e2e-1")
            trying = await pbx.provisional()
            assert trying.status == 100, pbx.last()
            ringing = await pbx.provisional()
            assert ringing.status == 180, pbx.last()
            assert ringing.get("Push-Status") == "delivered", pbx.last()
            push_arrived.set()  # the phone's "your push arrived"
            await pbx.accept_register(password)  # the woken phone's re-REGISTER
            ringing = await pbx.provisional()
            assert ringing.status == 180, pbx.last()
            assert ringing.get("Push-Status") is None, "the phone's own 180 this time"
            answer = await pbx.response("INVITE", 200)
            assert answer.body == PHONE_SDP.encode()
            assert (await pbx.hang_up(answer, dialog)).status == 200, pbx.last()

        async def phone() -> None:
            await asyncio.wait_for(push_arrived.wait(), STEP_TIMEOUT)
            woken = await TcpPhone.connect(server.ports["tcp"])
            phones.append(woken)
            assert woken.port != first_port, "a new connection"
            await woken.register(password)
            invite = await woken.take_call()
            # The INVITE as the PBX sent it, held in memory only while the phone slept.
            assert str(invite.uri) == str(contact.uri), "the registered Contact, pn- and all"
            assert invite.body == SDP.encode()
            assert CALLER_NAME in (invite.get("From") or "")
            assert not invite.routes, "the relay took the Path's Route off"
            assert invite.record_routes, "the relay Record-Routes the dialog"

        async with asyncio.TaskGroup() as group:
            group.create_task(caller())
            group.create_task(phone())
        assert await _metric(server, 'softrelay_wake_calls_total{end="delivered"}') == 1
        assert await _metric(server, "softrelay_wake_parked") == 0
    except BaseException:
        for woken in phones:
            print("\n".join(woken.transcript[-10:]))
        print("\n".join(pbx.transcript[-20:]))
        print(server.log())
        raise
    finally:
        for woken in phones:
            await woken.close()
        await pbx.close()
    assert await server.stop() == 0, server.log()

    # (c) With debug mode off, the parked call existed in memory only.
    # The address and the push token are stored, encrypted: in the clear nowhere.
    status, report = await audit(
        server, CALLER_NAME, CALLEE_NAME, SDP_CANARY, password, clear=[PHONE_IP, TOKEN]
    )
    assert status == 0, report
    assert "no canary found" in report
    # ...while the scan does read the data: the serial is stored in plain.
    status, report = await audit(server, SERIAL)
    assert status == 1, report


async def test_sigterm_answers_both_parked_calls_with_503_before_serve_exits(
    start_server: Callable[[], Awaitable[Server]],
) -> None:
    """(b) Two calls parked for a sleeping phone; SIGTERM: each INVITE gets a final 503
    with Retry-After, read by the PBX after `serve` has exited with status 0."""
    server = await start_server()
    pbx = await _linked_pbx(server)
    try:
        _, contact, path = await _asleep(server, pbx, None)
        calls = ("wake-e2e-stop-1", "wake-e2e-stop-2")
        for call_id in calls:
            await pbx.invite(contact, path, call_id)
        # Both parked and pushed: 100 and 180 Push-Status for each, in some order.
        seen: dict[str, list[int]] = {call_id: [] for call_id in calls}
        while any(statuses != [100, 180] for statuses in seen.values()):
            provisional = await pbx.provisional()
            seen[provisional.call_id].append(provisional.status)
            assert len(seen[provisional.call_id]) <= 2, seen
            if provisional.status == 180:
                assert provisional.get("Push-Status") == "delivered", pbx.last()

        assert await server.stop() == 0, server.log()
        finals = [await pbx.response("INVITE") for _ in calls]
    except BaseException:
        print("\n".join(pbx.transcript[-20:]))
        print(server.log())
        raise
    finally:
        await pbx.close()
    assert sorted(f.call_id for f in finals) == sorted(calls)
    assert [f.status for f in finals] == [503, 503], pbx.transcript[-2:]
    assert all(f.get("Retry-After") for f in finals)
    assert all("shutting down" in (f.get("Reason") or "") for f in finals)
