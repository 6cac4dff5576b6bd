"""Two nodes sharing one SIP port, as the workers of `serve --workers N` do
(SO_REUSEPORT): the kernel hands a peer's UDP datagram to the node its 4-tuple hashes
to, often not the one that sent the request. Which one it picks is the kernel's, so
the datagram is given here to the other node's UDP socket directly (its receive path,
with the peer's source address): it goes over the internal link to the node named by
its Via, which takes it as come on its own UDP flow to that peer, and no other."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.sip.flow import Flow, Transport
from proxy.sip.message import Request
from proxy.sip.overload import OverloadSettings
from proxy.sip.parser import parse
from proxy.sip.responses import make_response
from proxy.sip.settings import PbxSettings, SipSettings
from proxy.sip.tokens import node_of
from softrelay.app import REGISTRY, SIP_TRANSPORTS
from tests.cluster.world import PBX_SECRET, Node, StartNode, cluster_secret, start_node
from tests.peers import DOMAIN, PHONE_DOMAIN, SERIAL, STEP_TIMEOUT
from tests.sip.test_wake_e2e import CallingPbx, TcpPhone

__all__ = ["cluster_secret", "start_node"]  # fixtures


def _sip(static: tuple[str, int] | None) -> SipSettings:
    return SipSettings(
        DOMAIN,
        (PbxSettings(SERIAL, PBX_SECRET, static=static),),
        overload=OverloadSettings(lag=0),
        reuse_port=True,
    )


async def _sharing(start_node: StartNode, static: tuple[str, int] | None) -> tuple[Node, Node]:
    """Nodes A and B on one SIP port, UDP and TCP (port 0 would give each its own)."""
    with _reserved_port() as port:
        a = await start_node("a", sip=_sip(static), sip_listen=("127.0.0.1", port))
        b = await start_node("b", sip=_sip(static), sip_listen=("127.0.0.1", port))
    assert a.sip_port == b.sip_port == port
    for node in (a, b):
        assert node.server.app[SIP_TRANSPORTS].address(Transport.UDP) == ("127.0.0.1", port)
    return a, b


@contextlib.contextmanager
def _reserved_port() -> Iterator[int]:
    """A port free for both UDP and TCP, held (SO_REUSEPORT, as the nodes bind it) until
    both nodes listen on it, then let go: no connection may wait on these sockets."""
    for _ in range(100):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for sock in (tcp, udp):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            tcp.bind(("127.0.0.1", 0))
            udp.bind(("127.0.0.1", tcp.getsockname()[1]))
        except OSError:
            tcp.close()
            udp.close()
            continue
        try:
            yield tcp.getsockname()[1]
        finally:
            tcp.close()
            udp.close()
        return
    raise AssertionError("no port free for both UDP and TCP")


def _received_on_udp(node: Node, data: bytes, source: tuple[str, int]) -> None:
    """`data` as if `node`'s socket on the shared port received it from `source`."""
    udp = node.server.app[SIP_TRANSPORTS]._udp
    assert udp is not None
    udp.datagram_received(data, source)


def _not_from_target(node: Node) -> float:
    value = node.server.app[REGISTRY].get_sample_value(
        "softrelay_sip_errors_total", {"reason": "response_not_from_target"}
    )
    return value or 0.0


def _handled(node: Node, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Set once `node` has handled a response forwarded to it over the link."""
    handled = asyncio.Event()
    original = node.relay.node_response

    async def node_response(data: bytes, flow: Flow, udp: Any = None) -> None:
        await original(data, flow, udp)
        handled.set()

    monkeypatch.setattr(node.relay, "node_response", node_response)
    return handled


class _Pbx(asyncio.DatagramProtocol):
    """A PBX configured by static UDP address: what it receives, in order."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait((data, (addr[0], addr[1])))


def _sender_and_other(request: Request, a: Node, b: Node) -> tuple[Node, Node]:
    """The node whose Via tops `request` (it sealed the branch), and the other one."""
    sender = node_of(request.top_via.params.get("ft") or "")
    assert sender in (a.nodes.node_id, b.nodes.node_id), sender
    return (a, b) if sender == a.nodes.node_id else (b, a)


async def test_a_udp_response_taken_in_by_the_other_node_reaches_the_caller(
    start_node: StartNode,
) -> None:
    loop = asyncio.get_running_loop()
    transport, pbx = await loop.create_datagram_endpoint(_Pbx, local_addr=("127.0.0.1", 0))
    pbx_address = transport.get_extra_info("sockname")[:2]
    try:
        a, b = await _sharing(start_node, pbx_address)
        phone = await TcpPhone.connect(a.sip_port)  # on A or B: the kernel's choice
        try:
            registering = asyncio.create_task(
                phone.digest_register("alice", PHONE_DOMAIN, None, tag="ph")
            )
            async with asyncio.timeout(STEP_TIMEOUT):
                data, source = await pbx.received.get()
            register = parse(data)
            assert isinstance(register, Request)
            assert register.method == "REGISTER"
            assert source[1] == a.sip_port  # sent from the shared UDP port
            sender, other = _sender_and_other(register, a, b)
            answer = make_response(register, 403, "Not Here").serialize()
            _received_on_udp(other, answer, pbx_address)
            async with asyncio.timeout(STEP_TIMEOUT):
                first, _ = await registering
            assert (first.status, first.reason) == (403, "Not Here"), phone.last()
            assert _not_from_target(sender) == 0
        finally:
            await phone.close()
    finally:
        transport.close()


async def test_a_response_to_a_request_sent_on_a_stream_is_dropped_when_forwarded_as_udp(
    start_node: StartNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await _sharing(start_node, None)
    pbx = await CallingPbx.connect(a.sip_port)
    phone = await TcpPhone.connect(a.sip_port)
    try:
        assert await pbx.link(PBX_SECRET) == 200, pbx.last()
        registering = asyncio.create_task(
            phone.digest_register("alice", PHONE_DOMAIN, None, tag="ph")
        )
        received = await pbx.request("REGISTER")  # over the PBX's TCP link
        register = parse(received.serialize())
        assert isinstance(register, Request)
        sender, other = _sender_and_other(register, a, b)
        # The PBX's TCP address, stated by the other node as a UDP source on the shared
        # port: the branch is sealed to the stream the request went on, not to that.
        pbx_address = pbx.writer.get_extra_info("sockname")[:2]
        forged = make_response(register, 200, "Forged").serialize()
        handled = _handled(sender, monkeypatch)
        _received_on_udp(other, forged, (pbx_address[0], pbx_address[1]))
        async with asyncio.timeout(STEP_TIMEOUT):
            await handled.wait()
        assert _not_from_target(sender) == 1
        await pbx.send(make_response(register, 403, "Real").serialize())
        async with asyncio.timeout(STEP_TIMEOUT):
            first, _ = await registering
        assert (first.status, first.reason) == (403, "Real"), phone.last()
    finally:
        await phone.close()
        await pbx.close()
