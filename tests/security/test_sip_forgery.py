"""Issue 14.2 and 14.4 against a real `softrelay serve`: what the audit did, done again.

- A TCP client with no account REGISTERs through the relay (for `eve`, who does not
  exist, then for `alice`, whose password it lacks), with the push token of alice's
  phone, and forges the PBX's 200 behind each, with the very Via the relay put on top
  (more than it could learn). Nothing is stored, alice's parked call stays parked and
  reaches nobody; a forged 200 to an un-REGISTER (`Expires: 0`, `Contact: *`) deletes
  nothing.
- A PBX's REGISTER with its digest, captured and replayed from a fresh connection, gets
  a new challenge, not 200; the serial stays linked to the PBX's own connection.

The relay handles one connection's messages in order, so after the forgeries the
attacker sends an OPTIONS the relay answers itself: the next message the attacker gets
is that answer, or something reached it that should not have.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Self

from mockphone.sipwire import Response, make_response
from privacy.clock import SystemClock
from privacy.keys import load_keyring
from privacy.policy import load_policy
from privacy.store import Record, Store
from tests.peers import (
    PHONE_DOMAIN,
    PHONE_IP,
    STEP_TIMEOUT,
    Pbx,
    Server,
    StreamPeer,
    sip_message,
    stored_registration,
)
from tests.sip.test_wake_e2e import PN_PARAM, TOKEN, TcpPhone, _asleep, _linked_pbx, _metric

ATTACKER_IP = "127.0.0.4"


class Attacker(StreamPeer):
    """A client with no account on one TCP connection from ATTACKER_IP."""

    @classmethod
    async def connect(cls, port: int) -> Self:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(ATTACKER_IP, 0)), STEP_TIMEOUT
        )
        peer = cls(reader, writer)
        peer.port = writer.get_extra_info("sockname")[1]
        return peer

    port: int = 0

    def via(self) -> str:
        return f"Via: SIP/2.0/TCP {ATTACKER_IP}:{self.port};branch=z9hG4bK-{secrets.token_hex(6)}"

    def register(self, user: str, contact: str, expires: int) -> bytes:
        call_id = f"forge-{secrets.token_hex(6)}"
        return sip_message(
            f"REGISTER sip:{PHONE_DOMAIN} SIP/2.0",
            self.via(),
            f"From: <sip:{user}@{PHONE_DOMAIN}>;tag={call_id}",
            f"To: <sip:{user}@{PHONE_DOMAIN}>",
            f"Call-ID: {call_id}",
            "CSeq: 1 REGISTER",
            "Max-Forwards: 70",
            f"Contact: {contact}",
            f"Expires: {expires}",
        )

    async def forge_answers(self, pbx: Pbx, registers: list[bytes]) -> None:
        """Each REGISTER through the relay, and the PBX's 200 forged behind it from the
        request as the PBX received it (every Via, the relay's on top)."""
        for register in registers:
            await self.send(register)
            forwarded = await pbx.request("REGISTER")
            contact = forwarded.get("Contact") or "*"
            await self.send(
                make_response(forwarded, 200, headers=[("Contact", contact), ("Expires", "600")])
            )

    async def nothing_came_back(self) -> None:
        """An OPTIONS the relay answers itself (404): it must be the next thing here."""
        await self.send(
            sip_message(
                "OPTIONS sip:probe@elsewhere.example SIP/2.0",
                self.via(),
                f"From: <sip:probe@{PHONE_DOMAIN}>;tag=probe",
                "To: <sip:probe@elsewhere.example>",
                "Call-ID: probe",
                "CSeq: 1 OPTIONS",
                "Max-Forwards: 70",
            )
        )
        answer = await self.receive()
        assert isinstance(answer, Response), self.last()
        assert (answer.cseq.method, answer.status) == ("OPTIONS", 404), self.last()


async def _registrations(data_dir: Path) -> list[Record]:
    """Every registration `serve` stored, read back through the store once it stopped."""
    store = await Store.create(
        load_policy("auerproxy"), load_keyring("", data_dir), data_dir, SystemClock()
    )
    try:
        return await store.find("registration")
    finally:
        await store.close()


def _push_contact(user: str) -> str:
    """A Contact with the push parameters of alice's phone (its pn-prid, the victim's)."""
    return (
        f"<sip:{user}@{ATTACKER_IP}:5099;transport=tcp;"
        f"pn-provider=apns;pn-prid={TOKEN};pn-param={PN_PARAM}>"
    )


async def test_forged_200s_store_nothing_and_take_no_parked_call(
    start_server: Callable[[], Awaitable[Server]],
) -> None:
    server = await start_server()
    pbx = await _linked_pbx(server)
    attacker = await Attacker.connect(server.ports["tcp"])
    try:
        _, contact, path = await _asleep(server, pbx, None)
        await pbx.invite(contact, path, "victim-call")
        assert (await pbx.provisional()).status == 100, pbx.last()
        ringing = await pbx.provisional()
        assert ringing.get("Push-Status") == "delivered", pbx.last()

        registers = [attacker.register(u, _push_contact(u), 600) for u in ("eve", "alice")]
        await attacker.forge_answers(pbx, registers)
        await attacker.nothing_came_back()
        assert await _metric(server, "softrelay_wake_parked") == 1
        assert await _metric(server, 'softrelay_wake_calls_total{end="delivered"}') == 0
        refused = 'softrelay_sip_errors_total{reason="response_not_from_target"}'
        assert await _metric(server, refused) == 2
    except BaseException:
        print("\n".join(attacker.transcript[-6:]))
        print(server.log())
        raise
    finally:
        await attacker.close()
        await pbx.close()
    assert await server.stop() == 0, server.log()
    stored = await _registrations(server.data_dir)
    assert [r.fields["sip_username"] for r in stored] == ["alice"]
    assert stored[0].fields["phone_ip"] == PHONE_IP, "alice's own binding, untouched"


async def test_a_forged_200_to_an_unregister_deletes_no_binding(
    start_server: Callable[[], Awaitable[Server]],
) -> None:
    server = await start_server()
    pbx = await _linked_pbx(server)
    attacker = await Attacker.connect(server.ports["tcp"])
    try:
        _, contact, _ = await _asleep(server, pbx, None)
        registers = [
            attacker.register("alice", "*", 0),
            attacker.register("alice", f"{contact};expires=0", 0),
        ]
        await attacker.forge_answers(pbx, registers)
        await attacker.nothing_came_back()
    except BaseException:
        print("\n".join(attacker.transcript[-6:]))
        print(server.log())
        raise
    finally:
        await attacker.close()
        await pbx.close()
    assert await server.stop() == 0, server.log()
    binding = await stored_registration(server)
    assert binding.fields["phone_ip"] == PHONE_IP


async def test_a_replayed_pbx_register_gets_a_new_challenge_and_moves_no_link(
    start_server: Callable[[], Awaitable[Server]],
) -> None:
    server = await start_server()
    tcp = server.ports["tcp"]
    pbx = await Pbx.connect(tcp)
    replayer = await Pbx.connect(tcp)
    phone = await TcpPhone.connect(tcp)
    try:
        assert await pbx.link(server.secret) == 200, pbx.last()
        (captured,) = [entry[4:] for entry in pbx.transcript if entry.startswith(">>> REGISTER")][
            1:
        ]
        assert "Authorization: Digest" in captured
        # From a fresh connection: a challenge of its own, which it cannot answer.
        await replayer.send(captured.encode())
        answer = await replayer.final("REGISTER")
        assert answer.status == 401, replayer.last()
        assert "stale=true" in (answer.get("WWW-Authenticate") or "")
        # On the PBX's own connection, a second time: used up, challenged again.
        await pbx.send(captured.encode())
        assert (await pbx.final("REGISTER")).status == 401, pbx.last()
        # The serial is still linked to the PBX's connection: a phone's REGISTER goes there.
        async with asyncio.TaskGroup() as group:
            registered = group.create_task(phone.register(None))
            register = await pbx.request("REGISTER")
            (bound,) = register.contacts
            await pbx.accept(register, bound)
        assert registered.result().status == 200
    except BaseException:
        print("\n".join(replayer.transcript[-4:]))
        print("\n".join(pbx.transcript[-4:]))
        print(server.log())
        raise
    finally:
        for peer in (phone, replayer, pbx):
            await peer.close()
