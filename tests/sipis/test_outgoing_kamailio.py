"""Calls and texts a SIPIS app places, through softrelay and a real provider (Kamailio,
which challenges every INVITE and MESSAGE from its own users with 407): softrelay
answers the challenge with the stored HA1, so the app never sends a password or an
Authorization. The callee is another Kamailio user, a Python UA registered there
directly over UDP. Every wait is bounded and waits for a message, never for time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from proxy.sip.message import Request, Response
from sipis.account import Account, Credential
from sipis.appleg import MARK
from tests.kamailio import DOMAIN, Kamailio, Subscriber
from tests.sipis.calls_world import (
    ALICE,
    APP_IP,
    SDP,
    SIPIS_DOMAIN,
    App,
    KamailioUser,
    World,
    kamailio,
    make_world,
    message,
)

TARGET = f"sip:bob@{DOMAIN}"

__all__ = ["kamailio"]  # the fixture (alice and bob)


class Placing(App):
    """The SIPIS app, keeping what it sent (to show no credential ever left it)."""

    sent: list[bytes]

    def send(self, data: bytes) -> None:
        if not hasattr(self, "sent"):
            self.sent = []
        self.sent.append(data)
        super().send(data)

    def via(self, branch: str) -> str:
        return f"Via: SIP/2.0/TCP {APP_IP}:{self.port};branch={branch}"

    def from_(self, account: Account) -> str:
        return f"<sip:{account.account_id}@{SIPIS_DOMAIN}>;tag={self.tag}"

    def invite(self, account: Account) -> tuple[str, str]:
        """An INVITE to bob; its Call-ID and branch."""
        call_id, branch = secrets.token_hex(8), "z9hG4bK" + secrets.token_hex(8)
        self.send(
            message(
                f"INVITE {TARGET} SIP/2.0",
                self.via(branch),
                "Max-Forwards: 70",
                f"From: {self.from_(account)}",
                f"To: <{TARGET}>",
                f"Call-ID: {call_id}",
                "CSeq: 1 INVITE",
                f"Contact: {self.contact}",
                "Content-Type: application/sdp",
                body=SDP,
            )
        )
        return call_id, branch

    def cancel(self, account: Account, call_id: str, branch: str) -> None:
        self.send(
            message(
                f"CANCEL {TARGET} SIP/2.0",
                self.via(branch),
                "Max-Forwards: 70",
                f"From: {self.from_(account)}",
                f"To: <{TARGET}>",
                f"Call-ID: {call_id}",
                "CSeq: 1 CANCEL",
            )
        )

    def in_dialog(self, method: str, cseq: int, ok: Response) -> None:
        """ACK or BYE of the dialog the 2xx `ok` set up: to its Contact, by its
        Record-Route reversed (the app is the UAC)."""
        routes = [f"Route: {v}" for v in reversed(ok.values("Record-Route"))]
        self.send(
            message(
                f"{method} {ok.contacts[0].uri} SIP/2.0",
                self.via("z9hG4bK" + secrets.token_hex(8)),
                *routes,
                "Max-Forwards: 70",
                f"From: {ok.get('From')}",
                f"To: {ok.get('To')}",
                f"Call-ID: {ok.call_id}",
                f"CSeq: {cseq} {method}",
            )
        )

    def text(self, account: Account, body: str) -> str:
        """A MESSAGE to bob; its Call-ID."""
        call_id = secrets.token_hex(8)
        self.send(
            message(
                f"MESSAGE {TARGET} SIP/2.0",
                self.via("z9hG4bK" + secrets.token_hex(8)),
                "Max-Forwards: 70",
                f"From: {self.from_(account)}",
                f"To: <{TARGET}>",
                f"Call-ID: {call_id}",
                "CSeq: 1 MESSAGE",
                "Content-Type: text/plain",
                body=body,
            )
        )
        return call_id

    def never_sent_a_credential(self) -> None:
        for data in self.sent:
            text = data.decode()
            assert "Authorization: Digest" not in text
            assert "Proxy-Authorization" not in text
            assert ALICE.password not in text
            assert ALICE.ha1() not in text


@contextlib.asynccontextmanager
async def bob_and_app(
    world: World, account: Account, secret: str
) -> AsyncIterator[tuple[KamailioUser, Placing]]:
    """bob registered at Kamailio, and the account's app connected to softrelay."""
    assert world.kamailio.port is not None
    async with (
        KamailioUser.registered(world.kamailio.port) as bob,
        Placing.registered(world.sip_port, account.account_id, secret) as app,
    ):
        yield bob, app


