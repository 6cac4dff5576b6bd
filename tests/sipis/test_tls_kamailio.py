"""Registering SIPIS accounts over TLS at the real provider registrar: Kamailio with its
tls module (tests/kamailio.py KamailioTls), serving a certificate for 127.0.0.1 from a
throwaway CA made here.

With that CA configured (`UacSettings.ca_file`) an account with transport tls registers
over TLS, and Kamailio routes requests for the user to it over that same connection:
the handler gets them on the TLS connection to the registrar. With the system CAs only,
the handshake fails: the account is FAILING with the reason and nothing reached
Kamailio's routing. Without tls.so (Debian kamailio-tls-modules) the tests are skipped,
and fail in CI (tests/limits.py in_ci()).

Time is a manual clock, as in tests/sipis/test_registrar_kamailio.py (its helpers).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from proxy.sip.message import Request
from push.fakes.certs import ThrowawayCa
from sipis.account import Account, SipTransport
from sipis.registrar import Registrations, unavailable
from sipis.uac import Destination, Inbound, Uac, UacSettings
from tests.kamailio import KamailioTls
from tests.sipis.manualtime import ManualTime
from tests.sipis.provider import running
from tests.sipis.test_registrar_kamailio import (
    ALICE,
    BOB,
    SETTINGS,
    World,
    account,
    ask,
    failing,
    registered,
    registers_logged,
)


@pytest.fixture
def ca(tmp_path: Path) -> ThrowawayCa:
    return ThrowawayCa.create(tmp_path)


@pytest.fixture
def kamailio(ca: ThrowawayCa) -> Iterator[KamailioTls]:
    with running(lambda: KamailioTls([ALICE, BOB], ca.issue_server())) as server:
        yield server


@dataclasses.dataclass
class Arrival:
    account_id: str
    method: str
    transport: SipTransport
    destination: Destination | None  # the registrar connection it came on


@contextlib.asynccontextmanager
async def tls_world(ca_file: Path | None) -> AsyncIterator[tuple[World, list[Arrival]]]:
    """Registrations whose UAC trusts `ca_file` (None: the system's CAs only); the
    requests the provider sent, with the connection each came on."""
    time = ManualTime()
    registry = CollectorRegistry()
    settings = UacSettings(t1=SETTINGS.t1, bind_host="127.0.0.1", ca_file=ca_file)
    uac = await Uac.create(settings, time.clock, time.sleep)
    arrivals: list[Arrival] = []

    async def handler(account: Account, request: Request, inbound: Inbound) -> None:
        arrivals.append(
            Arrival(account.account_id, request.method, inbound.transport, inbound.destination)
        )
        await unavailable(account, request, inbound)

    regs = Registrations(
        SETTINGS, uac, time.clock, registry, sleep=time.sleep, handler=handler, owns_uac=True
    )
    regs.start()
    try:
        yield World(time, regs, uac, registry), arrivals
    finally:
        await regs.close()


def tls_account(kamailio: KamailioTls) -> Account:
    """Alice at Kamailio's TLS port (127.0.0.1: the certificate names the address)."""
    assert kamailio.tls_port is not None
    made = account(kamailio, ALICE, SipTransport.TLS)
    return dataclasses.replace(made, registrar_port=kamailio.tls_port)


async def test_account_registers_over_tls_with_the_configured_ca_and_calls_come_over_it(
    kamailio: KamailioTls, ca: ThrowawayCa
) -> None:
    alice = tls_account(kamailio)
    assert await ask(kamailio, "OPTIONS", "alice") == 480  # no contact yet
    async with tls_world(ca.write_cert()) as (world, arrivals):
        world.regs.add(alice, spread=False)
        status = await world.until(alice.account_id, registered)
        assert status.expires_at == world.time.now() + SETTINGS.expires
        assert world.sent("challenged") == 1  # 401 over TLS, answered from the HA1
        assert world.sent("registered") == 1
        # Kamailio saw both REGISTERs over TLS, on one connection.
        sources = registers_logged(kamailio)
        assert len(sources) == 2
        assert sources[0] == sources[1]
        assert sources[0].startswith("tls:127.0.0.1:")
        # A caller (UDP, foreign domain) reaches Alice: Kamailio sends it down our TLS
        # connection, to the handler.
        assert await ask(kamailio, "OPTIONS", "alice") == 200
        assert await ask(kamailio, "INVITE", "alice") == 480  # the default handler's answer
        tls = Destination.of(alice)  # 127.0.0.1, the TLS port
        assert arrivals == [
            Arrival(alice.account_id, "OPTIONS", SipTransport.TLS, tls),
            Arrival(alice.account_id, "INVITE", SipTransport.TLS, tls),
        ]
        assert registers_logged(kamailio) == sources  # no REGISTER besides


async def test_system_cas_only_fail_the_handshake_and_the_account_is_failing(
    kamailio: KamailioTls,
) -> None:
    alice = tls_account(kamailio)
    async with tls_world(None) as (world, arrivals):
        start = world.time.now()
        world.regs.add(alice, spread=False)
        status = await world.until(alice.account_id, failing)
        assert status.reason == "TLS handshake failed: certificate not trusted"
        assert status.retry_at is not None
        assert status.retry_at > start  # backs off, as any failure
        assert world.sent("transport_error") == 1
        assert world.sent("registered") == world.sent("challenged") == 0
    # Nothing got past the handshake: Kamailio routed no REGISTER, Alice has no contact.
    assert registers_logged(kamailio) == []
    assert await ask(kamailio, "OPTIONS", "alice") == 480
    assert arrivals == []
