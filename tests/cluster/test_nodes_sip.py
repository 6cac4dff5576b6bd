"""Two nodes of a cluster (tests/cluster/world.py): a PBX linked on node A, a phone
connected to node B. The phone's REGISTER reaches the PBX over the internal link, the
Path names B, and calls go both ways through both nodes."""

from __future__ import annotations

import asyncio
import re
import secrets

from redis.asyncio import Redis

from mockphone.sipwire import NameAddr, Response
from softrelay.app import CLUSTER, REGISTRY
from tests.cluster.world import PBX_SECRET, Node, StartNode, cluster_secret, start_node
from tests.limits import LONGEST_WAIT
from tests.peers import (
    PHONE_DOMAIN,
    PHONE_IP,
    PHONE_SDP,
    SDP,
    SERIAL,
    STEP_TIMEOUT,
    StreamPeer,
    sip_message,
)
from tests.redisserver import RedisServer
from tests.sip.test_wake_e2e import SDP as PBX_SDP
from tests.sip.test_wake_e2e import TOKEN, CallingPbx, TcpPhone

__all__ = ["cluster_secret", "start_node"]  # fixtures


async def linked_pbx(node: Node) -> CallingPbx:
    pbx = await CallingPbx.connect(node.sip_port)
    assert await pbx.link(PBX_SECRET) == 200, pbx.last()
    return pbx


async def registered(
    node: Node, pbx: CallingPbx, password: str
) -> tuple[TcpPhone, NameAddr, NameAddr]:
    """A phone on `node` registered through the PBX: the phone, its Contact and Path."""
    phone = await TcpPhone.connect(node.sip_port)
    async with asyncio.TaskGroup() as group:
        group.create_task(phone.register(password))
        accepted = group.create_task(pbx.accept_register(password))
    _, contact, path = accepted.result()
    return phone, contact, path


async def pbx_calls(pbx: CallingPbx, phone: TcpPhone, contact: NameAddr, path: NameAddr) -> None:
    """The PBX INVITEs the phone along its Path; 180, 200, ACK, BYE."""

    async def caller() -> None:
        dialog = await pbx.invite(contact, path, f"in-{secrets.token_hex(4)}")
        assert (await pbx.provisional()).status == 180, pbx.last()
        answer = await pbx.response("INVITE", 200)
        assert answer.body == PHONE_SDP.encode()
        assert (await pbx.hang_up(answer, dialog)).status == 200, pbx.last()

    async with asyncio.TaskGroup() as group:
        group.create_task(caller())
        invite = group.create_task(phone.take_call())
    assert invite.result().body == PBX_SDP.encode()  # the body passes through untouched


async def phone_calls(phone: StreamPeer, pbx: CallingPbx, phone_port: int) -> Response:
    """The phone INVITEs carol at its PBX: 180, 200 (with the Record-Route of the
    relay), then its ACK and BYE along the route set; the answer to the BYE."""
    call_id = f"out-{secrets.token_hex(4)}"
    dialog = [f"From: <sip:alice@{PHONE_DOMAIN}>;tag=ph-out", f"Call-ID: {call_id}"]
    contact = f"<sip:alice@{PHONE_IP}:{phone_port};transport=tcp>"
    await phone.send(
        sip_message(
            f"INVITE sip:carol@{PHONE_DOMAIN} SIP/2.0",
            phone.via(),
            "Max-Forwards: 70",
            *dialog,
            f"To: <sip:carol@{PHONE_DOMAIN}>",
            "CSeq: 1 INVITE",
            f"Contact: {contact}",
            "Content-Type: application/sdp",
            body=PHONE_SDP,
        )
    )

    async def callee() -> None:
        invite = await pbx.request("INVITE")
        assert invite.record_routes, "the relay Record-Routes the dialog"
        await pbx.answer(invite, contact=pbx.contact, tag="pbx-out", sdp=SDP)

    async def caller() -> Response:
        ringing = await phone.receive()
        assert isinstance(ringing, Response), phone.last()
        assert ringing.status == 180, phone.last()
        answer = await phone.final("INVITE")
        assert answer.status == 200, phone.last()
        # UAC route set: the Record-Route of the answer, reversed (RFC 3261 12.1.2).
        routes = [f"Route: {rr}" for rr in reversed(answer.record_routes)]
        (target,) = answer.contacts
        in_dialog = [*routes, "Max-Forwards: 70", *dialog, f"To: {answer.get('To')}"]
        await phone.send(
            sip_message(f"ACK {target.uri} SIP/2.0", phone.via(), *in_dialog, "CSeq: 1 ACK")
        )
        await phone.send(
            sip_message(f"BYE {target.uri} SIP/2.0", phone.via(), *in_dialog, "CSeq: 2 BYE")
        )
        return await phone.final("BYE")

    async with asyncio.TaskGroup() as group:
        group.create_task(callee())
        bye = group.create_task(caller())
    return bye.result()


