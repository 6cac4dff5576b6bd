"""SIPp against `softrelay serve`, over UDP and TCP on loopback.

A phone (SIPp, scenario `sipp/phone.xml`, bound to 127.0.0.2 so that its address
differs from the relay's 127.0.0.1) registers through the relay with the digest
challenge of its PBX, takes a call from the PBX and calls out through it; afterwards
`softrelay audit --canary` finds neither its password, nor its Authorization header,
nor its address in plain under the data directory.

The PBX that links for real is a Python client on one TCP connection (`Pbx` below),
not SIPp: softrelay challenges PBXs with SHA-256 digests (RFC 7616) and SIPp 3.6, the
version Debian ships, answers only MD5 ones. SIPp does play a PBX whose answer to that
challenge is wrong, and is refused (`sipp/pbx_wrong_secret.xml`).

Every wait is bounded: SIPp runs one call (-m 1) under -timeout and -recv_timeout, and
each message and process end is awaited under asyncio.wait_for.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import shutil
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from privacy.clock import SystemClock
from privacy.keys import load_keyring
from privacy.policy import load_policy
from privacy.store import Store
from proxy.sip.digest import parse_authorization
from proxy.sip.framing import PONG, Keepalive, StreamFramer
from proxy.sip.message import NameAddr, Request, Response, SipUri, make_response, parse

SCENARIOS = Path(__file__).parent / "sipp"
DOMAIN = "relay.test"
SERIAL = "0042137"
PHONE_DOMAIN = f"{SERIAL}.{DOMAIN}"
PHONE_IP = "127.0.0.2"  # the relay listens on 127.0.0.1: the phone's address is its own
STEP_TIMEOUT = 10.0  # seconds for any one message or process step
SIPP_LIMITS = ["-m", "1", "-timeout", "20s", "-timeout_error", "-recv_timeout", "10000"]
SDP = "v=0\r\no=pbx 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
SDP += "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"


# --- softrelay serve ------------------------------------------------------------------


@dataclass
class Server:
    """`softrelay serve` in a subprocess, with what it printed."""

    proc: asyncio.subprocess.Process
    config: Path
    data_dir: Path
    secret: str
    ports: dict[str, int]
    output: list[str] = field(default_factory=list)
    drains: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self) -> int:
        """SIGTERM, then the exit status once the process and its output have ended."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(self.proc.wait(), STEP_TIMEOUT)
        await asyncio.wait_for(asyncio.gather(*self.drains), STEP_TIMEOUT)
        return status

    def log(self) -> str:
        return "".join(self.output[-60:])


async def _drain(stream: asyncio.StreamReader, into: list[str]) -> None:
    while line := await stream.readline():
        into.append(line.decode(errors="replace"))


async def _start_server(tmp_path: Path) -> Server:
    secret = f"pbx-secret-{secrets.token_hex(8)}"
    (tmp_path / "pbx.secret").write_text(secret + "\n", encoding="utf-8")
    config = tmp_path / "softrelay.toml"
    config.write_text(
        f'[sip]\ndomain = "{DOMAIN}"\n\n'
        f'[[sip.pbx]]\nserial = "{SERIAL}"\nsecret = "file:{tmp_path / "pbx.secret"}"\n',
        encoding="utf-8",
    )
    data_dir = tmp_path / "var"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.cli",
        "serve",
        "--config",
        str(config),
        "--data-dir",
        str(data_dir),
        "--http-port",
        "0",
        "--sip-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SOFTRELAY_CONFIG": ""},
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    srv = Server(proc, config, data_dir, secret, {})
    srv.drains.append(asyncio.create_task(_drain(proc.stderr, srv.output)))
    # The SIP lines come before the "profile" line that ends the start-up report.
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), STEP_TIMEOUT)).decode()
        srv.output.append(line)
        assert line, f"serve ended before listening:\n{srv.log()}"
        if match := re.match(r"softrelay: sip (udp|tcp) 127\.0\.0\.1:(\d+)$", line.strip()):
            srv.ports[match.group(1)] = int(match.group(2))
        if line.startswith("softrelay: profile"):
            break
    assert set(srv.ports) == {"udp", "tcp"}, srv.log()
    srv.drains.append(asyncio.create_task(_drain(proc.stdout, srv.output)))
    return srv


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[Callable[[], Awaitable[Server]]]:
    """Starts `softrelay serve` on tmp_path when called; stops it after the test.

    A test calls it only once SIPp is known to be there, and exchanges SIP with the server
    before it stops it: serve sets up its SIGTERM handler just after its start-up report.
    """
    started: list[Server] = []

    async def start() -> Server:
        started.append(await _start_server(tmp_path))
        return started[-1]

    try:
        yield start
        for srv in started:
            assert await srv.stop() == 0, srv.log()
    finally:
        for srv in started:
            if srv.proc.returncode is None:
                srv.proc.kill()
                await srv.proc.wait()
            for task in srv.drains:
                task.cancel()


