"""Real peers for the end-to-end tests, in one place.

`softrelay` as an operator runs it (`spawn_serve`, `run_cli`, `start_server`,
`audit`); SIP peers on loopback: the base of every Python SIP peer (`SipPeer`, and
`StreamPeer` for one TCP connection), the PBX that links by serial (`Pbx`), and the PBX's
part of a phone's whole scenario (`serve_phone`).

The peers write and read SIP with the mock parties' own code (`mockphone.sipwire`,
`mockphone.digest`, the PBX's link as `mockphone.pbx.LinkRegistration`), not with the
relay's parser or digest: a bug there must show, not be shared by both ends.

Every wait is bounded by STEP_TIMEOUT (or by the start-up and CLI timeouts below),
never paced by sleeping.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from mockphone import digest
from mockphone.pbx import LinkRegistration
from mockphone.sipwire import (
    PONG,
    Keepalive,
    NameAddr,
    Request,
    Response,
    StreamFramer,
    make_response,
    parse,
    sip_message,
)
from privacy.clock import SystemClock
from privacy.keys import load_keyring
from privacy.policy import load_policy
from privacy.store import Record, Store

DOMAIN = "relay.test"
SERIAL = "0042137"
PHONE_DOMAIN = f"{SERIAL}.{DOMAIN}"
PHONE_IP = "127.0.0.2"  # the relay listens on 127.0.0.1: the phone's address is its own
STEP_TIMEOUT = 10.0  # seconds for any one message or process step
STARTUP_TIMEOUT = 20.0  # seconds for `serve` to print where it listens
CLI_TIMEOUT = 30.0  # seconds for one `softrelay` command to finish
SDP = "v=0\r\no=pbx 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
SDP += "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
# The phone's SDP names its own address: bodies pass through, and are never kept.
PHONE_SDP = f"v=0\r\no=alice 1 1 IN IP4 {PHONE_IP}\r\ns=-\r\nc=IN IP4 {PHONE_IP}\r\nt=0 0\r\n"
PHONE_SDP += "m=audio 41000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"


# --- softrelay in a subprocess --------------------------------------------------------


def _cli_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    """The environment of a `softrelay` subprocess: no config but the one it is given."""
    return {**os.environ, "SOFTRELAY_CONFIG": "", **(extra or {})}


async def spawn_serve(
    data_dir: Path, *args: str, env: Mapping[str, str] | None = None
) -> asyncio.subprocess.Process:
    """`softrelay serve` on ports 0 with `data_dir` and `args`, stdout and stderr piped;
    `env` is added to the environment (SOFTRELAY_CONFIG is empty unless it sets it)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "softrelay.cli",
        "serve",
        *args,
        "--data-dir",
        str(data_dir),
        "--http-port",
        "0",
        "--sip-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_cli_env(env),
    )


async def http_base(proc: asyncio.subprocess.Process) -> str:
    """The `http://127.0.0.1:<port>` that `serve` prints on its first line."""
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), STARTUP_TIMEOUT)
    match = re.search(rb"http://127\.0\.0\.1:(\d+)", line)
    assert match, line
    return f"http://127.0.0.1:{int(match.group(1))}"


async def run_cli(*args: str, env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """`softrelay ARGS` in a subprocess, as an operator runs it (`env` added to its
    environment); status and output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "softrelay.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=_cli_env(env),
    )
    out, _ = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


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
    grew: asyncio.Event = field(default_factory=asyncio.Event)  # set as a line arrives

    async def line(self, pattern: str) -> str:
        """The first line of output matching the regex `pattern`, once it has come."""
        seen = 0
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                for line in self.output[seen:]:
                    if re.search(pattern, line):
                        return line
                seen = len(self.output)
                self.grew.clear()
                await self.grew.wait()

    async def stop(self) -> int:
        """SIGTERM, then the exit status once the process and its output have ended."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(self.proc.wait(), STEP_TIMEOUT)
        await asyncio.wait_for(asyncio.gather(*self.drains), STEP_TIMEOUT)
        return status

    async def kill(self) -> None:
        """After a failed test: the process gone, its output no longer read."""
        if self.proc.returncode is None:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), STEP_TIMEOUT)
        for task in self.drains:
            task.cancel()

    def log(self) -> str:
        return "".join(self.output[-60:])

    def http_port(self) -> int:
        """The HTTP port `serve` printed at start; SIP over WebSocket is at /sip on it."""
        for line in self.output:
            if match := re.match(r"softrelay: http://127\.0\.0\.1:(\d+) ", line):
                return int(match.group(1))
        raise AssertionError(f"serve printed no HTTP address:\n{self.log()}")


