"""Two nodes sharing one SIP port, as the workers of `serve --workers N` do
(SO_REUSEPORT): the kernel hands a peer's UDP datagram to the node its 4-tuple hashes
to, often not the one that sent the request.

So a node sends its requests to a UDP peer it chose (a static PBX) from a socket of its
own, which its Via names: the answers come back to it, and never cross the internal
link; Path and Record-Route still name the shared port. A request sent from the shared
port (to a phone's NAT binding) is still answered there: a node given such an answer
(here directly, on its socket's receive path, as the kernel's choice is not ours)
forwards it over the link to the node its Via names, which takes it as come on its own
UDP flow to that peer, and no other."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any, cast

import pytest

from mockphone import sipwire
from mockphone.sipwire import sip_message
from proxy.sip.flow import Flow, Transport
from proxy.sip.message import Request, Response
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


def _handled_here(node: Node, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Set once `node` has handled a response that came on one of its own sockets."""
    handled = asyncio.Event()
    original = node.relay._response

    async def response(response: Response, flow: Flow, shared: Flow | None = None) -> None:
        await original(response, flow, shared)
        handled.set()

    monkeypatch.setattr(node.relay, "_response", response)
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


def _frames(node: Node, kind: str) -> float:
    """Frames of `kind` `node` sent over the internal link."""
    value = node.server.app[REGISTRY].get_sample_value(
        "softrelay_node_frames_total", {"way": "out", "kind": kind}
    )
    return value or 0.0


def _own_udp(node: Node) -> tuple[str, int]:
    own = node.server.app[SIP_TRANSPORTS].own_udp_address
    assert own is not None
    return own


Registering = asyncio.Task[tuple[sipwire.Response, sipwire.Response]]  # the phone's answers


async def _register_reaches(
    phone: TcpPhone, pbx: _Pbx
) -> tuple[Registering, Request, tuple[str, int]]:
    """The phone REGISTERs (its task, answered once the PBX answers) and the PBX gets
    the REGISTER: that request and the address it came from."""
    registering = asyncio.create_task(phone.digest_register("alice", PHONE_DOMAIN, None, tag="ph"))
    async with asyncio.timeout(STEP_TIMEOUT):
        data, source = await pbx.received.get()
    register = parse(data)
    assert isinstance(register, Request)
    assert register.method == "REGISTER"
    return registering, register, source


async def _refused(
    transport: asyncio.DatagramTransport,
    register: Request,
    source: tuple[str, int],
    reason: str,
    registering: Registering,
    phone: TcpPhone,
) -> None:
    """The PBX answers the REGISTER 403 `reason` to `source`; the phone gets that."""
    transport.sendto(make_response(register, 403, reason).serialize(), source)
    async with asyncio.timeout(STEP_TIMEOUT):
        first, _ = await registering
    assert (first.status, first.reason) == (403, reason), phone.last()


async def test_a_request_to_a_static_udp_pbx_goes_from_the_node_s_own_socket_and_is_answered_there(
    start_node: StartNode,
) -> None:
    """The PBX answers where the Via says (RFC 3261 18.2.2), the sending node's own
    socket: the answer reaches the caller without crossing the link. The Path names
    the shared port, which the PBX's calls to the phone may reach on either node."""
    loop = asyncio.get_running_loop()
    transport, pbx = await loop.create_datagram_endpoint(_Pbx, local_addr=("127.0.0.1", 0))
    pbx_address = transport.get_extra_info("sockname")[:2]
    try:
        a, b = await _sharing(start_node, pbx_address)
        assert _own_udp(a) != _own_udp(b)
        assert a.sip_port not in (_own_udp(a)[1], _own_udp(b)[1])
        phone = await TcpPhone.connect(a.sip_port)  # on A or B: the kernel's choice
        try:
            registering, register, source = await _register_reaches(phone, pbx)
            sender, _ = _sender_and_other(register, a, b)
            assert source == _own_udp(sender)
            via = register.top_via
            assert (via.host, via.port) == source
            path = register.get("Path") or ""
            assert path.startswith(f"<sip:127.0.0.1:{a.sip_port};"), path
            await _refused(transport, register, source, "Not Here", registering, phone)
            assert _not_from_target(sender) == 0
            assert _frames(a, "response") == _frames(b, "response") == 0
        finally:
            await phone.close()
    finally:
        transport.close()


