"""The internal SIP link between the nodes of a cluster.

Each node holds its own connections (PBX links, phone flows) and makes its own tokens,
which name it (proxy/sip/tokens.py). What arrives on one node for a flow held by
another goes there over this link, as SIP with a small header:

    phone ──► B ──REGISTER, deliver to flow F──► A ──► PBX (linked on A, `pbx:` in Redis)
    PBX   ──► A ──INVITE, route "Path of B" from flow F──► B ──► phone
    phone ──► B ──200, response that came on flow P──► ... (Via names the node that sent)

On the receiving node the other node's flow is a `Flow` whose sender writes back over
the link (`remote_flow`): the relay routes, seals and checks as on one node, and the
flow's end on its node (a `closed` notice) ends it here too.

Frames: `deliver` (write these bytes on your flow f), `route` (a request that came on
my flow f, to follow this Route of yours), `response` (a response that came on my flow
f, whose Via is yours; on UDP with the local address it came to, which may be the SIP
port we share as workers), `closed` (my flow f ended), `app` (a message from a SIPIS
app on my flow f, for account a, whose lease you hold: sipis/appleg.py checked the
device secret here and handles it there; your answers come back as `deliver`). A node
forwards only what arrived on its own flows: a message that came over the link is never
sent on to a third node.

Authentication, by the cluster secret (no TLS: the link is meant for a private network,
or a tunnel; see README "Running a cluster"): on connect, the listening node sends a
nonce; the dialling node answers with its node id, a nonce of its own and an HMAC of
both under the secret; the listener proves the secret back. Every frame then carries an
HMAC under a key of that connection (both nonces) over its sequence number and bytes,
so a frame cannot be forged, replayed on another connection, reordered or dropped
unnoticed. A connection that fails any of these is closed at once. Frames flow one way:
each node dials the others to send, and reads what the others' connections bring.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter

from cluster.location import (
    LINK_REFRESH,
    Location,
    Registration,
    format_address,
    parse_address,
)
from cluster.redis import ClusterUnavailable
from privacy.clock import Clock
from privacy.store import Subject
from privacy.tasks import Tasks
from proxy.sip.flow import Address, Flow, FlowClosed, Transport
from proxy.sip.message import Request
from proxy.sip.parser import parse
from proxy.sip.relay import Relay
from proxy.sip.responses import make_response
from proxy.sip.syntax import SipParseError
from proxy.sip.wake import PushIdentity

log = logging.getLogger("softrelay.sip.nodes")

MAGIC = b"SRN1"
NONCE = 16
MAC = 16  # bytes of HMAC-SHA-256 kept in each frame
MAX_FRAME = 256 * 1024  # a SIP message (the transports' limit is lower) and its header
HANDSHAKE_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0
MAX_REMOTE_FLOWS = 100_000  # other nodes' flows known here, at most
# A registration another node stored is the phone of a parked call only if it was
# accepted after the call was parked (less this much for the nodes' clocks).
CLOCK_SKEW = 2.0
CLOSE_GRACE = 2.0  # seconds for the last location writes at shutdown
MAX_PENDING = 64  # frames of one flow waiting before the link stops being read
_LENGTH = struct.Struct(">I")
_SEQ = struct.Struct(">Q")


# SIPIS mode's app leg on this node (sipis/appleg.py `AppLeg.from_node`): the account id
# the other node authenticated, the flow standing in for the app's, the message.
AppHandler = Callable[[str, Flow, bytes], Awaitable[None]]


class LinkRefused(Exception):
    """The other end does not prove the cluster secret, or breaks the framing."""


class NodeUnreachable(Exception):
    """No live node of that id, or its link cannot be dialled now."""


@dataclass(eq=False, slots=True)
class _Session:
    key: bytes
    seq: int = 0

    def seal(self, body: bytes) -> bytes:
        mac = hmac.digest(self.key, _SEQ.pack(self.seq) + body, "sha256")[:MAC]
        self.seq += 1
        return _LENGTH.pack(MAC + len(body)) + mac + body

    def open(self, frame: bytes) -> bytes:
        mac, body = frame[:MAC], frame[MAC:]
        expected = hmac.digest(self.key, _SEQ.pack(self.seq) + body, "sha256")[:MAC]
        if not hmac.compare_digest(mac, expected):
            raise LinkRefused("frame not sealed with this connection's key")
        self.seq += 1
        return body


@dataclass(eq=False, slots=True)
class _Out:
    """This node's connection to another, to send on."""

    writer: asyncio.StreamWriter
    session: _Session
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(eq=False, slots=True)
class _Pending:
    """Frames of one flow waiting for its worker."""

    frames: deque[tuple[dict[str, Any], bytes]] = field(default_factory=deque)
    drained: asyncio.Event = field(default_factory=asyncio.Event)


