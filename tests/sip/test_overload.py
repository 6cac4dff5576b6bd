"""The overload guard's signal: a lag sustained over several probes, not one late one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.sip.overload import Overload, OverloadSettings
from proxy.sip.settings import SipSettings, parse_sip
from tomlsections.reader import ConfigError, Section


def _observed(lags: list[float], late_probes: int = 3) -> list[bool]:
    """Shedding after each probe of `lags` (seconds), against a 100 ms limit."""
    overload = Overload(OverloadSettings(lag=0.1, late_probes=late_probes))
    states = []
    for lag in lags:
        overload.observe(lag)
        states.append(overload.shedding)
    return states


def test_single_late_probes_never_shed() -> None:
    # A probe 2 s late (a descheduled process, a collection) between prompt ones.
    assert _observed([2.0, 0.0, 0.5, 0.01, 2.0, 0.3, 0.02] * 5) == [False] * 35


def test_a_lag_sustained_for_three_probes_sheds_at_the_third() -> None:
    assert _observed([0.2, 0.15, 0.1, 0.3]) == [False, False, True, True]


def test_a_run_broken_by_a_prompt_probe_starts_again() -> None:
    assert _observed([0.2, 0.2, 0.09, 0.2, 0.2, 0.2]) == [False] * 5 + [True]


def test_shedding_stops_after_three_probes_under_half_the_limit() -> None:
    states = _observed([0.2] * 3 + [0.04, 0.04, 0.06, 0.04, 0.04, 0.04])
    # The probe at 60 ms (over half the limit) breaks the run down.
    assert states == [False, False, True, True, True, True, True, True, False]


def test_one_probe_sheds_when_configured_so() -> None:
    assert _observed([0.1, 0.0], late_probes=1) == [True, False]


def test_a_zero_limit_never_sheds() -> None:
    overload = Overload(OverloadSettings(lag=0))
    for _ in range(10):
        overload.observe(5.0)
    assert not overload.shedding
    assert overload.lag == 5.0


def _sip(overload: dict[str, Any]) -> SipSettings:
    return parse_sip(
        Section({"domain": "relay.example", "overload": overload}, Path("softrelay.toml"), "sip")
    )


def test_late_probes_is_read_and_checked() -> None:
    settings = _sip({"lag_ms": 250, "late_probes": 5})
    assert (settings.overload.lag, settings.overload.late_probes) == (0.25, 5)
    assert _sip({}).overload.late_probes == 3
    with pytest.raises(ConfigError, match=r"sip\.overload\.late_probes"):
        _sip({"late_probes": 0})
