"""SIPp against `softrelay serve`, over UDP and TCP on loopback.

A phone (SIPp, scenario `sipp/phone.xml`, bound to 127.0.0.2 so that its address
differs from the relay's 127.0.0.1) registers through the relay with the digest
challenge of its PBX, takes a call from the PBX and calls out through it; afterwards
`softrelay audit --canary` finds neither its password, nor its Authorization header,
nor its address in plain under the data directory.

The PBX that links for real is a Python client on one TCP connection (`tests.peers.Pbx`),
not SIPp: softrelay challenges PBXs with SHA-256 digests (RFC 7616) and SIPp 3.6, the
version Debian ships, answers only MD5 ones. SIPp does play a PBX whose answer to that
challenge is wrong, and is refused (`sipp/pbx_wrong_secret.xml`).

Every wait is bounded: SIPp runs one call (-m 1) under -timeout and -recv_timeout, and
each message and process end is awaited under asyncio.wait_for.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.limits import in_ci
from tests.peers import (
    PHONE_DOMAIN,
    PHONE_IP,
    SERIAL,
    Pbx,
    PhoneSecrets,
    Server,
    audit,
    serve_phone,
    stored_registration,
)

SCENARIOS = Path(__file__).parent / "sipp"
SIPP_LIMITS = ["-m", "1", "-timeout", "20s", "-timeout_error", "-recv_timeout", "10000"]


# --- SIPp -----------------------------------------------------------------------------


def _sipp() -> str:
    """SIPp's path; a skip without it, or a failure in CI, which must run these tests."""
    path = shutil.which("sipp")
    if path is None:
        if in_ci():
            pytest.fail("sipp is not on PATH: .ci/run installs it (Debian package sip-tester)")
        pytest.skip("sipp is not installed (Debian package sip-tester)")
    return path


@dataclass
class Sipp:
    """One SIPp run in the background, its logs under `logs`."""

    proc: asyncio.subprocess.Process
    logs: Path
    name: str

    @classmethod
    async def start(cls, sipp: str, scenario: str, target: str, logs: Path, *args: str) -> Sipp:
        logs.mkdir(parents=True, exist_ok=True)
        name = Path(scenario).stem
        with (logs / f"{name}.out").open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sipp,
                target,
                "-sf",
                str(SCENARIOS / scenario),
                *SIPP_LIMITS,
                "-nostdin",
                "-trace_msg",
                "-message_file",
                str(logs / f"{name}.messages"),
                "-trace_err",
                "-error_file",
                str(logs / f"{name}.errors"),
                "-trace_screen",
                "-screen_file",
                str(logs / f"{name}.screen"),
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                cwd=logs,
            )
        return cls(proc, logs, name)

    async def finish(self) -> int:
        """SIPp's exit status (0: its one call succeeded); killed if it overruns."""
        try:
            # -timeout 20s bounds SIPp itself; this bounds a SIPp that ignores it.
            return await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise

    def report(self) -> str:
        parts = []
        for suffix in ("errors", "out", "messages"):
            path = self.logs / f"{self.name}.{suffix}"
            if path.exists():
                text = path.read_text(errors="replace")
                parts.append(f"--- {path.name} ---\n{text[-6000:]}")
        return "\n".join(parts)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_phone_registers_and_calls_both_ways_and_leaves_no_secret(
    start_server: Callable[[], Awaitable[Server]], tmp_path: Path, transport: str
) -> None:
    sipp = _sipp()
    server = await start_server()
    pbx = await Pbx.connect(server.ports["tcp"])
    try:
        assert await pbx.link("not-the-secret") == 403, "a wrong secret is refused"
        assert await pbx.link(server.secret) == 200, server.log()

        phone = PhoneSecrets(password=f"pw-canary-{secrets.token_hex(8)}")
        run = await Sipp.start(
            sipp,
            "phone.xml",
            f"127.0.0.1:{server.ports[transport]}",
            tmp_path / "sipp",
            "-t",
            "u1" if transport == "udp" else "t1",
            "-i",
            PHONE_IP,
            "-bind_local",
            "-mi",
            PHONE_IP,
            "-ci",
            PHONE_IP,
            "-s",
            "alice",
            "-au",
            "alice",
            "-ap",
            phone.password,
            "-auth_uri",
            PHONE_DOMAIN,
        )
        try:
            await serve_phone(pbx, phone)
            status = await run.finish()
        except BaseException:
            run.kill()
            await run.proc.wait()
            print(run.report())
            print("\n".join(pbx.transcript[-20:]))
            raise
        assert status == 0, run.report()
    finally:
        await pbx.close()
    assert await server.stop() == 0, server.log()

    # With the server stopped: nothing of the phone's secrets or address in plain...
    status, report = await audit(server, *phone.canaries(), server.secret, clear=[PHONE_IP])
    assert status == 0, report
    assert "no canary found" in report
    # ...while the scan does read the data: the serial is stored in plain.
    status, report = await audit(server, SERIAL)
    assert status == 1, report
    assert repr(SERIAL) in report
    # ...and the phone's address was stored, encrypted: the store gives it back.
    binding = await stored_registration(server)
    assert binding.fields["phone_ip"] == PHONE_IP


async def test_sipp_pbx_with_a_wrong_secret_is_refused(
    start_server: Callable[[], Awaitable[Server]], tmp_path: Path
) -> None:
    sipp = _sipp()
    server = await start_server()
    run = await Sipp.start(
        sipp,
        "pbx_wrong_secret.xml",
        f"127.0.0.1:{server.ports['tcp']}",
        tmp_path / "sipp",
        "-t",
        "t1",
        "-i",
        "127.0.0.1",
        "-bind_local",
        "-mi",
        "127.0.0.1",
        "-ci",
        "127.0.0.1",
    )
    status = await run.finish()
    assert status == 0, run.report()
