"""Mutual TLS for PBX links, on real loopback sockets: a PBX configured with
`auth = "mtls"` links by a client certificate naming its serial, without a digest
challenge; a certificate for another serial, one naming it only in the CN, none, or
plain TCP get 403; `auth = "both"` needs the certificate and the digest; phones without
a certificate keep using the same TLS listener; configuration errors name the key."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from mockphone import digest
from privacy.audit import scan_for_canaries
from privacy.clock import ManualClock
from privacy.store import Store
from proxy.sip.flow import Transport, certificate_names
from proxy.sip.message import Request, Response
from proxy.sip.parser import parse
from proxy.sip.relay import Relay
from proxy.sip.settings import PbxAuth, PbxSettings, SipSettings, transport_settings
from proxy.sip.tls import server_tls_context
from proxy.sip.transports import SipTransports
from push.fakes.certs import ThrowawayCa
from softrelay.config import load_config
from tomlsections.reader import ConfigError

TIMEOUT = 5.0  # a bound on waiting for the network, never a wait for time to pass
DOMAIN = "relay.test"
SERIAL = "0042137"
OTHER = "0099"
SECRET = "pbx-secret-5f1c"
CERT_CANARY = "pbx-cert-canary-7f3e"


@dataclass(frozen=True, slots=True)
class Pki:
    ca: ThrowawayCa
    ca_file: Path  # the client CA the relay trusts
    server: Path  # the relay's TLS certificate and key


@pytest.fixture
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    # Outside tmp_path (the store's data directory), so the canary scan sees only data.
    ca = ThrowawayCa.create(tmp_path_factory.mktemp("pki"))
    return Pki(ca, ca.write_cert(), ca.issue_server())


class Peer:
    """A PBX or phone on one connection to the relay."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def receive(self) -> Request | Response:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() in (b"content-length", b"l"):
                length = int(value)
        body = await asyncio.wait_for(self.reader.readexactly(length), TIMEOUT)
        return parse(head + body)

    async def ask(self, data: bytes) -> Response:
        self.writer.write(data)
        answer = await self.receive()
        assert isinstance(answer, Response)
        return answer


@dataclass
class Relayed:
    relay: Relay
    transports: SipTransports
    registry: CollectorRegistry

    def pbx_auth_errors(self) -> float:
        labels = {"reason": "pbx_auth"}
        return self.registry.get_sample_value("softrelay_sip_errors_total", labels) or 0.0


Start = Callable[..., Awaitable[Relayed]]
Connect = Callable[..., Awaitable[Peer]]


@pytest.fixture
async def start(store: Store, clock: ManualClock, pki: Pki) -> AsyncIterator[Start]:
    """Starts the relay on its own transports: TCP and TLS on free loopback ports, the
    TLS listener asking for client certificates of the test CA."""
    started: list[SipTransports] = []

    async def factory(auth: PbxAuth) -> Relayed:
        secret = "" if auth is PbxAuth.MTLS else SECRET
        settings = SipSettings(
            DOMAIN,
            (PbxSettings(SERIAL, secret, auth=auth), PbxSettings(OTHER, SECRET)),
            tls_port=0,
            tls_cert=pki.server,
            tls_client_ca=pki.ca_file,
        )
        registry = CollectorRegistry()
        relay = Relay(settings, store, clock, registry)
        transports = await SipTransports.start(
            transport_settings(settings, "127.0.0.1", 0), relay.handle, clock, registry
        )
        started.append(transports)
        return Relayed(relay, transports, registry)

    yield factory
    for transports in started:
        await transports.stop()


@pytest.fixture
async def connect(pki: Pki) -> AsyncIterator[Connect]:
    """Connects a peer over TLS (with the client certificate given, if any) or TCP."""
    writers: list[asyncio.StreamWriter] = []

    async def factory(
        relayed: Relayed, kind: Transport = Transport.TLS, cert: Path | None = None
    ) -> Peer:
        address = relayed.transports.address(kind)
        if kind is Transport.TLS:
            context = pki.ca.client_context()
            if cert is not None:
                context.load_cert_chain(cert)
            reader, writer = await asyncio.open_connection(
                *address, ssl=context, server_hostname="localhost"
            )
        else:
            reader, writer = await asyncio.open_connection(*address)
        writers.append(writer)
        return Peer(reader, writer)

    yield factory
    for writer in writers:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def _request(method: str, uri: str, *headers: str) -> bytes:
    lines = [f"{method} {uri} SIP/2.0", *headers, "Content-Length: 0", "", ""]
    return "\r\n".join(lines).encode()


