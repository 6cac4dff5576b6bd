"""The HTTP port's limits on a real `serve` (issue 14, point 5, the audit's variants).

Slow connections spread over several 127.x addresses, slow heads and WebSocket
upgrades that then say nothing, fill the port up to its total cap: each address is
held to its own cap, a new client is served while there is room, and at the total cap
SIP over TCP is still answered (the caps leave it its descriptors). And the caps are
fitted under the process's open-file limit at start, with a clear warning when they
do not fit. Every wait is for an answer, bounded by STEP_TIMEOUT."""

from __future__ import annotations

import asyncio
import re
import resource
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.peers import STARTUP_TIMEOUT, STEP_TIMEOUT, _cli_env
from webapi.connections import RESERVED_DESCRIPTORS, HttpLimits, fit_descriptors

SLOW_HEAD = b"GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Slow: 1\r\n"  # never finished
WS_UPGRADE = (
    b"GET /sip HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Protocol: sip\r\n\r\n"
)
CONFIG = """
[http]
max_connections = 30
max_connections_per_ip = 10

[sip.limits]
max_connections = 1000
"""


class Serve:
    def __init__(self, proc: asyncio.subprocess.Process, lines: list[str]) -> None:
        self.proc = proc
        self.lines = lines

    def port(self, pattern: str) -> int:
        for line in self.lines:
            if match := re.match(pattern, line):
                return int(match.group(1))
        raise AssertionError("".join(self.lines))


async def spawn(tmp: Path, config: str, nofile: int | None = None) -> Serve:
    (tmp / "softrelay.toml").write_text(config)

    def limit() -> None:  # in the child, before exec
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "softrelay.cli",
        "serve",
        "--config",
        str(tmp / "softrelay.toml"),
        "--data-dir",
        str(tmp / "var"),
        "--http-port",
        "0",
        "--sip-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_cli_env(None),
        preexec_fn=limit,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(STARTUP_TIMEOUT):
        while not lines or not lines[-1].startswith("softrelay: profile"):
            line = (await proc.stdout.readline()).decode()
            assert line, "".join(lines)
            lines.append(line)
    return Serve(proc, lines)


@pytest.fixture
async def stopping() -> AsyncIterator[list[Serve]]:
    """Serves to stop after the test; their stderr is returned by `stop`."""
    started: list[Serve] = []
    yield started
    for serve in started:
        if serve.proc.returncode is None:
            serve.proc.kill()
            await serve.proc.wait()


async def stop(serve: Serve) -> bytes:
    serve.proc.terminate()
    _, err = await asyncio.wait_for(serve.proc.communicate(), STEP_TIMEOUT)
    return err