# --- SIPp -----------------------------------------------------------------------------


def _sipp() -> str:
    """SIPp's path; a skip without it, or a failure in CI, which must run these tests."""
    path = shutil.which("sipp")
    if path is None:
        if os.environ.get("CI") == "true":
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


# --- the PBX --------------------------------------------------------------------------


def _message(start: str, *headers: str, body: str = "") -> bytes:
    lines = [start, *headers, f"Content-Length: {len(body.encode())}", "", body]
    return "\r\n".join(lines).encode()


def _challenge_param(header: str, name: str) -> str:
    match = re.search(rf'{name}="?([^",]+)"?', header)
    assert match, header
    return match.group(1)


def _digest(
    algorithm: str,
    *,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    nc: str,
    cnonce: str,
) -> str:
    """The qop=auth response of RFC 7616 3.4.1, made here, not by proxy.sip.digest."""
    name = {"MD5": "md5", "SHA-256": "sha256"}[algorithm.upper()]

    def h(text: str) -> str:
        return hashlib.new(name, text.encode()).hexdigest()

    ha1 = h(f"{username}:{realm}:{password}")
    ha2 = h(f"{method}:{uri}")
    return h(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")


class Pbx:
    """A PBX that dialled out to the relay: one TCP connection, kept for all it does.

    It receives strictly in order, skipping what a UDP peer's retransmission repeats.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.framer = StreamFramer()
        self.inbox: deque[bytes] = deque()
        self.seen: set[tuple[str, str, str, str]] = set()
        host, port = writer.get_extra_info("sockname")[:2]
        self.contact = f"<sip:{SERIAL}@{host}:{port};transport=tcp>"
        self.sent_by = f"{host}:{port}"
        self.transcript: list[str] = []

    @classmethod
    async def connect(cls, port: int) -> Pbx:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), STEP_TIMEOUT
        )
        return cls(reader, writer)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()

    def via(self) -> str:
        return f"Via: SIP/2.0/TCP {self.sent_by};branch=z9hG4bK-pbx-{secrets.token_hex(6)}"

    async def send(self, message: bytes | Request | Response) -> None:
        data = message if isinstance(message, bytes) else message.serialize()
        self.transcript.append(f">>> {data.decode(errors='replace')}")
        self.writer.write(data)
        await self.writer.drain()

    async def _next(self) -> Request | Response:
        while not self.inbox:
            data = await asyncio.wait_for(self.reader.read(65536), STEP_TIMEOUT)
            assert data, "the relay closed the PBX's connection"
            for item in self.framer.feed(data):
                if item is Keepalive.PING:
                    self.writer.write(PONG)
                elif isinstance(item, bytes):
                    self.inbox.append(item)
        raw = self.inbox.popleft()
        self.transcript.append(f"<<< {raw.decode(errors='replace')}")
        return parse(raw)

    async def receive(self) -> Request | Response:
        """The next message that is not a repetition of one already received."""
        while True:
            message = await self._next()
            first = message.method if isinstance(message, Request) else str(message.status)
            key = (first, message.call_id, str(message.cseq), message.top_via.branch or "")
            if key not in self.seen:
                self.seen.add(key)
                return message

    async def request(self, method: str) -> Request:
        message = await self.receive()
        assert isinstance(message, Request), f"expected {method}, got:\n{self.last()}"
        assert message.method == method, f"expected {method}, got:\n{self.last()}"
        return message

    async def response(self, method: str, status: int | None = None) -> Response:
        """The next response to `method`: with `status`, or else the next final one."""
        while True:
            message = await self.receive()
            assert isinstance(message, Response), f"expected a response, got:\n{self.last()}"
            assert message.cseq.method == method, self.last()
            if status is None and message.status < 200:
                continue
            assert status is None or message.status == status, self.last()
            return message

    def last(self) -> str:
        return self.transcript[-1] if self.transcript else "(nothing)"

    async def link(self, secret: str) -> int:
        """REGISTER as the serial, answering the relay's challenge; the final status."""
        call_id = f"pbx-link-{secrets.token_hex(6)}"

        def register(cseq: int, *extra: str) -> bytes:
            return _message(
                f"REGISTER sip:{DOMAIN} SIP/2.0",
                self.via(),
                f"From: <sip:{SERIAL}@{DOMAIN}>;tag=pbx-{call_id}",
                f"To: <sip:{SERIAL}@{DOMAIN}>",
                f"Call-ID: {call_id}",
                f"CSeq: {cseq} REGISTER",
                "Max-Forwards: 70",
                f"Contact: {self.contact}",
                "Expires: 600",
                *extra,
            )

        await self.send(register(1))
        challenge = (await self.response("REGISTER", 401)).get("WWW-Authenticate") or ""
        realm = _challenge_param(challenge, "realm")
        nonce = _challenge_param(challenge, "nonce")
        algorithm = _challenge_param(challenge, "algorithm")
        uri, nc, cnonce = f"sip:{DOMAIN}", "00000001", secrets.token_hex(8)
        answer = _digest(
            algorithm,
            username=SERIAL,
            realm=realm,
            password=secret,
            method="REGISTER",
            uri=uri,
            nonce=nonce,
            nc=nc,
            cnonce=cnonce,
        )
        authorization = (
            f'Digest username="{SERIAL}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{answer}", algorithm={algorithm}, qop=auth, nc={nc}, cnonce="{cnonce}"'
        )
        await self.send(register(2, f"Authorization: {authorization}"))
        return (await self.response("REGISTER")).status


# --- the scenario ---------------------------------------------------------------------


@dataclass
class PhoneSecrets:
    """What of the phone must never be stored in plain."""

    password: str
    authorization: str = ""
    digest_response: str = ""


async def _serve_phone(pbx: Pbx, phone: PhoneSecrets, *, contact_host: str = PHONE_IP) -> None:
    """The PBX's part of the phone's whole scenario (sipp/phone.xml), step by step;
    the phone's Contact names `contact_host`."""
    # The phone's REGISTER arrives over the PBX's link, with a Path back to the phone.
    register = await pbx.request("REGISTER")
    assert register.get("Authorization") is None
    (path,) = register.paths
    assert "ft=" in str(path), str(path)
    assert PHONE_IP not in str(path), "the Path names the relay, not the phone"
    nonce = secrets.token_hex(12)
    challenge = f'Digest realm="pbx.{DOMAIN}", nonce="{nonce}", algorithm=MD5, qop="auth"'
    await pbx.send(make_response(register, 401, headers=[("WWW-Authenticate", challenge)]))

    # The phone's answer comes through untouched and proves the phone's password.
    register = await pbx.request("REGISTER")
    authorization = register.get("Authorization")
    assert authorization is not None, pbx.last()
    creds = parse_authorization(authorization)
    assert (creds.username, creds.realm, creds.nonce, creds.uri, creds.qop) == (
        "alice",
        f"pbx.{DOMAIN}",
        nonce,
        f"sip:{PHONE_DOMAIN}",
        "auth",
    ), authorization
    expected = _digest(
        "MD5",
        username="alice",
        realm=creds.realm,
        password=phone.password,
        method="REGISTER",
        uri=creds.uri,
        nonce=nonce,
        nc=creds.nc,
        cnonce=creds.cnonce,
    )
    assert creds.response == expected, (
        f"the phone's digest does not prove its password: {authorization}"
    )
    phone.authorization = authorization
    phone.digest_response = creds.response
    (contact,) = register.contacts
    assert isinstance(contact.uri, SipUri)
    assert contact.uri.host == contact_host
    await pbx.send(
        make_response(
            register,
            200,
            headers=[("Contact", str(contact.with_param("expires", "600"))), ("Expires", "600")],
        )
    )

    await _call_the_phone(pbx, register, contact, path)
    await _answer_the_phone(pbx)


async def _call_the_phone(pbx: Pbx, register: Request, contact: NameAddr, path: NameAddr) -> None:
    """INVITE along the Path; 180, 200, ACK; then the PBX hangs up."""
    # SIPp matches "in///<its Call-ID>" to the phone's one call (see sipp/phone.xml).
    call_id = f"in///{register.call_id}"
    dialog = [
        f"From: <sip:bob@{PHONE_DOMAIN}>;tag=pbx-in",
        f"Call-ID: {call_id}",
    ]
    await pbx.send(
        _message(
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
    ringing = await pbx.response("INVITE", 180)
    assert ringing.record_routes, pbx.last()
    answer = await pbx.response("INVITE", 200)
    assert b"m=audio" in answer.body
    # UAC route set: the Record-Route of the answer, reversed (RFC 3261 12.1.2).
    routes = [f"Route: {rr}" for rr in reversed(answer.record_routes)]
    assert routes, pbx.last()
    (phone_contact,) = answer.contacts
    in_dialog = [*routes, "Max-Forwards: 70", *dialog, f"To: {answer.get('To')}"]
    await pbx.send(
        _message(f"ACK {phone_contact.uri} SIP/2.0", pbx.via(), *in_dialog, "CSeq: 1 ACK")
    )
    await pbx.send(
        _message(f"BYE {phone_contact.uri} SIP/2.0", pbx.via(), *in_dialog, "CSeq: 2 BYE")
    )
    await pbx.response("BYE", 200)


async def _answer_the_phone(pbx: Pbx) -> None:
    """The phone calls carol: 180, 200 with the relay's Record-Route; ACK; its BYE."""
    invite = await pbx.request("INVITE")
    assert str(invite.uri) == f"sip:carol@{PHONE_DOMAIN}", pbx.last()
    assert invite.record_routes, "the relay Record-Routes the dialog"
    assert invite.max_forwards == 69
    echoed = [("Record-Route", value) for value in invite.get_all("Record-Route")]
    tag = "pbx-out"
    await pbx.send(
        make_response(invite, 180, headers=[*echoed, ("Contact", pbx.contact)], to_tag=tag)
    )
    await pbx.send(
        make_response(
            invite,
            200,
            headers=[*echoed, ("Contact", pbx.contact), ("Content-Type", "application/sdp")],
            to_tag=tag,
            body=SDP.encode(),
        )
    )
    ack = await pbx.request("ACK")
    assert ack.call_id == invite.call_id
    assert not ack.routes, "the relay took its own Route off"
    bye = await pbx.request("BYE")
    await pbx.send(make_response(bye, 200))


async def _audit(server: Server, *canaries: str) -> tuple[int, str]:
    args = [arg for canary in canaries for arg in ("--canary", canary)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.cli",
        "audit",
        "--config",
        str(server.config),
        "--data-dir",
        str(server.data_dir),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "SOFTRELAY_CONFIG": ""},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


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
            await _serve_phone(pbx, phone)
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
    status, report = await _audit(
        server,
        phone.password,
        phone.authorization,
        phone.digest_response,
        'Digest username="alice"',
        PHONE_IP,
        server.secret,
    )
    assert status == 0, report
    assert "no canary found" in report
    # ...while the scan does read the data: the serial is stored in plain.
    status, report = await _audit(server, SERIAL)
    assert status == 1, report
    assert repr(SERIAL) in report
    # ...and the phone's address was stored, encrypted: the store gives it back.
    store = await Store.create(
        load_policy("auerproxy"), load_keyring("", server.data_dir), server.data_dir, SystemClock()
    )
    try:
        (binding,) = await store.find("registration", pbx_serial=SERIAL, sip_username="alice")
    finally:
        await store.close()
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