async def _drain(
    stream: asyncio.StreamReader, into: list[str], grew: asyncio.Event | None = None
) -> None:
    while line := await stream.readline():
        into.append(line.decode(errors="replace"))
        if grew is not None:
            grew.set()


async def start_server(tmp_path: Path, more_config: str = "", secret: str = "") -> Server:
    """`softrelay serve` on tmp_path with one PBX (SERIAL, `secret` or a fresh one) in
    DOMAIN, and the TOML tables of `more_config` ([store], [usage] ...), once it has
    reported its UDP and TCP SIP ports."""
    secret = secret or f"pbx-secret-{secrets.token_hex(8)}"
    (tmp_path / "pbx.secret").write_text(secret + "\n", encoding="utf-8")
    config = tmp_path / "softrelay.toml"
    config.write_text(
        f'[sip]\ndomain = "{DOMAIN}"\n\n'
        f'[[sip.pbx]]\nserial = "{SERIAL}"\nsecret = "file:{tmp_path / "pbx.secret"}"\n\n'
        + more_config,
        encoding="utf-8",
    )
    data_dir = tmp_path / "var"
    proc = await spawn_serve(data_dir, "--config", str(config))
    assert proc.stdout is not None
    assert proc.stderr is not None
    srv = Server(proc, config, data_dir, secret, {})
    srv.drains.append(asyncio.create_task(_drain(proc.stderr, srv.output, srv.grew)))
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
    srv.drains.append(asyncio.create_task(_drain(proc.stdout, srv.output, srv.grew)))
    return srv


async def audit(server: Server, *canaries: str, clear: Sequence[str] = ()) -> tuple[int, str]:
    """`softrelay audit` of the stopped server's data, looking for each canary anywhere
    (decrypted fields included), and for each of `clear` in the clear in files only."""
    args = [arg for canary in canaries for arg in ("--canary", canary)]
    args += [arg for value in clear for arg in ("--clear-canary", value)]
    return await run_cli(
        "audit", "--config", str(server.config), "--data-dir", str(server.data_dir), *args
    )


async def stored_registration(server: Server) -> Record:
    """The one registration of alice at SERIAL, read back (decrypted) through the store
    of the stopped server."""
    store = await Store.create(
        load_policy("auerproxy"), load_keyring("", server.data_dir), server.data_dir, SystemClock()
    )
    try:
        (binding,) = await store.find("registration", pbx_serial=SERIAL, sip_username="alice")
    finally:
        await store.close()
    return binding


# --- SIP messages and digests: the mock parties' ---------------------------------------


def digest_authorization(challenge: str, *, username: str, password: str, uri: str) -> str:
    """The Authorization value that answers `challenge` (a WWW-Authenticate value, with
    its realm, nonce and algorithm) for a REGISTER of `uri`."""
    return digest.answer(
        challenge, username=username, password=password, method="REGISTER", uri=uri
    ).header


__all__ = ["sip_message"]  # re-exported: the tests write raw messages with it


# --- SIP peers ------------------------------------------------------------------------


