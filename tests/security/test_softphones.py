"""A real softphone (baresip, Debian package baresip-core) with softrelay as its outbound
proxy: it puts softrelay in a `Route` header on REGISTER and INVITE, and softrelay must
take every Route entry naming itself off before the PBX sees the request (RFC 3261
16.4), or a loose-routing PBX would send the call back to softrelay.

baresip registers through the relay to the test's PBX, is called by the PBX and
answers, and calls out; what reaches the PBX is checked at each step.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mockphone.sipwire import Request, make_response
from tests import peers
from tests.limits import in_ci
from tests.peers import PHONE_DOMAIN, SDP, STEP_TIMEOUT, Pbx, sip_message

PHONE_HOST = "127.0.0.3"  # baresip's own address: not the relay's, not the PBX's
PASSWORD = "baresip-pw-7d1f"


def _baresip() -> str:
    """baresip's path; a skip without it, a failure in CI, which must run these tests."""
    path = shutil.which("baresip")
    if path is None:
        if in_ci():
            pytest.fail("baresip is not on PATH: .ci/run installs it (Debian baresip-core)")
        pytest.skip("baresip is not installed (Debian package baresip-core)")
    return path


def _free_port(host: str, kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Baresip:
    """baresip in the background, driven through its ctrl_tcp module (netstrings)."""

    proc: asyncio.subprocess.Process
    ctrl_port: int
    sip_port: int
    control: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    @classmethod
    async def start(cls, home: Path, relay_tcp_port: int) -> Baresip:
        home.mkdir()
        sip_port = _free_port(PHONE_HOST, socket.SOCK_STREAM)
        ctrl_port = _free_port("127.0.0.1", socket.SOCK_STREAM)
        modules = "/usr/lib/baresip/modules"
        # What baresip says in a call: a second of 8 kHz silence, the rate of PCMU.
        silence = home / "silence.wav"
        with wave.open(str(silence), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(8000)
            out.writeframes(bytes(16000))
        (home / "config").write_text(
            f"sip_listen {PHONE_HOST}:{sip_port}\n"
            f"module_path {modules}\n"
            "module g711.so\nmodule aufile.so\n"
            "module_app account.so\nmodule_app menu.so\nmodule_app ctrl_tcp.so\n"
            f"ctrl_tcp_listen 127.0.0.1:{ctrl_port}\n"
            f"audio_source aufile,{silence}\naudio_player aufile,{home / 'heard.wav'}\n"
            f"audio_alert aufile,{home / 'alert.wav'}\n"
            "rtp_ports 42000-42100\n",
            encoding="utf-8",
        )
        # outbound= makes baresip send everything to the relay with a Route naming it.
        (home / "accounts").write_text(
            f"<sip:alice@{PHONE_DOMAIN};transport=tcp>;auth_pass={PASSWORD};"
            f'outbound="sip:127.0.0.1:{relay_tcp_port};transport=tcp;lr";'
            "regint=600;answermode=auto;medianat=;sipnat=\n",
            encoding="utf-8",
        )
        proc = await asyncio.create_subprocess_exec(
            _baresip(),
            "-f",
            str(home),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return cls(proc, ctrl_port, sip_port)

    async def command(self, command: str, params: str = "") -> None:
        """Send one command. Called only after baresip's first REGISTER has arrived:
        by then its modules, the control port's among them, are loaded."""
        if self.control is None:
            self.control = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.ctrl_port), STEP_TIMEOUT
            )
        payload = json.dumps({"command": command, "params": params, "token": "t"}).encode()
        _, writer = self.control
        writer.write(b"%d:%s," % (len(payload), payload))
        await writer.drain()

    async def stop(self) -> None:
        if self.control is not None:
            self.control[1].close()
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), STEP_TIMEOUT)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@pytest.fixture
async def baresip(
    tmp_path: Path,
) -> AsyncIterator[Callable[[int], Awaitable[Baresip]]]:
    started: list[Baresip] = []

    async def start(relay_tcp_port: int) -> Baresip:
        started.append(await Baresip.start(tmp_path / "baresip", relay_tcp_port))
        return started[-1]

    try:
        yield start
    finally:
        for phone in started:
            await phone.stop()


def _names_relay(request: Request, port: int) -> list[str]:
    """The Route entries of `request` that name the relay's own listen address."""
    named = []
    for route in request.routes:
        uri = route.uri
        if uri.scheme == "sip" and uri.host == "127.0.0.1" and uri.port == port:
            named.append(str(route))
    return named


async def test_baresip_registers_is_called_and_calls_with_no_route_to_the_relay_left(
    start_server: Callable[[], Awaitable[peers.Server]],
    baresip: Callable[[int], Awaitable[Baresip]],
) -> None:
    _baresip()
    server = await start_server()
    tcp = server.ports["tcp"]
    pbx = await Pbx.connect(tcp)
    try:
        assert await pbx.link(server.secret) == 200, pbx.last()
        phone = await baresip(tcp)
        await _register_be_called_and_call(pbx, phone, tcp)
    finally:
        await pbx.close()


async def _register_be_called_and_call(pbx: Pbx, phone: Baresip, tcp: int) -> None:
    # REGISTER: baresip routes it through the relay by a Route naming the relay.
    register = await pbx.request("REGISTER")
    assert _names_relay(register, tcp) == [], pbx.last()
    await pbx.challenge(register)
    register = await pbx.request("REGISTER")
    assert register.get("Authorization") is not None, pbx.last()
    assert _names_relay(register, tcp) == [], pbx.last()
    (contact,) = register.contacts
    (path,) = register.paths
    await pbx.accept(register, contact)

    # The PBX calls baresip along the Path; baresip answers by itself (answermode=auto).
    dialog = [f"From: <sip:bob@{PHONE_DOMAIN}>;tag=pbx-in", "Call-ID: baresip-in-1"]
    await pbx.send(
        sip_message(
            f"INVITE {contact.uri} SIP/2.0",
            pbx.via(),
            f"Route: {path}",
            "Max-Forwards: 70",
            *dialog,
            f"To: <sip:alice@{PHONE_DOMAIN}>",
            "CSeq: 1 INVITE",
            f"Contact: {pbx.contact}",
            "Content-Type: application/sdp",
            body=SDP,
        )
    )
    answer = await pbx.response("INVITE")
    assert answer.status == 200, pbx.last()
    bye = await pbx.hang_up(answer, dialog)
    assert bye.status == 200, pbx.last()

    # baresip calls carol: the INVITE reaches the PBX without the Route naming the relay.
    await phone.command("dial", f"sip:carol@{PHONE_DOMAIN}")
    invite = await pbx.request("INVITE")
    assert str(invite.uri).startswith(f"sip:carol@{PHONE_DOMAIN}"), pbx.last()
    assert _names_relay(invite, tcp) == [], pbx.last()
    assert invite.record_routes, "the relay stays in the dialog"
    echoed = [("Record-Route", value) for value in invite.get_all("Record-Route")]
    headers = [*echoed, ("Contact", pbx.contact), ("Content-Type", "application/sdp")]
    await pbx.send(make_response(invite, 200, headers=headers, to_tag="pbx-out", body=SDP.encode()))
    ack = await pbx.request("ACK")
    assert _names_relay(ack, tcp) == [], pbx.last()
    await phone.command("hangup")
    their_bye = await pbx.request("BYE")
    assert _names_relay(their_bye, tcp) == [], pbx.last()
    await pbx.send(make_response(their_bye, 200))
