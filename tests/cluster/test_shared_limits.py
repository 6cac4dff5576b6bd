"""What the nodes of a cluster share besides the location service, on a real Redis:
every wired rate limit (usage pings per address, provisioning and OAuth relays per
client, crash ingest per project, failed DSR proofs per client) is one allowance for
two nodes, exactly, on an injected clock; a DSR challenge issued on one node is
answered on the other, its PBX linked on either; Redis stopped is 503
cluster_unavailable JSON, never a 500 and never a request let through uncounted."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from crashreports.settings import parse_crashreports
from dsr.identity import CHALLENGE_TTL
from dsr.service import DsrSettings
from mockphone import digest
from mockphone.sipwire import Request, make_response
from privacy.clock import ManualClock
from proxy.oauth.settings import OAuthSettings
from proxy.provisioning.settings import ProvisioningSettings
from proxy.sip.digest import DigestAuthority, DigestError
from tests.cluster.world import PBX_SECRET, Node, StartNode, cluster_secret, start_node
from tests.limits import LONGEST_WAIT
from tests.peers import SERIAL, Pbx
from tests.redisserver import RedisServer
from tests.usage_fixtures import install_pid
from tomlsections.reader import Section
from usage.endpoint import PING_PATH
from usage.period import period_of
from usage.settings import Tenant, UsageSettings
from webapi.ratelimit import RateLimit

__all__ = ["cluster_secret", "start_node"]  # fixtures

TENANT_KEY = "acme-key-0123456789abcdef"
CRASH_KEY = "crashkeyfortests0123456789"
PASSWORD = "alice-dsr-password-canary-5e1f"
PBX_REALM = "pbx.example"
SUBJECT = {"sip_username": "alice", "pbx_serial": SERIAL}

Send = Callable[[aiohttp.ClientSession, str, ManualClock], Awaitable[int]]


async def _ping(session: aiohttp.ClientSession, base: str, clock: ManualClock) -> int:
    period = period_of(clock.now())
    body = {
        "tenant": "acme",
        "period": period,
        "pid": install_pid(1, "acme", period),
        "platform": "ios",
        "app_version": "5.2.1",
    }
    headers = {"Authorization": f"Bearer {TENANT_KEY}"}
    async with session.post(base + PING_PATH.lstrip("/"), json=body, headers=headers) as answer:
        return answer.status


async def _provisioning(session: aiohttp.ClientSession, base: str, clock: ManualClock) -> int:
    async with session.get(f"{base}provisioning/no-such-pbx/phone.cfg") as answer:
        return answer.status


async def _oauth(session: aiohttp.ClientSession, base: str, clock: ManualClock) -> int:
    async with session.post(f"{base}oauth/no-such-provider/token", data={}) as answer:
        return answer.status


async def _crash(session: aiohttp.ClientSession, base: str, clock: ManualClock) -> int:
    headers = {"X-Sentry-Auth": f"Sentry sentry_version=7, sentry_key={CRASH_KEY}"}
    async with session.post(f"{base}api/1/store/", data=b"{", headers=headers) as answer:
        return answer.status


async def _dsr_failure(session: aiohttp.ClientSession, base: str, clock: ManualClock) -> int:
    headers = {"Authorization": "Bearer not-the-admin-token"}
    async with session.get(f"{base}dsr/v1/requests", headers=headers) as answer:
        return answer.status


def _crash_settings(tmp_path: Path) -> Any:
    section = {"project": [{"id": "1", "key": CRASH_KEY}], "rate_limit": 2}
    return parse_crashreports(Section(section, tmp_path / "test.toml", "crashreports"))


@dataclass(frozen=True)
class Case:
    send: Send
    allowance: int  # requests at once
    refill: float  # seconds until one more
    answer: int  # the status of one allowed (its own refusal past the limit, or success)

    def changes(self, tmp_path: Path) -> dict[str, Any]:
        if self.send is _ping:
            return {"usage": UsageSettings((Tenant("acme", TENANT_KEY),), ip_burst=3)}
        if self.send is _provisioning:
            return {"provisioning": ProvisioningSettings(rate=RateLimit(per_minute=2, burst=2))}
        if self.send is _oauth:
            return {"oauth": OAuthSettings(rate=RateLimit(per_minute=2, burst=2))}
        if self.send is _crash:
            return {"crash": _crash_settings(tmp_path)}
        return {"dsr": DsrSettings(max_failures=1, failure_window=600)}


CASES = {
    "usage ping per address": Case(_ping, 3, 1200, 202),  # 3 per hour
    "provisioning per client": Case(_provisioning, 2, 30, 404),
    "oauth per client": Case(_oauth, 2, 30, 404),
    "crash ingest per project": Case(_crash, 2, 30, 400),
    # max_failures 1, so 4 failures per client per 600 s (CLIENT_FAILURE_FACTOR).
    "dsr failed proofs per client": Case(_dsr_failure, 4, 150, 403),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_two_nodes_share_one_allowance_exactly(
    start_node: StartNode, clock: ManualClock, tmp_path: Path, case: Case
) -> None:
    """Requests alternate between node A and node B: together they get the allowance
    of one node, not twice it; after one token's refill exactly one more, on either."""
    a = await start_node("a", **case.changes(tmp_path / "a"))
    b = await start_node("b", **case.changes(tmp_path / "b"))
    bases = [str(n.server.make_url("/")) for n in (a, b)]
    async with aiohttp.ClientSession() as session, asyncio.timeout(LONGEST_WAIT):
        statuses = [
            await case.send(session, bases[i % 2], clock) for i in range(case.allowance + 2)
        ]
        assert statuses == [case.answer] * case.allowance + [429, 429]
        clock.advance(case.refill)
        assert await case.send(session, bases[1], clock) == case.answer
        assert await case.send(session, bases[0], clock) == 429


