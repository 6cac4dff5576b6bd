"""When a node dies, stops, or Redis restarts: two `softrelay serve` nodes of one
cluster (real processes: SIGKILL needs them), the mock PBX and mock phones re-dialling
the next node as real ones do, and in-process nodes (tests/cluster/world.py) for Redis
restarted under them.

Every wait is for an event (a link, a re-registration, an answer); the whole of each
test is bounded by LONGEST_WAIT, and the servers are killed whatever happens."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from mockphone.pbx import MockPbx
from mockphone.phone import Kind, MockPhone, PhoneSpec
from mockphone.sip import RelayAddress
from mockphone.sipwire import make_response
from tests.cluster.serves import PBX_SECRET, StartServe, start_serve
from tests.cluster.test_nodes_sip import linked_pbx, registered
from tests.cluster.world import StartNode, cluster_secret, start_node
from tests.limits import LONGEST_WAIT
from tests.peers import (
    DOMAIN,
    PHONE_DOMAIN,
    PHONE_IP,
    PHONE_SDP,
    SERIAL,
    Server,
    sip_message,
)
from tests.redisserver import RedisServer
from tests.sip.test_wake_e2e import CallingPbx, TcpPhone

__all__ = ["cluster_secret", "start_node", "start_serve"]  # fixtures
PASSWORD = "pw-of-the-phones"
USERS = {"alice": PASSWORD, "bob": PASSWORD}


def address(server: Server) -> RelayAddress:
    return RelayAddress("127.0.0.1", server.ports["tcp"], udp_port=server.ports["udp"])


def desktop(user: str, *relays: Server) -> MockPhone:
    """A phone that stays connected (no pings: the node's end of the flow is the news)."""
    spec = PhoneSpec(user, PASSWORD, Kind.DESKTOP, keepalive=0)
    return MockPhone(spec, [address(r) for r in relays], serial=SERIAL, domain=DOMAIN)


async def test_sigkill_of_a_node_its_pbx_and_phones_redial_the_other_and_calls_work(
    start_serve: StartServe,
) -> None:
    """PBX and bob on A, alice on B; A is killed: the PBX links again on B, bob registers
    again through B, and calls to and from both phones connect."""
    a, b = await start_serve("a"), await start_serve("b")
    pbx = alice = bob = None
    try:
        async with asyncio.timeout(LONGEST_WAIT):
            pbx = await MockPbx.connect(
                [address(a), address(b)],
                serial=SERIAL,
                secret=PBX_SECRET,
                domain=DOMAIN,
                users=USERS,
                keepalive=3600,
            )
            alice, bob = desktop("alice", b, a), desktop("bob", a, b)
            assert await alice.start() == 200
            assert await bob.start() == 200
            assert (await pbx.call("alice")).connected
            assert (await pbx.call("bob")).connected

            await a.kill()  # SIGKILL: no goodbye to anyone

            await pbx.wait_links(2, within=LONGEST_WAIT)
            await bob.wait_redials(1, within=LONGEST_WAIT)
            assert pbx.relay_index == 1
            assert bob.relay == address(b)
            assert (await pbx.call("alice")).connected
            assert (await pbx.call("bob")).connected
            assert (await alice.call("echo")).connected
            assert (await bob.call("echo")).connected
    except BaseException:
        print(a.log(), b.log())
        raise
    finally:
        for phone in (alice, bob):
            if phone is not None:
                await phone.stop()
        if pbx is not None:
            await pbx.close()


async def test_sigterm_hands_over_its_pbx_and_phones_to_the_other_node(
    start_serve: StartServe,
) -> None:
    """A stops (SIGTERM) with the PBX and bob on it: it exits 0, having closed their
    flows and deleted its PBX entry; the PBX links on B, bob registers through B, and
    calls connect both ways."""
    a, b = await start_serve("a"), await start_serve("b")
    pbx = alice = bob = None
    try:
        async with asyncio.timeout(LONGEST_WAIT):
            pbx = await MockPbx.connect(
                [address(a), address(b)],
                serial=SERIAL,
                secret=PBX_SECRET,
                domain=DOMAIN,
                users=USERS,
                keepalive=3600,
            )
            alice, bob = desktop("alice", b, a), desktop("bob", a, b)
            assert await alice.start() == 200
            assert await bob.start() == 200

            assert await a.stop() == 0, a.log()

            await pbx.wait_links(2, within=LONGEST_WAIT)
            await bob.wait_redials(1, within=LONGEST_WAIT)
            assert (await pbx.call("alice")).connected
            assert (await pbx.call("bob")).connected
            assert (await bob.call("echo")).connected
    except BaseException:
        print(a.log(), b.log())
        raise
    finally:
        for phone in (alice, bob):
            if phone is not None:
                await phone.stop()
        if pbx is not None:
            await pbx.close()


async def _phone_on(node: Server, pbx: CallingPbx) -> TcpPhone:
    """A phone connected to `node`, registered through the PBX (linked elsewhere)."""
    phone = await TcpPhone.connect(node.ports["tcp"])
    async with asyncio.TaskGroup() as group:
        group.create_task(phone.register("pw-alice"))
        group.create_task(pbx.accept_register("pw-alice"))
    return phone


async def test_an_invite_in_flight_to_a_node_killed_before_its_pbx_answers_gets_480_from_the_other(
    start_serve: StartServe,
) -> None:
    """The phone on B calls out; B forwards the INVITE to the PBX on A, which receives it
    and has not answered when A is killed: B, which forwarded it, gives the phone the
    final 480 (the node is gone), rather than leaving it waiting."""
    a, b = await start_serve("a"), await start_serve("b")
    pbx = phone = None
    try:
        async with asyncio.timeout(LONGEST_WAIT):
            pbx = await CallingPbx.connect(a.ports["tcp"])
            assert await pbx.link(PBX_SECRET) == 200, pbx.last()
            phone = await _phone_on(b, pbx)
            await phone.send(
                sip_message(
                    f"INVITE sip:carol@{PHONE_DOMAIN} SIP/2.0",
                    phone.via(),
                    "Max-Forwards: 70",
                    f"From: <sip:alice@{PHONE_DOMAIN}>;tag=ph-gone",
                    "Call-ID: in-flight-1",
                    f"To: <sip:carol@{PHONE_DOMAIN}>",
                    "CSeq: 1 INVITE",
                    f"Contact: <sip:alice@{PHONE_IP}:{phone.port};transport=tcp>",
                    "Content-Type: application/sdp",
                    body=PHONE_SDP,
                )
            )
            invite = await pbx.request("INVITE")  # reached the PBX: in flight, unanswered
            assert invite.call_id == "in-flight-1"
            await a.kill()
            final = await phone.final("INVITE")
            assert final.status == 480, phone.last()
            assert final.reason in ("Node Gone", "Node Unreachable"), phone.last()
    except BaseException:
        print(a.log(), b.log())
        raise
    finally:
        if phone is not None:
            await phone.close()
        if pbx is not None:
            await pbx.close()


async def test_an_invite_in_flight_to_a_phone_on_a_node_killed_gets_480_from_the_pbxs_node(
    start_serve: StartServe,
) -> None:
    """The other way: the PBX on B calls the phone on A; B routes the INVITE to A, the
    phone receives it and has not answered when A is killed: B, which routed it, gives
    the PBX the final 480 (the node is gone), rather than leaving it waiting."""
    a, b = await start_serve("a"), await start_serve("b")
    pbx = phone = None
    try:
        async with asyncio.timeout(LONGEST_WAIT):
            pbx = await CallingPbx.connect(b.ports["tcp"])
            assert await pbx.link(PBX_SECRET) == 200, pbx.last()
            phone = await TcpPhone.connect(a.ports["tcp"])
            async with asyncio.TaskGroup() as group:
                group.create_task(phone.register("pw-alice"))
                accepted = group.create_task(pbx.accept_register("pw-alice"))
            _, contact, path = accepted.result()
            await pbx.invite(contact, path, "in-flight-2")
            invite = await phone.request("INVITE")  # reached the phone: in flight, unanswered
            assert invite.call_id == "in-flight-2"
            await a.kill()
            final = await pbx.final("INVITE")
            assert (final.status, final.reason) == (480, "Node Gone"), pbx.last()
            assert final.call_id == "in-flight-2"
            (via,) = final.vias  # the PBX's own: the answer is to its INVITE
            assert (via.branch or "").startswith("z9hG4bK-pbx-"), pbx.last()
    except BaseException:
        print(a.log(), b.log())
        raise
    finally:
        if phone is not None:
            await phone.close()
        if pbx is not None:
            await pbx.close()


async def test_a_routed_invite_finally_answered_before_its_node_goes_gets_no_second_answer(
    start_node: StartNode,
) -> None:
    """In-process nodes: the PBX on B calls the phone on A twice; the phone answers the
    first 486 and leaves the second unanswered; A closes. B, which saw the 486 pass,
    answers 480 Node Gone to the second call only: the first has had its final answer,
    and the next final the PBX gets is the second call's."""
    a, b = await start_node("a"), await start_node("b")
    pbx = await linked_pbx(b)
    phone, contact, path = await registered(a, pbx, "pw-alice")
    try:
        async with asyncio.timeout(LONGEST_WAIT):
            await pbx.invite(contact, path, "answered-1")
            await phone.send(make_response(await phone.request("INVITE"), 486))
            busy = await pbx.final("INVITE")
            assert (busy.status, busy.call_id) == (486, "answered-1"), pbx.last()
            await pbx.invite(contact, path, "unanswered-2")
            assert (await phone.request("INVITE")).call_id == "unanswered-2"
            await a.server.close()
            final = await pbx.final("INVITE")
            assert (final.status, final.reason) == (480, "Node Gone"), pbx.last()
            assert final.call_id == "unanswered-2", pbx.last()
    finally:
        await phone.close()
        await pbx.close()


async def test_once_a_killed_nodes_heartbeat_expires_its_pbx_entry_is_ignored_480_not_forwarded(
    start_serve: StartServe, redis_server: RedisServer, redis_url: str
) -> None:
    """A holds the PBX's link and is killed: its `pbx:` entry outlives it (a minute at
    most), but once its heartbeat `nodes:node-a` expires (heartbeat_expiry 2 s here,
    seen by Redis's own expiry event) B no longer forwards there: a REGISTER for the
    serial gets 480 PBX Not Connected from B."""
    beat = 'heartbeat_interval = "1s"\nheartbeat_expiry = "2s"\n'
    a, b = await start_serve("a", beat), await start_serve("b", beat)
    pbx = phone = None
    watcher = Redis.from_url(redis_url)
    events = watcher.pubsub()
    try:
        async with asyncio.timeout(LONGEST_WAIT):
            assert redis_server.command("CONFIG", "SET", "notify-keyspace-events", "Ex") == b"+OK"
            await events.subscribe("__keyevent@0__:expired")
            pbx = await CallingPbx.connect(a.ports["tcp"])
            assert await pbx.link(PBX_SECRET) == 200, pbx.last()
            await a.kill()
            while True:
                message = await events.get_message(timeout=LONGEST_WAIT)
                if message is not None and message["data"] == b"nodes:node-a":
                    break
            assert redis_server.command("EXISTS", f"pbx:{SERIAL}") == b":1", "still there"
            phone = await TcpPhone.connect(b.ports["tcp"])
            answer, _ = await phone.digest_register("alice", PHONE_DOMAIN, None, tag="dead")
            assert (answer.status, answer.reason) == (480, "PBX Not Connected"), phone.last()
    except BaseException:
        print(a.log(), b.log())
        raise
    finally:
        redis_server.command("CONFIG", "SET", "notify-keyspace-events", "")
        await events.aclose()  # type: ignore[no-untyped-call]  # redis-py untyped
        await watcher.aclose()
        if phone is not None:
            await phone.close()
        if pbx is not None:
            await pbx.close()
