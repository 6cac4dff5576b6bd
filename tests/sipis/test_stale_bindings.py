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

At the Transactions seam, a stand-in registrar shows what Kamailio cannot: a 439 (no
outbound at the provider's edge), a registrar that rewrites our Contact (no cleanup:
it would cut off our live binding), and an un-REGISTER's 200 listing an old binding.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from privacy.clock import SystemClock
from proxy.sip.headers import NameAddr
from proxy.sip.message import Request, Response
from proxy.sip.responses import make_response
from proxy.sip.uri import SipUri
from sipis.account import Account, Credential, Push, SipTransport, State, Status
from sipis.registrar import RegistrarSettings, Registrations, instance_id, unavailable
from sipis.uac import (
    Address,
    ClientInvite,
    Destination,
    Inbound,
    Uac,
    UacSettings,
    choose_challenge,
    digest_authorization,
)
from tests.kamailio import DOMAIN, Kamailio, Subscriber
from tests.sipis.manualtime import ManualTime
from tests.sipis.provider import running_kamailio
from tests.sipis.test_registrar_kamailio import SETTINGS, WAIT, account, ask

ALICE = Subscriber("alice", "alice-" + secrets.token_hex(4))
FR_TIMER_MS = 600_000  # a dead branch would hold the call this long: beyond every wait
MODES = {"instance": (), "plain": ("WITHOUT_INSTANCE",)}
KEY = secrets.token_bytes(32)  # the nodes' shared instance key
REGISTRIES: dict[int, CollectorRegistry] = {}  # each running engine's metrics


@pytest.fixture(params=list(MODES))
def kamailio(request: pytest.FixtureRequest) -> Iterator[Kamailio]:
    defines = (*MODES[request.param], f"FR_TIMER={FR_TIMER_MS}")
    with running_kamailio([ALICE], defines=defines) as server:
        yield server


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


# --- at the Transactions seam: what only a stand-in registrar can show -------------------


@dataclass
class PlainRegistrar:
    """A registrar of RFC 3261 alone (bindings by Contact URI), answering at once; it
    may answer the first REGISTERs carrying reg-id with 439 (no outbound at its edge)
    and may rewrite each Contact's host (a NAT fix-up)."""

    refuse_outbound: bool = False
    rewrite_host: str | None = None
    bindings: dict[str, int] = field(default_factory=dict)  # URI -> expires
    requests: list[Request] = field(default_factory=list)

    async def request(
        self, destination: Destination, make: Callable[[Address], Request]
    ) -> Response:
        request = make(("192.0.2.1", next(PORTS)))
        request.prepend("Via", f"SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK{secrets.token_hex(4)}")
        self.requests.append(request)
        if self.refuse_outbound and "reg-id" in (request.get("Contact") or ""):
            return make_response(request, 439, "First Hop Lacks Outbound Support")
        expires = int(request.get("Expires") or "0")
        for value in request.contacts:
            uri = value.uri
            if self.rewrite_host is not None and isinstance(uri, SipUri):
                uri = uri._replace(host=self.rewrite_host)
            seconds = value.expires if value.expires is not None else expires
            if seconds:
                self.bindings[str(uri)] = seconds
            else:
                self.bindings.pop(str(uri), None)
        listed = [("Contact", f"<{uri}>;expires={e}") for uri, e in self.bindings.items()]
        return make_response(request, 200, headers=listed)

    def bind(self, handler: object, lost: object = None) -> None:
        pass

    def registrar_addresses(self, destination: Destination) -> set[str]:
        return set()

    async def send(self, destination: Destination, request: Request) -> None:
        raise AssertionError("no ACK here")

    async def invite(self, *args: object, **kwargs: object) -> ClientInvite:
        raise AssertionError("no INVITE here")

    async def close(self) -> None:
        pass


PORTS = itertools.count(40000)  # each REGISTER from another port: each a "restart"


def plain_account(n: int = 1) -> Account:
    return Account(
        account_id=f"acc{n}",
        registrar_host="registrar.test",
        registrar_port=5060,
        transport=SipTransport.UDP,
        domain=DOMAIN,
        user="alice",
        credential=Credential("alice", DOMAIN, ha1_md5="0" * 32),
        push=Push("fcm", "token", "app"),
    )


@contextlib.asynccontextmanager
async def fake_engine(registrar: PlainRegistrar) -> AsyncIterator[Registrations]:
    time = ManualTime()
    regs = Registrations(
        RegistrarSettings(start_spread=0),
        registrar,
        time.clock,
        CollectorRegistry(),
        sleep=time.sleep,
        instance_key=KEY,
    )
    regs.start()
    try:
        yield regs
    finally:
        await regs.close()


async def test_a_439_registers_again_without_reg_id_keeping_the_instance_id() -> None:
    registrar = PlainRegistrar(refuse_outbound=True)
    async with fake_engine(registrar) as regs:
        regs.add(plain_account(), spread=False)
        await registered(regs, "acc1")
    first, second = registrar.requests
    instance = instance_id(KEY, "acc1")
    assert first.contacts[0].reg_id == 1
    assert first.get("Supported") == "path, outbound"
    assert (second.contacts[0].instance, second.contacts[0].reg_id) == (instance, None)
    assert second.get("Supported") == "path"


async def test_only_our_own_old_bindings_are_unregistered_and_without_the_instance() -> None:
    registrar = PlainRegistrar()
    registrar.bindings = {
        "sip:acc1@192.0.2.9:5070;transport=udp": 600,  # ours, left by a dead process
        "sip:acc2@192.0.2.9:5070;transport=udp": 600,  # another account's
        "sip:alice@198.51.100.7": 600,  # the user's own phone
    }
    async with fake_engine(registrar) as regs:
        regs.add(plain_account(), spread=False)
        await registered(regs, "acc1")
        live = regs.contact("acc1")
        assert live is not None
    register, cleanup = registrar.requests
    assert register.contacts[0].instance == instance_id(KEY, "acc1")
    assert [str(c) for c in cleanup.contacts] == ["<sip:acc1@192.0.2.9:5070;transport=udp>"]
    assert cleanup.get("Expires") == "0"
    assert sorted(registrar.bindings) == sorted(
        [live.strip("<>"), "sip:acc2@192.0.2.9:5070;transport=udp", "sip:alice@198.51.100.7"]
    )


async def test_a_registrar_that_rewrites_our_contact_gets_no_cleanup() -> None:
    # It lists our live binding under another URI: un-REGISTERing "the others" of ours
    # would cut it off, so nothing is sent.
    registrar = PlainRegistrar(rewrite_host="203.0.113.5")
    registrar.bindings = {"sip:acc1@192.0.2.9:5070;transport=udp": 600}
    async with fake_engine(registrar) as regs:
        regs.add(plain_account(), spread=False)
        await registered(regs, "acc1")
    assert len(registrar.requests) == 1
    assert len(registrar.bindings) == 2


async def test_an_unregister_also_removes_our_old_bindings_it_lists() -> None:
    registrar = PlainRegistrar()
    async with fake_engine(registrar) as regs:
        regs.add(plain_account(), spread=False)
        await registered(regs, "acc1")
        registrar.bindings["sip:acc1@192.0.2.9:5070;transport=udp"] = 600  # a dead one
        registrar.bindings["sip:alice@198.51.100.7"] = 600
        await asyncio.wait_for(regs.remove("acc1"), WAIT)
    assert list(registrar.bindings) == ["sip:alice@198.51.100.7"]
    assert registrar.requests[-1].contacts[0].instance is None  # the old one, by its URI
