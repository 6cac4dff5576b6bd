"""SIPIS mode in a cluster: the app connects to one node, its account's lease (and so the
provider's registration, the parked calls, the waiting texts) is on another. Two whole
apps (softrelay/app.py) on one Redis and one PostgreSQL, a real Kamailio: the lease is
on node A, the app connects to node B, which checks its device secret and hands its
flow to A over the internal link (sipis/appleg.py, the `app` frame of
proxy/sip/nodes.py). A call parked on A while the app slept reaches it on B after the
push and completes; a text waits on A and reaches it on B; a call the app places on B
goes out from A, answered with the stored HA1; a wrong secret on B changes nothing on A.

Every wait is for a message, a status change or a lease turn, bounded; never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cluster.settings import ClusterSettings
from privacy.database import StoreSettings
from privacy.keys import Keyring
from proxy.sip.flow import Transport
from proxy.sip.settings import SipSettings
from sipis.account import State
from sipis.accounts import MESSAGES
from sipis.api import ACCOUNTS
from sipis.appleg import MARK
from softrelay.app import (
    REGISTRY,
    SIP_TRANSPORTS,
    SIPIS_CALLS,
    SIPIS_LEASES,
    SIPIS_MESSAGES,
    STAND_INS,
    STORE,
)
from tests.kamailio import DOMAIN, Kamailio
from tests.limits import LONGEST_WAIT
from tests.sipis.calls_world import (
    ALICE,
    RELAY_DOMAIN,
    SDP,
    WAIT,
    App,
    Caller,
    KamailioUser,
    ack_then_app_hangs_up,
    ack_then_caller_hangs_up,
    answer,
    kamailio,
)
from tests.sipis.test_e2e import TOKEN, Running, running, settings
from tests.sipis.test_outgoing_kamailio import Placing

__all__ = ["kamailio"]  # the fixture (alice and bob)

LEASE_TTL = 6.0  # the keepers turn every 2 s; A renews long before its lease runs out


def _node(name: str, redis_url: str) -> ClusterSettings:
    return ClusterSettings(redis_url=redis_url, secret="c" * 32, node_id=name)


@dataclass
class Pair:
    a: Running  # holds the lease of the account
    b: Running  # where the app connects
    account_id: str
    secret: str
    stop_a: Callable[[], Awaitable[None]]


@contextlib.asynccontextmanager
async def two_nodes(
    kamailio: Kamailio, tmp_path: Path, redis_url: str, dsn: str
) -> AsyncIterator[Pair]:
    """Node A holding the lease of alice's account (registered at Kamailio), then node
    B; the account id and its device secret."""
    keyring, store = Keyring.generate(), StoreSettings(backend="postgresql", dsn=dsn)
    sipis = settings(lease_ttl=LEASE_TTL)
    sip = {"sip": SipSettings(RELAY_DOMAIN), "sip_listen": ("127.0.0.1", 0)}
    async with contextlib.AsyncExitStack() as stack, contextlib.AsyncExitStack() as a_stack:
        a = await a_stack.enter_async_context(
            running(
                tmp_path / "a", keyring, store, sipis, cluster=_node("node-a", redis_url), **sip
            )
        )
        account_id, secret = await a.create(kamailio, ALICE, registered=False)
        await a.app[SIPIS_LEASES].turn()  # A takes the lease now, before B is there
        assert account_id in a.app[SIPIS_LEASES].held
        await a.until(account_id, State.REGISTERED)
        b = await stack.enter_async_context(
            running(
                tmp_path / "b", keyring, store, sipis, cluster=_node("node-b", redis_url), **sip
            )
        )
        await b.app[SIPIS_LEASES].next_turn()
        stopped = False

        async def stop_a() -> None:
            nonlocal stopped
            stopped = True
            await a_stack.aclose()  # a clean stop: A lets go of its leases

        yield Pair(a, b, account_id, secret, stop_a)
        if not stopped:
            # The lease never moved: B registered nothing, all went through A.
            assert account_id in a.app[SIPIS_LEASES].held
            assert account_id not in b.app[SIPIS_LEASES].held
            assert b.engine.status(account_id) is None


def _sip_port(node: Running) -> int:
    return node.app[SIP_TRANSPORTS].address(Transport.TCP)[1]


def _app_frames(node: Running) -> float:
    value = node.app[REGISTRY].get_sample_value(
        "softrelay_node_frames_total", {"way": "out", "kind": "app"}
    )
    return value or 0.0


async def test_a_call_parked_on_the_lease_holder_reaches_the_app_on_another_node(
    kamailio: Kamailio, tmp_path: Path, redis_url: str, postgres_store_dsn: str
) -> None:
    """Parked on A while the app sleeps, pushed from A; the app connects to B (a wrong
    secret first: 403 on B, nothing on A) and gets the call there; it completes and the
    app hangs up; a second call, the caller hangs up."""
    assert kamailio.port is not None
    async with two_nodes(kamailio, tmp_path, redis_url, postgres_store_dsn) as pair:
        a, b, account_id, secret = pair.a, pair.b, pair.account_id, pair.secret
        calls_a, calls_b = a.app[SIPIS_CALLS], b.app[SIPIS_CALLS]
        token = TOKEN
        async with Caller.open(kamailio.port) as caller:
            caller.invite()
            ringing = await caller.inbox.response(180)
            assert ringing.get("Push-Status") == "delivered"
            await asyncio.wait_for(a.app[STAND_INS].deliveries.wait_for(token), WAIT)
            assert calls_a.parked_for(account_id) == 1
            async with App.connect(_sip_port(b)) as app:
                # A wrong device secret is refused on B; nothing reaches A.
                refused = await app.register(account_id, "not-" + secret, cseq=1)
                assert refused.status == 403
                assert _app_frames(b) == 0
                assert calls_a.parked_for(account_id) == 1
                assert app.inbox.requests("INVITE") == []

                registered = await app.register(account_id, secret, cseq=2)
                assert registered.status == 200
                assert registered.get("Contact") == f"{app.contact};expires=600"
                invite = await app.inbox.request("INVITE")
                assert calls_a.parked_for(account_id) == 0
                assert _app_frames(b) >= 1  # the REGISTER went to A as an `app` frame
                assert str(invite.uri) == app.contact.strip("<>")
                assert invite.body.decode() == SDP
                # The app's route set starts at B, where its connection is.
                top_route = invite.values("Record-Route")[0]
                assert MARK in top_route
                assert f"127.0.0.1:{_sip_port(b)};transport=tcp" in top_route
                app.reply(invite, 180, "Ringing")
                await caller.inbox.response(180)
                app.reply(invite, 200, "OK", body=SDP)
                ok = await caller.inbox.response(200)
                assert ok.get("Contact") == a.engine.contact(account_id)
                assert not any(MARK in v for v in ok.values("Record-Route"))
                await ack_then_app_hangs_up(caller, app, invite, ok)

            async with (
                Caller.open(kamailio.port) as caller2,
                App.registered(_sip_port(b), account_id, secret) as app2,
            ):
                caller2.invite()
                invite2 = await app2.inbox.request("INVITE")  # connected: no push
                assert len(a.app[STAND_INS].deliveries.for_token(token)) == 1
                app2.reply(invite2, 200, "OK", body=SDP)
                ok2 = await caller2.inbox.response(200)
                await ack_then_caller_hangs_up(caller2, app2, ok2)
        assert calls_b.parked_for(account_id) == 0
        assert b.app[STAND_INS].deliveries.for_token(token) == []  # B pushed nothing


async def test_a_text_waits_on_the_holder_and_the_app_on_another_node_gets_it_and_calls_out(
    kamailio: Kamailio, tmp_path: Path, redis_url: str, postgres_store_dsn: str
) -> None:
    """A text for the sleeping app waits on A (202, stored); the app connects to B and
    receives it (then it is gone from the store); then the app places a call on B,
    which A sends to Kamailio as the account's, answering the 407 with the stored HA1."""
    assert kamailio.port is not None
    text = f"Text canary {secrets.token_hex(6)}"
    async with two_nodes(kamailio, tmp_path, redis_url, postgres_store_dsn) as pair:
        a, b, account_id, secret = pair.a, pair.b, pair.account_id, pair.secret
        async with Caller.open(kamailio.port) as caller:
            caller.text(text)
            await caller.inbox.response(202, "MESSAGE")
        store = a.app[STORE]
        assert len(await store.find(MESSAGES, account_id=account_id)) == 1
        async with (
            KamailioUser.registered(kamailio.port) as bob,
            Placing.connect(_sip_port(b)) as app,
        ):
            assert isinstance(app, Placing)
            assert (await app.register(account_id, secret)).status == 200
            delivered = await app.inbox.request("MESSAGE")
            assert delivered.body.decode() == text
            app.send(answer(delivered, 200, "OK", tag=secrets.token_hex(4)))
            await asyncio.wait_for(a.app[SIPIS_MESSAGES].idle(account_id), WAIT)
            assert await store.find(MESSAGES, account_id=account_id) == []

            account = await a.app[ACCOUNTS].get(account_id)
            assert account is not None
            call_id, branch = app.invite(account)
            invite = await bob.inbox.request("INVITE")
            assert invite.call_id == call_id
            assert invite.cseq.number == 2  # A answered Kamailio's 407 with the HA1
            assert str(invite.from_.uri) == f"sip:alice@{DOMAIN}"
            assert invite.get("Contact") == a.engine.contact(account_id)
            bob.reply(invite, 200, "OK", body=SDP)
            ok = await app.inbox.response(200)
            assert ok.top_via.branch == branch
            app.in_dialog("ACK", 1, ok)
            await bob.inbox.request("ACK")
            app.in_dialog("BYE", 2, ok)
            bye = await bob.inbox.request("BYE")
            bob.reply(bye, 200, "OK")
            assert (await app.inbox.response(200, "BYE")).get("CSeq") == "2 BYE"
            app.never_sent_a_credential()
        assert not a.app[SIPIS_CALLS].outgoing.has(call_id)