async def get(port: int, source: str, path: str = "/healthz") -> bytes:
    """One request on its own connection; the answer's status line, b"" when cut."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), STEP_TIMEOUT
    )
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), STEP_TIMEOUT)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def open_count(port: int) -> int:
    """The port's open connections as /metrics counts them, this scrape's excluded."""
    text = (await get(port, "127.0.0.1", "/metrics")).decode()
    match = re.search(r"^softrelay_http_connections (\S+)$", text, re.M)
    assert match, text[:500]
    return int(float(match.group(1))) - 1


async def until_open(port: int, count: int) -> None:
    async with asyncio.timeout(STEP_TIMEOUT):
        while await open_count(port) != count:
            pass


async def sip_options(port: int) -> bytes:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.9.9", 0)), STEP_TIMEOUT
    )
    try:
        writer.write(
            b"OPTIONS sip:relay.invalid SIP/2.0\r\n"
            b"Via: SIP/2.0/TCP 127.0.9.9:5999;branch=z9hG4bK-limits-1;rport\r\n"
            b"Max-Forwards: 70\r\nFrom: <sip:probe@relay.invalid>;tag=p1\r\n"
            b"To: <sip:relay.invalid>\r\nCall-ID: limits-1\r\nCSeq: 1 OPTIONS\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        return await asyncio.wait_for(reader.readline(), STEP_TIMEOUT)
    finally:
        writer.close()


async def test_slow_clients_of_many_addresses_fill_the_port_and_sip_still_answers(
    tmp_path: Path, stopping: list[Serve]
) -> None:
    serve = await spawn(tmp_path, CONFIG)
    stopping.append(serve)
    port = serve.port(r"softrelay: http://127\.0\.0\.1:(\d+) ")
    sip = serve.port(r"softrelay: sip tcp 127\.0\.0\.1:(\d+)")
    held: list[asyncio.StreamWriter] = []

    async def hold(source: str, first: bytes) -> asyncio.StreamReader:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), STEP_TIMEOUT
        )
        writer.write(first)
        held.append(writer)
        return reader

    try:
        # Two addresses dribble heads up to their own cap; one more of them is cut.
        for source in ("127.31.0.2", "127.32.0.3"):
            for _ in range(10):
                await hold(source, SLOW_HEAD)
        await until_open(port, 20)
        assert await get(port, "127.31.0.2") == b""
        # A third address upgrades WebSockets that then say nothing: they count too.
        for _ in range(5):
            reader = await hold("127.33.0.4", WS_UPGRADE)
            line = await asyncio.wait_for(reader.readline(), STEP_TIMEOUT)
            assert line.startswith(b"HTTP/1.1 101"), line
        await until_open(port, 25)
        # A new client is still served while there is room.
        assert (await get(port, "127.34.0.5")).startswith(b"HTTP/1.1 200")
        # Fill to the total cap (the scrape itself is the 30th now and then).
        for _ in range(4):
            await hold("127.35.0.6", SLOW_HEAD)
        await until_open(port, 29)
        await hold("127.36.0.7", SLOW_HEAD)
        # At the cap: a newcomer is cut, and SIP over TCP answers all the same.
        assert await get(port, "127.37.0.8") == b""
        assert (await sip_options(sip)).startswith(b"SIP/2.0 ")  # answered, not starved
    finally:
        for writer in held:
            writer.close()
    await asyncio.wait_for(until_open(port, 0), STEP_TIMEOUT)
    assert (await get(port, "127.37.0.8")).startswith(b"HTTP/1.1 200")
    err = await stop(serve)
    for source in ("127.31.0.2", "127.33.0.4", "127.36.0.7", "127.37.0.8"):
        assert source.encode() not in err


def test_caps_that_fit_raise_the_soft_limit_and_keep_the_configured_cap() -> None:
    limits = HttpLimits(max_connections=10_000)
    fit = fit_descriptors(limits, 100_000, soft=1024, hard=1_048_576)
    assert fit.warning is None
    assert fit.limits == limits
    assert fit.sip_connections == 100_000
    assert fit.soft_limit == 10_000 + 100_000 + RESERVED_DESCRIPTORS
    unlimited = fit_descriptors(limits, 100_000, soft=1024, hard=resource.RLIM_INFINITY)
    assert unlimited.warning is None


def test_caps_that_do_not_fit_are_both_cut_to_their_share_and_say_so() -> None:
    fit = fit_descriptors(HttpLimits(max_connections=10_000), 100_000, soft=4096, hard=20_000)
    assert fit.soft_limit == 20_000
    cap = fit.limits.max_connections
    assert cap == (20_000 - RESERVED_DESCRIPTORS) * 10_000 // 110_000
    # SIP's cap is cut too: together they leave the reserved descriptors free.
    assert fit.sip_connections == 20_000 - RESERVED_DESCRIPTORS - cap
    assert f"SIP at most {fit.sip_connections}" in (fit.warning or "")
    assert fit.warning is not None
    assert "[http] max_connections" in fit.warning
    assert "[sip.limits] max_connections" in fit.warning
    assert f"at most {cap}" in fit.warning


async def test_serve_warns_at_start_when_the_caps_exceed_the_open_file_limit(
    tmp_path: Path, stopping: list[Serve]
) -> None:
    serve = await spawn(tmp_path, CONFIG.replace("1000", "100000"), nofile=2048)
    stopping.append(serve)
    port = serve.port(r"softrelay: http://127\.0\.0\.1:(\d+) ")
    assert (await get(port, "127.38.0.2")).startswith(b"HTTP/1.1 200")
    err = (await stop(serve)).decode()
    expected = (2048 - RESERVED_DESCRIPTORS) * 30 // 100_030
    assert "softrelay: warning: the open-file limit (2048) cannot hold" in err, err
    assert f'"event":"http.descriptors_short","count":{max(1, expected)}' in err
