"""SIPIS-mode apps in `softrelay simulate` and as mock parties: an embedded softrelay
with SIPIS mode on, a real Kamailio as the apps' provider (the simulate world starts
it), the apps storing their accounts over HTTP and woken by the stand-ins' pushes.

The simulation runs on an injected stepped pace (no wait costs real time, the events
one after another), so its figures are exact: every call to a sleeping SIPIS app is
delivered, every text reaches its app. With CI set, a missing kamailio fails.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mockphone.delays import SteppedPace
from mockphone.phone import Answer, Kind, PhoneSpec, State
from mockphone.simulate import SimSettings, Simulation
from mockphone.sipis import ProviderCaller, SipisPhone
from privacy.clock import SystemClock
from privacy.keys import load_keyring
from privacy.policy import load_policy
from privacy.store import Store
from softrelay.cli import main
from softrelay.simulate import embedded_world
from tests.kamailio import BINARY_ENV, find_binary
from tests.limits import in_ci

SETTINGS = SimSettings(
    phones=6,
    duration=30.0,
    call_rate=1.0,
    outgoing_share=0.4,
    text_rate=0.2,
    mix={Kind.IOS: 1, Kind.SIPIS: 1},
    answers={Answer.ANSWER: 3, Answer.DECLINE: 1},
    seed=11,
)


@pytest.fixture(autouse=True)
def _kamailio_here() -> None:
    if find_binary() is None:
        if in_ci():
            pytest.fail("CI needs Kamailio (Debian package kamailio)")
        pytest.skip("kamailio not installed")


async def _stored(workdir: Path, category: str) -> int:
    data_dir = workdir / "var"
    store = await Store.create(
        load_policy("auerproxy"), load_keyring("", data_dir), data_dir, SystemClock()
    )
    try:
        return len(await store.find(category))
    finally:
        await store.close()


async def test_simulate_delivers_every_call_and_text_to_sleeping_sipis_apps(
    tmp_path: Path,
) -> None:
    world = await embedded_world(SETTINGS, tmp_path)
    try:
        assert world.provider is not None
        simulation = Simulation(SETTINGS, world, asyncio.Event(), pace=SteppedPace())
        stats = await simulation.run()
        events = Counter(kind for _, kind in simulation.events())
        apps = [p for p in simulation.phones if isinstance(p, SipisPhone)]
    finally:
        await world.close()
    summary: dict[str, Any] = stats.summary(SETTINGS)
    sipis = summary["sipis"]
    assert sipis["apps"] == len(apps) == 3
    assert sipis["accounts"] == {"registered": 3, "failed": {}}
    assert summary["registrations"] == {"ok": 6, "failed": {}}
    calls = sipis["calls"]
    assert calls["attempted"] > 0, "the seed's calls reach SIPIS apps"
    # Every SIPIS app sleeps between events: each call found it asleep, and reached it.
    assert calls["to_sleeping_apps"] == calls["attempted"]
    assert calls["delivered_to_sleeping_apps"] == calls["attempted"]
    assert sipis["delivery_latency"]["count"] == calls["attempted"]
    assert calls["connected"] + sum(calls["failed"].values()) == calls["attempted"]
    assert set(calls["failed"]) <= {"603 Decline"}, calls
    assert calls["connected"] == sum(p.counters.answered for p in apps)
    assert sum(p.counters.calls_in for p in apps) == calls["attempted"]
    # The apps' own calls: through softrelay (the stored HA1) to the provider's line.
    placed = sipis["placed_calls"]
    assert placed["attempted"] > 0, "the seed's outgoing calls include SIPIS apps"
    assert placed == {
        "attempted": placed["attempted"],
        "connected": placed["attempted"],
        "failed": {},
    }
    assert simulation.caller is not None
    assert simulation.caller.counters.calls_in == placed["attempted"]
    texts = sipis["texts"]
    assert texts["sent"] == events["text"] > 0
    assert texts["answered"] == {"202": texts["sent"]}
    assert texts["delivered_to_sleeping_apps"] == texts["sent"]
    bodies = sorted(t.decode() for p in apps for t in p.texts)
    assert bodies == sorted(f"text {n + 1}" for n in range(texts["sent"]))
    assert sum(p.sipis.texts for p in apps) == texts["sent"]
    # One push per call to a sleeping phone (relay or SIPIS) and per text: all delivered.
    assert summary["pushes"] == {"delivered": summary["calls"]["woken"] + texts["sent"]}
    assert all(p.state is State.OFFLINE for p in apps)  # stopped at the end
    # A delivered text is gone from softrelay's store; the accounts stay.
    assert await _stored(tmp_path, "pending_message") == 0
    assert await _stored(tmp_path, "sip_account") == 3


async def test_a_sipis_app_stores_only_the_ha1_and_takes_a_call_and_a_text(
    tmp_path: Path,
) -> None:
    """The mock parties alone: the app's POST carries HA1s computed on the device, it
    holds no flow until the push, then the call is delivered and answered, a text sent
    while it sleeps again reaches it, and it places a call through softrelay."""
    settings = SimSettings(phones=1, mix={Kind.SIPIS: 1})
    world = await embedded_world(settings, tmp_path)
    try:
        provider = world.provider
        assert provider is not None
        (account,) = provider.accounts
        phone = SipisPhone(
            PhoneSpec(account.user, account.password, Kind.SIPIS),
            world.address,
            account=account,
            relay_domain=world.domain,
            session=world.session,
            inbox=world.inbox,
            pace=SteppedPace(),
        )
        realm_text = f"{account.user}:{provider.domain}:{account.password}".encode()
        assert account.ha1() == hashlib.md5(realm_text).hexdigest()
        try:
            assert await phone.start() == 200
            assert phone.link is None
            assert phone.state is State.ASLEEP
            assert (await phone.status())["status"]["state"] == "registered"
            async with ProviderCaller.open(provider.host, provider.port, provider.domain) as carol:
                result = await carol.call(account.user)
                assert result.connected, result
                assert result.woken
                assert result.push_status == "delivered"
                assert phone.counters.calls_in == 1
                assert phone.counters.answered == 1
                await phone.sleep()
                assert await carol.text(account.user, "see you at 8") == 202
                assert await phone.wait_texts(1) == [b"see you at 8"]
                assert phone.sipis.text_wakes == 1
                # The user opens the app and calls the provider's line.
                line = provider.line
                assert line is not None
                assert await carol.register(line.user, line.password) == 200
                placed = await phone.place_call(line.user)
                assert placed.connected, placed
                assert carol.counters.calls_in == 1
                assert phone.state is State.ASLEEP  # back to sleep after the call
        finally:
            await phone.stop()
    finally:
        await world.close()
    # What softrelay stored of the account is encrypted: no password, no plain HA1.
    raw = b"".join(p.read_bytes() for p in (tmp_path / "var").rglob("*") if p.is_file())
    assert account.password.encode() not in raw
    assert account.ha1().encode() not in raw


def test_sipis_mix_without_kamailio_stops_with_one_line_naming_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(BINARY_ENV, str(tmp_path / "no-kamailio"))
    assert main(["simulate", "--embedded", "--phones", "2", "--mix", "sipis=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("softrelay: --mix sipis: ")
    assert "kamailio not found" in err[-1]


def test_sipis_mix_against_a_target_is_refused_naming_the_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["simulate", "--target", "http://127.0.0.1:1", "--mix", "ios=1,sipis=1"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "softrelay: --mix sipis: only with --embedded, which starts the SIPIS apps' provider "
        "(a real Kamailio) and a softrelay with SIPIS mode on for it"
    )