def pbx_register(cseq: int = 1, auth: str = "", serial: str = SERIAL) -> bytes:
    return _request(
        "REGISTER",
        f"sip:{DOMAIN}",
        f"Via: SIP/2.0/TLS 127.0.0.1:40000;branch=z9hG4bKpbx{cseq}",
        f"From: <sip:{serial}@{DOMAIN}>;tag=p1",
        f"To: <sip:{serial}@{DOMAIN}>",
        "Call-ID: pbxreg-1",
        f"CSeq: {cseq} REGISTER",
        "Max-Forwards: 70",
        "Contact: <sip:pbx@127.0.0.1:40000;transport=tls>",
        "Expires: 600",
        *([f"Authorization: {auth}"] if auth else []),
    )


def digest_answer(challenge: Response, secret: str = SECRET) -> str:
    """The PBX's answer, by the mock parties' digest (not the relay's)."""
    return digest.answer(
        challenge.get("WWW-Authenticate") or "",
        username=SERIAL,
        password=secret,
        method="REGISTER",
        uri=f"sip:{DOMAIN}",
    ).header


# Linking by certificate ----------------------------------------------------------


@pytest.mark.parametrize(
    ("dns", "uris"),
    [
        ((SERIAL,), ()),
        ((f"{SERIAL}.{DOMAIN}",), ()),
        ((), (f"{SERIAL}.{DOMAIN}",)),
        (("pbx.example.test", f"{SERIAL}.RELAY.TEST"), ()),
    ],
    ids=["dns-serial", "dns-serial.domain", "uri-serial.domain", "dns-among-others"],
)
async def test_pbx_with_a_certificate_naming_its_serial_links_at_its_first_register(
    start: Start,
    connect: Connect,
    pki: Pki,
    store: Store,
    tmp_path: Path,
    dns: tuple[str, ...],
    uris: tuple[str, ...],
) -> None:
    relayed = await start(PbxAuth.MTLS)
    pbx = await connect(relayed, cert=pki.ca.issue_client(CERT_CANARY, dns=dns, uris=uris))
    ok = await pbx.ask(pbx_register())
    assert ok.status == 200
    assert not ok.has("WWW-Authenticate")
    assert relayed.relay.pbx_flow(SERIAL) is not None
    # The link keeps what the policy declares; nothing of the certificate.
    (link,) = await store.find("pbx_link", pbx_serial=SERIAL)
    assert link.fields["transport"] == "tls"
    assert set(link.fields) == {"pbx_serial", "pbx_ip", "pbx_port", "transport"}
    await store.close()
    assert scan_for_canaries(tmp_path, [CERT_CANARY]) == []


async def test_certificate_of_another_serial_gets_403(
    start: Start, connect: Connect, pki: Pki
) -> None:
    relayed = await start(PbxAuth.MTLS)
    lookalikes = (OTHER, f"{SERIAL}.other.test", f"x{SERIAL}", f"{SERIAL}.{DOMAIN}.evil.test")
    pbx = await connect(relayed, cert=pki.ca.issue_client(OTHER, dns=lookalikes))
    refused = await pbx.ask(pbx_register())
    assert (refused.status, refused.reason) == (403, "Certificate Does Not Match")
    assert relayed.relay.pbx_flow(SERIAL) is None
    assert relayed.pbx_auth_errors() == 1


async def test_certificate_naming_the_serial_only_in_its_common_name_gets_403(
    start: Start, connect: Connect, pki: Pki
) -> None:
    """The CN is free text, not a typed name: no fallback to it (see certificate_names)."""
    relayed = await start(PbxAuth.MTLS)
    pbx = await connect(relayed, cert=pki.ca.issue_client(SERIAL))
    refused = await pbx.ask(pbx_register())
    assert (refused.status, refused.reason) == (403, "Certificate Does Not Match")
    assert relayed.relay.pbx_flow(SERIAL) is None