async def test_a_phone_on_node_b_registers_with_the_pbx_linked_on_node_a_and_calls_go_both_ways(
    start_node: StartNode,
) -> None:
    a, b = await start_node("a"), await start_node("b")
    pbx = await linked_pbx(a)
    phone, contact, path = await registered(b, pbx, "pw-alice")
    try:
        # The Path names the node holding the phone's connection, in its sealed token.
        assert re.search(r";ft=[a-z2-7]+\.node-b[;>]", str(path)), str(path)
        await pbx_calls(pbx, phone, contact, path)
        assert (await phone_calls(phone, pbx, phone.port)).status == 200, phone.last()
    except BaseException:
        print("\n".join(pbx.transcript[-12:]))
        print("\n".join(phone.transcript[-12:]))
        raise
    finally:
        await phone.close()
        await pbx.close()
    # Linked on A only: B reached it over the internal link.
    assert a.relay.pbx_flow(SERIAL) is not None
    assert b.relay.pbx_flow(SERIAL) is None


async def test_a_call_parked_on_node_b_is_released_to_the_phone_back_on_node_c(
    start_node: StartNode, redis_url: str
) -> None:
    """The phone registered through B and slept; the PBX (on A) calls it: B parks the
    call and pushes. The phone wakes, connects to C and registers again; once the PBX
    accepts that REGISTER, C publishes it and B sends the call over C to the phone."""
    a, b, c = await start_node("a"), await start_node("b"), await start_node("c")
    pbx = await linked_pbx(a)
    phone, contact, path = await registered(b, pbx, "pw-alice")
    await phone.sleep()
    push_arrived = asyncio.Event()
    woken: list[TcpPhone] = []
    try:

        async def caller() -> None:
            dialog = await pbx.invite(contact, path, "wake-across-1")
            assert (await pbx.provisional()).status == 100, pbx.last()
            ringing = await pbx.provisional()
            assert ringing.get("Push-Status") == "delivered", pbx.last()
            push_arrived.set()
            await pbx.accept_register("pw-alice")  # the woken phone's, through C
            ringing = await pbx.provisional()
            assert ringing.status == 180, pbx.last()
            assert ringing.get("Push-Status") is None, "the phone's own 180 this time"
            answer = await pbx.response("INVITE", 200)
            assert (await pbx.hang_up(answer, dialog)).status == 200, pbx.last()

        async def callee() -> None:
            await asyncio.wait_for(push_arrived.wait(), STEP_TIMEOUT)
            again = await TcpPhone.connect(c.sip_port)
            woken.append(again)
            await again.register("pw-alice")
            invite = await again.take_call()
            assert str(invite.uri) == str(contact.uri)

        async with asyncio.TaskGroup() as group:
            group.create_task(caller())
            group.create_task(callee())
    except BaseException:
        print("\n".join(pbx.transcript[-12:]))
        for again in woken:
            print("\n".join(again.transcript[-12:]))
        raise
    finally:
        for again in woken:
            await again.close()
        await pbx.close()
    assert len(b.relay.parking) == 0
    # What Redis holds names nodes, serials, flow ids and fingerprints: no user, push
    # token or address of the phone (policy: the `location` category).
    held = await _redis_contents(redis_url)
    assert any(value.startswith("reg:") for value in held), held
    for personal in ("alice", TOKEN, PHONE_IP):
        assert not any(personal in value for value in held), (personal, held)


async def _redis_contents(url: str) -> list[str]:
    """Every key and string value in Redis, as text."""
    client = Redis.from_url(url, decode_responses=True)
    try:
        keys = [key async for key in client.scan_iter("*")]
        values = await client.mget(keys) if keys else []
    finally:
        await client.aclose()
    return [str(k) for k in keys] + [str(v) for v in values if v]


