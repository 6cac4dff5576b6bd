"""Redis restarted or stopped under in-process nodes of a cluster (tests/cluster/world.py),
on a real Redis (tests/redisserver.py: a restarted server is empty, on the same port).

After a restart every node subscribes again and, before re-reading, writes back what it
holds (its heartbeat, its PBX links): a phone on B registers with the PBX on A and calls
go both ways again, and a call parked across the restart ends with a final answer.
While Redis is out, what needs it is refused at once with 503 and Retry-After (the
caller tries again or another node), never 480 and never silence.

Every wait is for an event (a subscribe round, a message); each test is bounded by
LONGEST_WAIT; nothing sleeps."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from privacy.clock import ManualClock
from proxy.sip.wake import WakeSettings
from softrelay.app import CLUSTER, REGISTRY
from tests.cluster.test_nodes_sip import linked_pbx, pbx_calls, phone_calls, registered
from tests.cluster.world import Node, StartNode, cluster_secret, start_node
from tests.limits import LONGEST_WAIT
from tests.peers import PHONE_DOMAIN, SERIAL
from tests.redisserver import RedisServer
from tests.sip.test_wake_e2e import CallingPbx, TcpPhone

__all__ = ["cluster_secret", "start_node"]  # fixtures


def _rounds(*nodes: Node) -> list[int]:
    return [node.server.app[CLUSTER].subscriptions.rounds for node in nodes]


async def _restart(redis_server: RedisServer, nodes: list[Node]) -> None:
    """Restart Redis (empty, same port) while the nodes run, and wait until each has
    subscribed again and run its re-read (republish first)."""
    before = _rounds(*nodes)
    await asyncio.to_thread(redis_server.restart)
    for node, count in zip(nodes, before, strict=True):
        await node.rounds(count + 1)


def _exists(redis_server: RedisServer, key: str) -> bool:
    return redis_server.command("EXISTS", key) == b":1"


async def test_after_redis_restarts_empty_the_nodes_republish_and_a_phone_on_b_registers_and_calls(
    start_node: StartNode, redis_server: RedisServer
) -> None:
    """The restarted Redis knows nothing; once A has subscribed again its heartbeat and
    the PBX's `pbx:` entry are back, so a phone on B registers through the PBX on A and
    calls go both ways."""
    a, b = await start_node("a"), await start_node("b")
    pbx = await linked_pbx(a)
    phone = None
    try:
        async with asyncio.timeout(LONGEST_WAIT):
            before = _rounds(a, b)
            # A key no node writes: gone after the restart shows Redis came back empty
            # (the `pbx:` entry itself may already be written back by then).
            redis_server.command("SET", "restart-marker", "1")
            await asyncio.to_thread(redis_server.stop)
            assert not redis_server.running
            await asyncio.to_thread(redis_server.start)
            assert not _exists(redis_server, "restart-marker"), "restarted empty"
            await a.rounds(before[0] + 1)
            await b.rounds(before[1] + 1)
            assert _exists(redis_server, f"pbx:{SERIAL}"), "A wrote its PBX link back"
            assert _exists(redis_server, "nodes:node-a"), "and its heartbeat"
            assert _exists(redis_server, "nodes:node-b")
            phone, contact, path = await registered(b, pbx, "pw-alice")
            await pbx_calls(pbx, phone, contact, path)
            assert (await phone_calls(phone, pbx, phone.port)).status == 200, phone.last()
    except BaseException:
        print("\n".join(pbx.transcript[-12:]))
        raise
    finally:
        if phone is not None:
            await phone.close()
        await pbx.close()


async def test_a_call_parked_across_a_redis_restart_is_released_to_the_phone_back_on_c(
    start_node: StartNode, redis_server: RedisServer
) -> None:
    """B holds a call parked for a sleeping phone when Redis restarts. After it, the
    phone wakes and registers through C: C finds the PBX on A (republished), the PBX
    accepts, C publishes, and B, subscribed again, sends the call over C."""
    a, b, c = await start_node("a"), await start_node("b"), await start_node("c")
    pbx = await linked_pbx(a)
    phone, contact, path = await registered(b, pbx, "pw-alice")
    await phone.sleep()
    woken: list[TcpPhone] = []
    try:
        async with asyncio.timeout(LONGEST_WAIT):
            dialog = await pbx.invite(contact, path, "restart-1")
            assert (await pbx.provisional()).status == 100, pbx.last()
            assert (await pbx.provisional()).get("Push-Status") == "delivered", pbx.last()
            assert len(b.relay.parking) == 1
            await _restart(redis_server, [a, b, c])
            assert len(b.relay.parking) == 1, "still parked: nobody registered yet"
            again = await TcpPhone.connect(c.sip_port)
            woken.append(again)
            async with asyncio.TaskGroup() as group:
                group.create_task(again.register("pw-alice"))
                group.create_task(pbx.accept_register("pw-alice"))
            async with asyncio.TaskGroup() as group:
                call = group.create_task(again.take_call())
                group.create_task(_answered_and_hung_up(pbx, dialog))
            assert str(call.result().uri) == str(contact.uri)
    except BaseException:
        print("\n".join(pbx.transcript[-12:]))
        for peer in woken:
            print("\n".join(peer.transcript[-12:]))
        raise
    finally:
        for peer in woken:
            await peer.close()
        await pbx.close()
    assert len(b.relay.parking) == 0


async def test_a_call_parked_across_a_redis_restart_whose_phone_never_returns_gets_480(
    start_node: StartNode, redis_server: RedisServer, clock: ManualClock
) -> None:
    """The phone does not come back after the restart: at the wake timeout (the injected
    clock) the PBX gets the final 480, as on one node; nothing hangs."""
    a, b = await start_node("a"), await start_node("b")
    timeout = WakeSettings().timeout  # the world's (the default)
    pbx = await linked_pbx(a)
    phone, contact, path = await registered(b, pbx, "pw-alice")
    await phone.sleep()
    try:
        async with asyncio.timeout(LONGEST_WAIT):
            await pbx.invite(contact, path, "restart-2")
            assert (await pbx.provisional()).status == 100, pbx.last()
            assert (await pbx.provisional()).get("Push-Status") == "delivered", pbx.last()
            await _restart(redis_server, [a, b])
            clock.advance(timeout - 1)
            assert await b.relay.parking.expire() == 0
            clock.advance(2)
            assert await b.relay.parking.expire() == 1
            final = await pbx.response("INVITE")
            assert final.status == 480, pbx.last()
    except BaseException:
        print("\n".join(pbx.transcript[-12:]))
        raise
    finally:
        await pbx.close()
    assert len(b.relay.parking) == 0


async def _refused_while_redis_is_out(
    redis_server: RedisServer, phone: TcpPhone, session: aiohttp.ClientSession, base: str
) -> None:
    """Stop Redis: B answers the phone's REGISTER for a PBX on another node 503 Cluster
    Unavailable with Retry-After, and the DSR challenge (its limit in Redis) 503."""
    await asyncio.to_thread(redis_server.stop)
    answer, _ = await phone.digest_register("alice", PHONE_DOMAIN, None, tag="out")
    assert (answer.status, answer.reason) == (503, "Cluster Unavailable"), phone.last()
    assert int(answer.get("Retry-After") or "0") > 0, phone.last()
    subject = {"sip_username": "alice", "pbx_serial": SERIAL}
    async with session.post(f"{base}dsr/v1/challenge", json=subject) as reply:
        body = await reply.json()
        assert reply.status == 503, body
        assert body["error"] == "cluster_unavailable"
        assert int(reply.headers["Retry-After"]) > 0


async def test_while_redis_is_out_a_register_for_a_pbx_on_another_node_gets_503_retry_after(
    start_node: StartNode, redis_server: RedisServer
) -> None:
    """Where the PBX is cannot be known with Redis out: B answers 503 Cluster
    Unavailable with Retry-After (try again, or another node), not 480 (the PBX is
    not known to be gone) and not silence; a limited HTTP endpoint (the DSR challenge,
    its limit shared in Redis) is 503 cluster_unavailable."""
    a, b = await start_node("a"), await start_node("b")
    pbx = await linked_pbx(a)
    phone = await TcpPhone.connect(b.sip_port)
    base = str(b.server.make_url("/"))
    try:
        async with asyncio.timeout(LONGEST_WAIT), aiohttp.ClientSession() as session:
            await _refused_while_redis_is_out(redis_server, phone, session, base)
    except BaseException:
        print("\n".join(phone.transcript[-12:]))
        raise
    finally:
        redis_server.start()
        await phone.close()
        await pbx.close()


async def test_with_redis_back_a_register_for_a_pbx_on_another_node_goes_through(
    start_node: StartNode, redis_server: RedisServer
) -> None:
    """After Redis was out (503 meanwhile), the REGISTER goes through once it is back."""
    a, b = await start_node("a"), await start_node("b")
    pbx = await linked_pbx(a)
    phone = await TcpPhone.connect(b.sip_port)
    base = str(b.server.make_url("/"))
    try:
        async with asyncio.timeout(LONGEST_WAIT), aiohttp.ClientSession() as session:
            await _refused_while_redis_is_out(redis_server, phone, session, base)
            before = _rounds(a)
            await asyncio.to_thread(redis_server.start)
            await a.rounds(before[0] + 1)  # A wrote its PBX link back
            async with asyncio.TaskGroup() as group:
                registering = group.create_task(phone.register("pw-alice"))
                group.create_task(pbx.accept_register("pw-alice"))
            assert registering.result().status == 200
    except BaseException:
        print("\n".join(phone.transcript[-12:]))
        raise
    finally:
        redis_server.start()
        await phone.close()
        await pbx.close()


class _Lost(logging.Handler):
    """Counts the subscriber's `cluster.subscriber_lost` lines, and wakes a waiter."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "cluster.subscriber_lost":
            self.count += 1
            self.changed.set()

    async def wait(self, count: int) -> None:
        while self.count < count:
            self.changed.clear()
            await self.changed.wait()


