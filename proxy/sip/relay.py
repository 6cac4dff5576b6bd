"""The relay: where phones and PBXs meet (the Auerproxy role), almost stateless.

Every message arrives with its flow. Routing needs no table of calls:

- A PBX dials out and REGISTERs as `sip:<serial>@<domain>`; softrelay challenges it
  with the digest secret of that serial and links the serial to the flow.
- A phone REGISTERs `sip:<user>@<serial>.<domain>`; softrelay forwards it over the
  PBX's flow with a `Path` naming the phone's flow, passes the PBX's challenge and the
  phone's answer through, and on 200 keeps the binding the policy allows.
- Requests towards a phone carry that Path back as their top Route; requests of a
  dialog carry our Record-Route, which names the flows of both sides. Responses find
  their flow in the parameter of the Via we added. Every such value is sealed with a
  key of the process (proxy/sip/tokens.py) to where it may be used from: a response
  only from the flow its request went to, a Path only from the PBX of its serial, a
  Record-Route only from the ends of its dialog (or that PBX on a new flow). Having
  seen a token is not enough to use it.
- Route entries that name us without a token (a phone's outbound proxy, RFC 3261
  16.4) are taken off, on REGISTER too, before the request goes on.

The only transaction state kept is for REGISTER, bounded and short-lived: those in
flight (to store the binding when the PBX accepts it, and to absorb a phone's
retransmissions instead of loading the PBX with each), and for phones on UDP the final
answer for as long as a retransmission may still come (RFC 3261 timer J). INVITE
retransmissions go on, statelessly, to the PBX or phone, which absorbs them.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cluster.redis import ClusterUnavailable
from privacy.backend import StorageUnavailable
from privacy.clock import Clock
from privacy.store import Store, Subject
from privacy.tasks import Tasks
from proxy.sip.digest import DigestAuthority, DigestError, MalformedAuthorization, StaleNonce
from proxy.sip.flow import Address, Flow, FlowClosed, Transport
from proxy.sip.headers import NameAddr, parse_name_addr
from proxy.sip.message import Request, Response
from proxy.sip.overload import Overload
from proxy.sip.params import Params
from proxy.sip.parser import parse
from proxy.sip.responses import error_response, make_response
from proxy.sip.settings import PbxSettings, SipSettings
from proxy.sip.syntax import SipParseError
from proxy.sip.tokens import Dialog, End, Sealer, node_of
from proxy.sip.uri import SipUri
from proxy.sip.wake import Parking, PushIdentity
from push.service import PushService

log = logging.getLogger("softrelay.proxy")
PENDING_REGISTERS = 10_000  # REGISTERs awaiting the PBX's answer, at most
LAST_WRITTEN_LIMIT = 100_000  # bindings remembered for coalescing before old ones go
PENDING_TTL = 32.0  # seconds: RFC 3261 timer F, after which no answer will come
ANSWERED_LIMIT = 10_000  # final REGISTER answers kept for UDP retransmissions, at most
BINDING_WRITES = 1_000  # binding writes in flight before a PBX's answers wait for them
ADDRESSES_LIMIT = 256  # our addresses (one per transport and local address) kept made
DIALOGS_LIMIT = 10_000  # dialog tokens kept made or opened, before the cache is emptied
# Requests sent to another node's flow and not finally answered yet, at most, and for
# how long (RFC 3261 timer C, a proxy's longest INVITE wait): answered 480 by this node
# should that flow, or the node, go first.
ACROSS_LIMIT = 10_000
ACROSS_TTL = 180.0


@dataclass(frozen=True, slots=True)
class _Across:
    """A request forwarded to another node's flow (`target`) from our `came_from`."""

    request: Request
    came_from: Flow
    target: Flow
    at: float


@dataclass(frozen=True, slots=True)
class _Routed:
    """A request from our `came_from` routed to `node` (a token of its), which sends it
    on its own flow: the answers come back as bytes that node writes on `came_from`."""

    request: Request
    came_from: Flow
    node: str
    at: float


@dataclass(frozen=True, slots=True)
class _PendingRegister:
    serial: str
    username: str
    instance: str
    flow: Flow
    contact: NameAddr | None  # None for a fetch of the bindings, or `Contact: *`
    expires: int
    created: float
    remove_all: bool = False  # `Contact: *`: every binding of the user at this PBX


class Cluster(Protocol):
    """What the relay asks of the other nodes of a cluster (proxy/sip/nodes.py): where a
    PBX linked on another node is, and the internal link for what another node holds."""

    async def pbx_flow(self, serial: str) -> Flow | None:
        """The PBX of `serial` linked on another node, as a flow to it; None: nowhere.
        ClusterUnavailable when that cannot be known now (answered 503, Retry-After)."""

    async def forward_response(self, node: str, data: bytes, flow: Flow) -> bool:
        """A response that arrived on `flow` and whose Via names `node`; whether it
        went (False: the node is unreachable now)."""

    async def forward_route(self, node: str, request: Request, flow: Flow, route: str) -> bool:
        """A request that arrived on `flow`, to follow `route` (a token of `node`);
        whether it went (False: the node is unreachable now)."""

    async def pbx_linked(self, serial: str, flow: Flow, expires: int) -> None: ...

    def pbx_unlinked(self, serial: str, flow: Flow) -> None: ...

    def registered(
        self, identity: PushIdentity, subject: Subject, instance: str, flow: Flow, expires: int
    ) -> None:
        """The PBX accepted a REGISTER of a binding with push parameters on `flow`."""


