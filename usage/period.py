"""Billing months ("YYYY-MM", UTC) and the times that bound them."""

from __future__ import annotations

import re
from datetime import UTC, datetime

_PERIOD = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


def parse_period(text: str) -> tuple[int, int]:
    """'2026-03' -> (2026, 3); ValueError on anything else."""
    match = _PERIOD.match(text)
    if match is None or not 2000 <= int(match.group(1)) <= 9999:
        raise ValueError(f"expected a month like '2026-03', got {text!r}")
    return int(match.group(1)), int(match.group(2))


def period_of(when: float) -> str:
    moment = datetime.fromtimestamp(when, UTC)
    return f"{moment.year:04d}-{moment.month:02d}"


def start_of(period: str) -> float:
    year, month = parse_period(period)
    return datetime(year, month, 1, tzinfo=UTC).timestamp()


def end_of(period: str) -> float:
    """The first instant of the next month."""
    return start_of(next_period(period))


def next_period(period: str) -> str:
    year, month = parse_period(period)
    return f"{year + month // 12:04d}-{month % 12 + 1:02d}"


def previous_period(period: str) -> str:
    year, month = parse_period(period)
    return f"{year - (month == 1):04d}-{(month - 2) % 12 + 1:02d}"
