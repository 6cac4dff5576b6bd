"""The provider's real Kamailio (tests/kamailio.py) as the SIPIS tests run it: skipped
where Kamailio is missing, a failure in CI (tests/limits.py in_ci()), closed at the end."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from tests.kamailio import Kamailio, KamailioUnavailable, Subscriber
from tests.limits import in_ci

K = TypeVar("K", bound=Kamailio)


@contextlib.contextmanager
def running_kamailio(
    subscribers: list[Subscriber],
    *,
    sha256: bool = False,
    min_expires: int | None = None,
    defines: tuple[str, ...] = (),
) -> Iterator[Kamailio]:
    """Kamailio started with these accounts (tests/kamailio.py names the options)."""
    with running(
        lambda: Kamailio(subscribers, sha256=sha256, min_expires=min_expires, defines=defines)
    ) as server:
        yield server


@contextlib.contextmanager
def running(make: Callable[[], K]) -> Iterator[K]:
    """The Kamailio `make` builds (KamailioTls, say), started."""
    try:
        server = make()
    except KamailioUnavailable as exc:
        if in_ci():
            pytest.fail(f"CI needs Kamailio: {exc}")
        pytest.skip(str(exc))
    try:
        server.start()
        yield server
    finally:
        server.close()