async def test_redis_stopped_is_503_cluster_unavailable_on_a_limited_endpoint(
    start_node: StartNode, clock: ManualClock, tmp_path: Path, redis_server: RedisServer
) -> None:
    """The usage ping, the DSR challenge and crash ingest cannot count their limits
    while Redis is out: 503 with the JSON reason and Retry-After, never 500; once Redis
    is back the same node answers again."""
    changes = CASES["usage ping per address"].changes(tmp_path)
    node = await start_node("a", **changes, crash=_crash_settings(tmp_path))
    base = str(node.server.make_url("/"))
    async with aiohttp.ClientSession() as session, asyncio.timeout(LONGEST_WAIT):
        assert await _ping(session, base, clock) == 202
        redis_server.stop()
        try:
            async with session.post(
                base + PING_PATH.lstrip("/"), json={}, headers={"Authorization": "Bearer x"}
            ) as answer:
                body = await answer.json()
                assert answer.status == 503, body
                assert body["error"] == "cluster_unavailable"
                assert int(answer.headers["Retry-After"]) > 0
            async with session.post(f"{base}dsr/v1/challenge", json=SUBJECT) as answer:
                assert answer.status == 503
                assert (await answer.json())["error"] == "cluster_unavailable"
            assert await _crash(session, base, clock) == 503
        finally:
            redis_server.start()
        assert await _ping(session, base, clock) == 202


# --- DSR challenges across nodes -----------------------------------------------------


class DigestRegistrar:
    """The PBX's registrar: challenges a REGISTER fetch, checks the credentials of the
    next (a real PBX's digest check, its nonce its own)."""

    def __init__(self, pbx: Pbx, clock: ManualClock) -> None:
        self.pbx = pbx
        self.clock = clock
        self.authority = DigestAuthority(PBX_REALM)
        self.seen: list[Request] = []

    async def serve(self, count: int) -> None:
        for _ in range(count):
            register = await self.pbx.request("REGISTER")
            self.seen.append(register)
            auth = register.get("Authorization")
            if auth is None:
                challenge = self.authority.challenge("alice", self.clock.now(), algorithm="MD5")
                headers = [("WWW-Authenticate", challenge)]
                await self.pbx.send(make_response(register, 401, headers=headers))
                continue
            try:
                self.authority.verify(auth, "alice", PASSWORD, "REGISTER", self.clock.now())
                await self.pbx.send(make_response(register, 200))
            except DigestError:
                await self.pbx.send(make_response(register, 403))


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with session.post(url, json=body) as answer:
        return answer.status, await answer.json()