class AppLeg(Protocol):
    """SIPIS mode's app leg (sipis/appleg.py): apps that connect for an account softrelay
    registers on their behalf. The relay hands it each REGISTER for `sip:<id>@<domain>`
    and, from then on, every message of that flow; it answers them itself."""

    domain: str

    async def handle(self, message: Request | Response, flow: Flow) -> None: ...


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "softrelay_sip_messages", "SIP messages handled", ["kind"], registry=registry
        )
        self.errors = Counter(
            "softrelay_sip_errors", "SIP messages refused or dropped", ["reason"], registry=registry
        )
        self.pbx_links = Gauge("softrelay_sip_pbx_links", "PBXs linked", registry=registry)
        # Per configured serial, so an alert can name the PBX that went offline (a serial
        # is no personal data: the policy declares pbx_link unlinkable). A cluster's PBX
        # is linked on one node: take the max over nodes.
        self.pbx_linked = Gauge(
            "softrelay_sip_pbx_linked",
            "1 while this node holds the link of a configured dial-out PBX, else 0",
            ["serial"],
            registry=registry,
        )
        self.bindings = Counter(
            "softrelay_sip_bindings_written",
            "Phone bindings written to the store (refreshes within the interval are not)",
            registry=registry,
        )
        self.latency = Histogram(
            "softrelay_sip_routing_seconds",
            "Time from a message's arrival to its forwarding or answer",
            ["kind"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
            registry=registry,
        )
        # Bound once: a label look-up per message costs more than the count itself.
        kinds = ("register", "request", "response", "malformed", "shed")
        self.message_of = {kind: self.messages.labels(kind) for kind in kinds}
        self.latency_of = {kind: self.latency.labels(kind) for kind in kinds}
        self.errors_store = self.errors.labels("store")
        self.errors_store_unavailable = self.errors.labels("store_unavailable")


class Relay:
    def __init__(
        self,
        settings: SipSettings,
        store: Store,
        clock: Clock,
        registry: CollectorRegistry,
        push: PushService | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.digest = DigestAuthority(settings.domain)
        self._flow_key = secrets.token_bytes(32)
        self._tokens: dict[int, str] = {}  # flow id -> token
        self._flows: dict[int, Flow] = {}  # flow id -> flow, for those with a token
        self.node = ""  # our node id in a cluster (`join`): every token names it
        # Dialog tokens made or opened: both ways, so a call's requests seal or open
        # each once. Emptied when full: a miss only costs the seal again.
        self._dialog_tokens: dict[tuple[bytes, bytes, str], str] = {}
        self._dialogs: dict[str, Dialog] = {}
        # Hosts and ports that name us in a Route (RFC 3261 16.4): the configured names,
        # and every local address a flow arrived on or `listening` was told of.
        self._own_hosts = {settings.domain.lower()}
        if settings.public_host:
            self._own_hosts.add(_canonical_host(settings.public_host))
        self._own_ports: set[int] = set()
        self._by_token: dict[str, Flow] = {}
        self._pbx_flows: dict[str, Flow] = {}  # serial -> its flow
        self._linked: dict[int, str] = {}  # the reverse: flow id -> serial
        self._pbx_settings = {p.serial: p for p in settings.pbxs}
        self._static = {p.static: p.serial for p in settings.pbxs if p.static is not None}
        self._addresses: dict[tuple[Transport, tuple[str, int]], tuple[SipUri, str, str]] = {}
        # Set once the transports run: the UDP flow to a peer on the SIP port.
        self.udp_flow: Callable[[tuple[str, int]], Flow | None] | None = None
        # `serve --workers N` (`send_own_udp`): the flow to a static PBX from this
        # worker's own socket, and that socket's address -> the shared SIP port's.
        self.udp_out: Callable[[tuple[str, int]], Flow | None] | None = None
        self._own_udp: dict[tuple[str, int], tuple[str, int]] = {}
        self._pending: dict[str, _PendingRegister] = {}
        self._answered: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        # binding -> (when its last use was written, the expiry written with it)
        self._last_written: dict[tuple[str, str, str], tuple[float, int]] = {}
        self.overload = Overload(settings.overload)
        self.metrics = RelayMetrics(registry)
        # Bound once, at 0 until linked: the series exists for an alert from the start.
        self._linked_gauge = {
            p.serial: self.metrics.pbx_linked.labels(p.serial)
            for p in settings.pbxs
            if p.static is None
        }
        self._writes = Tasks(
            log, "binding not stored", on_error=lambda _: self.metrics.errors_store.inc()
        )
        self._accepting = True
        self.parking = Parking(settings.wake, self, push, store, clock, registry)
        self.cluster: Cluster | None = None  # set by `join` in a cluster
        self._remote: set[int] = set()  # flows to another node's flows (`remote_flow`)
        # (our branch, method) -> a request on its way to another node's flow.
        self._across: OrderedDict[tuple[str, str], _Across] = OrderedDict()
        # (our flow's id, its sender's branch, method) -> a request routed to another node.
        self._routed: OrderedDict[tuple[int, str, str], _Routed] = OrderedDict()
        self._answers = Tasks(log, "answer for a gone node failed")
        self.app_leg: AppLeg | None = None  # SIPIS mode (`attach_app_leg`)
        self._app_flows: set[int] = set()  # flows whose messages go to the app leg

    def attach_app_leg(self, leg: AppLeg) -> None:
        """SIPIS mode: REGISTERs to `leg.domain`, and their flows, are the leg's."""
        self.app_leg = leg

    async def _to_app_leg(self, leg: AppLeg, message: Request | Response, flow: Flow) -> None:
        if flow.id not in self._app_flows:
            self._app_flows.add(flow.id)
            flow.on_close.append(lambda gone: self._app_flows.discard(gone.id))
        await leg.handle(message, flow)

    def join(self, node: str, cluster: Cluster) -> None:
        """Be node `node` of a cluster: every token names it (the tokens made before
        do not, and stop working), and what another node holds goes there."""
        self.node = node
        self._sealer.node = node
        self._tokens.clear()
        self._by_token.clear()
        self._dialog_tokens.clear()
        self._dialogs.clear()
        self.cluster = cluster

    def send_own_udp(
        self,
        udp_out: Callable[[tuple[str, int]], Flow | None],
        own: tuple[str, int],
        shared: tuple[str, int],
    ) -> None:
        """A worker of `serve --workers N`: requests to a static PBX go on `udp_out`'s
        flows, from this worker's own socket at `own`, and our Via names it, so the
        answers come back to this worker and not to whichever the kernel hashes the
        shared port's to (`SipTransports.udp_out`). Record-Route and Path still name the
        `shared` SIP port: requests of a dialog may reach any worker, and its token
        routes them to the one that made it."""
        self.udp_out = udp_out
        self._own_udp[own] = shared
        self._addresses.clear()

    def remote_flow(self, flow: Flow, serial: str | None) -> None:
        """`flow` stands for a flow of another node (its PBX's link when `serial`):
        requests and responses from it are that node's, who checked them."""
        self._token(flow)
        self._remote.add(flow.id)
        if serial is not None:
            self._linked[flow.id] = serial

    def watch(self, flow: Flow) -> None:
        """Know our `flow` by its id from now until it ends (another node was told of it:
        what it sends back names the flow by id)."""
        self._token(flow)

    def local_flow(self, flow_id: int) -> Flow | None:
        """One of our own flows that a token was made for (not another node's)."""
        flow = self._live(flow_id)
        return None if flow is None or flow_id in self._remote else flow

    # --- flows ----------------------------------------------------------------------

    def _token(self, flow: Flow) -> str:
        """The flow's token, sealed once: its id and an HMAC of it, so a peer can name
        only flows it was told about. Routing then finds the flow by a dict look-up."""
        token = self._tokens.get(flow.id)
        if token is None:
            token = self._sealer.flow_token(flow.id)  # names our node: see proxy/sip/tokens.py
            self._tokens[flow.id] = token
            self._by_token[token] = flow
            self._flows[flow.id] = flow
            flow.on_close.append(self._forget_flow)
        return token

    @property
    def _flow_key(self) -> bytes:
        return self._key

    @_flow_key.setter
    def _flow_key(self, key: bytes) -> None:
        """The key of every token and seal (bench/relay_inproc.py fixes it, so that the
        octets forwarded can be compared between runs)."""
        self._key = key
        self._sealer = Sealer(key, getattr(self, "node", ""))

    def _flow(self, token: str | None) -> Flow | None:
        flow = self._by_token.get(token.lower()) if token else None
        return None if flow is None or flow.closed else flow

    def _live(self, flow_id: int) -> Flow | None:
        flow = self._flows.get(flow_id)
        return None if flow is None or flow.closed else flow

    def _forget_flow(self, flow: Flow) -> None:
        self._by_token.pop(self._tokens.pop(flow.id, ""), None)
        self._flows.pop(flow.id, None)
        if flow.id in self._remote:
            self._remote.discard(flow.id)
            self._answer_across(flow)
        serial = self._linked.pop(flow.id, None)
        if serial is not None and self._pbx_flows.get(serial) is flow:
            del self._pbx_flows[serial]
            self._links_changed(serial)
            log.info("pbx link closed", extra={"fields": {"pbx_serial": serial}})
            if self.cluster is not None:
                self.cluster.pbx_unlinked(serial, flow)

    async def _pbx_anywhere(self, serial: str) -> Flow | None:
        """The PBX's flow here, or else a flow to the node of the cluster it linked on."""
        flow = self.pbx_flow(serial)
        if flow is None and self.cluster is not None:
            flow = await self.cluster.pbx_flow(serial)
        return flow

    def _links_changed(self, serial: str) -> None:
        """The link gauges after `serial` linked or unlinked (only its own: a refresh
        of one of 10,000 PBXs does not walk the others)."""
        self.metrics.pbx_links.set(len(self._pbx_flows))
        gauge = self._linked_gauge.get(serial)
        if gauge is not None:
            gauge.set(1 if serial in self._pbx_flows else 0)

    def pbx_links(self) -> dict[str, Flow]:
        """The PBXs linked on this node: serial -> flow."""
        return {serial: flow for serial, flow in self._pbx_flows.items() if not flow.closed}

    def registered_phones(self) -> int:
        """Phone bindings registered through this node since it started whose expiry has
        not passed (the operator console's figure: a count from memory, no store read)."""
        now = self.clock.now()
        return sum(1 for _, expires_at in self._last_written.values() if expires_at > now)

    def pbx_flow(self, serial: str) -> Flow | None:
        flow = self._pbx_flows.get(serial)
        if flow is not None and not flow.closed:
            return flow
        pbx = self._pbx_settings.get(serial)
        make = self.udp_out or self.udp_flow
        if pbx is not None and pbx.static is not None and make is not None:
            return make(pbx.static)
        return None

    def _is_pbx(self, flow: Flow) -> bool:
        return flow.id in self._linked or (
            flow.transport.value == "udp" and flow.remote in self._static
        )

    def _me(self, flow: Flow) -> SipUri:
        """Our address as the peer on `flow` reaches us."""
        return self._address(flow)[0]

    def _address(self, flow: Flow) -> tuple[SipUri, str, str]:
        """`_me(flow)`, its text, and the start of the Via we put on requests to `flow`.

        Made once per transport and local address: there are as many as listening
        sockets, so the cache stays small (it is emptied should it ever grow)."""
        key = (flow.transport, flow.local)
        address = self._addresses.get(key)
        if address is None:
            # A worker's own UDP socket (`send_own_udp`): the Via names it, the rest the
            # shared SIP port.
            shared = self._own_udp.get(flow.local) if flow.transport is Transport.UDP else None
            host, port = shared or flow.local
            host = self.settings.public_host or host
            transport = flow.transport.value
            params = () if transport == "udp" else (("transport", transport),)
            me = SipUri(host, port=port, params=Params((*params, ("lr", None))))
            sent_by = me.host_port
            if shared is not None:
                own = SipUri(self.settings.public_host or flow.local[0], port=flow.local[1])
                sent_by = own.host_port
            address = (me, str(me), f"SIP/2.0/{flow.transport.via_name} {sent_by}")
            if len(self._addresses) >= ADDRESSES_LIMIT:
                self._addresses.clear()
            self._addresses[key] = address
            self.listening(((flow.transport, flow.local),))
        return address

    def listening(self, addresses: Iterable[tuple[Transport, tuple[str, int]]]) -> None:
        """Where we listen (each transport's bound address): a Route naming one of them
        names us. Those that flows arrive on are learnt as well."""
        for _, (host, port) in addresses:
            if len(self._own_ports) < ADDRESSES_LIMIT:
                self._own_ports.add(port)
            # A wildcard bind names no host: the flows that arrive say which it has.
            if len(self._own_hosts) < ADDRESSES_LIMIT and not _is_unspecified(host):
                self._own_hosts.add(_canonical_host(host))

    # --- entry point ----------------------------------------------------------------

    async def handle(self, data: bytes, flow: Flow) -> None:
        started = time.perf_counter()  # a duration for the histogram, not policy time
        kind = await self._handle(data, flow)
        self.metrics.latency_of[kind].observe(time.perf_counter() - started)

    async def _handle(self, data: bytes, flow: Flow) -> str:
        """Route one message; the kind it was, for the metrics."""
        try:
            # Only what routing touches is parsed further (views are lazy): a header we
            # merely pass on is the next hop's business. A bad one we need still raises.
            message = parse(data)
        except SipParseError as exc:
            self.metrics.errors.labels("malformed").inc()
            if (answer := error_response(exc)) is not None:
                await self._send(flow, answer)
            return "malformed"
        if isinstance(message, Response):
            kind = "response"
        else:
            kind = "register" if message.method == "REGISTER" else "request"
        self.metrics.message_of[kind].inc()
        try:
            if isinstance(message, Request) and (refusal := self._refusal(message)):
                self.metrics.errors.labels(refusal).inc()
                retry = ("Retry-After", str(self.settings.overload.retry_after))
                await self.reply(message, flow, 503, None, (retry,))
                return "shed"
            if self._app_flows and flow.id in self._app_flows and self.app_leg is not None:
                await self._to_app_leg(self.app_leg, message, flow)  # SIPIS: an app's flow
            elif isinstance(message, Response):
                await self._response(message, flow)
            elif message.method == "REGISTER":
                await self._register(message, flow)
            else:
                await self._request(message, flow)
        except SipParseError as exc:
            # A header the route needed was malformed: answer like a parse error.
            self.metrics.errors.labels("malformed").inc()
            if isinstance(message, Request) and message.method != "ACK":
                await self._send(flow, make_response(message, exc.status, exc.reason))
        except ClusterUnavailable as exc:
            if isinstance(message, Request):
                await self._cluster_unavailable(message, flow, exc)
        return kind

    async def _cluster_unavailable(
        self, request: Request, flow: Flow, exc: ClusterUnavailable
    ) -> None:
        """503 with Retry-After: where the request must go (a PBX on another node) cannot
        be known while Redis is out; the caller tries again, or another node."""
        self.metrics.errors.labels("cluster_unavailable").inc()
        log.warning("cluster unavailable", extra={"fields": {"error": str(exc)}})
        retry = ("Retry-After", str(self.settings.overload.retry_after))
        await self.reply(request, flow, 503, "Cluster Unavailable", (retry,))

    def _refusal(self, request: Request) -> str | None:
        """Why new work is refused (503) now, "overload" or "stopping"; None: it is
        not. Never what finishes a call already set up (in-dialog requests, ACK, CANCEL)."""
        if self._accepting and not self.overload.shedding and len(self._writes) < BINDING_WRITES:
            return None
        if request.method in ("ACK", "CANCEL") or request.to.tag is not None:
            return None
        if self._accepting and request.method == "REGISTER" and self._brings_back(request):
            return None  # a woken phone: its parked call is work already taken on
        return "overload" if self._accepting else "stopping"

    def _brings_back(self, request: Request) -> bool:
        """Whether a REGISTER names a push token a call is parked for on this node. Only
        a hint to let it through while shedding: the release itself still checks the
        subject and instance once the PBX accepts it. A call parked on another node is
        reached by the phone's retry after Retry-After, within the wake timeout."""
        if not self.parking or request.contact_star:
            return False
        return any(
            (identity := PushIdentity.of(contact.push)) is not None
            and self.parking.awaits(identity.token)
            for contact in request.contacts
        )

    def stop_accepting(self) -> None:
        """Shutdown has begun: new requests outside a dialog get 503 with Retry-After,
        so the caller tries another node or later; calls under way go on."""
        self._accepting = False

    async def drain(self) -> None:
        """Wait for the binding writes in flight (those a write starts included)."""
        await self._writes.wait()

    async def close(self) -> None:
        """At shutdown, once the transports stopped (no message comes in any more):
        the binding writes under way land, before the store closes."""
        await self._writes.wait()
        await self._writes.close()
        await self._answers.close()

    async def _send(self, flow: Flow, message: Request | Response) -> None:
        await self._send_bytes(flow, message.serialize())

    async def _send_bytes(self, flow: Flow, data: bytes) -> bool:
        """Whether `data` went out on `flow` (False: the flow is gone)."""
        try:
            await flow.send(data)
        except (FlowClosed, OSError):
            self.metrics.errors.labels("flow_closed").inc()
            return False
        return True

    async def _send_on(self, request: Request, came_from: Flow, target: Flow, branch: str) -> None:
        """Send a request we forward (`branch` our Via's) to `target`. To another node's
        flow, it is remembered until its final answer, which this node gives (480)
        should that flow or its node go first, or the node be unreachable now."""
        remote = target.id in self._remote and request.method != "ACK"
        if remote:
            self._remember_across(branch, _Across(request, came_from, target, self.clock.now()))
        if not await self._send_bytes(target, request.serialize()) and remote:
            self._across.pop((branch, request.method), None)
            await self._answer_gone(request, came_from, "Node Unreachable")

    def _remember_across(self, branch: str, across: _Across) -> None:
        _keep(self._across, (branch, across.request.method), across, self.clock.now())

    def routed_answer(self, flow: Flow, data: bytes) -> None:
        """Bytes another node writes on our `flow`: a final response to a request we
        routed there ends our wait for it. Only final responses are parsed, and only
        while some request waits."""
        if not self._routed or not data.startswith(b"SIP/2.0 ") or data[8:9] == b"1":
            return
        try:
            response = parse(data)
            if isinstance(response, Response):
                key = (flow.id, response.top_via.branch or "", response.cseq.method)
                self._routed.pop(key, None)
        except SipParseError:
            pass  # not one we could match: the wait lasts until the node goes, or ACROSS_TTL

    def node_lost(self, node: str) -> None:
        """The link to `node` is lost (it stopped or died): each request routed there and
        not finally answered yet gets its 480 here, once."""
        waiting = [key for key, routed in self._routed.items() if routed.node == node]
        for key in waiting:
            routed = self._routed.pop(key)
            self._answers.spawn(self._answer_routed(routed.request, routed.came_from))

    async def _answer_routed(self, request: Request, came_from: Flow) -> None:
        self.metrics.errors.labels("node_gone").inc()
        await self.reply(request, came_from, 480, "Node Gone")

    def _answer_across(self, target: Flow) -> None:
        """Another node's flow ended (or the link to its node did): each request still
        waiting on it gets its final answer here."""
        waiting = [key for key, across in self._across.items() if across.target is target]
        for key in waiting:
            across = self._across.pop(key)
            self._answers.spawn(self._answer_gone(across.request, across.came_from, "Node Gone"))

    async def _answer_gone(self, request: Request, came_from: Flow, reason: str) -> None:
        """480 to a request we forwarded (our Via on top) that no one will answer."""
        response = make_response(request, 480, reason)
        response.pop_via()  # ours: the answer goes to the request's sender
        self.metrics.errors.labels("node_gone").inc()
        await self._send(came_from, response)

    async def reply(
        self,
        request: Request,
        flow: Flow,
        status: int,
        reason: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        *,
        to_tag: str | None = None,
    ) -> None:
        """Answer `request` on `flow` (an ACK gets no answer). Parking uses it too."""
        if request.method != "ACK":
            await self._send(flow, make_response(request, status, reason, headers, to_tag=to_tag))

    async def forward_to(self, request: Request, flow: Flow, target: Flow) -> None:
        """Forward a request that came on `flow` to `target`, as a new dialog's first."""
        await self._forward(request, flow, target, record_route=True)

    # --- REGISTER -------------------------------------------------------------------

    async def _register(self, request: Request, flow: Flow) -> None:
        self._take_own_routes(request, flow)  # we are the next hop: the Route ends here
        to = request.to.uri
        if not isinstance(to, SipUri):
            await self.reply(request, flow, 416)
            return
        host = to.host.lower()
        if self.app_leg is not None and host == self.app_leg.domain:
            await self._to_app_leg(self.app_leg, request, flow)  # SIPIS: an app for its account
        elif host == self.settings.domain and to.user:
            await self._register_pbx(request, flow, to.user)
        elif host.endswith("." + self.settings.domain) and to.user:
            serial = host[: -len(self.settings.domain) - 1]
            await self._register_phone(request, flow, serial, to.user)
        else:
            self.metrics.errors.labels("not_our_domain").inc()
            await self.reply(request, flow, 404, "Not Served Here")

    async def _register_pbx(self, request: Request, flow: Flow, serial: str) -> None:
        pbx = self._pbx_settings.get(serial)
        if pbx is None:
            await self.reply(request, flow, 404, "Unknown PBX")
            return
        if not flow.transport.reliable:
            # Calls must come back over this flow; a datagram "flow" dies with the NAT.
            await self.reply(request, flow, 403, "PBX Must Use TCP, TLS or WebSocket")
            return
        if not await self._authenticate_pbx(request, flow, pbx):
            return
        expires = request.expires if request.expires is not None else 3600
        if expires == 0:
            if self._pbx_flows.get(serial) is flow:
                del self._pbx_flows[serial]
                del self._linked[flow.id]
                if self.cluster is not None:
                    self.cluster.pbx_unlinked(serial, flow)
        else:
            # Stored before it is linked: a new link the store cannot record is refused
            # (503) and changes nothing. A refresh of the link this flow holds is answered
            # 200 all the same: its record is stored already, only this use of it is not
            # (the retention then counts from an earlier use: sooner, never later), and
            # the calls over it go on.
            try:
                await self.store.put(
                    "pbx_link",
                    {
                        "pbx_serial": serial,
                        "pbx_ip": flow.remote[0],
                        "pbx_port": flow.remote[1],
                        "transport": flow.transport.value,
                    },
                )
            except StorageUnavailable as exc:
                if self._pbx_flows.get(serial) is not flow:
                    await self._store_unavailable(request, flow, exc)
                    return
                self.metrics.errors_store.inc()
            if flow.closed:
                return  # it ended while the record was written: nothing to link or answer
            self._token(flow)  # watch the flow: its end unlinks the PBX
            previous = self._pbx_flows.get(serial)
            if previous is not None:
                self._linked.pop(previous.id, None)
            self._pbx_flows[serial] = flow
            self._linked[flow.id] = serial
            log.info("pbx linked", extra={"fields": {"pbx_serial": serial}})
            if self.cluster is not None:
                await self.cluster.pbx_linked(serial, flow, expires)
        self._links_changed(serial)
        contacts = [str(c.with_param("expires", str(expires))) for c in request.contacts]
        headers = (*(("Contact", c) for c in contacts), ("Expires", str(expires)))
        await self.reply(request, flow, 200, None, headers)

    async def _authenticate_pbx(self, request: Request, flow: Flow, pbx: PbxSettings) -> bool:
        """Whether the PBX proved its serial as configured: by its client certificate, the
        digest secret, or both (certificate first: without it there is no challenge).
        False: it has been answered, with a challenge or a 403."""
        serial = pbx.serial
        if pbx.auth.needs_certificate and not self._certified(flow, serial):
            self.metrics.errors.labels("pbx_auth").inc()
            log.warning("pbx certificate refused", extra={"fields": {"pbx_serial": serial}})
            if flow.transport is Transport.TLS:
                await self.reply(request, flow, 403, "Certificate Does Not Match")
            else:  # WebSocket flows carry no certificate names: SIP over TLS only
                await self.reply(request, flow, 403, "PBX Must Use SIP over TLS")
            return False
        if not pbx.auth.needs_digest:
            return True
        now = self.clock.now()
        answers = request.get_all("Authorization")
        if len(answers) > 1:
            # One realm, ours, challenged this REGISTER: which of several to believe
            # would be our guess, and a second one can only be there to confuse.
            self.metrics.errors.labels("pbx_auth").inc()
            await self.reply(request, flow, 400, "One Authorization Only")
            return False
        authorization = answers[0] if answers else None
        # Nonces are bound to this flow and answered once: a REGISTER captured elsewhere,
        # or replayed here, gets a new challenge, and the serial stays where it is.
        if authorization is None:
            challenges = self.digest.challenges(serial, now, flow=flow.key)
            await self.reply(request, flow, 401, None, _www_authenticate(challenges))
            return False
        try:
            self.digest.verify(authorization, serial, pbx.secret, "REGISTER", now, flow=flow.key)
        except StaleNonce:
            challenges = self.digest.challenges(serial, now, stale=True, flow=flow.key)
            await self.reply(request, flow, 401, None, _www_authenticate(challenges))
            return False
        except MalformedAuthorization:
            self.metrics.errors.labels("pbx_auth").inc()
            await self.reply(request, flow, 400, "Malformed Authorization")
            return False
        except DigestError:
            self.metrics.errors.labels("pbx_auth").inc()
            log.warning("pbx authentication failed", extra={"fields": {"pbx_serial": serial}})
            await self.reply(request, flow, 403, "Wrong Credentials")
            return False
        return True

    def _certified(self, flow: Flow, serial: str) -> bool:
        """Whether the flow's verified client certificate names `serial`: a DNS or URI
        subjectAltName entry equal to the serial or to `<serial>.<domain>`."""
        wanted = {serial.lower(), f"{serial}.{self.settings.domain}".lower()}
        return any(name.lower() in wanted for name in flow.peer_names)

    async def _register_phone(
        self, request: Request, flow: Flow, serial: str, username: str
    ) -> None:
        pbx = await self._pbx_anywhere(serial)
        if pbx is None:
            await self.reply(request, flow, 480, "PBX Not Connected")
            return
        contacts = [] if request.contact_star else request.contacts
        contact = contacts[0] if contacts else None
        # Restricted (GDPR Art. 18): no binding is made or changed. A fetch (no Contact)
        # changes nothing and is how a subject proves identity to lift the mark.
        if contact is not None or request.contact_star:
            try:
                restricted = await self.store.is_restricted(Subject(username, serial))
            except StorageUnavailable as exc:
                # The binding could not be stored, nor the mark ruled out: 503 before the
                # PBX sees it, so phone and PBX agree that nothing changed.
                await self._store_unavailable(request, flow, exc)
                return
            if restricted:
                self.metrics.errors.labels("restricted").inc()
                await self.reply(request, flow, 403, "Restricted by Data Subject Request")
                return
        expires = request.expires if request.expires is not None else 3600
        if contact is not None and contact.expires is not None:
            expires = contact.expires
        if request.contact_star:
            expires = 0
        self._token(flow)  # watch the flow: the Path names it
        branch = self._forward_prepare(request, flow, pbx)
        previous = self._pending.get(branch)
        if previous is not None and self.clock.now() - previous.created <= PENDING_TTL:
            # A retransmission while the PBX has the original: its answer will come.
            self.metrics.errors.labels("retransmission_absorbed").inc()
            return
        answered = self._answered.get(branch)
        if answered is not None and self.clock.now() - answered[1] <= PENDING_TTL:
            self.metrics.errors.labels("retransmission_absorbed").inc()
            await self._send_bytes(flow, answered[0])
            return
        # Only the PBX of this serial may send along this Path to the phone's flow.
        path_token = self._sealer.path_token(flow, serial)
        request.prepend("Path", f"<{self._me(pbx).with_param('ob').with_param('ft', path_token)}>")
        self._push_via(request, branch, flow, pbx)
        if not request.has("Supported") or "path" not in (request.get("Supported") or ""):
            request.add("Supported", "path")
        self._remember(
            branch,
            _PendingRegister(
                serial,
                username,
                (contact.instance or "") if contact else "",
                flow,
                contact,
                expires,
                self.clock.now(),
                request.contact_star,
            ),
        )
        await self._send_on(request, flow, pbx, branch)

    async def _store_unavailable(
        self, request: Request, flow: Flow, exc: StorageUnavailable
    ) -> None:
        """503 with Retry-After to a REGISTER whose binding the store cannot take now."""
        self.metrics.errors_store_unavailable.inc()
        retry = ("Retry-After", str(max(1, math.ceil(exc.retry_after))))
        await self.reply(request, flow, 503, "Store Unavailable", (retry,))

    def _remember(self, branch: str, pending: _PendingRegister) -> None:
        now = self.clock.now()
        if len(self._pending) >= PENDING_REGISTERS:
            for key, old in list(self._pending.items()):
                if now - old.created > PENDING_TTL:
                    del self._pending[key]
        if len(self._pending) < PENDING_REGISTERS:
            self._pending[branch] = pending

    def _keep_answer(self, branch: str, data: bytes) -> None:
        """A final answer to a phone on UDP, for its retransmissions (timer J)."""
        now = self.clock.now()
        while self._answered and (
            len(self._answered) >= ANSWERED_LIMIT
            or now - next(iter(self._answered.values()))[1] > PENDING_TTL
        ):
            self._answered.popitem(last=False)
        self._answered[branch] = (data, now)

    async def _write_binding(self, pending: _PendingRegister) -> None:
        """Store the binding without holding up the PBX's flow: its next answers need not
        wait for this commit, and concurrent writes share one (group commit)."""
        write = self._unregistered_all if pending.remove_all else self._registered
        if len(self._writes) >= BINDING_WRITES:
            await write(pending)  # the store is behind: let the PBX wait
            return
        self._writes.spawn(write(pending))

    async def _unregistered_all(self, pending: _PendingRegister) -> None:
        """The PBX accepted `Contact: *` (RFC 3261 10.2.2): every binding of the user at
        that PBX goes, whatever its instance."""
        await self.store.delete(
            "registration", pbx_serial=pending.serial, sip_username=pending.username
        )
        user = (pending.serial, pending.username)
        self._last_written = {k: v for k, v in self._last_written.items() if k[:2] != user}

    async def _registered(self, pending: _PendingRegister) -> None:
        """The PBX accepted a phone's REGISTER: keep what the policy allows."""
        key = (pending.serial, pending.username, pending.instance)
        if pending.contact is None:
            return  # a query of the bindings changes nothing
        # Before the write is coalesced away: when its refresh push is due.
        self.parking.binding_registered(key, pending.expires, pending.contact)
        if pending.expires == 0:
            await self.store.delete(
                "registration",
                pbx_serial=pending.serial,
                sip_username=pending.username,
                instance=pending.instance,
            )
            self._last_written.pop(key, None)
            return
        now = self.clock.now()
        expires_at = int(now) + pending.expires
        written, written_expiry = self._last_written.get(key, (-1e18, 0))
        # A refresh is not written while the last write is recent and the expiry stored
        # with it still covers half the new one: the binding never looks expired early.
        if (
            now - written < self.settings.last_use_interval
            and written_expiry - now >= pending.expires / 2
        ):
            return
        push = pending.contact.push
        await self.store.put(
            "registration",
            {
                "pbx_serial": pending.serial,
                "sip_username": pending.username,
                "instance": pending.instance,
                "phone_ip": pending.flow.remote[0],
                "phone_port": pending.flow.remote[1],
                "push_provider": push.provider if push else None,
                "push_token": push.prid if push else None,
                "push_app_id": push.param if push else None,
                "expires_at": expires_at,
            },
        )
        if len(self._last_written) >= LAST_WRITTEN_LIMIT:
            # Entries older than the interval no longer coalesce anything: drop them.
            horizon = now - self.settings.last_use_interval
            self._last_written = {k: v for k, v in self._last_written.items() if v[0] > horizon}
        self._last_written[key] = (now, expires_at)
        self.metrics.bindings.inc()

    # --- other requests -------------------------------------------------------------

    def _forward_prepare(self, request: Request, flow: Flow, target: Flow) -> str:
        """Steps of RFC 3261 16.6 every forwarded request takes; our branch."""
        request.decrement_max_forwards()
        top = request.top_via
        if top.host != flow.remote[0] or top.wants_rport:
            request.pop_via()
            received = top.with_param("received", flow.remote[0])
            if top.wants_rport:
                received = received.with_param("rport", str(flow.remote[1]))
            request.prepend_via(received)
        # Stateless branch (RFC 3261 16.11): the same request (a retransmission, or its
        # CANCEL) gets the same branch, so the next hop can match it; sealed to the flow
        # it goes to, which alone may answer it.
        branch = self._sealer.branch(f"{top.branch}|{request.uri}".encode(), flow, target)
        for via in request.vias[1:]:
            if via.branch == branch:
                raise SipParseError("Loop Detected", status=482, partial=request)
        return branch

    def _push_via(self, request: Request, branch: str, came_from: Flow, going_to: Flow) -> None:
        # As str(ViaHeader.new(...).with_param("ft", token)) writes it, made once.
        start = self._address(going_to)[2]
        request.prepend("Via", f"{start};branch={branch};rport;ft={self._token(came_from)}")

    async def _request(self, request: Request, flow: Flow) -> None:
        strict = self._strict_routed(request)
        route = self._take_own_routes(request, flow) if strict is None else strict
        if route is not None:
            await self._follow_route(request, flow, route)
            return
        uri = request.uri
        if not isinstance(uri, SipUri) or not uri.host.lower().endswith("." + self.settings.domain):
            await self.reply(request, flow, 404, "Not Served Here")
            return
        serial = uri.host.lower()[: -len(self.settings.domain) - 1]
        pbx = await self._pbx_anywhere(serial)
        if pbx is None:
            await self.reply(request, flow, 480, "PBX Not Connected")
            return
        await self._forward(request, flow, pbx, record_route=True)

    def _take_own_routes(self, request: Request, flow: Flow) -> NameAddr | None:
        """Take off the Route entries on top that name us (RFC 3261 16.4): a phone's
        outbound proxy, both halves of a double Record-Route. The first that carries one
        of our tokens, which says where the request goes."""
        found = None
        while routes := request.routes:
            route = routes[0]
            if self._is_mine(route):
                found = found or route
            elif not self._names_me(route, flow):
                break
            request.pop_value("Route")
        return found

    def _names_me(self, route: NameAddr, flow: Flow) -> bool:
        """Whether a Route entry without our tokens names us: one of our names (domain,
        public host), or our address with one of our ports (the default port of its
        transport when it names none)."""
        uri = route.uri
        if not isinstance(uri, SipUri):
            return False
        host = uri.host.lower()
        if not (host in self._own_hosts or host == flow.local[0]):
            # An address may be written many ways ([::1], 0:0::1, ::ffff:127.0.0.1).
            host = _canonical_host(host)
            if not (host in self._own_hosts or host == _canonical_host(flow.local[0])):
                return False
        port = uri.port
        if port is None:
            if not _is_address(host):
                return True  # a name: DNS (RFC 3263) says which port, and it is ours
            port = _default_port(uri)
        # The port decides, whatever `transport` says: one of ours on our address is us
        # (nothing else listens there), and the request did reach us through it.
        return port == flow.local[1] or port in self._own_ports

    def _strict_routed(self, request: Request) -> NameAddr | None:
        """RFC 3261 16.4: a previous hop that routes strictly (no `lr`) puts our
        Record-Route, with its token, in the Request-URI and the remote target last in
        the Route set. The Request-URI becomes that last Route value again; our entry is
        the route to follow."""
        uri = request.uri
        if not isinstance(uri, SipUri) or not _carries_token(uri):
            return None
        if values := request.values("Route"):
            last = request.routes[-1].uri
            request.remove("Route")
            for value in values[:-1]:
                request.add("Route", value)
            request.uri = last
        return NameAddr(uri)

    async def node_route(self, data: bytes, flow: Flow, route: str) -> None:
        """A request another node took in and forwarded (`Cluster.forward_route`), as if
        it had come on `flow` (a `remote_flow`), to follow `route`, a token of ours."""
        request = parse(data)
        if not isinstance(request, Request):
            return
        try:
            await self._follow_route(request, flow, parse_name_addr(route))
        except SipParseError as exc:
            self.metrics.errors.labels("malformed").inc()
            if request.method != "ACK":
                await self._send(flow, make_response(request, exc.status, exc.reason))
        except ClusterUnavailable as exc:
            await self._cluster_unavailable(request, flow, exc)

    async def _elsewhere(self, request: Request, flow: Flow, route: NameAddr, token: str) -> bool:
        """Whether `token` is another node's: the request went there (or, from another
        node already, was refused: a node forwards only what it took in itself)."""
        node = node_of(token)
        if node == self.node:
            return False
        if self.cluster is None or not node or flow.id in self._remote:
            await self._refuse_route(request, flow)
            return True
        # Its answers come back as bytes the node writes on `flow` (`routed_answer`):
        # remembered until the final one, which this node gives should the node go first.
        key = (flow.id, request.top_via.branch or "", request.method)
        if request.method != "ACK":
            routed = _Routed(request, flow, node, self.clock.now())
            _keep(self._routed, key, routed, self.clock.now())
        sent = await self.cluster.forward_route(node, request, flow, str(route))
        if not sent and self._routed.pop(key, None) is not None:
            await self.reply(request, flow, 480, "Node Unreachable")
        return True

    async def _follow_route(self, request: Request, flow: Flow, route: NameAddr) -> None:
        uri = route.uri
        assert isinstance(uri, SipUri)
        path = uri.params.get("ft")
        if self.node and await self._elsewhere(
            request, flow, route, path or uri.params.get("dt") or ""
        ):
            return
        if path is not None:
            # A Path we gave a phone's REGISTER: the PBX sends a new request to the phone.
            # Only the PBX of the serial it was made for: for anyone else, no route. A
            # token of no flow we know (forged, or from before a restart) is a phone
            # whose flow is gone, which a call may wake.
            serial = self._serial_of(flow)
            if serial is None:
                await self._refuse_route(request, flow)
                return
            phone = self._sealer.open_path(path.lower(), serial)
            target = None if phone is None else self._live(phone)
            record_route = True
            if request.method == "INVITE" and serial in self.settings.wake.debug_serials:
                await self.parking.debug_record(serial, request)
            if target is None:
                await self._phone_asleep(request, flow)
                return
            if request.method == "INVITE" and not target.transport.reliable:
                self._watch_answer(request, flow)
        else:
            # Our Record-Route of a dialog: go to the side the request did not come from.
            dialog = self._dialog(uri.params.get("dt"))
            if dialog is None or not self._in_dialog(dialog, flow):
                await self._refuse_route(request, flow)
                return
            target = self._other_end(dialog, flow)
            if target is None and dialog.serial and dialog.phone.is_(flow):
                target = await self._pbx_anywhere(dialog.serial)  # linked again elsewhere
            record_route = False
        if target is None:
            await self.reply(request, flow, 480, "Flow Gone")
            return
        await self._forward(request, flow, target, record_route=record_route)

    async def _refuse_route(self, request: Request, flow: Flow) -> None:
        self.metrics.errors.labels("route_refused").inc()
        await self.reply(request, flow, 403, "Route Not Valid From Here")

    def _dialog_token(self, pbx: Flow, phone: Flow) -> str:
        """Our Record-Route's token for a dialog between these flows (made once)."""
        serial = self._serial_of(pbx) or ""
        key = (pbx.key, phone.key, serial)
        token = self._dialog_tokens.get(key)
        if token is None:
            self._token(pbx)  # watch both flows: the token names them by id
            self._token(phone)
            token, dialog = self._sealer.seal_dialog(pbx, phone, serial)
            if len(self._dialog_tokens) >= DIALOGS_LIMIT:
                self._dialog_tokens.clear()
            self._dialog_tokens[key] = token
            self._opened(token, dialog)  # what opening it would give: known already
        return token

    def _dialog(self, token: str | None) -> Dialog | None:
        """The dialog our Record-Route's token names, if it is ours."""
        if not token:
            return None
        dialog = self._dialogs.get(token)
        if dialog is None:
            dialog = self._sealer.open_dialog(token.lower())
            if dialog is not None:
                self._opened(token, dialog)
        return dialog

    def _opened(self, token: str, dialog: Dialog) -> None:
        if len(self._dialogs) >= DIALOGS_LIMIT:
            self._dialogs.clear()
        self._dialogs[token] = dialog

    def _in_dialog(self, dialog: Dialog, flow: Flow) -> bool:
        """Whether `flow` may send along the dialog's route: one of its ends, or the PBX
        of its serial come back on a new flow."""
        if dialog.phone.is_(flow) or dialog.pbx.is_(flow):
            return True
        return bool(dialog.serial) and self._serial_of(flow) == dialog.serial

    def _other_end(self, dialog: Dialog, flow: Flow) -> Flow | None:
        if not dialog.phone.is_(flow):
            return self._end_flow(dialog.phone)
        target = self._end_flow(dialog.pbx)
        if target is None and dialog.serial:
            target = self.pbx_flow(dialog.serial)  # the PBX is linked on a new flow
        return target

    def _end_flow(self, end: End) -> Flow | None:
        flow = self._live(end.flow_id)
        if flow is None and end.remote is not None:
            # UDP: the same peer, heard from anew. A phone where its NAT binding is, on
            # the SIP port; a static PBX from where we send it requests (`udp_out`).
            make = self.udp_flow
            if self.udp_out is not None and end.remote in self._static:
                make = self.udp_out
            if make is not None:
                flow = make(end.remote)
        return flow

    async def _phone_asleep(self, request: Request, flow: Flow) -> None:
        """A request for a phone whose flow is gone: wake it for a call, or follow a
        call that was delivered after a wake, or 480."""
        if request.method in ("CANCEL", "ACK"):
            if request.method == "CANCEL" and await self.parking.cancel(request, flow):
                return
            woken = self.parking.delivered_to(request, flow)
            if woken is not None:
                await self._forward(request, flow, woken, record_route=False)
                return
        elif request.method == "INVITE":
            wakeable = self._wakeable(request, flow)
            if wakeable is not None:
                await self.parking.park(request, flow, *wakeable)
                return
        await self.reply(request, flow, 480, "Flow Gone")

    def _watch_answer(self, request: Request, flow: Flow) -> None:
        """A call to a phone on UDP with push parameters: it may be asleep behind a
        flow that only looks alive, so parking takes over if nothing answers."""
        wakeable = self._wakeable(request, flow)
        if wakeable is not None:
            self.parking.watch(request, flow, *wakeable)

    def _wakeable(self, invite: Request, flow: Flow) -> tuple[PushIdentity, Subject] | None:
        """Whom an INVITE from a PBX would wake: the push identity in its Request-URI
        (the registered Contact) and the subject (callee at that PBX)."""
        uri, to = invite.uri, invite.to.uri
        identity = PushIdentity.in_uri(uri) if isinstance(uri, SipUri) else None
        serial = self._serial_of(flow)
        user = to.user if isinstance(to, SipUri) else None
        if identity is None or serial is None or not user:
            return None
        return identity, Subject(user, serial)

    def serial_of(self, flow: Flow) -> str | None:
        return self._serial_of(flow)

    def _serial_of(self, flow: Flow) -> str | None:
        """The serial of the PBX on `flow`, if a PBX is on it."""
        serial = self._linked.get(flow.id)
        if serial is None and flow.transport.value == "udp":
            serial = self._static.get(flow.remote)
        return serial

    async def _forward(
        self, request: Request, flow: Flow, target: Flow, *, record_route: bool
    ) -> None:
        try:
            branch = self._forward_prepare(request, flow, target)
        except SipParseError as exc:
            await self.reply(request, flow, exc.status, exc.reason)
            return
        if record_route and request.method in ("INVITE", "SUBSCRIBE", "REFER", "NOTIFY"):
            pbx_side, phone_side = (flow, target) if self._is_pbx(flow) else (target, flow)
            # Double Record-Route (RFC 5658): each side gets our address on its own
            # transport; the callee reads the set top down, the caller bottom up.
            # Our address has no dt of its own: it appends, as with_param would.
            params = f";dt={self._dialog_token(pbx_side, phone_side)}"
            entries = [f"<{self._address(side)[1]}{params}>" for side in (flow, target)]
            for entry in dict.fromkeys(entries):  # one entry when both sides look alike
                request.prepend("Record-Route", entry)
        self._push_via(request, branch, flow, target)
        await self._send_on(request, flow, target, branch)

    def _is_mine(self, route: NameAddr) -> bool:
        """Whether a Route entry carries one of our tokens (a Path's or a dialog's)."""
        uri = route.uri
        return isinstance(uri, SipUri) and _carries_token(uri)

    # --- responses ------------------------------------------------------------------

    async def node_response(
        self, data: bytes, flow: Flow, udp: tuple[Address, Address] | None = None
    ) -> None:
        """A response another node took in and forwarded (`Cluster.forward_response`),
        as if it had come on `flow` (a `remote_flow`); or, when `udp` (the local socket
        and the source it came on there), as if on our own UDP flow of that pair."""
        response = parse(data)
        if not isinstance(response, Response):
            return
        shared = None
        if node_of(response.top_via.params.get("ft") or "") == self.node:
            # (Never for a third node: what came over the link goes no further.)
            shared = self._shared_udp(udp)
        await self._response(response, flow, shared)

    def _shared_udp(self, udp: tuple[Address, Address] | None) -> Flow | None:
        """Our UDP flow for a datagram another node took in on its socket: the workers
        of `serve --workers N` share the SIP port (SO_REUSEPORT), and the kernel hands a
        peer's datagram to the worker its 4-tuple hashes to, not to the one that sent
        the request. Only a socket with our own local address is the one we sent from.
        The node's word for the pair is trusted: the link is authenticated and every
        frame sealed (proxy/sip/nodes.py), and a node forwards only what arrived on its
        own flows. The branch seal still decides: a request that went out on a stream,
        or to another address, is not answered by this."""
        if udp is None or self.udp_flow is None:
            return None
        local, remote = udp
        flow = self.udp_flow(remote)
        if flow is None or flow.local != local:
            return None
        return flow

    async def _response(self, response: Response, flow: Flow, shared: Flow | None = None) -> None:
        """`shared`: our UDP flow a forwarded datagram may stand for (`_shared_udp`);
        the request may have gone to either (ours, or the node's flow on that socket)."""
        top = response.top_via
        token = top.params.get("ft")
        if self.node and token and (node := node_of(token)) != self.node:
            if self.cluster is not None and node and flow.id not in self._remote:
                if not await self.cluster.forward_response(node, response.serialize(), flow):
                    self.metrics.errors.labels("node_unreachable").inc()
            else:
                self.metrics.errors.labels("response_unroutable").inc()
            return
        came_from = self._flow(token)
        if came_from is None:
            self.metrics.errors.labels("response_unroutable").inc()
            return
        branch = top.branch or ""
        if not self._sealer.answers_branch(branch, came_from, flow) and (
            shared is None or not self._sealer.answers_branch(branch, came_from, shared)
        ):
            # Not from where its request went: a forgery (or a peer's confusion).
            self.metrics.errors.labels("response_not_from_target").inc()
            return
        if self._across and response.status >= 200:
            self._across.pop((top.branch or "", response.cseq.method), None)
        response.pop_via()
        if self.parking.watching and response.cseq.method == "INVITE":
            self.parking.answered(came_from, response.call_id, response.top_via.branch or "")
        pending = None
        if response.status >= 200 and response.cseq.method == "REGISTER" and top.branch:
            pending = self._pending.pop(top.branch, None)
            if pending is not None and self.clock.now() - pending.created > PENDING_TTL:
                pending = None  # its transaction is over: an answer now changes nothing
        identity = None
        if pending is not None and 200 <= response.status < 300 and pending.contact:
            identity = PushIdentity.of(pending.contact.push)
            if identity is not None:
                # RFC 8599 5.6.1: we wake it; +sip.pnsreg if it can refresh on its own.
                response.add(
                    "Feature-Caps", self.parking.feature_caps(pending.contact, pending.expires)
                )
        data = response.serialize()
        await self._send_bytes(came_from, data)
        if pending is None:
            return
        if not came_from.transport.reliable:
            self._keep_answer(top.branch or "", data)
        if 200 <= response.status < 300:
            if identity is not None and pending.expires > 0:
                # The phone is back: what was parked for it goes out on its new flow.
                subject = Subject(pending.username, pending.serial)
                await self.parking.deliver(identity, subject, pending.instance, pending.flow)
                if self.cluster is not None:  # calls parked on other nodes come too
                    self.cluster.registered(
                        identity, subject, pending.instance, pending.flow, pending.expires
                    )
            await self._write_binding(pending)


_K = TypeVar("_K")
_W = TypeVar("_W", _Across, _Routed)


def _keep(waiting: OrderedDict[_K, _W], key: _K, value: _W, now: float) -> None:
    """Remember a request waiting for its final answer from another node: the oldest go
    past ACROSS_LIMIT, and any past ACROSS_TTL (no answer comes after timer C)."""
    while waiting and (
        len(waiting) >= ACROSS_LIMIT or now - next(iter(waiting.values())).at > ACROSS_TTL
    ):
        waiting.popitem(last=False)
    waiting[key] = value


def _www_authenticate(challenges: list[str]) -> tuple[tuple[str, str], ...]:
    return tuple(("WWW-Authenticate", challenge) for challenge in challenges)


def _carries_token(uri: SipUri) -> bool:
    """Whether a URI carries one of our tokens (a Path's `ft`, a dialog's `dt`)."""
    params = uri.params
    return params.get("ft") is not None or params.get("dt") is not None


def _default_port(uri: SipUri) -> int:
    """The port a URI without one means (RFC 3263 4.2, RFC 7118 for WebSocket)."""
    transport = uri.transport
    if transport == "ws":
        return 80
    if transport == "wss":
        return 443
    return 5061 if uri.scheme == "sips" or transport == "tls" else 5060


def _canonical_host(host: str) -> str:
    """A host as one spelling: an address in its canonical form (an IPv4-mapped IPv6
    address as the IPv4 address), a name in lower case."""
    host = host.strip("[]").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