def outgoing(world: World, method: str, outcome: str) -> float:
    value = world.registry.get_sample_value(
        "softrelay_sipis_outgoing_total", {"method": method, "outcome": outcome}
    )
    return value or 0.0


async def answered_call(
    world: World, app: Placing, bob: KamailioUser, account: Account
) -> tuple[Request, Response]:
    """The app calls bob, bob answers, the app ACKs: bob's INVITE and the app's 200."""
    call_id, branch = app.invite(account)
    invite = await bob.inbox.request("INVITE")
    assert invite.call_id == call_id
    # Kamailio forwards only an authenticated INVITE, and that was softrelay's second:
    # CSeq+1 after answering the 407 with the HA1. It came as the account's.
    assert invite.cseq.number == 2
    assert str(invite.from_.uri) == f"sip:alice@{DOMAIN}"
    assert invite.from_.tag == app.tag
    assert invite.get("Contact") == world.registrations.contact(account.account_id)
    assert invite.body.decode() == SDP
    shown = invite.serialize().decode()
    assert APP_IP not in shown  # the app's address stays with softrelay (SDP aside)
    assert "Authorization" not in shown  # Kamailio consumed softrelay's credentials
    bob.reply(invite, 180, "Ringing")
    ringing = await app.inbox.response(180)
    bob.reply(invite, 200, "OK", body=SDP)
    ok = await app.inbox.response(200)
    for response in (ringing, ok):  # as the app knows its INVITE
        assert response.get("CSeq") == "1 INVITE"
        assert response.top_via.branch == branch
        assert response.get("From") == app.from_(account)
        assert "Proxy-Authenticate" not in response.serialize().decode()
    assert MARK in ok.values("Record-Route")[-1]  # the app's route set starts with us
    assert str(ok.contacts[0].uri) == bob.contact.strip("<>")
    app.in_dialog("ACK", 1, ok)
    ack = await bob.inbox.request("ACK")
    assert ack.cseq.number == invite.cseq.number  # the answered INVITE's
    return invite, ok