class SipPeer:
    """What every Python SIP peer does alike: it keeps a transcript, takes messages in
    order, and registers with a digest. A subclass sends and receives, and has a
    Contact and a Via of its own."""

    contact: str
    transcript: list[str]

    def via(self) -> str:
        raise NotImplementedError

    async def send(self, message: bytes | Request | Response) -> None:
        raise NotImplementedError

    async def receive(self) -> Request | Response:
        raise NotImplementedError

    def _sent(self, data: bytes) -> None:
        self.transcript.append(f">>> {data.decode(errors='replace')}")

    def _received(self, data: bytes) -> Request | Response:
        self.transcript.append(f"<<< {data.decode(errors='replace')}")
        return parse(data)

    def last(self) -> str:
        return self.transcript[-1] if self.transcript else "(nothing)"

    async def request(self, method: str) -> Request:
        message = await self.receive()
        assert isinstance(message, Request), f"expected {method}, got:\n{self.last()}"
        assert message.method == method, f"expected {method}, got:\n{self.last()}"
        return message

    async def final(self, method: str) -> Response:
        """The next final response to `method`, past its provisional ones."""
        while True:
            message = await self.receive()
            assert isinstance(message, Response), f"expected a response, got:\n{self.last()}"
            assert message.cseq.method == method, self.last()
            if message.status >= 200:
                return message

    async def answer(
        self, invite: Request, *, contact: str, tag: str, sdp: str
    ) -> tuple[Request, Request]:
        """180 and 200 (with `sdp`) to `invite` from `contact`, echoing its Record-Route;
        then its ACK, and its BYE, answered 200. The ACK and the BYE."""
        echoed = [("Record-Route", value) for value in invite.get_all("Record-Route")]
        await self.send(
            make_response(invite, 180, headers=[*echoed, ("Contact", contact)], to_tag=tag)
        )
        await self.send(
            make_response(
                invite,
                200,
                headers=[*echoed, ("Contact", contact), ("Content-Type", "application/sdp")],
                to_tag=tag,
                body=sdp.encode(),
            )
        )
        ack = await self.request("ACK")
        assert ack.call_id == invite.call_id
        bye = await self.request("BYE")
        await self.send(make_response(bye, 200))
        return ack, bye

    async def digest_register(
        self, user: str, domain: str, password: str | None, *, tag: str
    ) -> tuple[Response, Response]:
        """REGISTER `user`@`domain` with this peer's Contact; a 401 answered with the
        digest of `password` (unless None). The final answer to the first REGISTER,
        and to the last (the same one when there was no challenge to answer)."""
        call_id = f"{tag}-reg-{secrets.token_hex(6)}"

        def register(cseq: int, *extra: str) -> bytes:
            return sip_message(
                f"REGISTER sip:{domain} SIP/2.0",
                self.via(),
                f"From: <sip:{user}@{domain}>;tag={tag}-{call_id}",
                f"To: <sip:{user}@{domain}>",
                f"Call-ID: {call_id}",
                f"CSeq: {cseq} REGISTER",
                "Max-Forwards: 70",
                f"Contact: {self.contact}",
                "Expires: 600",
                *extra,
            )

        await self.send(register(1))
        first = await self.final("REGISTER")
        if first.status != 401 or password is None:
            return first, first
        authorization = digest_authorization(
            first.get("WWW-Authenticate") or "",
            username=user,
            password=password,
            uri=f"sip:{domain}",
        )
        await self.send(register(2, f"Authorization: {authorization}"))
        return first, await self.final("REGISTER")


class StreamPeer(SipPeer):
    """A SIP peer on one TCP connection to the relay, answering its keepalive pings."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.framer = StreamFramer()
        self.inbox: deque[bytes] = deque()
        self.transcript = []

    async def send(self, message: bytes | Request | Response) -> None:
        data = message if isinstance(message, bytes) else message.serialize()
        self._sent(data)
        self.writer.write(data)
        await self.writer.drain()

    async def receive(self) -> Request | Response:
        while not self.inbox:
            data = await asyncio.wait_for(self.reader.read(65536), STEP_TIMEOUT)
            assert data, f"the relay closed the connection after:\n{self.last()}"
            for item in self.framer.feed(data):
                if item is Keepalive.PING:
                    self.writer.write(PONG)
                elif isinstance(item, bytes):
                    self.inbox.append(item)
        return self._received(self.inbox.popleft())

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


class Pbx(StreamPeer):
    """A PBX that dialled out to the relay: one TCP connection, kept for all it does.

    It receives strictly in order, skipping what a UDP peer's retransmission repeats
    (`receive`); `StreamPeer.receive` gives every message.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.seen: set[tuple[str, str, str, str]] = set()
        host, port = writer.get_extra_info("sockname")[:2]
        self.contact = f"<sip:{SERIAL}@{host}:{port};transport=tcp>"
        self.sent_by = f"{host}:{port}"

    @classmethod
    async def connect(cls, port: int) -> Self:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), STEP_TIMEOUT
        )
        return cls(reader, writer)

    def via(self) -> str:
        return f"Via: SIP/2.0/TCP {self.sent_by};branch=z9hG4bK-pbx-{secrets.token_hex(6)}"

    async def receive(self) -> Request | Response:
        """The next message that is not a repetition of one already received."""
        while True:
            message = await super().receive()
            first = message.method if isinstance(message, Request) else str(message.status)
            key = (first, message.call_id, str(message.cseq), message.top_via.branch or "")
            if key not in self.seen:
                self.seen.add(key)
                return message

    async def response(self, method: str, status: int | None = None) -> Response:
        """The next response to `method`: with `status`, or else the next final one."""
        if status is None:
            return await self.final(method)
        message = await self.receive()
        assert isinstance(message, Response), f"expected a response, got:\n{self.last()}"
        assert message.cseq.method == method, self.last()
        assert message.status == status, self.last()
        return message

    async def link(self, secret: str) -> int:
        """REGISTER as the serial, answering the relay's challenge; the final status."""
        registration = LinkRegistration(SERIAL, DOMAIN, self.contact)
        await self.send(registration.request(self.via().removeprefix("Via: ")))
        challenged = await self.final("REGISTER")
        assert challenged.status == 401, self.last()
        answer = registration.answer(challenged.get("WWW-Authenticate") or "", secret)
        await self.send(registration.request(self.via().removeprefix("Via: "), answer))
        return (await self.final("REGISTER")).status

    async def challenge(self, register: Request) -> str:
        """401 to a phone's REGISTER with an MD5 challenge of realm pbx.DOMAIN; its nonce."""
        nonce = secrets.token_hex(12)
        challenge = f'Digest realm="pbx.{DOMAIN}", nonce="{nonce}", algorithm=MD5, qop="auth"'
        await self.send(make_response(register, 401, headers=[("WWW-Authenticate", challenge)]))
        return nonce

    async def accept(self, register: Request, contact: NameAddr) -> None:
        """200 to a phone's REGISTER, binding `contact` for 600 seconds."""
        await self.send(
            make_response(
                register,
                200,
                headers=[
                    ("Contact", str(contact.with_param("expires", "600"))),
                    ("Expires", "600"),
                ],
            )
        )

    async def hang_up(self, answer: Response, dialog: list[str]) -> Response:
        """ACK the 200 `answer` to an INVITE with the `dialog` headers (From, Call-ID),
        then BYE, both along its route set; the final response to the BYE."""
        # UAC route set: the Record-Route of the answer, reversed (RFC 3261 12.1.2).
        routes = [f"Route: {rr}" for rr in reversed(answer.record_routes)]
        assert routes, self.last()
        (target,) = answer.contacts
        in_dialog = [*routes, "Max-Forwards: 70", *dialog, f"To: {answer.get('To')}"]
        await self.send(
            sip_message(f"ACK {target.uri} SIP/2.0", self.via(), *in_dialog, "CSeq: 1 ACK")
        )
        await self.send(
            sip_message(f"BYE {target.uri} SIP/2.0", self.via(), *in_dialog, "CSeq: 2 BYE")
        )
        return await self.response("BYE")