async def test_an_answer_to_the_own_socket_s_request_that_comes_to_the_shared_port_is_dropped(
    start_node: StartNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The branch is sealed to the flow on the node's own socket: the same answer from
    the PBX's address on the shared port, taken in by either node, is not that flow's."""
    loop = asyncio.get_running_loop()
    transport, pbx = await loop.create_datagram_endpoint(_Pbx, local_addr=("127.0.0.1", 0))
    pbx_address = transport.get_extra_info("sockname")[:2]
    try:
        a, b = await _sharing(start_node, pbx_address)
        phone = await TcpPhone.connect(a.sip_port)
        try:
            registering, register, source = await _register_reaches(phone, pbx)
            sender, other = _sender_and_other(register, a, b)
            forged = make_response(register, 200, "Forged").serialize()
            handled = _handled(sender, monkeypatch)
            _received_on_udp(other, forged, pbx_address)  # crosses the link, then dropped
            async with asyncio.timeout(STEP_TIMEOUT):
                await handled.wait()
            assert _not_from_target(sender) == 1
            handled = _handled_here(sender, monkeypatch)
            _received_on_udp(sender, forged, pbx_address)  # on the sender's shared socket
            async with asyncio.timeout(STEP_TIMEOUT):
                await handled.wait()
            assert _not_from_target(sender) == 2
            await _refused(transport, register, source, "Real", registering, phone)
        finally:
            await phone.close()
    finally:
        transport.close()


class _UdpPhone(asyncio.DatagramProtocol):
    """A phone on UDP: its NAT binding is to the shared port."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait(data)

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    async def next(self) -> Request | Response:
        async with asyncio.timeout(STEP_TIMEOUT):
            return parse(await self.received.get())


async def test_a_phone_s_udp_answer_taken_in_by_the_other_node_reaches_the_pbx(
    start_node: StartNode,
) -> None:
    """A call from the static PBX to a phone on UDP goes out from the shared port (the
    phone's NAT binding); the phone's answer, given to the other node, crosses the link
    to the node that sent the INVITE and is checked against its own flow to the phone."""
    loop = asyncio.get_running_loop()
    pbx_transport, pbx = await loop.create_datagram_endpoint(_Pbx, local_addr=("127.0.0.1", 0))
    pbx_address = pbx_transport.get_extra_info("sockname")[:2]
    phone_transport, phone = await loop.create_datagram_endpoint(
        _UdpPhone, local_addr=("127.0.0.1", 0)
    )
    try:
        a, b = await _sharing(start_node, pbx_address)
        shared = ("127.0.0.1", a.sip_port)
        here = f"127.0.0.1:{phone.address[1]}"
        phone_transport.sendto(
            sip_message(
                f"REGISTER sip:{PHONE_DOMAIN} SIP/2.0",
                f"Via: SIP/2.0/UDP {here};branch=z9hG4bK-reg-1;rport",
                f"From: <sip:alice@{PHONE_DOMAIN}>;tag=ph",
                f"To: <sip:alice@{PHONE_DOMAIN}>",
                "Call-ID: udp-phone-reg",
                "CSeq: 1 REGISTER",
                "Max-Forwards: 70",
                f"Contact: <sip:alice@{here}>",
                "Expires: 600",
            ),
            shared,
        )
        async with asyncio.timeout(STEP_TIMEOUT):
            data, source = await pbx.received.get()
        register = parse(data)
        assert isinstance(register, Request)
        holder, other = _sender_and_other(register, a, b)  # took the phone's datagram
        path = register.get("Path") or ""
        contact = register.get("Contact") or ""
        ok = make_response(register, 200, None, (("Contact", contact),))
        pbx_transport.sendto(ok.serialize(), source)
        registered = await phone.next()
        assert isinstance(registered, Response), registered
        assert registered.status == 200, registered
        invite = sip_message(
            f"INVITE sip:alice@{here} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{pbx_address[1]};branch=z9hG4bK-pbx-inv-1",
            f"Route: {path}",
            f"From: <sip:pbx@{PHONE_DOMAIN}>;tag=pbx1",
            f"To: <sip:alice@{PHONE_DOMAIN}>",
            "Call-ID: udp-phone-call",
            "CSeq: 1 INVITE",
            "Max-Forwards: 70",
            f"Contact: <sip:pbx@127.0.0.1:{pbx_address[1]}>",
        )
        _received_on_udp(holder, invite, pbx_address)  # on the shared port
        forwarded = await phone.next()
        assert isinstance(forwarded, Request), forwarded
        assert forwarded.method == "INVITE", forwarded
        ringing = make_response(forwarded, 180, None, to_tag="ph-call").serialize()
        _received_on_udp(other, ringing, phone.address)  # the kernel's other choice
        async with asyncio.timeout(STEP_TIMEOUT):
            data, _ = await pbx.received.get()
        answer = parse(data)
        assert isinstance(answer, Response), answer
        assert answer.status == 180, answer
        assert answer.top_via.branch == "z9hG4bK-pbx-inv-1"
        assert _frames(other, "response") == 1
        assert _not_from_target(holder) == _not_from_target(other) == 0
    finally:
        phone_transport.close()
        pbx_transport.close()


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
