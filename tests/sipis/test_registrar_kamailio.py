"""Registering SIPIS accounts at a real provider registrar: Kamailio (tests/kamailio.py)
with HA1-only subscriber rows, on a free loopback port.

Kamailio keeps its registrations in memory; a test sees them the way a caller does: an
OPTIONS or INVITE sent through Kamailio to the user (from a foreign domain, which it
does not challenge) reaches our registered contact and the handler (200 / 480 back), or
gets 480 from Kamailio when the user has no contact. Kamailio's log line per request
(`REGISTER ... (udp:127.0.0.1:PORT)`) is the independent count of what reached it.

Time is a manual clock: refreshes and backoffs happen when the test moves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from proxy.sip.message import Request, Response
from proxy.sip.parser import parse
from sipis.account import Account, Credential, Push, SipTransport, State, Status
from sipis.registrar import RegistrarSettings, Registrations, unavailable
from sipis.uac import Destination, Inbound, Uac, UacSettings
from tests.kamailio import DOMAIN, Kamailio, Subscriber
from tests.limits import LONGEST_WAIT
from tests.sipis.manualtime import ManualTime
from tests.sipis.provider import running_kamailio

WAIT = LONGEST_WAIT / 3
ALICE = Subscriber("alice", "alice-" + secrets.token_hex(4))
BOB = Subscriber("bob", "bob-" + secrets.token_hex(4))
SETTINGS = RegistrarSettings(start_spread=0, rate=100, t1=0.5)


@pytest.fixture
def kamailio() -> Iterator[Kamailio]:
    with running_kamailio([ALICE, BOB]) as server:
        yield server


@dataclass
class World:
    time: ManualTime
    regs: Registrations
    uac: Uac
    registry: CollectorRegistry
    seen: list[tuple[str, str]] = field(default_factory=list)  # (account id, method)

    async def until(self, account_id: str, check: Callable[[Status | None], bool]) -> Status:
        status = await asyncio.wait_for(self.regs.wait_for(account_id, check), WAIT)
        assert status is not None
        return status

    async def settle(self) -> None:
        await asyncio.wait_for(self.regs.settled(), WAIT)

    async def step(self) -> float:
        """Let what is under way finish, then move the clock to the next job."""
        await self.settle()
        due = self.regs.next_due()
        assert due is not None
        self.time.advance_to(due)
        return due

    def sent(self, outcome: str) -> float:
        value = self.registry.get_sample_value(
            "softrelay_sipis_registers_total", {"outcome": outcome}
        )
        return value or 0.0


@pytest.fixture
async def world() -> AsyncIterator[World]:
    async with make_world() as made:
        yield made


@contextlib.asynccontextmanager
async def make_world() -> AsyncIterator[World]:
    time = ManualTime()
    registry = CollectorRegistry()
    uac = await Uac.create(
        UacSettings(t1=SETTINGS.t1, bind_host="127.0.0.1"), time.clock, time.sleep
    )
    holder: list[World] = []

    async def handler(account: Account, request: Request, inbound: Inbound) -> None:
        holder[0].seen.append((account.account_id, request.method))
        await unavailable(account, request, inbound)

    regs = Registrations(
        SETTINGS, uac, time.clock, registry, sleep=time.sleep, handler=handler, owns_uac=True
    )
    regs.start()
    holder.append(World(time, regs, uac, registry))
    try:
        yield holder[0]
    finally:
        await regs.close()


def account(
    kamailio: Kamailio,
    sub: Subscriber,
    transport: SipTransport = SipTransport.UDP,
    *,
    md5: bool = True,
    sha256: bool = False,
    wrong: bool = False,
) -> Account:
    assert kamailio.port is not None
    ha1_md5 = sub.ha1() if md5 else None
    ha1_sha = sub.ha1(sha256=True) if sha256 else None
    if wrong:
        ha1_md5 = Subscriber(sub.user, "not-" + sub.password).ha1()
    return Account(
        account_id=secrets.token_urlsafe(9),
        registrar_host="127.0.0.1",
        registrar_port=kamailio.port,
        transport=transport,
        domain=DOMAIN,
        user=sub.user,
        credential=Credential(sub.user, DOMAIN, ha1_md5=ha1_md5, ha1_sha256=ha1_sha),
        push=Push("fcm", "token", "app"),
    )


def registered(status: Status | None) -> bool:
    return status is not None and status.state is State.REGISTERED


def failing(status: Status | None) -> bool:
    return status is not None and status.state is State.FAILING


def changed_from(
    previous: Status | None, check: Callable[[Status | None], bool]
) -> Callable[[Status | None], bool]:
    return lambda status: status != previous and check(status)


def registers_logged(kamailio: Kamailio) -> list[str]:
    """The source (proto:ip:port) of each REGISTER Kamailio logged."""
    text = kamailio.log_file.read_text(errors="replace")
    return re.findall(r"REGISTER sip:\S+ from \S+ \((\w+:[0-9.]+:\d+)\)", text)


async def ask(kamailio: Kamailio, method: str, user: str) -> int:
    """Send `method` to sip:user@domain through Kamailio from a foreign caller; the
    final status that comes back (a non-2xx to INVITE is ACKed)."""
    loop = asyncio.get_running_loop()
    finals: asyncio.Queue[Response] = asyncio.Queue()

    class Caller(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            message = parse(data)
            if isinstance(message, Response) and message.status >= 200:
                finals.put_nowait(message)

    transport, _ = await loop.create_datagram_endpoint(Caller, local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        branch = "z9hG4bK" + secrets.token_hex(8)
        head = (
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch={branch};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:caller@other.test>;tag={secrets.token_hex(4)}\r\n"
            f"To: <sip:{user}@{DOMAIN}>\r\n"
            f"Call-ID: {secrets.token_hex(8)}\r\n"
        )
        contact = f"Contact: <sip:caller@127.0.0.1:{port}>\r\n"
        assert kamailio.port is not None
        target = ("127.0.0.1", kamailio.port)
        request = f"{method} sip:{user}@{DOMAIN} SIP/2.0\r\n{head}CSeq: 1 {method}\r\n{contact}"
        transport.sendto((request + "Content-Length: 0\r\n\r\n").encode(), target)
        answer = await asyncio.wait_for(finals.get(), WAIT)
        if method == "INVITE" and answer.status >= 300:
            to = answer.get("To")
            ack = (
                f"ACK sip:{user}@{DOMAIN} SIP/2.0\r\n"
                + head.replace(f"To: <sip:{user}@{DOMAIN}>", f"To: {to}")
                + "CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
            )
            transport.sendto(ack.encode(), target)
        return answer.status
    finally:
        transport.close()


# --- registering ---------------------------------------------------------------------


@pytest.mark.parametrize("transport", [SipTransport.UDP, SipTransport.TCP])
async def test_account_registers_with_an_ha1_only_row_and_calls_reach_it(
    kamailio: Kamailio, world: World, transport: SipTransport
) -> None:
    alice = account(kamailio, ALICE, transport)
    assert await ask(kamailio, "OPTIONS", "alice") == 480  # no contact yet
    world.regs.add(alice, spread=False)
    status = await world.until(alice.account_id, registered)
    assert status.expires_at == world.time.now() + SETTINGS.expires
    assert world.sent("registered") == 1
    assert world.sent("challenged") == 1  # 401 first, answered from the HA1
    # Kamailio routes to our contact: the handler answers for the right account.
    assert await ask(kamailio, "OPTIONS", "alice") == 200
    assert await ask(kamailio, "INVITE", "alice") == 480  # the default handler's answer
    assert world.seen == [(alice.account_id, "OPTIONS"), (alice.account_id, "INVITE")]
    sources = registers_logged(kamailio)
    assert len(sources) == 2
    assert all(source.startswith(transport.value + ":") for source in sources)


async def test_requests_reach_the_account_the_request_uri_names(
    kamailio: Kamailio, world: World
) -> None:
    alice, bob = account(kamailio, ALICE), account(kamailio, BOB, SipTransport.TCP)
    world.regs.add(alice, spread=False)
    world.regs.add(bob, spread=False)
    await world.until(alice.account_id, registered)
    await world.until(bob.account_id, registered)
    assert await ask(kamailio, "INVITE", "bob") == 480
    assert await ask(kamailio, "MESSAGE", "alice") == 480
    assert world.seen == [(bob.account_id, "INVITE"), (alice.account_id, "MESSAGE")]


async def test_accounts_on_one_registrar_share_one_tcp_connection(
    kamailio: Kamailio, world: World
) -> None:
    alice, bob = (
        account(kamailio, ALICE, SipTransport.TCP),
        account(kamailio, BOB, SipTransport.TCP),
    )
    world.regs.add(alice, spread=False)
    world.regs.add(bob, spread=False)
    await world.until(alice.account_id, registered)
    await world.until(bob.account_id, registered)
    sources = registers_logged(kamailio)
    assert len(sources) == 4
    assert len(set(sources)) == 1


async def test_refresh_reuses_the_challenge_before_the_binding_expires(
    kamailio: Kamailio, world: World
) -> None:
    alice = account(kamailio, ALICE)
    world.regs.add(alice, spread=False)
    first = await world.until(alice.account_id, registered)
    due = await world.step()
    assert first.expires_at is not None
    assert due < first.expires_at
    assert due - (first.expires_at - SETTINGS.expires) == pytest.approx(
        SETTINGS.expires * SETTINGS.refresh_fraction
    )
    second = await world.until(alice.account_id, lambda s: registered(s) and s != first)
    assert second.expires_at == due + SETTINGS.expires
    assert len(registers_logged(kamailio)) == 3  # 401 + answer, then one refresh
    assert await ask(kamailio, "OPTIONS", "alice") == 200


async def test_lost_tcp_connection_registers_again_over_a_new_one(
    kamailio: Kamailio, world: World
) -> None:
    alice = account(kamailio, ALICE, SipTransport.TCP)
    world.regs.add(alice, spread=False)
    first = await world.until(alice.account_id, registered)
    world.time.advance(1)  # so that the new registration's expiry differs
    world.uac.drop_connection(Destination.of(alice))
    await world.until(alice.account_id, lambda s: s is not None and s != first and registered(s))
    sources = registers_logged(kamailio)
    assert len(set(sources)) == 2  # a second connection
    assert await ask(kamailio, "OPTIONS", "alice") == 200


# --- un-REGISTER -----------------------------------------------------------------------


async def test_remove_unregisters_at_the_provider(kamailio: Kamailio, world: World) -> None:
    alice = account(kamailio, ALICE, SipTransport.TCP)
    world.regs.add(alice, spread=False)
    await world.until(alice.account_id, registered)
    assert await ask(kamailio, "OPTIONS", "alice") == 200
    await asyncio.wait_for(world.regs.remove(alice.account_id), WAIT)
    assert world.regs.status(alice.account_id) is None
    assert world.sent("unregistered") == 1
    assert await ask(kamailio, "OPTIONS", "alice") == 480


async def test_pause_unregisters_and_resume_registers_again(
    kamailio: Kamailio, world: World
) -> None:
    alice = account(kamailio, ALICE)
    world.regs.add(alice, spread=False)
    await world.until(alice.account_id, registered)
    await asyncio.wait_for(world.regs.pause(alice.account_id), WAIT)
    assert world.regs.status(alice.account_id) == Status(State.PAUSED)
    assert await ask(kamailio, "OPTIONS", "alice") == 480
    await world.settle()
    assert world.regs.next_due() is None  # nothing is retried while paused
    world.regs.resume(alice.account_id)
    await world.until(alice.account_id, registered)
    assert await ask(kamailio, "OPTIONS", "alice") == 200


# --- challenges, 423, failures ---------------------------------------------------------


async def test_sha256_challenge_is_answered_from_the_sha256_ha1() -> None:
    with running_kamailio([ALICE], sha256=True) as kamailio:
        async with make_world() as world:
            alice = account(kamailio, ALICE, md5=False, sha256=True)
            world.regs.add(alice, spread=False)
            await world.until(alice.account_id, registered)
            assert await ask(kamailio, "OPTIONS", "alice") == 200
            md5_only = account(kamailio, ALICE, SipTransport.TCP)
            world.regs.add(md5_only, spread=False)
            status = await world.until(md5_only.account_id, failing)
            assert status.reason == "no HA1 for SHA-256"
            assert world.sent("no_credential") == 1


async def test_interval_too_brief_is_retried_with_min_expires() -> None:
    with running_kamailio([ALICE], min_expires=900) as kamailio:
        async with make_world() as world:
            alice = account(kamailio, ALICE)
            world.regs.add(alice, spread=False)
            status = await world.until(alice.account_id, registered)
            assert status.expires_at == world.time.now() + 900
            assert world.sent("interval_too_brief") == 1
            # The refresh asks for 900 at once: no second 423.
            await world.step()
            await world.until(alice.account_id, lambda s: registered(s) and s != status)
            assert world.sent("interval_too_brief") == 1


async def test_wrong_ha1_fails_with_a_reason_and_backs_off(
    kamailio: Kamailio, world: World
) -> None:
    wrong = account(kamailio, ALICE, SipTransport.TCP, wrong=True)
    start = world.time.now()
    world.regs.add(wrong, spread=False)
    status = await world.until(wrong.account_id, failing)
    assert status.reason == "credentials refused"
    assert status.retry_at is not None
    gaps: list[float] = [status.retry_at - start]
    span = 3600.0
    while True:
        await world.settle()
        due = world.regs.next_due()
        assert due is not None
        if due > start + span:
            break
        previous = world.regs.status(wrong.account_id)
        world.time.advance_to(due)
        now = world.time.now()
        status = await world.until(wrong.account_id, changed_from(previous, failing))
        assert status.reason == "credentials refused"
        assert status.retry_at is not None
        gaps.append(status.retry_at - now)
    # Each wait doubles (jitter: half to all of it), capped at backoff_cap.
    for n, gap in enumerate(gaps):
        nominal = min(SETTINGS.backoff_cap, SETTINGS.backoff_first * 2**n)
        assert nominal / 2 <= gap <= nominal
    # Attempts within the hour: bounded by the shortest possible waits.
    bound, elapsed = 0, 0.0
    while elapsed <= span:
        elapsed += min(SETTINGS.backoff_cap, SETTINGS.backoff_first * 2**bound) / 2
        bound += 1
    attempts = len(gaps)
    assert attempts <= bound
    assert len(registers_logged(kamailio)) == 2 * attempts  # unauthenticated + one answer
    assert world.sent("credentials_refused") == attempts


async def test_provider_down_backs_off_then_registers_when_it_is_back(
    kamailio: Kamailio, world: World
) -> None:
    alice = account(kamailio, ALICE, SipTransport.TCP)
    world.regs.add(alice, spread=False)
    await world.until(alice.account_id, registered)
    kamailio.stop()  # the connection goes: re-registering is refused
    status = await world.until(alice.account_id, failing)
    assert status.reason == "connection refused"
    first_retry = status.retry_at
    assert first_retry is not None
    await world.step()
    status = await world.until(alice.account_id, changed_from(status, failing))
    assert status.retry_at is not None
    assert status.retry_at - world.time.now() >= SETTINGS.backoff_first  # doubled
    assert status.retry_at != first_retry
    kamailio.start()  # same port, empty location table
    await world.step()
    await world.until(alice.account_id, registered)
    assert await ask(kamailio, "OPTIONS", "alice") == 200