# --- the PBX's part of a phone's scenario ---------------------------------------------


@dataclass
class PhoneSecrets:
    """What of the phone must never be stored in plain."""

    password: str
    authorization: str = ""
    digest_response: str = ""

    def canaries(self) -> tuple[str, ...]:
        """What an audit of the data directory must not find in plain."""
        return (self.password, self.authorization, self.digest_response, 'Digest username="alice"')


async def serve_phone(pbx: Pbx, phone: PhoneSecrets, *, contact_host: str = PHONE_IP) -> None:
    """The PBX's part of the phone's whole scenario (sipp/phone.xml), step by step;
    the phone's Contact names `contact_host`."""
    # The phone's REGISTER arrives over the PBX's link, with a Path back to the phone.
    register = await pbx.request("REGISTER")
    assert register.get("Authorization") is None
    (path,) = register.paths
    assert "ft=" in str(path), str(path)
    assert PHONE_IP not in str(path), "the Path names the relay, not the phone"
    nonce = await pbx.challenge(register)

    # The phone's answer comes through untouched and proves the phone's password.
    register = await pbx.request("REGISTER")
    authorization = register.get("Authorization")
    assert authorization is not None, pbx.last()
    creds = digest.params(authorization)
    assert [creds.get(k) for k in ("username", "realm", "nonce", "uri", "qop")] == [
        "alice",
        f"pbx.{DOMAIN}",
        nonce,
        f"sip:{PHONE_DOMAIN}",
        "auth",
    ], authorization
    assert digest.proves(
        authorization, username="alice", password=phone.password, method="REGISTER"
    ), f"the phone's digest does not prove its password: {authorization}"
    phone.authorization = authorization
    phone.digest_response = creds["response"]
    (contact,) = register.contacts
    assert contact.uri.host == contact_host
    await pbx.accept(register, contact)

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
    ringing = await pbx.response("INVITE", 180)
    assert ringing.record_routes, pbx.last()
    answer = await pbx.response("INVITE", 200)
    assert b"m=audio" in answer.body
    bye = await pbx.hang_up(answer, dialog)
    assert bye.status == 200, pbx.last()


async def _answer_the_phone(pbx: Pbx) -> None:
    """The phone calls carol: 180, 200 with the relay's Record-Route; ACK; its BYE."""
    invite = await pbx.request("INVITE")
    assert str(invite.uri) == f"sip:carol@{PHONE_DOMAIN}", pbx.last()
    assert invite.record_routes, "the relay Record-Routes the dialog"
    assert invite.max_forwards == 69
    ack, _ = await pbx.answer(invite, contact=pbx.contact, tag="pbx-out", sdp=SDP)
    assert not ack.routes, "the relay took its own Route off"