async def test_pbx_without_a_certificate_gets_403_and_no_challenge(
    start: Start, connect: Connect
) -> None:
    relayed = await start(PbxAuth.MTLS)
    pbx = await connect(relayed)
    refused = await pbx.ask(pbx_register())
    assert (refused.status, refused.reason) == (403, "Certificate Does Not Match")
    assert relayed.relay.pbx_flow(SERIAL) is None
    assert relayed.pbx_auth_errors() == 1


async def test_mtls_pbx_over_plain_tcp_gets_403(start: Start, connect: Connect) -> None:
    relayed = await start(PbxAuth.MTLS)
    pbx = await connect(relayed, Transport.TCP)
    refused = await pbx.ask(pbx_register())
    assert (refused.status, refused.reason) == (403, "PBX Must Use SIP over TLS")
    assert relayed.relay.pbx_flow(SERIAL) is None
    assert relayed.pbx_auth_errors() == 1


async def test_both_needs_the_certificate_and_the_digest(
    start: Start, connect: Connect, pki: Pki
) -> None:
    relayed = await start(PbxAuth.BOTH)
    # Without a certificate: refused before any challenge, the secret does not help.
    bare = await connect(relayed)
    assert (await bare.ask(pbx_register())).status == 403
    # With the certificate: challenged; a wrong secret is refused, the right one links.
    cert = pki.ca.issue_client("pbx", dns=(SERIAL,))
    pbx = await connect(relayed, cert=cert)
    challenge = await pbx.ask(pbx_register(1))
    assert challenge.status == 401
    wrong = await pbx.ask(pbx_register(2, digest_answer(challenge, "wrong-secret")))
    assert (wrong.status, wrong.reason) == (403, "Wrong Credentials")
    assert relayed.relay.pbx_flow(SERIAL) is None
    pbx = await connect(relayed, cert=cert)
    challenge = await pbx.ask(pbx_register(1))
    ok = await pbx.ask(pbx_register(2, digest_answer(challenge)))
    assert ok.status == 200
    assert relayed.relay.pbx_flow(SERIAL) is not None
    assert relayed.pbx_auth_errors() == 2


async def test_digest_pbx_is_challenged_even_with_a_certificate_naming_it(
    start: Start, connect: Connect, pki: Pki
) -> None:
    """A certificate links only PBXs configured for it: the default stays digest."""
    relayed = await start(PbxAuth.MTLS)
    pbx = await connect(relayed, cert=pki.ca.issue_client("pbx", dns=(OTHER,)))
    challenge = await pbx.ask(pbx_register(serial=OTHER))
    assert challenge.status == 401
    assert relayed.relay.pbx_flow(OTHER) is None


async def test_phone_without_a_certificate_registers_over_the_same_tls_listener(
    start: Start, connect: Connect, pki: Pki
) -> None:
    relayed = await start(PbxAuth.MTLS)
    pbx = await connect(relayed, cert=pki.ca.issue_client("pbx", dns=(SERIAL,)))
    assert (await pbx.ask(pbx_register())).status == 200
    phone = await connect(relayed)
    phone.writer.write(
        _request(
            "REGISTER",
            f"sip:{SERIAL}.{DOMAIN}",
            "Via: SIP/2.0/TLS 127.0.0.1:40002;branch=z9hG4bKph1",
            f"From: <sip:alice@{SERIAL}.{DOMAIN}>;tag=a1",
            f"To: <sip:alice@{SERIAL}.{DOMAIN}>",
            "Call-ID: phonereg-1",
            "CSeq: 1 REGISTER",
            "Max-Forwards: 70",
            "Contact: <sip:alice@127.0.0.1:40002;transport=tls>",
        )
    )
    forwarded = await pbx.receive()
    assert isinstance(forwarded, Request)
    assert forwarded.method == "REGISTER"
    assert "ft=" in str(forwarded.paths[0])


async def test_client_certificate_of_another_ca_does_not_complete_the_handshake(
    start: Start, connect: Connect, tmp_path_factory: pytest.TempPathFactory
) -> None:
    relayed = await start(PbxAuth.MTLS)
    stranger = ThrowawayCa.create(tmp_path_factory.mktemp("stranger"))
    cert = stranger.issue_client("pbx", dns=(SERIAL,))

    async def register() -> Response:
        pbx = await connect(relayed, cert=cert)
        return await pbx.ask(pbx_register())

    # TLS 1.3 clients finish their side first and learn of the refusal on the next read.
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await register()
    assert relayed.relay.pbx_flow(SERIAL) is None


