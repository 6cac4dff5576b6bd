"""The `start_server` fixture of the end-to-end SIP tests (the peers: tests/peers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests import peers


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[Callable[[], Awaitable[peers.Server]]]:
    """Starts `softrelay serve` on tmp_path when called; stops it after the test.

    A test calls it only once its peers are known to be there, and exchanges SIP with
    the server before it stops it: serve sets up its SIGTERM handler just after its
    start-up report.
    """
    started: list[peers.Server] = []

    async def start() -> peers.Server:
        started.append(await peers.start_server(tmp_path))
        return started[-1]

    try:
        yield start
        for srv in started:
            assert await srv.stop() == 0, srv.log()
    finally:
        for srv in started:
            await srv.kill()