async def test_a_response_reaches_a_node_whose_heartbeat_redis_lost_over_its_open_link(
    start_node: StartNode, redis_server: RedisServer
) -> None:
    """Redis restarted empty forgets B's heartbeat until B writes it again (its next beat
    or its re-read, seconds later). B's REGISTER reaches A meanwhile; the PBX's answer
    must go back to B at the link address B proved when it dialled A (it was dropped,
    and the phone over TCP waited for nothing: the stall once seen after a restart).
    B's heartbeat is slow here, and its key deleted, so Redis does not know B at all."""
    a = await start_node("a")
    b = await start_node("b", heartbeat_interval=3600.0)
    pbx = await linked_pbx(a)
    await asyncio.to_thread(redis_server.command, "DEL", "nodes:node-b")
    assert not _exists(redis_server, "nodes:node-b")
    phone, _, _ = await registered(b, pbx, "pw-alice")
    try:
        registry = a.server.app[REGISTRY]
        dropped = registry.get_sample_value(
            "softrelay_sip_errors_total", {"reason": "node_unreachable"}
        )
        assert not dropped, "A sent every answer back to B"
        assert not _exists(redis_server, "nodes:node-b"), "B was not known to Redis throughout"
    finally:
        await phone.close()
        await pbx.close()


async def test_a_reread_that_cannot_write_back_is_retried_until_it_can(
    start_node: StartNode, redis_server: RedisServer
) -> None:
    """Redis takes A's SUBSCRIBE again but refuses its writes (ACL: no SET): the
    republish fails, so the round is not counted done; the subscriber drops the
    connection and tries again, and once writes are allowed the PBX's entry is back
    (not left missing until the next refresh)."""
    a = await start_node("a")
    pbx = await linked_pbx(a)
    lost = _Lost()
    logger = logging.getLogger("softrelay.cluster")
    logger.addHandler(lost)
    try:
        async with asyncio.timeout(LONGEST_WAIT):
            (before,) = _rounds(a)
            assert redis_server.command("ACL", "SETUSER", "default", "-set") == b"+OK"
            redis_server.command("DEL", f"pbx:{SERIAL}")
            redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")
            await lost.wait(2)  # the kill, then a reread that could not write back
            assert _rounds(a) == [before], "a round that wrote nothing is not done"
            assert redis_server.command("ACL", "SETUSER", "default", "+set") == b"+OK"
            await a.rounds(before + 1)
            assert _exists(redis_server, f"pbx:{SERIAL}"), "written back on the retry"
    finally:
        redis_server.command("ACL", "SETUSER", "default", "+set")
        logger.removeHandler(lost)
        await pbx.close()


async def _answered_and_hung_up(pbx: CallingPbx, dialog: list[str]) -> None:
    assert (await pbx.provisional()).status == 180, pbx.last()
    answer = await pbx.response("INVITE", 200)
    assert (await pbx.hang_up(answer, dialog)).status == 200, pbx.last()
