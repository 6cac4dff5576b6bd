"""`softrelay serve` processes as nodes of one cluster: each its own SIP, HTTP and
internal ports on loopback, the same [cluster] Redis (a real redis-server) and secret,
and the store of the test's backend (on PostgreSQL the nodes share one database, as a
deployment does; on SQLite each keeps its own).

A PBX linked on node A receives the REGISTER of a phone connected to node B, and calls
go both ways; a phone that sleeps after registering on A (where its call is parked) wakes,
registers again through B, and gets the call."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.cluster.serves import StartServe, linked, start_serve
from tests.cluster.test_nodes_sip import pbx_calls, phone_calls
from tests.peers import STEP_TIMEOUT
from tests.sip.test_wake_e2e import TcpPhone

pytestmark = pytest.mark.both_backends

__all__ = ["start_serve"]  # fixtures


async def test_serve_nodes_pbx_on_a_phone_on_b_register_and_call_both_ways(
    start_serve: StartServe,
) -> None:
    a, b = await start_serve("a"), await start_serve("b")
    pbx = await linked(a)
    phone = None
    try:
        phone = await TcpPhone.connect(b.ports["tcp"])
        async with asyncio.TaskGroup() as group:
            group.create_task(phone.register("pw-alice"))
            accepted = group.create_task(pbx.accept_register("pw-alice"))
        _, contact, path = accepted.result()
        assert re.search(r";ft=[a-z2-7]+\.node-b[;>]", str(path)), str(path)
        await pbx_calls(pbx, phone, contact, path)
        assert (await phone_calls(phone, pbx, phone.port)).status == 200, phone.last()
    except BaseException:
        print("\n".join(pbx.transcript[-10:]))
        print(a.log(), b.log())
        raise
    finally:
        if phone is not None:
            await phone.close()
        await pbx.close()
    assert await b.stop() == 0, b.log()
    assert await a.stop() == 0, a.log()


async def test_serve_nodes_a_call_parked_on_a_is_delivered_when_the_phone_registers_on_b(
    start_serve: StartServe,
) -> None:
    """The phone registered on A (the PBX's node) and slept; A parks the PBX's call and
    pushes; the phone comes back on B, and as soon as the PBX accepts that REGISTER,
    A hears of it from Redis and sends the call over B."""
    a, b = await start_serve("a"), await start_serve("b")
    pbx = await linked(a)
    push_arrived = asyncio.Event()
    woken: list[TcpPhone] = []
    try:
        phone = await TcpPhone.connect(a.ports["tcp"])
        async with asyncio.TaskGroup() as group:
            group.create_task(phone.register("pw-alice"))
            accepted = group.create_task(pbx.accept_register("pw-alice"))
        _, contact, path = accepted.result()
        await phone.sleep()

        async def caller() -> None:
            dialog = await pbx.invite(contact, path, "serve-wake-1")
            assert (await pbx.provisional()).status == 100, pbx.last()
            ringing = await pbx.provisional()
            assert ringing.get("Push-Status") == "delivered", pbx.last()
            push_arrived.set()
            await pbx.accept_register("pw-alice")
            ringing = await pbx.provisional()
            assert ringing.get("Push-Status") is None, pbx.last()
            answer = await pbx.response("INVITE", 200)
            assert (await pbx.hang_up(answer, dialog)).status == 200, pbx.last()

        async def callee() -> None:
            await asyncio.wait_for(push_arrived.wait(), STEP_TIMEOUT)
            again = await TcpPhone.connect(b.ports["tcp"])
            woken.append(again)
            await again.register("pw-alice")
            invite = await again.take_call()
            assert str(invite.uri) == str(contact.uri)

        async with asyncio.TaskGroup() as group:
            group.create_task(caller())
            group.create_task(callee())
    except BaseException:
        print("\n".join(pbx.transcript[-10:]))
        print(a.log(), b.log())
        raise
    finally:
        for again in woken:
            await again.close()
        await pbx.close()
    assert await b.stop() == 0, b.log()
    assert await a.stop() == 0, a.log()
