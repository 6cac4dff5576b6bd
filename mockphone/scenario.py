"""Scenario files: a simulation described in TOML, for repeatable runs.

    [run]
    phones = 50
    pbxs = 2
    duration = "10m"          # or seconds as a number
    speed = 10                # simulated seconds per second
    seed = 7                  # the same seed, the same run

    [mix]                     # phone kinds, shares
    ios = 0.5
    android = 0.3
    desktop = 0.2

    [transports]              # shares; udp is used by desktops only
    tcp = 0.8
    ws = 0.2

    [behaviour]
    call_rate = 2.0           # calls per second, in all
    outgoing_share = 0.3      # of them, placed by phones
    sleep_rate = 0.5          # awake mobile phones falling asleep per second
    crash_rate = 0.1
    text_rate = 0.1           # texts to sleeping SIPIS apps (mix `sipis`) per second
    contacts = 0.5            # phones whose users sync a book and use Smart Contacts
    contacts_rate = 0.2       # their book edits, each with a discovery, per second
    opt_in = 0.5
    asleep = 0.6              # mobile phones asleep right after registering
    wake_delay = "lognormal:1.5,0.4"
    answer_delay = "uniform:0.5,3"
    hold = "uniform:1,5"
    ring_timeout = "20s"

    [answers]                 # how phones treat a call, shares
    answer = 0.85
    decline = 0.1
    ignore = 0.05

Every key is optional; an unknown key or a bad value stops the run with the file and
the key named. Command-line options override the file.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from mockphone.delays import Delay
from mockphone.phone import Answer, Kind
from mockphone.simulate import SimSettings, SimulationError, check
from mockphone.sip import Transport

_RUN = {"phones": int, "pbxs": int, "duration": "seconds", "speed": float, "seed": int}
_BEHAVIOUR = {
    "call_rate": float,
    "outgoing_share": float,
    "sleep_rate": float,
    "crash_rate": float,
    "text_rate": float,
    "contacts": float,
    "contacts_rate": float,
    "opt_in": float,
    "asleep": float,
    "wake_delay": "delay",
    "answer_delay": "delay",
    "hold": "delay",
    "ring_timeout": "seconds",
}
_SHARES: dict[str, tuple[str, Any]] = {
    "mix": ("mix", Kind),
    "transports": ("transports", Transport),
    "answers": ("answers", Answer),
}
_UNITS = {"s": 1, "m": 60, "h": 3600}


def load_scenario(path: Path, base: SimSettings | None = None) -> SimSettings:
    """The scenario's settings over `base` (None: SimSettings' defaults)."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SimulationError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SimulationError(f"{path}: not TOML: {exc}") from None
    changes: dict[str, Any] = {}
    for section, value in raw.items():
        if section in ("run", "behaviour"):
            keys = _RUN if section == "run" else _BEHAVIOUR
            table = _table(path, section, value)
            for key, item in table.items():
                if key not in keys:
                    raise SimulationError(f"{path}: {section}.{key}: unknown key")
                changes[key] = _value(path, f"{section}.{key}", keys[key], item)
        elif section in _SHARES:
            name, enum = _SHARES[section]
            shares: dict[Any, float] = {}
            for key, item in _table(path, section, value).items():
                try:
                    member = enum(key)
                except ValueError:
                    names = ", ".join(e.value for e in enum)
                    raise SimulationError(
                        f"{path}: {section}.{key}: unknown (one of {names})"
                    ) from None
                shares[member] = _value(path, f"{section}.{key}", float, item)
            if sum(shares.values()) <= 0:
                raise SimulationError(f"{path}: {section}: the shares add up to nothing")
            changes[name] = shares
        else:
            raise SimulationError(f"{path}: {section}: unknown section")
    try:
        return check(replace(base or SimSettings(), **changes), str(path))
    except TypeError as exc:  # pragma: no cover - every key above is a field
        raise SimulationError(f"{path}: {exc}") from None


def _table(path: Path, name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SimulationError(f"{path}: {name}: expected a table")
    return value


def _value(path: Path, key: str, kind: Any, value: Any) -> Any:
    where = f"{path}: {key}"
    if kind == "delay":
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise SimulationError(f'{where}: expected a delay like "uniform:1,3"')
        try:
            return Delay.parse(value)
        except ValueError as exc:
            raise SimulationError(f"{where}: {exc}") from None
    if kind == "seconds":
        if isinstance(value, str) and value[-1:] in _UNITS:
            try:
                return float(value[:-1]) * _UNITS[value[-1]]
            except ValueError:
                pass
        elif isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise SimulationError(f'{where}: expected seconds, or a duration like "10m"')
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SimulationError(f"{where}: expected an integer, got {value!r}")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise SimulationError(f"{where}: expected a number, got {value!r}")