async def test_when_the_lease_moves_to_the_apps_node_the_app_re_registering_is_served_there(
    kamailio: Kamailio, tmp_path: Path, redis_url: str, postgres_store_dsn: str
) -> None:
    """The app on B is handed to A; A stops (its leases let go); B takes the account
    over and registers it; until the app registers again, its text gets a 503; its next
    REGISTER stays on B (no frame to A), and a call reaches it there."""
    assert kamailio.port is not None
    async with two_nodes(kamailio, tmp_path, redis_url, postgres_store_dsn) as pair:
        b, account_id, secret = pair.b, pair.account_id, pair.secret
        account = await b.app[ACCOUNTS].get(account_id)
        assert account is not None
        async with Placing.connect(_sip_port(b)) as app:
            assert isinstance(app, Placing)
            assert (await app.register(account_id, secret, cseq=1)).status == 200
            handed = _app_frames(b)
            assert handed == 1  # the REGISTER, to A
            await pair.stop_a()
            keeper = b.app[SIPIS_LEASES]
            async with asyncio.timeout(LONGEST_WAIT):
                while account_id not in keeper.held:
                    await keeper.next_turn()
            await b.until(account_id, State.REGISTERED)
            # Until the app registers again, its flow is A's, which is gone: what the
            # app sends gets a 503 (try again), and its next REGISTER asks anew.
            app.text(account, "hello")
            gone = await app.inbox.response(503, "MESSAGE")
            assert gone.reason == "Account Node Unreachable"
            assert gone.get("Retry-After") == "5"
            assert (await app.register(account_id, secret, cseq=2)).status == 200
            assert _app_frames(b) == handed  # bound on B now
            async with Caller.open(kamailio.port) as caller:
                caller.invite()
                invite = await app.inbox.request("INVITE")
                assert f"127.0.0.1:{_sip_port(b)}" in invite.values("Record-Route")[0]
                # The app declines. A stopped node does not un-REGISTER, but B's
                # REGISTER carried the account's instance id, the same as A's: Kamailio
                # replaced A's binding, so the call forked to B alone and the 486 comes
                # at once (a branch to A's dead Contact would hold it for Kamailio's
                # FR_TIMER, 30 s, longer than this wait).
                app.reply(invite, 486, "Busy Here")
                busy = await caller.inbox.response(486)
                assert busy.reason == "Busy Here"
        assert b.app[STAND_INS].deliveries.for_token(TOKEN) == []  # connected: no push
