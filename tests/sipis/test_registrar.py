"""Registrations against a registrar stand-in at the `Transactions` seam (unit): the
start spread and the rate per registrar on a manual clock, 407 answered from the HA1
(Kamailio's config challenges REGISTER with 401 only), and what metrics show."""

from __future__ import annotations

import asyncio
import hashlib
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from mockphone import digest
from proxy.sip.message import Request, Response
from proxy.sip.responses import make_response
from sipis.account import Account, Credential, Push, SipTransport, State
from sipis.registrar import RateWindow, RegistrarSettings, Registrations
from sipis.uac import Address, ClientInvite, Destination, Inbound, LostListener
from tests.limits import LONGEST_WAIT
from tests.sipis.manualtime import ManualTime

WAIT = LONGEST_WAIT / 3
REALM = "provider.test"
PASSWORD = "pw-" + secrets.token_hex(4)


@dataclass
class FakeRegistrar:
    """Answers REGISTERs at once: 200 with the Contact and its expires, or first a
    407 whose answer it checks with the password (mockphone's own digest code)."""

    time: ManualTime
    proxy_auth: bool = False
    sent: list[tuple[float, Destination]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)

    async def request(
        self, destination: Destination, make: Callable[[Address], Request]
    ) -> Response:
        request = make(("192.0.2.1", 5060))
        request.prepend("Via", f"SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK{secrets.token_hex(4)}")
        self.sent.append((self.time.now(), destination))
        response = self._answer(request)
        self.answers.append(response.status)
        return response

    def _answer(self, request: Request) -> Response:
        if self.proxy_auth:
            given = request.get("Proxy-Authorization")
            user = request.from_.uri.user  # type: ignore[union-attr]
            ok = given is not None and digest.proves(
                given, username=user or "", password=PASSWORD, method="REGISTER"
            )
            if not ok:
                nonce = secrets.token_hex(8)
                challenge = digest.challenge(REALM, nonce, "SHA-256")
                return make_response(request, 407, headers=[("Proxy-Authenticate", challenge)])
        contact = request.get("Contact") or ""
        expires = request.get("Expires") or "0"
        return make_response(request, 200, headers=[("Contact", f"{contact};expires={expires}")])

    def bind(
        self,
        handler: Callable[[Request, Inbound], Awaitable[None]],
        lost: LostListener | None = None,
    ) -> None:
        pass

    def registrar_addresses(self, destination: Destination) -> set[str]:
        return set()

    async def send(self, destination: Destination, request: Request) -> None:
        raise AssertionError("the registrar sends no ACK")

    async def invite(
        self,
        destination: Destination,
        request: Request,
        *,
        accepted: Callable[[Response], None] | None = None,
        ring_limit: float = 180.0,
    ) -> ClientInvite:
        raise AssertionError("the registrar sends no INVITE")

    async def close(self) -> None:
        pass


def make_account(n: int, registrar: str = "registrar-a.test") -> Account:
    user = f"user{n}"
    return Account(
        account_id=f"acc{n}",
        registrar_host=registrar,
        registrar_port=5060,
        transport=SipTransport.UDP,
        domain=REALM,
        user=user,
        credential=Credential(
            user,
            REALM,
            ha1_md5=hashlib.md5(f"{user}:{REALM}:{PASSWORD}".encode()).hexdigest(),
            ha1_sha256=hashlib.sha256(f"{user}:{REALM}:{PASSWORD}".encode()).hexdigest(),
        ),
        push=Push("apns", "token", "app"),
    )


def most_in_one_second(times: list[float]) -> int:
    """The largest number of `times` in any window [t, t+1)."""
    times = sorted(times)
    most, start = 0, 0
    for end, at in enumerate(times):
        while times[start] <= at - 1.0:
            start += 1
        most = max(most, end - start + 1)
    return most


async def run_until_quiet(regs: Registrations, time: ManualTime, until: float) -> None:
    """Step the clock from job to job up to `until`, letting each finish."""
    while True:
        await asyncio.wait_for(regs.settled(), WAIT)
        due = regs.next_due()
        if due is None or due > until:
            return
        time.advance_to(due)


