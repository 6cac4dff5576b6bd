"""The first-run demo as tests play it: the sample configuration in a directory of its
own, its listen ports moved to free ones, and every demo key it names under `var/`
written as `make run` writes them; then `softrelay serve` and `softrelay simulate` run
there as the README's two terminals do."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from softrelay.config import DEFAULT_CONFIG
from tests.limits import LONGEST_WAIT

STEP_TIMEOUT = 15.0
# What the sample reads from files `make run` writes when they are missing.
_DEMO_FILE = re.compile(r'"file:(var/[\w.-]+)"')


def free_port() -> int:
    """A port free for TCP and UDP on 127.0.0.1 (SIP listens on both)."""
    for _ in range(20):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


@dataclass(frozen=True, slots=True)
class Demo:
    workdir: Path
    http_port: int
    sip_port: int
    keys: dict[str, str]  # var/NAME -> the key written there

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def demo_config(workdir: Path, changes: Mapping[str, str] | None = None) -> Demo:
    """The sample configuration in `workdir` with free ports, and its demo keys;
    `changes` replaces lines of the sample (each must be there once)."""
    text = DEFAULT_CONFIG.read_text(encoding="utf-8")
    for old, new in (changes or {}).items():
        assert text.count(old) == 1, f"the sample has no single {old!r}"
        text = text.replace(old, new)
    http_port, sip_port = free_port(), free_port()
    text, n_http = re.subn(r"(?m)^http_port = 8080", f"http_port = {http_port}", text)
    text, n_sip = re.subn(r"(?m)^sip_port = 5060", f"sip_port = {sip_port}", text)
    assert (n_http, n_sip) == (1, 1), "the sample's listen ports moved"
    # Any other listener the sample turns on (the console's) gets a free port too, so
    # that runs side by side do not meet.
    text = re.sub(
        r'(?m)^(listen = "127\.0\.0\.1:)\d+"', lambda m: f'{m.group(1)}{free_port()}"', text
    )
    (workdir / "softrelay.toml").write_text(text, encoding="utf-8")
    (workdir / "var").mkdir(mode=0o700)
    keys: dict[str, str] = {}
    for name in sorted(set(_DEMO_FILE.findall(text))):
        keys[name] = secrets.token_hex(24)  # what the Makefile writes
        fd = os.open(workdir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(keys[name] + "\n")
    return Demo(workdir, http_port, sip_port, keys)


async def softrelay(workdir: Path, *args: str) -> asyncio.subprocess.Process:
    """`softrelay ARGS --config softrelay.toml` in `workdir`, its output piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "softrelay.cli",
        *args,
        "--config",
        "softrelay.toml",
        cwd=workdir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SOFTRELAY_CONFIG": ""},
    )


async def started(serve: asyncio.subprocess.Process) -> list[str]:
    """What `serve` printed until it said it runs (its profile line, the last)."""
    assert serve.stdout is not None
    printed: list[str] = []
    while not printed or not printed[-1].startswith("softrelay: profile"):
        line = (await asyncio.wait_for(serve.stdout.readline(), STEP_TIMEOUT)).decode()
        assert line, f"serve ended:\n{''.join(printed)}"
        printed.append(line)
    return printed


async def stopped(serve: asyncio.subprocess.Process) -> bytes:
    """SIGTERM to `serve` (unless it ended), and its stderr once it has."""
    if serve.returncode is None:
        serve.terminate()
    _, err = await asyncio.wait_for(serve.communicate(), STEP_TIMEOUT)
    return err


@dataclass(frozen=True, slots=True)
class DemoRun:
    demo: Demo
    summary: dict[str, Any]  # simulate's --json summary
    printed: str  # what simulate printed (its summary tables)
    metrics: str  # the server's /metrics after the run
    serve_err: bytes


async def run_demo(
    workdir: Path, *simulate_args: str, changes: Mapping[str, str] | None = None
) -> DemoRun:
    """`serve` of the demo configuration in `workdir`, the plain `simulate` (no
    --target: it finds that server, as after `make run`) at speed inf with the given
    options, /metrics scraped after it, then serve stopped with SIGTERM."""
    demo = demo_config(workdir, changes)
    (workdir / "answers.toml").write_text("[answers]\nanswer = 3\ndecline = 1\n")
    serve = await softrelay(workdir, "serve")
    try:
        printed = await started(serve)
        assert f"softrelay: {demo.base} (healthz, metrics)\n" in printed, printed
        sim = await softrelay(
            workdir,
            "simulate",
            # Users answer or decline: at speed inf a call left ringing would ring out
            # only at its real-time bound.
            *("--scenario", "answers.toml", "--speed", "inf", "--no-live"),
            *("--json", "summary.json", *simulate_args),
        )
        out, err = await asyncio.wait_for(sim.communicate(), LONGEST_WAIT / 2)
        assert sim.returncode == 0, err.decode()
        assert b"starting one in this process" not in err, "it found the served relay"
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{demo.base}/metrics") as response,
        ):
            assert response.status == 200
            metrics = await response.text()
    finally:
        serve_err = await stopped(serve)
    assert serve.returncode == 0, serve_err.decode()[-3000:]
    summary = orjson.loads((workdir / "summary.json").read_bytes())
    assert isinstance(summary, dict)
    return DemoRun(demo, summary, out.decode(), metrics, serve_err)