def test_listener_trusts_the_client_ca_alone(pki: Pki) -> None:
    context = server_tls_context(pki.server, client_ca=pki.ca_file)
    assert context.verify_mode is ssl.CERT_OPTIONAL
    assert [ca["subject"] for ca in context.get_ca_certs()] == [
        ((("commonName", "softrelay throwaway CA"),),)
    ]
    assert server_tls_context(pki.server).verify_mode is ssl.CERT_NONE


def test_certificate_names_are_the_dns_and_uri_entries_of_a_verified_certificate() -> None:
    peercert = {
        "subject": ((("commonName", SERIAL),),),
        "subjectAltName": (("DNS", "a.test"), ("URI", "sip:b"), ("IP Address", "127.0.0.1")),
    }
    assert certificate_names(peercert) == ("a.test", "sip:b")
    assert certificate_names(None) == ()  # no certificate sent
    assert certificate_names({}) == ()  # sent but not verified (no client CA)


# Configuration ---------------------------------------------------------------------


def _config(tmp_path: Path, pki: Pki, body: str) -> Path:
    path = tmp_path / "softrelay.toml"
    path.write_text(body.format(cert=pki.server, ca=pki.ca_file, missing=tmp_path / "nope.pem"))
    return path


TLS = '[sip.tls]\ncert = "{cert}"\nclient_ca = "{ca}"\n'
SECRET_ENV = "SOFTRELAY_TEST_PBX_SECRET"
SECRET_KEY = f"secret = 'env:{SECRET_ENV}'\n"


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        (
            "[[sip.pbx]]\nserial = '0042137'\nauth = 'mtls'\n",
            "sip.pbx[0].auth",
            "'mtls' needs [sip.tls] client_ca",
        ),
        (
            '[sip.tls]\ncert = "{cert}"\n[[sip.pbx]]\nserial = "1"\nauth = "both"\n' + SECRET_KEY,
            "sip.pbx[0].auth",
            "'both' needs [sip.tls] client_ca",
        ),
        (
            TLS + "[[sip.pbx]]\nserial = '0042137'\nauth = 'certificate'\n",
            "sip.pbx[0].auth",
            "must be one of digest, mtls, both, got 'certificate'",
        ),
        (
            TLS + "[[sip.pbx]]\nserial = '0042137'\nauth = 'both'\n",
            "sip.pbx[0].secret",
            "is missing",
        ),
        (
            TLS + "[[sip.pbx]]\nserial = '0042137'\nauth = 'mtls'\n" + SECRET_KEY,
            "sip.pbx[0].secret",
            "is not used with auth = 'mtls'",
        ),
        ('[sip.tls]\nclient_ca = "{ca}"\n', "sip.tls.client_ca", "needs cert"),
        ('[sip.tls]\ncert = "{cert}"\nclient_ca = "{missing}"\n', "sip.tls.client_ca", "cannot"),
    ],
)
def test_config_errors_name_the_file_and_key(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch, body: str, key: str, message: str
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    path = _config(tmp_path, pki, body)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == key
    assert caught.value.file == str(path)
    assert message in caught.value.message


def test_client_ca_that_holds_no_certificate_stops_the_start(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "nope.pem").write_text("not a certificate\n")
    path = _config(tmp_path, pki, '[sip.tls]\ncert = "{cert}"\nclient_ca = "{missing}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "sip.tls.client_ca"
    assert "no usable PEM certificate" in caught.value.message


def test_mtls_pbx_needs_no_secret(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    body = TLS + "[[sip.pbx]]\nserial = '0042137'\nauth = 'mtls'\n"
    body += "[[sip.pbx]]\nserial = '0099'\n" + SECRET_KEY
    sip = load_config(_config(tmp_path, pki, body)).sip
    assert [(p.serial, p.auth) for p in sip.pbxs] == [
        ("0042137", PbxAuth.MTLS),
        ("0099", PbxAuth.DIGEST),
    ]
    assert sip.tls_client_ca == pki.ca_file
    assert transport_settings(sip, "127.0.0.1", 0).tls_client_ca == pki.ca_file
