"""The shared test limits: CI read one way, inner waits below pytest's own timeout."""

from __future__ import annotations

import pytest

from tests.limits import LONGEST_WAIT, PYTEST_TIMEOUT, in_ci


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False),
        ("", False),
        ("false", False),
        ("FALSE", False),
        ("0", False),
        (" 0 ", False),
        ("true", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("github-actions", True),
    ],
)
def test_ci_counts_as_set_for_any_value_but_empty_false_or_0(
    value: str | None, expected: bool
) -> None:
    environ = {} if value is None else {"CI": value}
    assert in_ci(environ) is expected


def test_the_longest_inner_wait_leaves_time_to_clean_up(pytestconfig: pytest.Config) -> None:
    assert float(pytestconfig.getini("timeout")) == PYTEST_TIMEOUT
    assert LONGEST_WAIT <= PYTEST_TIMEOUT - 15
