"""A node stopped with a call parked on it, and Redis restarted under running nodes:
real `softrelay serve` processes of one cluster (tests/cluster/serves.py), since a
SIGTERM and a Redis that goes away are the operating system's, not a test's seam.

Every wait is for an event (a response, a printed line, a subscription round seen in
/metrics); each test is bounded by LONGEST_WAIT; the servers are killed whatever
happens."""

from __future__ import annotations

import asyncio
import re

import aiohttp
from redis.asyncio import Redis

from tests.cluster.serves import StartServe, linked, start_serve
from tests.cluster.test_nodes_sip import pbx_calls
from tests.limits import LONGEST_WAIT
from tests.peers import PHONE_DOMAIN, SERIAL
from tests.redisserver import RedisServer
from tests.sip.test_wake_e2e import CallingPbx, TcpPhone

__all__ = ["start_serve"]  # fixtures


async def test_sigterm_answers_the_call_parked_on_it_503_and_the_next_call_goes_over_the_other(
    start_serve: StartServe,
) -> None:
    """A holds the PBX's link and a call parked for a sleeping phone; A gets SIGTERM: the
    PBX gets the final 503 with Retry-After from A as it drains (not a hang), A exits
    0 and closes the link; the PBX links on B, the phone wakes and registers through B,
    and the PBX's next call to it is delivered there."""
    a, b = await start_serve("a"), await start_serve("b")
    pbx = await linked(a)
    peers: list[CallingPbx | TcpPhone] = [pbx]
    try:
        async with asyncio.timeout(LONGEST_WAIT):
            phone = await TcpPhone.connect(a.ports["tcp"])
            async with asyncio.TaskGroup() as group:
                group.create_task(phone.register("pw-alice"))
                accepted = group.create_task(pbx.accept_register("pw-alice"))
            _, contact, path = accepted.result()
            await phone.sleep()
            await pbx.invite(contact, path, "sigterm-parked-1")
            assert (await pbx.provisional()).status == 100, pbx.last()
            assert (await pbx.provisional()).get("Push-Status") == "delivered", pbx.last()

            stopping = asyncio.create_task(a.stop())
            final = await pbx.final("INVITE")
            assert (final.status, final.call_id) == (503, "sigterm-parked-1"), pbx.last()
            assert int(final.get("Retry-After") or "0") > 0, pbx.last()
            assert await stopping == 0, a.log()
            assert await pbx.reader.read() == b"", "A closed the PBX's link as it stopped"

            pbx = await linked(b)
            peers.append(pbx)
            again = await TcpPhone.connect(b.ports["tcp"])
            peers.append(again)
            async with asyncio.TaskGroup() as group:
                group.create_task(again.register("pw-alice"))
                accepted = group.create_task(pbx.accept_register("pw-alice"))
            _, contact, path = accepted.result()
            assert re.search(r";ft=[a-z2-7]+\.node-b[;>]", str(path)), str(path)
            await pbx_calls(pbx, again, contact, path)
    except BaseException:
        print("\n".join(pbx.transcript[-12:]))
        print(a.log(), b.log())
        raise
    finally:
        for peer in peers:
            await peer.close()
    assert await b.stop() == 0, b.log()


async def _written_back(redis_server: RedisServer, *keys: str) -> None:
    """Start the stopped Redis (empty), and wait until each of `keys` exists again: the
    nodes, subscribed again, wrote back their heartbeats and PBX links. Keyspace events
    (off in production) are turned on for the wait; a key written before the watch
    began is found by the look that follows it."""
    await asyncio.to_thread(redis_server.start)
    assert redis_server.command("CONFIG", "SET", "notify-keyspace-events", "KA") == b"+OK"
    client = Redis.from_url(redis_server.url())
    events = client.pubsub()
    try:
        await events.subscribe(*(f"__keyspace@0__:{key}" for key in keys))
        missing = {key for key in keys if redis_server.command("EXISTS", key) != b":1"}
        while missing:
            message = await events.get_message(timeout=LONGEST_WAIT)
            if message is not None and message["type"] == "message":
                missing.discard(message["channel"].decode().split(":", 1)[1])
    finally:
        redis_server.command("CONFIG", "SET", "notify-keyspace-events", "")
        await events.aclose()  # type: ignore[no-untyped-call]  # redis-py untyped
        await client.aclose()


async def test_redis_out_then_back_a_cross_node_register_gets_503_then_goes_through_and_calls(
    start_serve: StartServe, redis_server: RedisServer
) -> None:
    """PBX on A, phone on B. With Redis stopped, B cannot know where the PBX is: the
    phone's REGISTER gets 503 Cluster Unavailable with Retry-After, and B's /healthz
    still answers (relaying over linked flows goes on). Once Redis is back (empty) and
    the nodes have written back what they hold, the REGISTER goes through the PBX on A
    and a call reaches the phone on B."""
    a, b = await start_serve("a"), await start_serve("b")
    pbx = await linked(a)
    phone = await TcpPhone.connect(b.ports["tcp"])
    try:
        async with asyncio.timeout(LONGEST_WAIT):
            await asyncio.to_thread(redis_server.stop)
            answer, _ = await phone.digest_register("alice", PHONE_DOMAIN, None, tag="out")
            assert (answer.status, answer.reason) == (503, "Cluster Unavailable"), phone.last()
            assert int(answer.get("Retry-After") or "0") > 0, phone.last()
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{b.http_port()}/healthz"
                async with session.get(url) as health:
                    assert health.status == 200, await health.text()

            await _written_back(redis_server, f"pbx:{SERIAL}", "nodes:node-a", "nodes:node-b")
            async with asyncio.TaskGroup() as group:
                registering = group.create_task(phone.register("pw-alice"))
                accepted = group.create_task(pbx.accept_register("pw-alice"))
            assert registering.result().status == 200, phone.last()
            _, contact, path = accepted.result()
            assert re.search(r";ft=[a-z2-7]+\.node-b[;>]", str(path)), str(path)
            await pbx_calls(pbx, phone, contact, path)
    except BaseException:
        print("\n".join(phone.transcript[-12:]))
        print(a.log(), b.log())
        raise
    finally:
        redis_server.start()
        await phone.close()
        await pbx.close()
    assert await b.stop() == 0, b.log()
    assert await a.stop() == 0, a.log()