class _NodeSender:
    """A flow of another node, as the relay sends on it."""

    def __init__(self, nodes: Nodes, node: str, flow_id: int) -> None:
        self._nodes = nodes
        self.node = node
        self.flow_id = flow_id

    async def send(self, data: bytes) -> None:
        try:
            await self._nodes.send(self.node, {"k": "deliver", "f": self.flow_id}, data)
        except NodeUnreachable as exc:
            raise FlowClosed(self.flow_id) from exc

    def close(self) -> None:
        pass  # the flow is the other node's: it closes there


class NodeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.frames = Counter(
            "softrelay_node_frames",
            "Frames on the internal link",
            ["way", "kind"],
            registry=registry,
        )
        self.refused = Counter(
            "softrelay_node_links_refused",
            "Internal link connections closed for failing the cluster secret or framing",
            registry=registry,
        )


class Nodes:
    """This node's side of the internal link, and the relay's `Cluster`."""

    def __init__(
        self,
        relay: Relay,
        location: Location,
        secret: str,
        clock: Clock,
        registry: CollectorRegistry,
    ) -> None:
        self.relay = relay
        self.location = location
        self.node_id = location.node_id
        self._secret = hashlib.sha256(b"softrelay node link\0" + secret.encode()).digest()
        self._clock = clock
        self._server: asyncio.Server | None = None
        self.address: Address = ("127.0.0.1", 0)
        self._out: dict[str, _Out] = {}
        self._dialing: dict[str, asyncio.Lock] = {}
        self._remote: dict[tuple[str, int], Flow] = {}
        # Our flows another node knows of: they hear of its end (`closed`).
        self._told: dict[int, set[str]] = {}
        self._readers: set[asyncio.StreamWriter] = set()
        self._dialled: dict[str, asyncio.Event] = {}  # set once we have dialled it
        # Nodes with a connection open to us, and the link address each proved.
        self._announced: dict[str, tuple[asyncio.StreamWriter, Address]] = {}
        self._pending: dict[tuple[str, bool, int], _Pending] = {}
        self._tasks = Tasks(log, "nodes.task_failed")  # location writes, `closed` notices
        self._loops = Tasks(log, "nodes.task_failed")  # refresher, watchers, early dials
        self._links = Tasks(log, "nodes.task_failed")  # readers of the others' connections
        self.metrics = NodeMetrics(registry)
        self.app_handler: AppHandler | None = None  # SIPIS mode (softrelay/app.py)

    @classmethod
    async def start(
        cls,
        relay: Relay,
        location: Location,
        secret: str,
        listen: Address,
        clock: Clock,
        registry: CollectorRegistry,
    ) -> Nodes:
        """Listen on `listen`, join the relay to the cluster, take registration events."""
        self = cls(relay, location, secret, clock, registry)
        self._server = await asyncio.start_server(self._accept, *listen)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = (host, port)
        relay.join(self.node_id, self)
        relay.listening(((Transport.TCP, self.address),))
        await location.listen(self._registration, self._reread)
        self._loops.spawn(self._refresh_links(), name="nodes-link-refresh")
        return self

    async def close(self) -> None:
        """After the transports stopped: the entries of the links they closed are
        deleted (bounded), then the link's connections close."""
        if self._server is not None:
            self._server.close()
        await self._loops.close()
        await self._tasks.wait(CLOSE_GRACE)
        for writer in [*self._readers, *(out.writer for out in self._out.values())]:
            writer.close()
        self._out.clear()
        await self._links.close()
        await self._tasks.close()
        for flow in list(self._remote.values()):
            flow.close()

    async def settle(self, within: float | None = None) -> bool:
        """Wait for the location writes and notices under way; whether none is left."""
        return await self._tasks.wait(within)

    # --- the relay's Cluster -----------------------------------------------------------

    async def pbx_flow(self, serial: str) -> Flow | None:
        # ClusterUnavailable goes to the relay: 503 with Retry-After, not "not linked".
        found = await self.location.pbx(serial)
        if found is None or found[0] == self.node_id:
            return None  # ours but gone (its entry outlived it): not linked
        return self.remote_flow(found[0], found[1], serial)

    async def forward_response(self, node: str, data: bytes, flow: Flow) -> bool:
        header: dict[str, Any] = {"k": "response"}
        if flow.transport is Transport.UDP:
            # The socket it came on: under `serve --workers N` the SIP port is shared,
            # and `node` may have sent the request from it (`Relay.node_response`).
            header["u"] = list(flow.local)
        return await self._forward(node, header, data, flow)

    async def forward_route(self, node: str, request: Request, flow: Flow, route: str) -> bool:
        return await self._forward(node, {"k": "route", "route": route}, request.serialize(), flow)

    async def forward_app(self, node: str, account_id: str, data: bytes, flow: Flow) -> bool:
        """A message from the SIPIS app on our `flow`, for `account_id`, whose lease `node`
        holds (sipis/appleg.py, which checked the app's device secret here). There the
        flow stands in as the app's connection: with its transport and our address on
        it, which our Via and Record-Route name to the app."""
        header = {"k": "app", "a": account_id, "t": flow.transport.value, "l": list(flow.local)}
        return await self._forward(node, header, data, flow)

    async def pbx_linked(self, serial: str, flow: Flow, expires: int) -> None:
        # Awaited before the PBX's 200: once linked, every node finds it. Refreshed by
        # `_refresh_links` for as long as the flow lasts, whatever the link's expiry.
        await self._location("pbx link", self.location.link_pbx({serial: flow.id}))

    async def _refresh_links(self) -> None:
        """Every LINK_REFRESH seconds, the entries of the PBX links this node holds: they
        outlive the node by a minute at most, and come back after Redis restarted."""
        while True:
            await asyncio.sleep(LINK_REFRESH)
            links = {serial: flow.id for serial, flow in self.relay.pbx_links().items()}
            await self._location("pbx link refresh", self.location.link_pbx(links))

    def pbx_unlinked(self, serial: str, flow: Flow) -> None:
        self._tasks.spawn(self._location("pbx unlink", self.location.unlink_pbx(serial, flow.id)))

    def registered(
        self, identity: PushIdentity, subject: Subject, instance: str, flow: Flow, expires: int
    ) -> None:
        fingerprints = self.location.fingerprints
        binding = self._binding(identity, subject)
        write = self.location.registered(
            binding, fingerprints.instance(instance), flow.id, expires, self._clock.now()
        )
        self._tasks.spawn(self._location("registration", write))

    async def _location(self, what: str, write: Any) -> None:
        try:
            await write
        except ClusterUnavailable as exc:
            # The entry lapses or stays stale until the next REGISTER; calls that need it
            # get 480 meanwhile (nothing is routed to a flow not known to be there).
            log.warning(
                "nodes.location_failed", extra={"fields": {"what": what, "error": str(exc)}}
            )

    def _binding(self, identity: PushIdentity, subject: Subject) -> str:
        return self.location.fingerprints.binding(
            identity.service.value, identity.token, subject.sip_username, subject.pbx_serial
        )

    # --- wake across nodes -------------------------------------------------------------

    async def _registration(self, event: Registration) -> None:
        if event.node != self.node_id:
            await self._release(event, parked_before=None)

    async def _reread(self) -> None:
        """After (re)subscribing: what this node holds is written again (a restarted
        Redis is empty: the others would not find our PBXs, nor us, until the next
        refresh), then the registrations we may have missed, for the calls parked here
        (only those accepted after the call was parked release it). ClusterUnavailable
        goes to the subscriber, which drops its connection and subscribes again later:
        swallowed here, the round would count as done with nothing written back, and
        nothing would write again before the next refresh."""
        links = {serial: flow.id for serial, flow in self.relay.pbx_links().items()}
        await self.location.republish(links)
        for node in await self.location.live_nodes():
            self._dial_soon(node)
        seen: set[str] = set()
        for identity, subject in self.relay.parking.parked_calls():
            binding = self._binding(identity, subject)
            if binding in seen:
                continue
            seen.add(binding)
            event = await self.location.registration(binding)
            if event is not None and event.node != self.node_id:
                await self._release(event, parked_before=event.at + CLOCK_SKEW)

    async def _release(self, event: Registration, parked_before: float | None) -> None:
        fingerprints = self.location.fingerprints

        def released(
            identity: PushIdentity, subject: Subject, instances: frozenset[str], parked_at: float
        ) -> bool:
            if self._binding(identity, subject) != event.binding:
                return False
            if parked_before is not None and parked_at > parked_before:
                return False
            return (
                not instances
                or "" in instances
                or event.instance in {fingerprints.instance(i) for i in instances}
            )

        flow = self.remote_flow(event.node, event.flow_id, None)
        if flow is not None:
            await self.relay.parking.deliver_where(released, flow)

    # --- other nodes' flows ------------------------------------------------------------

    def remote_flow(
        self,
        node: str,
        flow_id: int,
        serial: str | None,
        remote: Address | None = None,
        *,
        transport: Transport = Transport.TCP,
        local: Address | None = None,
    ) -> Flow | None:
        """The flow standing here for flow `flow_id` of `node` (made on first use); an
        app's (`app` frames) keeps the transport and local address it has there."""
        flow = self._remote.get((node, flow_id))
        if flow is None:
            if len(self._remote) >= MAX_REMOTE_FLOWS:
                return None
            sender = _NodeSender(self, node, flow_id)
            flow = Flow(transport, remote or (node, 0), local or self.address, sender)
            self._remote[(node, flow_id)] = flow
            flow.on_close.append(lambda gone: self._forget_remote(node, flow_id))
        elif remote is not None:
            flow.remote = remote
        self.relay.remote_flow(flow, serial)
        return flow

    def _forget_remote(self, node: str, flow_id: int) -> None:
        self._remote.pop((node, flow_id), None)

    async def _forward(self, node: str, header: dict[str, Any], data: bytes, flow: Flow) -> bool:
        header = {**header, "f": flow.id, "r": list(flow.remote)}
        serial = self.relay.serial_of(flow)
        if serial is not None:
            header["s"] = serial
        self.relay.watch(flow)  # its answers come back by its id
        self._note(flow, node)
        try:
            await self.send(node, header, data)
        except NodeUnreachable:
            return False
        return True

    def _note(self, flow: Flow, node: str) -> None:
        """`node` knows of our `flow`: it hears when the flow ends."""
        told = self._told.get(flow.id)
        if told is None or not told:
            if told is None:
                told = self._told[flow.id] = set()
            flow.on_close.append(self._flow_closed)
        told.add(node)

    def _flow_closed(self, flow: Flow) -> None:
        for node in self._told.pop(flow.id, ()):
            self._tasks.spawn(self._tell_closed(node, flow.id))

    async def _gone(self, node: str, flow_id: int, data: bytes) -> None:
        """`node` sent on our flow `flow_id`, which is gone: a request gets 480 as if
        from that flow (its Via is the node's, sealed to the flow it sent to, so the
        node routes it), then the node hears that the flow ended, in that order."""
        try:
            request = parse(data)
        except SipParseError:
            request = None
        if isinstance(request, Request) and request.method != "ACK":
            answer = make_response(request, 480, "Flow Gone").serialize()
            with contextlib.suppress(NodeUnreachable):
                await self.send(node, {"k": "response", "f": flow_id}, answer)
        await self._tell_closed(node, flow_id)

    async def _tell_closed(self, node: str, flow_id: int) -> None:
        # Unreachable: it is gone, or learns on its next `deliver` (answered `closed`).
        with contextlib.suppress(NodeUnreachable):
            await self.send(node, {"k": "closed", "f": flow_id}, b"")

    # --- sending -----------------------------------------------------------------------

    async def send(self, node: str, header: dict[str, Any], data: bytes) -> None:
        body = orjson.dumps(header) + b"\n" + data
        for attempt in (1, 2):  # a connection the other node closed is dialled again once
            out = await self._connection(node)
            async with out.lock:
                try:
                    out.writer.write(out.session.seal(body))
                    await out.writer.drain()
                except (ConnectionError, OSError) as exc:
                    if self._out.get(node) is out:
                        del self._out[node]
                    out.writer.close()
                    if attempt == 2:
                        raise NodeUnreachable(node) from exc
                    continue
            self.metrics.frames.labels("out", str(header["k"])).inc()
            return

    async def _connection(self, node: str) -> _Out:
        out = self._out.get(node)
        if out is not None and not out.writer.is_closing():
            return out
        lock = self._dialing.setdefault(node, asyncio.Lock())
        async with lock:
            out = self._out.get(node)
            if out is not None and not out.writer.is_closing():
                return out
            address = await self._address(node)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    reader, writer = await asyncio.open_connection(*address)
                    session = await self._hello(reader, writer, node)
            except (OSError, TimeoutError, LinkRefused, asyncio.IncompleteReadError) as exc:
                log.warning(
                    "nodes.dial_failed",
                    extra={"fields": {"node": node, "error": type(exc).__name__}},
                )
                raise NodeUnreachable(node) from exc
            out = self._out[node] = _Out(writer, session)
            self._dialled.setdefault(node, asyncio.Event()).set()
            # The other end never sends after the handshake: its close is all we read.
            self._loops.spawn(self._watch(node, out, reader))
            return out

    async def dialled(self, node: str) -> None:
        """Until this node has had a connection of its own to `node` (tests)."""
        await self._dialled.setdefault(node, asyncio.Event()).wait()

    def _dial_soon(self, node: str) -> None:
        """Open our connection to `node` now, in the background, rather than on the
        first message for it: that dial (a Redis read, a connect, the handshake) would
        hold up the flow whose answer waits to go there, and behind it every message of
        that flow (a UDP flow drops what queues past its limit). Done for every live
        node after each (re)subscribe, and for a node as soon as it has dialled us."""
        if node == self.node_id or self._loops.closed:
            return
        out = self._out.get(node)
        lock = self._dialing.get(node)
        if (out is not None and not out.writer.is_closing()) or (lock and lock.locked()):
            return
        self._loops.spawn(self._dial_quietly(node), name="nodes-dial")

    async def _dial_quietly(self, node: str) -> None:
        with contextlib.suppress(NodeUnreachable):  # logged by `_connection`; dialled again on use
            await self._connection(node)

    async def _address(self, node: str) -> Address:
        """Where `node`'s link listens: its heartbeat says, or else the address it
        proved in the handshake of a connection it holds open to us now. Redis may not
        know a live node for a moment (restarted empty, the node's heartbeat not yet
        written again): a response to a request it just sent us must still reach it."""
        try:
            address = await self.location.address(node)
        except ClusterUnavailable:
            address = None
        if address is None:
            announced = self._announced.get(node)
            if announced is None or announced[0].is_closing():
                raise NodeUnreachable(node)
            address = announced[1]
        return address

    async def _watch(self, node: str, out: _Out, reader: asyncio.StreamReader) -> None:
        """The other node closes our connection only when it stops or dies: its flows
        are gone, and the requests sent on them, or routed to it, get their answer here
        (the relay)."""
        with contextlib.suppress(ConnectionError, OSError):
            await reader.read()
        if self._out.get(node) is out:
            del self._out[node]
        out.writer.close()
        gone = [flow for (owner, _), flow in self._remote.items() if owner == node]
        if gone:
            log.info("nodes.link_lost", extra={"fields": {"node": node, "flows": len(gone)}})
        for flow in gone:
            flow.close()
        self.relay.node_lost(node)

    async def _hello(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, node: str
    ) -> _Session:
        """The dialling side of the handshake (module docstring)."""
        greeting = await reader.readexactly(len(MAGIC) + NONCE)
        if greeting[: len(MAGIC)] != MAGIC:
            raise LinkRefused("not a softrelay node")
        theirs, ours = greeting[len(MAGIC) :], os.urandom(NONCE)
        me = self.node_id.encode()
        where = format_address(self.address).encode()
        proof = self._mac(b"hello", theirs, ours, me, where)
        writer.write(bytes((len(me),)) + me + bytes((len(where),)) + where + ours + proof)
        await writer.drain()
        answer = await reader.readexactly(32)
        if not hmac.compare_digest(answer, self._mac(b"welcome", ours, theirs, me)):
            raise LinkRefused("the other node does not know the cluster secret")
        return _Session(self._mac(b"session", theirs, ours, me))

    def _mac(self, *parts: bytes) -> bytes:
        return hmac.digest(self._secret, b"\0".join(parts), "sha256")

    # --- receiving ---------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, so that `_links` owns the reader (asyncio would make an
        # unowned task of a coroutine) and `close` ends it.
        if self._links.closed:
            writer.close()
            return
        self._links.spawn(self._serve(reader, writer), name="nodes-link-reader")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._readers.add(writer)
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                node, session = await self._welcome(reader, writer)
            while True:
                body = session.open(await _frame(reader))
                header_end = body.index(b"\n")
                header = orjson.loads(body[:header_end])
                await self._queue(node, header, body[header_end + 1 :])
        except (LinkRefused, ValueError, TimeoutError, orjson.JSONDecodeError, KeyError) as exc:
            self.metrics.refused.inc()
            log.warning("nodes.link_refused", extra={"fields": {"error": type(exc).__name__}})
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # the other node went, or closed its connection
        finally:
            self._readers.discard(writer)
            self._announced = {
                node: known for node, known in self._announced.items() if known[0] is not writer
            }
            writer.close()

    async def _welcome(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[str, _Session]:
        ours = os.urandom(NONCE)
        writer.write(MAGIC + ours)
        await writer.drain()
        node = await reader.readexactly((await reader.readexactly(1))[0])
        where = await reader.readexactly((await reader.readexactly(1))[0])
        theirs = await reader.readexactly(NONCE)
        proof = await reader.readexactly(32)
        if not hmac.compare_digest(proof, self._mac(b"hello", ours, theirs, node, where)):
            raise LinkRefused("the dialling node does not know the cluster secret")
        address = parse_address(where.decode(errors="replace"))
        if address is None:
            raise LinkRefused("the dialling node's address is not HOST:PORT")
        writer.write(self._mac(b"welcome", theirs, ours, node))
        await writer.drain()
        name = node.decode()
        self._announced[name] = (writer, address)
        self._dial_soon(name)  # our answers to it will need a connection of our own
        return name, _Session(self._mac(b"session", ours, theirs, node))

    async def _queue(self, node: str, header: dict[str, Any], data: bytes) -> None:
        """Hand a frame from `node` (authenticated) to the worker of its flow: the frames
        of one flow are handled in the order sent (a CANCEL never overtakes its INVITE),
        those of different flows concurrently, so that one call waiting on the store
        does not hold up the rest of the link. A flow with MAX_PENDING frames waiting
        stops the reading of the link until it has caught up."""
        kind, flow_id = str(header["k"]), int(header["f"])
        self.metrics.frames.labels("in", kind).inc()
        # `deliver` names our flow; the others, the sending node's.
        key = (node, kind == "deliver", flow_id)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending()
            self._tasks.spawn(self._work(key, pending))
        pending.frames.append((header, data))
        if len(pending.frames) >= MAX_PENDING:
            pending.drained.clear()
            await pending.drained.wait()

    async def _work(self, key: tuple[str, bool, int], pending: _Pending) -> None:
        try:
            while pending.frames:
                header, data = pending.frames.popleft()
                if len(pending.frames) < MAX_PENDING // 2:
                    pending.drained.set()
                try:
                    await self._dispatch(key[0], header, data)
                except Exception as exc:  # the class only: a message may be quoted in it
                    log.warning(
                        "nodes.frame_failed", extra={"fields": {"error": type(exc).__name__}}
                    )
        finally:
            pending.drained.set()
            del self._pending[key]

    async def _dispatch(self, node: str, header: dict[str, Any], data: bytes) -> None:
        """One frame from `node`, in the order it sent those of its flow."""
        kind, flow_id = str(header["k"]), int(header["f"])
        if kind == "deliver":
            flow = self.relay.local_flow(flow_id)
            if flow is None:
                self._tasks.spawn(self._gone(node, flow_id, data))
                return
            self._note(flow, node)
            self.relay.routed_answer(flow, data)
            with contextlib.suppress(FlowClosed, OSError):  # its close tells the node
                await flow.send(data)
        elif kind == "closed":
            gone = self._remote.get((node, flow_id))
            if gone is not None:
                gone.close()
        elif kind == "app":
            await self._app(node, flow_id, header, data)
        elif kind in ("route", "response"):
            remote = header.get("r")
            address = (str(remote[0]), int(remote[1])) if isinstance(remote, list) else None
            serial = header.get("s")
            flow = self.remote_flow(node, flow_id, None if serial is None else str(serial), address)
            if flow is None:
                return
            if kind == "route":
                await self.relay.node_route(data, flow, str(header["route"]))
            else:
                local = header.get("u")
                udp = None
                if isinstance(local, list) and address is not None:
                    udp = ((str(local[0]), int(local[1])), address)
                await self.relay.node_response(data, flow, udp)

    async def _app(self, node: str, flow_id: int, header: dict[str, Any], data: bytes) -> None:
        """A SIPIS app's message from `node`'s flow, for an account whose lease we hold
        (`forward_app`): to our app leg, which trusts the account id as `node`'s word
        (an authenticated node of the cluster; sipis/appleg.py)."""
        flow = self.remote_flow(
            node,
            flow_id,
            None,
            _address(header.get("r")),
            transport=Transport(str(header["t"])),
            local=_address(header.get("l")),
        )
        if flow is None:
            return
        handler = self.app_handler
        if handler is not None:
            await handler(str(header["a"]), flow, data)
            return
        with contextlib.suppress(SipParseError):  # SIPIS mode is off here
            request = parse(data)
            if isinstance(request, Request) and request.method != "ACK":
                answer = make_response(request, 503, "SIPIS Not Served Here").serialize()
                with contextlib.suppress(FlowClosed, OSError):
                    await flow.send(answer)


def _address(value: object) -> Address | None:
    if isinstance(value, list) and len(value) == 2:
        return (str(value[0]), int(value[1]))
    return None


async def _frame(reader: asyncio.StreamReader) -> bytes:
    """The next frame's MAC and body, its size bounded."""
    size: int = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))[0]
    if not MAC < size <= MAX_FRAME:
        raise LinkRefused("frame size")
    return await reader.readexactly(size)