async def test_outgoing_call_is_authenticated_with_the_stored_ha1_and_hung_up_by_the_app(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    async with make_world(kamailio, tmp_path) as world:
        account, secret = await world.account()
        async with bob_and_app(world, account, secret) as (bob, app):
            invite, ok = await answered_call(world, app, bob, account)
            app.in_dialog("BYE", 2, ok)
            bye = await bob.inbox.request("BYE")
            assert bye.cseq.number == 3  # the app's 2, after the offset of one challenge
            assert bye.cseq.number > invite.cseq.number
            assert str(bye.from_.uri) == f"sip:alice@{DOMAIN}"
            bob.reply(bye, 200, "OK")
            done = await app.inbox.response(200, "BYE")
            assert done.get("CSeq") == "2 BYE"
            assert done.get("From") == app.from_(account)
            app.never_sent_a_credential()
        assert not world.calls.outgoing.has(invite.call_id)
        assert outgoing(world, "INVITE", "answered") == 1


async def test_callee_hangs_up_a_call_the_app_placed(kamailio: Kamailio, tmp_path: Path) -> None:
    async with make_world(kamailio, tmp_path) as world:
        account, secret = await world.account()
        async with bob_and_app(world, account, secret) as (bob, app):
            invite, _ = await answered_call(world, app, bob, account)
            bob.bye(invite)
            bye = await app.inbox.request("BYE")
            # The app sees its own side of the dialog: its From (and tag) as the To.
            assert bye.get("To") == app.from_(account)
            assert str(bye.uri) == app.contact.strip("<>")
            app.reply(bye, 200, "OK")
            done = await bob.inbox.response(200, "BYE")
            assert str(done.to.uri) == f"sip:alice@{DOMAIN}"
            app.never_sent_a_credential()
        assert not world.calls.outgoing.has(invite.call_id)


async def test_app_cancels_its_call_before_the_answer(kamailio: Kamailio, tmp_path: Path) -> None:
    async with make_world(kamailio, tmp_path) as world:
        account, secret = await world.account()
        async with bob_and_app(world, account, secret) as (bob, app):
            call_id, branch = app.invite(account)
            invite = await bob.inbox.request("INVITE")
            bob.reply(invite, 180, "Ringing")
            await app.inbox.response(180)
            app.cancel(account, call_id, branch)
            assert (await app.inbox.response(200, "CANCEL")).get("CSeq") == "1 CANCEL"
            # Kamailio matched softrelay's CANCEL to the authenticated INVITE (its branch
            # and CSeq 2), so the CANCEL reached bob.
            cancel = await bob.inbox.request("CANCEL")
            assert cancel.call_id == call_id
            assert cancel.cseq.number == invite.cseq.number == 2
            bob.reply(cancel, 200, "OK")
            bob.reply(invite, 487, "Request Terminated")
            terminated = await app.inbox.response(487)
            assert terminated.get("CSeq") == "1 INVITE"
            assert terminated.top_via.branch == branch
            app.never_sent_a_credential()
        assert 200 not in app.inbox.statuses()
        assert outgoing(world, "INVITE", "cancelled") == 1


async def test_wrong_stored_ha1_gives_the_app_a_final_403_and_no_loop(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    async with make_world(kamailio, tmp_path) as world:
        account, secret = await world.account()
        # The stored HA1 goes wrong after the account registered (the password was
        # changed at the provider, say): the app's REGISTER reads the stored account.
        wrong = Subscriber("alice", "not-" + ALICE.password).ha1()
        credential = Credential("alice", DOMAIN, ha1_md5=wrong)
        assert await world.accounts.update(dataclasses.replace(account, credential=credential))
        async with bob_and_app(world, account, secret) as (bob, app):
            app.invite(account)
            refused = await app.inbox.response(403)
            assert refused.get("CSeq") == "1 INVITE"
            assert refused.reason == "Stored Credentials Refused"
            text = refused.serialize().decode()
            assert "Authenticate" not in text  # never a challenge the app would answer
            assert not bob.inbox.requests("INVITE")
            # One answer to the 407, refused with a second one: two INVITEs, no loop.
            assert [s for s in app.inbox.statuses() if s >= 200] == [403]
            app.text(account, "hello")
            assert (await app.inbox.response(403, "MESSAGE")).reason == (
                "Stored Credentials Refused"
            )
            app.never_sent_a_credential()
        assert outgoing(world, "INVITE", "credentials_refused") == 1
        assert _invites_from_alice(kamailio) == 2


def _invites_from_alice(kamailio: Kamailio) -> int:
    """The INVITEs from alice Kamailio logged (one line per initial request)."""
    lines = kamailio.log_file.read_text(errors="replace").splitlines()
    return sum(1 for line in lines if "INVITE sip:bob@" in line and "from sip:alice@" in line)


async def test_outgoing_message_is_authenticated_and_delivered(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    async with make_world(kamailio, tmp_path) as world:
        account, secret = await world.account()
        async with bob_and_app(world, account, secret) as (bob, app):
            call_id = app.text(account, "hello bob")
            delivered = await bob.inbox.request("MESSAGE")
            assert delivered.call_id == call_id
            assert delivered.body == b"hello bob"
            assert delivered.cseq.number == 2  # after the 407, answered with the HA1
            assert str(delivered.from_.uri) == f"sip:alice@{DOMAIN}"
            bob.reply(delivered, 200, "OK")
            ok = await app.inbox.response(200, "MESSAGE")
            assert ok.get("CSeq") == "1 MESSAGE"
            assert ok.get("From") == app.from_(account)
            assert ok.top_via.host == APP_IP
            app.never_sent_a_credential()
        assert outgoing(world, "MESSAGE", "answered") == 1
