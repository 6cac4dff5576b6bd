"""When a node dies, stops, or Redis restarts: two `softrelay serve` nodes of one
cluster (real processes: SIGKILL needs them), the mock PBX and mock phones re-dialling
the next node as real ones do, and in-process nodes (tests/cluster/world.py) for Redis
restarted under them.

Every wait is for an event (a link, a re-registration, an answer); the whole of each
test is bounded by LONGEST_WAIT, and the servers are killed whatever happens."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from mockphone.pbx import MockPbx
from mockphone.phone import Kind, MockPhone, PhoneSpec
from mockphone.sip import RelayAddress
from tests.limits import LONGEST_WAIT
from tests.peers import DOMAIN, SERIAL, Server, start_server

StartServe = Callable[[str], Awaitable[Server]]
PBX_SECRET = "failures-pbx-secret"
PASSWORD = "pw-of-the-phones"
USERS = {"alice": PASSWORD, "bob": PASSWORD}


@pytest.fixture
async def start_serve(tmp_path: Path, redis_url: str) -> AsyncIterator[StartServe]:
    """Starts `serve` as node `name` of one cluster (SQLite each, one PBX secret); all
    are killed after the test."""
    (tmp_path / "redis.url").write_text(redis_url + "\n", encoding="utf-8")
    (tmp_path / "cluster.secret").write_text(secrets.token_hex(16) + "\n", encoding="utf-8")
    started: list[Server] = []

    async def start(name: str) -> Server:
        home = tmp_path / name
        home.mkdir()
        cluster = (
            f'[cluster]\nredis = "file:{tmp_path / "redis.url"}"\n'
            f'secret = "file:{tmp_path / "cluster.secret"}"\nnode_id = "node-{name}"\n\n'
        )
        server = await start_server(home, cluster, secret=PBX_SECRET)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.kill()


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
