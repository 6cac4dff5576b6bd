"""`softrelay simulate --embedded`: a handful of phones for a few simulated seconds, run
twenty times faster than real time; the JSON summary's figures are checked against
what the embedded softrelay stored."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from mockphone.scenario import load_scenario
from mockphone.simulate import SimulationError
from privacy.clock import SystemClock
from privacy.keys import load_keyring
from privacy.policy import load_policy
from privacy.store import Store
from softrelay.cli import main


def test_simulate_embedded_summary_matches_what_happened(tmp_path: Path) -> None:
    summary_file = tmp_path / "summary.json"
    status = main(
        [
            "simulate",
            "--embedded",
            "--data-dir",
            str(tmp_path / "world"),
            "--phones",
            "8",
            "--duration",
            "30",
            "--speed",
            "20",
            "--call-rate",
            "1",
            "--crash-rate",
            "0.3",
            "--opt-in",
            "0.5",
            "--mix",
            "ios=2,android=1,desktop=1",
            "--seed",
            "7",
            "--no-live",
            "--json",
            str(summary_file),
        ]
    )
    assert status == 0
    summary = orjson.loads(summary_file.read_bytes())
    assert summary["registrations"] == {"ok": 8, "failed": {}}
    calls = summary["calls"]
    assert calls["attempted"] >= 10, "about 30 calls at 1/s over 30 simulated seconds"
    assert calls["connected"] + sum(calls["failed"].values()) == calls["attempted"]
    assert calls["woken"] >= 1, "some calls reached sleeping phones"
    assert summary["wake_latency"]["count"] == calls["woken"]
    assert summary["wake_latency"]["p50"] <= summary["wake_latency"]["p99"]
    assert summary["pushes"]["delivered"] >= calls["woken"]
    assert summary["pings"] == {"sent": 8, "by_status": {"202": 8}}
    crashes = summary["crash_reports"]
    assert crashes["sent"] == crashes["opted_in"] + crashes["not_opted_in"] >= 1
    assert crashes["errors"] == 0
    assert summary["interrupted"] is False

    # The relay kept the opted-in reports only, and counted every install's ping.
    async def stored() -> tuple[int, int]:
        data_dir = tmp_path / "world" / "var"
        store = await Store.create(
            load_policy("auerproxy"), load_keyring("", data_dir), data_dir, SystemClock()
        )
        try:
            reports = await store.find("crash_report")
            usage = await store.find("usage")
        finally:
            await store.close()
        return len(reports), len(usage)

    reports, usage = asyncio.run(stored())
    assert reports == crashes["opted_in"]
    assert usage == 8


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