async def _prove_across(
    session: aiohttp.ClientSession, registrar: DigestRegistrar, asked: Node, answered: Node
) -> tuple[dict[str, Any], int]:
    """A challenge from `asked`, its proof sent to `answered` (an export): the proof and
    the export's status."""

    async def subject() -> tuple[dict[str, Any], int]:
        status, challenge = await _post(
            session, f"{asked.server.make_url('/')}dsr/v1/challenge", SUBJECT
        )
        assert status == 200, challenge
        (www,) = challenge["www_authenticate"]
        authorization = digest.answer(
            www, username="alice", password=PASSWORD, method="REGISTER", uri=challenge["uri"]
        ).header
        proof = {"challenge_id": challenge["challenge_id"], "authorization": authorization}
        status, export = await _post(
            session, f"{answered.server.make_url('/')}dsr/v1/export", SUBJECT | proof
        )
        assert status == 200, export
        return proof, status

    async with asyncio.TaskGroup() as group:
        group.create_task(registrar.serve(2))
        done = group.create_task(subject())
    return done.result()


async def test_a_challenge_issued_on_one_node_is_answered_on_the_other(
    start_node: StartNode, clock: ManualClock, redis_url: str
) -> None:
    """The PBX is linked on A. A challenge from B (its fetch reaches the PBX over the
    internal link) is proved at A; one from A is proved at B (the proof goes to the
    PBX across). The PBX sees each pair as one exchange (same Call-ID and From tag,
    CSeq + 1); a proof is used once, on whichever node; Redis never holds the user,
    the serial, the nonce or the Authorization, and nothing once the proof is used."""
    a = await start_node("a")
    b = await start_node("b")
    pbx = await Pbx.connect(a.sip_port)
    raw = Redis.from_url(redis_url)
    try:
        assert await pbx.link(PBX_SECRET) == 200, pbx.last()
        registrar = DigestRegistrar(pbx, clock)
        async with aiohttp.ClientSession() as session, asyncio.timeout(LONGEST_WAIT):
            proof, _ = await _prove_across(session, registrar, b, a)
            # Used once: the same proof at B, the node that issued it, is refused.
            status, body = await _post(
                session, f"{b.server.make_url('/')}dsr/v1/export", SUBJECT | proof
            )
            assert (status, body["error"]) == (403, "not_proved")
            clock.advance(1)  # the registrar's nonces are made of the time: a new one
            await _prove_across(session, registrar, a, b)
        for first, second in (registrar.seen[0:2], registrar.seen[2:4]):
            assert first.get("Authorization") is None
            assert not first.contacts
            assert second.get("Authorization") is not None
            assert second.call_id == first.call_id
            assert second.from_.tag == first.from_.tag
            assert second.cseq.number == first.cseq.number + 1
        assert await raw.keys("dsr:challenge:*") == []  # taken, none left
    finally:
        await pbx.close()
        await raw.aclose()


async def test_a_kept_challenge_holds_no_user_serial_nonce_or_credential(
    start_node: StartNode, clock: ManualClock, redis_url: str
) -> None:
    """What Redis holds for a challenge not answered yet: a hashed key that expires with
    the challenge, and the subject only as a keyed fingerprint."""
    a = await start_node("a")
    b = await start_node("b")
    pbx = await Pbx.connect(a.sip_port)
    raw = Redis.from_url(redis_url)
    try:
        assert await pbx.link(PBX_SECRET) == 200, pbx.last()
        registrar = DigestRegistrar(pbx, clock)
        async with aiohttp.ClientSession() as session, asyncio.timeout(LONGEST_WAIT):
            async with asyncio.TaskGroup() as group:
                group.create_task(registrar.serve(1))
                asked = group.create_task(
                    _post(session, f"{b.server.make_url('/')}dsr/v1/challenge", SUBJECT)
                )
            status, challenge = asked.result()
            assert status == 200, challenge
        (key,) = await raw.keys("dsr:challenge:*")
        assert isinstance(key, bytes)
        assert challenge["challenge_id"].encode() not in key
        value = await raw.get(key)
        assert isinstance(value, bytes)
        (www,) = challenge["www_authenticate"]
        nonce = www.split('nonce="')[1].split('"')[0]
        for secret in (b"alice", SERIAL.encode(), nonce.encode(), b"Digest"):
            assert secret not in key + value
        assert 0 < await raw.pttl(key) <= CHALLENGE_TTL * 1000
    finally:
        await pbx.close()
        await raw.aclose()