async def test_a_register_for_a_pbx_whose_link_on_another_node_ended_gets_480(
    start_node: StartNode,
) -> None:
    """The PBX's connection to A ends: a phone on B that registers then gets 480, from B
    once the entry in Redis is gone, and from A while a stale entry still names the
    flow that ended (A answers for it, as the stale entry set here shows): never
    silence."""
    a, b = await start_node("a"), await start_node("b")
    pbx = await linked_pbx(a)
    link = a.relay.pbx_flow(SERIAL)
    assert link is not None
    gone = asyncio.Event()
    link.on_close.append(lambda _: gone.set())
    await pbx.close()
    await asyncio.wait_for(gone.wait(), STEP_TIMEOUT)
    phone = await TcpPhone.connect(b.sip_port)
    try:
        first, _ = await phone.digest_register("alice", PHONE_DOMAIN, None, tag="ph")
        # A deletes its entry right after the close: either answer may come first.
        assert first.status == 480, phone.last()
        assert first.reason in ("PBX Not Connected", "Flow Gone"), phone.last()
        # The entry as it was before A deleted it (a refresh racing with the close).
        await a.nodes.location.link_pbx({SERIAL: link.id})
        second, _ = await phone.digest_register("alice", PHONE_DOMAIN, None, tag="ph2")
        assert (second.status, second.reason) == (480, "Flow Gone"), phone.last()
    finally:
        await phone.close()


async def test_a_node_that_missed_the_registration_event_rereads_it_on_resubscribe(
    start_node: StartNode, redis_server: RedisServer
) -> None:
    """Pub/sub drops what is published while a node is not subscribed. B holds a parked
    call; Redis refuses every subscription (ACL: no channels) while the phone registers
    again through C, so nobody hears the event. Once channels are allowed again, B
    subscribes again, re-reads the binding's entry, and delivers the call."""
    a, b, c = await start_node("a"), await start_node("b"), await start_node("c")
    pbx = await linked_pbx(a)
    phone, contact, path = await registered(b, pbx, "pw-alice")
    await phone.sleep()
    woken: list[TcpPhone] = []
    try:
        dialog = await pbx.invite(contact, path, "reread-1")
        assert (await pbx.provisional()).status == 100, pbx.last()
        assert (await pbx.provisional()).get("Push-Status") == "delivered", pbx.last()
        rounds = b.server.app[CLUSTER].subscriptions.rounds
        # No channel for anyone: subscribers are cut off and cannot subscribe again.
        assert redis_server.command("ACL", "SETUSER", "default", "resetchannels") == b"+OK"
        redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")
        again = await TcpPhone.connect(c.sip_port)
        woken.append(again)
        async with asyncio.TaskGroup() as group:
            group.create_task(again.register("pw-alice"))
            group.create_task(pbx.accept_register("pw-alice"))
        assert await c.nodes.settle(STEP_TIMEOUT)  # its entry is written (its PUBLISH refused)
        assert len(b.relay.parking) == 1, "nobody heard of it: still parked"
        assert redis_server.command("ACL", "SETUSER", "default", "allchannels") == b"+OK"
        await b.rounds(rounds + 1)  # subscribed again, and re-read
        async with asyncio.TaskGroup() as group:
            call = group.create_task(again.take_call())
            group.create_task(_answered_and_hung_up(pbx, dialog))
        assert str(call.result().uri) == str(contact.uri)
    except BaseException:
        print("\n".join(pbx.transcript[-12:]))
        raise
    finally:
        redis_server.command("ACL", "SETUSER", "default", "allchannels")
        for peer in woken:
            await peer.close()
        await pbx.close()
    assert len(b.relay.parking) == 0


async def _answered_and_hung_up(pbx: CallingPbx, dialog: list[str]) -> None:
    assert (await pbx.provisional()).status == 180, pbx.last()
    answer = await pbx.response("INVITE", 200)
    assert (await pbx.hang_up(answer, dialog)).status == 200, pbx.last()


async def test_nodes_dial_each_other_before_any_message_needs_it(start_node: StartNode) -> None:
    """B, started second, dials A at once (A is live when B subscribes), and A dials B
    back as soon as B proved itself: neither waits for a first message to open its
    link, since that dial would hold up the flow whose message waits behind it (a UDP
    flow drops what queues past its limit)."""
    a = await start_node("a")
    b = await start_node("b")
    async with asyncio.timeout(LONGEST_WAIT):
        await b.nodes.dialled("node-a")
        await a.nodes.dialled("node-b")
    for node in (a, b):
        registry = node.server.app[REGISTRY]
        assert not registry.get_sample_value(
            "softrelay_node_frames_total", {"way": "out", "kind": "deliver"}
        )


async def test_each_heartbeat_tells_the_other_nodes_this_ones_flows_and_loop_lag(
    start_node: StartNode,
) -> None:
    """The operator console's cluster page reads another node's load from its beat."""
    a, b = await start_node("a"), await start_node("b")
    pbx = await linked_pbx(a)
    try:
        await a.server.app[CLUSTER].beat()
        fields = (await b.server.app[CLUSTER].live_nodes())["node-a"]
        assert fields["flows"] == "1", fields  # the PBX's TCP link
        assert float(fields["load"]) >= 0.0
    finally:
        await pbx.close()
