"""What every test reads the same way: how long an inner wait may last, and whether it
runs in CI.

pytest-timeout ends a test at `timeout` (pyproject.toml) from outside: nothing of the
test's own cleanup (`finally`, fixtures' teardown: processes stopped, files closed) runs
then. An inner wait as long as that never gets to clean up, so the longest one a test
may make is LONGEST_WAIT, well below it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
PYTEST_TIMEOUT = float(
    tomllib.loads(_PYPROJECT.read_text(encoding="utf-8"))["tool"]["pytest"]["ini_options"][
        "timeout"
    ]
)
# The longest single inner wait: a third of the test's time is left to clean up.
LONGEST_WAIT = PYTEST_TIMEOUT * 2 / 3


def in_ci(environ: os._Environ[str] | dict[str, str] | None = None) -> bool:
    """Whether `CI` is set: any value but empty, `false` or `0` (any case), as CI
    services set it (`true`, `1`, `yes`...)."""
    value = (os.environ if environ is None else environ).get("CI", "")
    return value.strip().lower() not in ("", "false", "0")
