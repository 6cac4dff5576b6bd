"""One binding per SIPIS account at the provider, whichever process made it: a restart
(a new UDP port) registers the account again from another Contact, and the binding the
old process left must not stay beside it (the provider would fork calls to the dead
contact too: a busy answer would wait for the dead branch's timeout, and after a delete
the dead binding alone would be left).

Against a real Kamailio in both of its modes (tests/peers/kamailio/README.md):
- by default its usrloc matches a Contact's RFC 5626 +sip.instance and reg-id: the new
  REGISTER replaces the old binding (nothing to clean up: `stale_removed` stays 0);
- `-A WITHOUT_INSTANCE` makes it a registrar of RFC 3261 alone (matching by Contact
  URI): the new binding is added, and the engine un-REGISTERs its old one, seen in the
  200, right after (`stale_removed` 1); another device's binding of the same user
  (another user part) stays.

Kamailio's bindings are read the way RFC 3261 10.2.3 offers: an authenticated REGISTER
without Contact, answered with the list. Kamailio runs with a transaction timeout
(FR_TIMER) far longer than any wait here, so a call forked to a dead contact would not
get its final answer within the wait: that is what the 486 and 480 tests would catch.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest
from prometheus_client import CollectorRegistry

from privacy.clock import SystemClock
from proxy.sip.headers import NameAddr
from proxy.sip.message import Request, Response
from proxy.sip.uri import SipUri
from sipis.account import Account, State, Status
from sipis.registrar import Registrations, instance_id, unavailable
from sipis.uac import Destination, Inbound, Uac, UacSettings, choose_challenge, digest_authorization
from tests.kamailio import DOMAIN, Kamailio, Subscriber
from tests.sipis.manualtime import ManualTime
from tests.sipis.test_registrar_kamailio import SETTINGS, WAIT, account, ask, start_kamailio

ALICE = Subscriber("alice", "alice-" + secrets.token_hex(4))
FR_TIMER_MS = 600_000  # a dead branch would hold the call this long: beyond every wait
MODES = {"instance": (), "plain": ("WITHOUT_INSTANCE",)}
KEY = secrets.token_bytes(32)  # the nodes' shared instance key
REGISTRIES: dict[int, CollectorRegistry] = {}  # each running engine's metrics


@pytest.fixture(params=list(MODES))
def kamailio(request: pytest.FixtureRequest) -> Iterator[Kamailio]:
    defines = (*MODES[request.param], f"FR_TIMER={FR_TIMER_MS}")
    server = start_kamailio([ALICE], defines=defines)
    try:
        yield server
    finally:
        server.close()


def plain(kamailio: Kamailio) -> bool:
    return "WITHOUT_INSTANCE" in kamailio.defines


async def busy(account: Account, request: Request, inbound: Inbound) -> None:
    """The app declines every call: 486 (OPTIONS and the rest as by default)."""
    if request.method == "INVITE":
        inbound.respond(486)
        return
    await unavailable(account, request, inbound)


@contextlib.asynccontextmanager
async def engine() -> AsyncIterator[Registrations]:
    """One process's registrar engine: its own UDP socket, closed on leaving (the
    bindings it made stay at the provider, as after a crash or a restart)."""
    time = ManualTime()
    uac = await Uac.create(
        UacSettings(t1=SETTINGS.t1, bind_host="127.0.0.1"), time.clock, time.sleep
    )
    registry = CollectorRegistry()
    regs = Registrations(
        SETTINGS,
        uac,
        time.clock,
        registry,
        sleep=time.sleep,
        handler=busy,
        owns_uac=True,
        instance_key=KEY,
    )
    regs.start()
    REGISTRIES[id(regs)] = registry
    try:
        yield regs
    finally:
        del REGISTRIES[id(regs)]
        await regs.close()


async def registered(regs: Registrations, account_id: str) -> Status:
    def check(status: Status | None) -> bool:
        return status is not None and status.state is State.REGISTERED

    status = await asyncio.wait_for(regs.wait_for(account_id, check), WAIT)
    assert status is not None
    await asyncio.wait_for(regs.settled(), WAIT)  # a cleanup it started has finished
    return status


def stale_removed(regs: Registrations) -> float:
    """Old bindings of ours the engine un-REGISTERed (its metric)."""
    value = REGISTRIES[id(regs)].get_sample_value(
        "softrelay_sipis_registers_total", {"outcome": "stale_removed"}
    )
    return value or 0.0


async def register_as(
    kamailio: Kamailio, sub: Subscriber, contact: str | None = None
) -> list[NameAddr]:
    """A REGISTER of `sub` (authenticated from its HA1) adding `contact` for 600 s, or
    without Contact: the bindings Kamailio holds for the user, from its 200."""
    assert kamailio.port is not None
    destination = Destination("127.0.0.1", kamailio.port, account(kamailio, sub).transport)
    credential = account(kamailio, sub).credential
    uac = await Uac.create(UacSettings(t1=0.5, bind_host="127.0.0.1"), SystemClock())
    call_id, tag = secrets.token_hex(8), secrets.token_hex(4)
    try:
        authorization: str | None = None
        for cseq in (1, 2):

            def make(_: object, cseq: int = cseq, auth: str | None = authorization) -> Request:
                headers = [
                    ("Max-Forwards", "70"),
                    ("From", f"<sip:{sub.user}@{DOMAIN}>;tag={tag}"),
                    ("To", f"<sip:{sub.user}@{DOMAIN}>"),
                    ("Call-ID", call_id),
                    ("CSeq", f"{cseq} REGISTER"),
                ]
                if contact is not None:
                    headers += [("Contact", contact), ("Expires", "600")]
                if auth is not None:
                    headers.append(("Authorization", auth))
                return Request("REGISTER", f"sip:{DOMAIN}", headers)

            response: Response = await asyncio.wait_for(uac.request(destination, make), WAIT)
            if response.status != 401:
                break
            challenge = choose_challenge(response.get_all("www-authenticate"), credential)
            authorization = digest_authorization(
                challenge, credential, method="REGISTER", uri=f"sip:{DOMAIN}", nc=1, cnonce="c1"
            )
        assert response.status == 200, response.status
        return response.contacts
    finally:
        await uac.close()


async def registered_once(alice: Account) -> str:
    """Register `alice` from an engine and close it (its binding stays, its socket is
    gone): the Contact it registered."""
    async with engine() as first:
        first.add(alice, spread=False)
        await registered(first, alice.account_id)
        old = first.contact(alice.account_id)
        assert old is not None
    return old


def users(bindings: list[NameAddr], user: str) -> list[NameAddr]:
    return [b for b in bindings if isinstance(b.uri, SipUri) and b.uri.user == user]


def ours(bindings: list[NameAddr], account_id: str) -> list[str]:
    return [f"<{b.uri}>" for b in users(bindings, account_id)]


async def test_a_restart_leaves_one_binding_and_a_busy_answer_comes_at_once(
    kamailio: Kamailio,
) -> None:
    alice = account(kamailio, ALICE)
    phone = "<sip:alice-phone@127.0.0.1:9;transport=udp>"  # the user's own device
    await register_as(kamailio, ALICE, phone)
    old = await registered_once(alice)
    async with engine() as second:
        second.add(alice, spread=False)
        await registered(second, alice.account_id)
        new = second.contact(alice.account_id)
        assert new is not None
        assert new != old  # another port: the old socket is closed, its binding dead
        bindings = await register_as(kamailio, ALICE)
        assert ours(bindings, alice.account_id) == [new]
        assert [f"<{b.uri}>" for b in users(bindings, "alice-phone")] == [phone]  # kept
        assert len(bindings) == 2
        # Which mechanism did it: the registrar's instance matching, or our cleanup.
        assert stale_removed(second) == (1 if plain(kamailio) else 0)
        # The phone sleeps (nothing answers at its contact): it goes, so that a call
        # forks to our binding alone, and the app's decline reaches the caller at once.
        # With the old binding left, the 486 would wait for its branch's FR_TIMER.
        await register_as(kamailio, ALICE, phone + ";expires=0")
        assert await ask(kamailio, "INVITE", ALICE.user) == 486


async def test_the_binding_carries_the_accounts_instance_id_and_reg_id(
    kamailio: Kamailio,
) -> None:
    alice = account(kamailio, ALICE)
    await registered_once(alice)
    (binding,) = users(await register_as(kamailio, ALICE), alice.account_id)
    if plain(kamailio):
        assert (binding.instance, binding.reg_id) == (None, None)  # dropped before save()
    else:
        # The same on every node and after restarts: derived from the account id.
        assert binding.instance == instance_id(KEY, alice.account_id)
        assert binding.reg_id == 1


async def test_a_delete_after_a_restart_leaves_no_binding_of_ours(kamailio: Kamailio) -> None:
    alice = account(kamailio, ALICE)
    await registered_once(alice)
    async with engine() as second:
        second.add(alice, spread=False)
        await registered(second, alice.account_id)
        await asyncio.wait_for(second.remove(alice.account_id), WAIT)
        assert second.status(alice.account_id) is None
        assert ours(await register_as(kamailio, ALICE), alice.account_id) == []
        assert await ask(kamailio, "INVITE", ALICE.user) == 480  # at once, from Kamailio
