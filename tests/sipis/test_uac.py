"""The outbound SIP client (unit, loopback peers written here): UDP retransmission on
timers E and F (T1 doubling to T2) on a manual clock, responses matched by branch and
method, TLS to a registrar with a configured CA (a Python peer here; Kamailio's TLS
module in test_tls_kamailio.py), and the digest answer from an HA1 checked by
independent code (mockphone's digest)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import secrets
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mockphone import digest
from proxy.sip.message import Request, Response
from proxy.sip.parser import parse
from proxy.sip.responses import make_response
from push.fakes.certs import ThrowawayCa
from sipis.account import Credential, SipTransport
from sipis.uac import (
    Address,
    Destination,
    Timeout,
    TransportError,
    Uac,
    UacSettings,
    digest_authorization,
    parse_challenge,
)
from tests.limits import LONGEST_WAIT
from tests.sipis.manualtime import ManualTime

WAIT = LONGEST_WAIT / 3
T1, T2 = 0.5, 4.0


def register(local: Address) -> Request:
    return Request(
        "REGISTER",
        "sip:provider.test",
        [
            ("From", "<sip:a@provider.test>;tag=1"),
            ("To", "<sip:a@provider.test>"),
            ("Call-ID", secrets.token_hex(6)),
            ("CSeq", "1 REGISTER"),
            ("Contact", f"<sip:acc@{local[0]}:{local[1]}>"),
        ],
    )


class Peer(asyncio.DatagramProtocol):
    """A UDP registrar stand-in that records what arrives (and answers if told to)."""

    def __init__(self) -> None:
        self.arrived: asyncio.Queue[Request] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None
        self.answer: list[Response] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        message = parse(data)
        assert isinstance(message, Request)
        self.arrived.put_nowait(message)


@pytest.fixture
async def udp_peer() -> AsyncIterator[tuple[Peer, int]]:
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    try:
        yield peer, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


async def test_udp_request_is_retransmitted_on_timer_e_and_times_out_on_timer_f(
    udp_peer: tuple[Peer, int],
) -> None:
    peer, port = udp_peer
    time = ManualTime()
    uac = await Uac.create(UacSettings(t1=T1, t2=T2, bind_host="127.0.0.1"), time.clock, time.sleep)
    start = time.now()
    try:
        pending = asyncio.ensure_future(
            uac.request(Destination("127.0.0.1", port, SipTransport.UDP), register)
        )
        first = await asyncio.wait_for(peer.arrived.get(), WAIT)
        sent_at = [time.now() - start]
        while not pending.done():
            await asyncio.wait_for(time.changed.wait(), WAIT)
            time.changed.clear()
            wake = time.next_wake()
            if wake is None:
                continue
            time.advance_to(wake)
            if time.now() - start < 64 * T1:
                again = await asyncio.wait_for(peer.arrived.get(), WAIT)
                assert again.serialize() == first.serialize()  # the same branch
                sent_at.append(time.now() - start)
            else:
                await asyncio.wait_for(asyncio.wait({pending}), WAIT)
        with pytest.raises(Timeout):
            pending.result()
    finally:
        await uac.close()
    # Timer E: T1, 2T1, 4T1, then T2 between sends, until timer F at 64*T1.
    assert sent_at[:5] == [0.0, 0.5, 1.5, 3.5, 7.5]
    gaps = [b - a for a, b in itertools.pairwise(sent_at)]
    assert gaps[3:] == [T2] * (len(gaps) - 3)
    assert sent_at[-1] < 64 * T1


async def test_response_is_matched_by_branch_and_method(udp_peer: tuple[Peer, int]) -> None:
    peer, port = udp_peer
    time = ManualTime()
    uac = await Uac.create(UacSettings(t1=T1, bind_host="127.0.0.1"), time.clock, time.sleep)
    try:
        pending = asyncio.ensure_future(
            uac.request(Destination("127.0.0.1", port, SipTransport.UDP), register)
        )
        request = await asyncio.wait_for(peer.arrived.get(), WAIT)
        assert peer.transport is not None
        target = ("127.0.0.1", uac.udp_port)
        # Another branch: not this transaction's; dropped.
        stray = make_response(request, 200)
        stray.set("Via", str(request.top_via.with_param("branch", "z9hG4bKother")))
        peer.transport.sendto(stray.serialize(), target)
        # Its own branch and method, 100 then 401: the final one ends it.
        peer.transport.sendto(make_response(request, 100).serialize(), target)
        peer.transport.sendto(make_response(request, 401).serialize(), target)
        response = await asyncio.wait_for(pending, WAIT)
        assert response.status == 401
        assert response.top_via.branch == request.top_via.branch
    finally:
        await uac.close()


# --- TLS ---------------------------------------------------------------------------


async def tls_registrar(ca: ThrowawayCa) -> tuple[asyncio.Server, int]:
    """A TLS registrar stand-in that answers every REGISTER 200."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(ca.issue_server())

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request = parse(head)
            assert isinstance(request, Request)
            writer.write(make_response(request, 200).serialize())
            await writer.drain()
            await reader.read()  # until the client closes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    return server, server.sockets[0].getsockname()[1]


async def test_tls_registrar_is_reached_with_the_configured_ca(tmp_path: Path) -> None:
    ca = ThrowawayCa.create(tmp_path)
    server, port = await tls_registrar(ca)
    time = ManualTime()
    trusting = await Uac.create(UacSettings(ca_file=ca.write_cert()), time.clock, time.sleep)
    system = await Uac.create(UacSettings(), time.clock, time.sleep)
    try:
        destination = Destination("localhost", port, SipTransport.TLS)
        response = await asyncio.wait_for(trusting.request(destination, register), WAIT)
        assert response.status == 200
        assert response.top_via.transport == "TLS"
        with pytest.raises(TransportError, match="TLS handshake failed"):
            await asyncio.wait_for(system.request(destination, register), WAIT)
    finally:
        await trusting.close()
        await system.close()
        server.close()
        await server.wait_closed()


async def test_refused_connection_is_a_transport_error() -> None:
    time = ManualTime()
    uac = await Uac.create(UacSettings(), time.clock, time.sleep)
    with socket_closed_port() as port, pytest.raises(TransportError, match="connection refused"):
        await asyncio.wait_for(
            uac.request(Destination("127.0.0.1", port, SipTransport.TCP), register), WAIT
        )
    await uac.close()


class socket_closed_port:
    """A loopback TCP port nobody listens on (bound, never listening)."""

    def __enter__(self) -> int:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        port: int = self._sock.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


# --- digest --------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_digest_answer_from_the_ha1_proves_the_password(algorithm: str) -> None:
    hash_ = hashlib.md5 if algorithm == "MD5" else hashlib.sha256
    ha1 = hash_(b"alice:provider.test:secret").hexdigest()
    credential = Credential(
        "alice",
        "provider.test",
        ha1_md5=ha1 if algorithm == "MD5" else None,
        ha1_sha256=ha1 if algorithm == "SHA-256" else None,
    )
    challenge = parse_challenge(digest.challenge("provider.test", "n0nce", algorithm))
    header = digest_authorization(
        challenge, credential, method="REGISTER", uri="sip:provider.test", nc=1, cnonce="c1"
    )
    assert digest.proves(header, username="alice", password="secret", method="REGISTER")
    assert not digest.proves(header, username="alice", password="wrong", method="REGISTER")
    params = digest.params(header)
    assert (params["qop"], params["nc"], params["algorithm"]) == ("auth", "00000001", algorithm)
