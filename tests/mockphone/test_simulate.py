"""The simulation behind `softrelay simulate`: a handful of phones for 30 simulated
seconds on an injected stepped pace (no wait costs real time, the events run in order),
against an embedded softrelay; the summary's figures are checked exactly against the
events the seed drew and what the relay pushed and stored. The command's options and
scenario files are checked for the errors they name."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mockphone.delays import SteppedPace
from mockphone.phone import Answer, Kind
from mockphone.scenario import load_scenario
from mockphone.simulate import SimSettings, Simulation, SimulationError
from privacy.clock import SystemClock
from privacy.keys import load_keyring
from privacy.policy import load_policy
from privacy.store import Store
from softrelay.cli import main
from softrelay.simulate import embedded_world

# Decliners but no phone that ignores calls: on a stepped pace no wait costs real time,
# so a ringing-out call would take its whole ring bound in real seconds.
SETTINGS = SimSettings(
    phones=8,
    duration=30.0,
    call_rate=1.0,
    crash_rate=0.3,
    opt_in=0.5,
    mix={Kind.IOS: 2, Kind.ANDROID: 1, Kind.DESKTOP: 1},
    answers={Answer.ANSWER: 3, Answer.DECLINE: 1},
    seed=7,
)
# Real seconds, where a stepped run still measures them: not part of what is compared.
_REAL_TIME = ("wall_seconds", "wake_latency")


async def _run(workdir: Path) -> tuple[dict[str, Any], Counter[str], tuple[int, int]]:
    """One run of SETTINGS on an injected stepped pace against an embedded softrelay:
    its summary, its events by kind, and the crash reports and usage ids it stored."""
    world = await embedded_world(SETTINGS, workdir)
    try:
        simulation = Simulation(SETTINGS, world, asyncio.Event(), pace=SteppedPace())
        stats = await simulation.run()
        events = Counter(kind for _, kind in simulation.events())
    finally:
        await world.close()
    data_dir = workdir / "var"
    store = await Store.create(
        load_policy("auerproxy"), load_keyring("", data_dir), data_dir, SystemClock()
    )
    try:
        stored = len(await store.find("crash_report")), len(await store.find("usage"))
    finally:
        await store.close()
    return stats.summary(SETTINGS), events, stored


async def test_a_seeded_run_on_an_injected_pace_is_exact_and_repeats(tmp_path: Path) -> None:
    """Every event the seed draws is accounted for, the figures match what the relay
    pushed and stored, and a second run of the same seed gives the same summary."""
    summary, events, (reports, usage) = await _run(tmp_path / "first")

    assert summary["registrations"] == {"ok": 8, "failed": {}}
    assert summary["pings"] == {"sent": 8, "by_status": {"202": 8}}
    assert summary["events"] == dict(sorted(events.items())), "every event drawn was run"
    calls = summary["calls"]
    assert calls["attempted"] + calls["unplaced"] == events["pbx_call"] + events["phone_call"]
    assert calls["connected"] + sum(calls["failed"].values()) == calls["attempted"]
    assert set(calls["failed"]) <= {"603 Decline"}, calls
    # Each woken call is one push, delivered; nothing else was pushed (no call rang out).
    assert calls["woken"] > 0, "the seed's calls reach sleeping phones"
    assert summary["pushes"] == {"delivered": calls["woken"]}
    assert summary["wake_latency"]["count"] == calls["woken"]
    crashes = summary["crash_reports"]
    assert crashes["sent"] == events["crash"] > 0
    assert crashes["opted_in"] + crashes["not_opted_in"] == crashes["sent"]
    assert crashes["errors"] == 0
    assert summary["skipped_events"] == 0
    assert summary["interrupted"] is False
    # The relay kept the opted-in reports only, and counted every install's ping.
    assert (reports, usage) == (crashes["opted_in"], 8)

    again, events_again, stored_again = await _run(tmp_path / "second")
    assert events_again == events
    assert stored_again == (reports, usage)
    assert {k: v for k, v in again.items() if k not in _REAL_TIME} == {
        k: v for k, v in summary.items() if k not in _REAL_TIME
    }


def test_scenario_file_sets_the_run_and_names_a_bad_key(tmp_path: Path) -> None:
    scenario = tmp_path / "day.toml"
    scenario.write_text(
        '[run]\nphones = 50\nduration = "10m"\nseed = 3\n'
        "[mix]\nios = 1\nandroid = 1\n"
        '[behaviour]\ncall_rate = 2.5\nwake_delay = "uniform:1,2"\n',
        encoding="utf-8",
    )
    settings = load_scenario(scenario)
    assert (settings.phones, settings.duration, settings.seed) == (50, 600.0, 3)
    assert settings.call_rate == 2.5
    assert str(settings.wake_delay) == "uniform:1,2"
    scenario.write_text("[behaviour]\ncall_rat = 2\n", encoding="utf-8")
    with pytest.raises(SimulationError, match=r"day\.toml: behaviour\.call_rat: unknown key"):
        load_scenario(scenario)


def test_bad_options_stop_with_one_line_naming_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--embedded", "--mix", "ios=1,nokia=2"]) == 2
    assert "--mix ios=1,nokia=2: 'nokia=2'" in capsys.readouterr().err
    assert main(["simulate", "--embedded", "--phones", "0"]) == 2
    assert "phones must be at least 1" in capsys.readouterr().err