async def test_a_thousand_accounts_start_within_the_spread_at_the_rate_per_registrar() -> None:
    time = ManualTime()
    fake = FakeRegistrar(time)
    settings = RegistrarSettings(start_spread=120.0, rate=10)
    registry = CollectorRegistry()
    regs = Registrations(
        settings, fake, time.clock, registry, sleep=time.sleep, rng=random.Random(7)
    )
    regs.start()
    start = time.now()
    try:
        for n in range(1000):
            # Two registrars: the rate is each one's own.
            regs.add(make_account(n, "registrar-a.test" if n % 2 else "registrar-b.test"))
        assert all(regs.status(f"acc{n}").state is State.PENDING for n in range(1000))  # type: ignore[union-attr]
        await run_until_quiet(regs, time, start + settings.expires * 0.5)
        assert all(regs.status(f"acc{n}").state is State.REGISTERED for n in range(1000))  # type: ignore[union-attr]
    finally:
        await regs.close()
    for host in ("registrar-a.test", "registrar-b.test"):
        times = [at for at, dest in fake.sent if dest.host == host]
        assert len(times) == 500
        assert most_in_one_second(times) <= settings.rate
        # Not all at once: the start spread, then the rate, stretch them out.
        assert sum(1 for at in times if at < start + 1.0) <= settings.rate
        assert max(times) - start >= 500 / settings.rate - 1
    assert registry.get_sample_value("softrelay_sipis_accounts", {"state": "registered"}) == 1000


async def test_start_delay_is_random_within_the_spread() -> None:
    time = ManualTime()
    settings = RegistrarSettings(start_spread=60.0, rate=1000)
    regs = Registrations(
        settings, FakeRegistrar(time), time.clock, CollectorRegistry(), rng=random.Random(3)
    )
    for n in range(200):
        regs.add(make_account(n))
    starts = [regs.status(f"acc{n}").retry_at for n in range(200)]  # type: ignore[union-attr]
    assert all(s is not None and time.now() <= s <= time.now() + 60.0 for s in starts)
    assert most_in_one_second([s for s in starts if s is not None]) < 20
    regs.add(make_account(999), spread=False)  # a new account: at once
    assert regs.status("acc999").retry_at == time.now()  # type: ignore[union-attr]
    await regs.close()


def test_rate_window_gives_at_most_rate_slots_in_any_second() -> None:
    window = RateWindow(5)
    rng = random.Random(1)
    now, slots = 100.0, []
    for _ in range(500):
        now += rng.choice([0.0, 0.0, 0.01, 0.3, 2.0])
        slot = window.reserve(now)
        assert slot >= now
        slots.append(slot)
    assert slots == sorted(slots)
    assert most_in_one_second(slots) == 5


async def register_one(fake: FakeRegistrar, registry: CollectorRegistry) -> None:
    """make_account(1) registered at `fake` by an engine started for it, closed after."""
    time = fake.time
    regs = Registrations(
        RegistrarSettings(start_spread=0), fake, time.clock, registry, sleep=time.sleep
    )
    regs.start()
    try:
        regs.add(make_account(1), spread=False)
        status = await asyncio.wait_for(
            regs.wait_for("acc1", lambda s: s is not None and s.state is State.REGISTERED), WAIT
        )
        assert status is not None
    finally:
        await regs.close()


async def test_proxy_authenticate_is_answered_from_the_ha1() -> None:
    fake = FakeRegistrar(ManualTime(), proxy_auth=True)
    await register_one(fake, CollectorRegistry())
    assert fake.answers == [407, 200]  # SHA-256 challenge, answered from ha1_sha256


async def test_metric_labels_name_no_account_user_or_registrar() -> None:
    registry = CollectorRegistry()
    await register_one(FakeRegistrar(ManualTime(), proxy_auth=True), registry)
    labels = {
        value
        for metric in registry.collect()
        for sample in metric.samples
        for value in sample.labels.values()
    }
    assert labels <= {s.value for s in State} | {
        "registered",
        "unregistered",
        "challenged",
        "interval_too_brief",
        "credentials_refused",
        "no_credential",
        "rejected",
        "server_error",
        "timeout",
        "transport_error",
        "no_outbound",
        "stale_removed",
        "stale_kept",
    }
