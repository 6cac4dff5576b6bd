"""The app leg of SIPIS mode: the app's own connection to softrelay.

An app whose account softrelay registers at the provider connects, when it is woken or
opened, to softrelay's SIP port (the relay's transports: UDP, TCP, TLS, WebSocket) and
REGISTERs for its account:

    REGISTER sip:sipis.<relay domain> SIP/2.0
    To: <sip:<account id>@sipis.<relay domain>>
    Contact: <sip:...@<the app's address>;transport=tcp>
    Authorization: Bearer <device secret>

The device secret proves the account (RFC 8898 carries Bearer tokens in SIP); the SIP
password never reaches softrelay. No or another scheme: 401 with a Bearer challenge; a
wrong or stale secret: 403, and nothing changes. Each accepted REGISTER is the app's
contact (`Accounts.authenticate` touches the account: its 7-day retention restarts).

The binding (account -> the flow and the Contact it registered) lives in memory only,
as long as its expiry and its flow: the relay's `relay` category. The relay hands the
leg the REGISTER and, from then on, every message of that flow (proxy/sip/relay.py
`AppLeg`); the leg answers REGISTERs, matches the app's responses to the requests it
sent (by its Via branch), and gives the app's other requests to `on_request` (the calls'
in-dialog requests: sipis/calls.py). Those listening on `on_registered` hear of each
accepted REGISTER: parked calls and waiting texts go out on its flow.

In a cluster the provider sends an account's calls and texts to the node that holds its
lease (sipis/lease.py), while the app connects to any node (another host, or any worker
of `serve --workers N`). The node the app reaches checks the device secret (the store is
shared), asks Redis which live node holds the lease and, if another, hands the app's
flow there over the internal link (proxy/sip/nodes.py, the `app` frame): the REGISTER,
its Authorization taken off, then every message of that flow until a REGISTER finds the
lease elsewhere. On the holder a stand-in flow (the app's transport, and our address as
the app reached it, for Via and Record-Route) is the app's connection: its AppLeg binds
it, and the calls, texts and the calls the app places run there as on one node; what it
sends on the flow goes back as `deliver` frames. A call across nodes:

    provider ── INVITE ──► A (lease; parks, pushes) ·· app wakes ·· app ── REGISTER ──► B
    B: secret checked, holder A ── app frame (REGISTER, no secret) ──► A: bound, 200 ──► B ──► app
    A ── INVITE (Record-Route: B's address) ── deliver ──► B ──► app; its answers: app frames to A

Trust: A takes the account id of an `app` frame as B's word, without the secret (which
never leaves B). Nodes trust each other: they share the cluster secret that
authenticates every frame, the store and the keyring, so a node that lied could read the
accounts anyway. A frame comes only from an authenticated node, and a node hands on only
its own flows' messages, never what came over the link. The holder unreachable (it died;
its lease runs out within the lease time): 503 with Retry-After, and the app's next
REGISTER asks again; Redis unreachable: 503 likewise. An app bound on its own node keeps
that binding if the lease moves away, until it registers again (refresh or reconnect).

Nothing here logs a secret, a Contact or an address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cluster.redis import ClusterUnavailable
from privacy.backend import StorageUnavailable
from privacy.clock import Clock
from proxy.sip.flow import Flow, FlowClosed
from proxy.sip.headers import parse_name_addr
from proxy.sip.message import Request, Response
from proxy.sip.parser import parse
from proxy.sip.responses import make_response
from proxy.sip.syntax import SipParseError
from proxy.sip.uri import SipUri, Uri
from sipis.account import Account
from sipis.accounts import Accounts
from sipis.uac import Inbound, Sleep

log = logging.getLogger("softrelay.sipis")

MAX_EXPIRES = 3600  # the longest binding an app gets; it registers again to keep it
DEFAULT_EXPIRES = 600
PENDING_LIMIT = 10_000  # requests to apps awaiting their answer, at most
TRANSACTION_WAIT = 32.0  # 64*T1: a non-INVITE request the app does not answer
RETRY_AFTER = 5  # seconds, in a 503 while the cluster cannot say where the account is
MARK = "sipis"  # the parameter of our Record-Route: a Route entry with it names us


@dataclass(frozen=True, slots=True)
class Binding:
    """An app connected for its account: where requests for the account go."""

    account: Account
    flow: Flow
    contact: SipUri  # the Contact it registered: the Request-URI of what we send it
    expires_at: float  # clock time


@dataclass(eq=False, slots=True)
class _Pending:
    flow: Flow
    future: asyncio.Future[Response | None]
    provisional: Callable[[Response], Awaitable[None]] | None


RequestHandler = Callable[[Binding, Request], Awaitable[None]]
Listener = Callable[[Binding], Awaitable[None]]


class Holders(Protocol):
    """Which node holds an account's lease (sipis/lease.py `Leases`)."""

    async def holder(self, account_id: str) -> str | None: ...


class AppLink(Protocol):
    """The internal link between nodes (proxy/sip/nodes.py `Nodes`)."""

    node_id: str

    async def forward_app(self, node: str, account_id: str, data: bytes, flow: Flow) -> bool: ...


class AppLeg:
    """The apps' connections (see the module docstring); the relay's `AppLeg`."""

    def __init__(
        self,
        domain: str,
        accounts: Accounts,
        clock: Clock,
        *,
        public_host: str | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.domain = domain.lower()
        self._accounts = accounts
        self._clock = clock
        self._public_host = public_host
        self._sleep = sleep
        self._bindings: dict[str, Binding] = {}
        self._flow_accounts: dict[int, str] = {}  # flow id -> the account bound on it
        self._pending: dict[tuple[str, str], _Pending] = {}  # (our branch, method)
        self.on_registered: list[Listener] = []
        self.on_request: RequestHandler | None = None
        # In a cluster (`join`): the lease lookup, the internal link, and our flows whose
        # messages go to the node holding their account's lease: flow id -> (node, id).
        self._holders: Holders | None = None
        self._link: AppLink | None = None
        self._handed: dict[int, tuple[str, str]] = {}

    def binding(self, account_id: str) -> Binding | None:
        """The app connected for the account now, if any (its flow open, unexpired)."""
        binding = self._bindings.get(account_id)
        if binding is None:
            return None
        if binding.flow.closed or binding.expires_at <= self._clock.now():
            del self._bindings[account_id]
            return None
        return binding

    # --- our address on a flow ------------------------------------------------------

    def address(self, flow: Flow) -> SipUri:
        """softrelay as the app on `flow` reaches it."""
        host, port = flow.local
        params = () if flow.transport.value == "udp" else (("transport", flow.transport.value),)
        uri = SipUri(self._public_host or host, port=port)
        for name, value in params:
            uri = uri.with_param(name, value)
        return uri

    def record_route(self, flow: Flow) -> str:
        """Our Record-Route for a dialog with the app on `flow`: its requests of the
        dialog come back to us on the flow (whose every message the leg gets)."""
        return f"<{self.address(flow).with_param('lr').with_param(MARK)}>"

    def _via(self, flow: Flow, branch: str) -> str:
        return f"SIP/2.0/{flow.transport.via_name} {self.address(flow).host_port};branch={branch}"

    # --- what the relay hands us ----------------------------------------------------

    async def handle(self, message: Request | Response, flow: Flow) -> None:
        handed = self._handed.get(flow.id)
        if handed is not None and not (
            isinstance(message, Request) and message.method == "REGISTER"
        ):
            await self._pass_on(handed, message, flow)
        elif isinstance(message, Response):
            await self._response(message, flow)
        elif message.method == "REGISTER":
            await self._register(message, flow)
        else:
            await self._request(message, flow)

    async def _request(self, message: Request, flow: Flow) -> None:
        binding = self._of_flow(flow)
        if binding is None:
            if message.method != "ACK":
                await self.reply(message, flow, 403, "Register First")
            return
        _take_own_routes(message)
        if self.on_request is None:
            await self.reply(message, flow, 501)
            return
        await self.on_request(binding, message)

    def _flow_gone(self, flow: Flow) -> None:
        self._flow_accounts.pop(flow.id, None)

    def _of_flow(self, flow: Flow) -> Binding | None:
        # By the flow's id, not a scan of every binding: this runs for each message.
        account_id = self._flow_accounts.get(flow.id)
        binding = None if account_id is None else self.binding(account_id)
        return binding if binding is not None and binding.flow is flow else None

    async def reply(
        self,
        request: Request,
        flow: Flow,
        status: int,
        reason: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        if request.method != "ACK":
            await _send(flow, make_response(request, status, reason, headers).serialize())

    async def _register(self, request: Request, flow: Flow) -> None:
        to = request.to.uri
        account_id = to.user if isinstance(to, SipUri) else None
        if not isinstance(to, SipUri) or to.host.lower() != self.domain or not account_id:
            await self.reply(request, flow, 404, "Not Served Here")
            return
        authorization = request.get("Authorization") or ""
        scheme, _, secret = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            challenge = ("WWW-Authenticate", f'Bearer realm="{self.domain}"')
            await self.reply(request, flow, 401, None, (challenge,))
            return
        try:
            account = await self._accounts.authenticate(account_id, secret.strip())
        except StorageUnavailable:
            await self.reply(request, flow, 503, "Store Unavailable", (("Retry-After", "5"),))
            return
        if account is None:
            log.info("sipis.app_refused")
            await self.reply(request, flow, 403, "Wrong Device Secret")
            return
        if self._link is not None and self._holders is not None:
            try:
                holder = await self._holders.holder(account_id)
            except ClusterUnavailable:
                retry = (("Retry-After", str(RETRY_AFTER)),)
                await self.reply(request, flow, 503, "Cluster Unavailable", retry)
                return
            if holder is not None and holder != self._link.node_id:
                await self._hand_over(holder, account_id, request, flow)
                return
            self._handed.pop(flow.id, None)  # the lease came here (or is nobody's)
        await self._bind(account, request, flow)

    async def _bind(self, account: Account, request: Request, flow: Flow) -> None:
        """The REGISTER of the app on `flow` for `account` (its secret checked)."""
        account_id = account.account_id
        contacts = [] if request.contact_star else request.contacts
        expires = request.expires if request.expires is not None else DEFAULT_EXPIRES
        if contacts and contacts[0].expires is not None:
            expires = contacts[0].expires
        current = self._bindings.get(account_id)
        if request.contact_star or (contacts and expires == 0):
            if current is not None and current.flow is flow:
                del self._bindings[account_id]
            await self.reply(request, flow, 200)
            return
        if not contacts:  # a fetch: what is bound now
            listed = () if current is None else (("Contact", f"<{current.contact}>"),)
            await self.reply(request, flow, 200, None, listed)
            return
        uri = contacts[0].uri
        if not isinstance(uri, SipUri):
            await self.reply(request, flow, 416)
            return
        expires = min(expires, MAX_EXPIRES)
        binding = Binding(account, flow, uri, self._clock.now() + expires)
        self._bindings[account_id] = binding
        if flow.id not in self._flow_accounts:
            flow.on_close.append(self._flow_gone)
        self._flow_accounts[flow.id] = account_id
        answer = (("Contact", f"<{uri}>;expires={expires}"), ("Expires", str(expires)))
        await self.reply(request, flow, 200, None, answer)
        for listener in self.on_registered:
            await listener(binding)

    # --- in a cluster: the app on one node, its account's lease on another ------------

    def join(self, holders: Holders, link: AppLink) -> None:
        """In a cluster: an app whose account's lease another live node holds is handed
        to that node (the module docstring)."""
        self._holders, self._link = holders, link

    async def _hand_over(self, node: str, account_id: str, request: Request, flow: Flow) -> None:
        """Pass the app's REGISTER (its secret checked here) to `node`, and every message
        of its flow after it, until a REGISTER finds the lease elsewhere."""
        request.remove("Authorization")  # the device secret never leaves this node
        current = self._bindings.get(account_id)
        if current is not None and current.flow is flow:
            del self._bindings[account_id]  # bound here before the lease moved: there now
        if flow.id not in self._handed:
            flow.on_close.append(self._unhand)
        self._handed[flow.id] = (node, account_id)
        await self._pass_on((node, account_id), request, flow)

    def _unhand(self, flow: Flow) -> None:
        self._handed.pop(flow.id, None)

    async def _pass_on(
        self, handed: tuple[str, str], message: Request | Response, flow: Flow
    ) -> None:
        node, account_id = handed
        assert self._link is not None
        if await self._link.forward_app(node, account_id, message.serialize(), flow):
            return
        # The holder is unreachable (it died; its lease runs out within the lease time):
        # the app's next REGISTER asks again.
        self._handed.pop(flow.id, None)
        log.info("sipis.app_node_unreachable")
        if isinstance(message, Request) and message.method != "ACK":
            retry = (("Retry-After", str(RETRY_AFTER)),)
            await self.reply(message, flow, 503, "Account Node Unreachable", retry)

    async def from_node(self, account_id: str, flow: Flow, data: bytes) -> None:
        """A message of an app connected to another node, for an account whose lease
        this node holds (the `app` frame of proxy/sip/nodes.py); `flow` stands for the
        app's flow there, and what is sent on it goes back to the app. That node checked
        the device secret of each REGISTER and took it off: its word for the account is
        taken, as the cluster's nodes trust each other (the module docstring)."""
        try:
            message = parse(data)
            if not (isinstance(message, Request) and message.method == "REGISTER"):
                await (
                    self._response(message, flow)
                    if isinstance(message, Response)
                    else self._request(message, flow)
                )
                return
            to = message.to.uri
        except SipParseError:
            return  # parsed on the other node already: not expected
        if not isinstance(to, SipUri) or to.user != account_id:
            await self.reply(message, flow, 403, "Not This Account")
            return
        try:
            account = await self._accounts.get(account_id)
        except StorageUnavailable:
            await self.reply(message, flow, 503, "Store Unavailable", (("Retry-After", "5"),))
            return
        if account is None:  # deleted since the other node read it
            await self.reply(message, flow, 403, "Wrong Device Secret")
            return
        await self._bind(account, message, flow)

    # --- requests to the app ----------------------------------------------------------

    async def request(
        self,
        flow: Flow,
        request: Request,
        *,
        provisional: Callable[[Response], Awaitable[None]] | None = None,
        wait: float = TRANSACTION_WAIT,
    ) -> Response | None:
        """Send `request` to the app on `flow` under a Via of ours; its final response
        (our Via taken off), or None: the flow went, or no answer within `wait`.
        `provisional` gets each 1xx but 100."""
        if len(self._pending) >= PENDING_LIMIT:
            return None
        branch = "z9hG4bK" + secrets.token_hex(10)
        request.prepend("Via", self._via(flow, branch))
        future: asyncio.Future[Response | None] = asyncio.get_running_loop().create_future()
        key = (branch, request.method)
        self._pending[key] = _Pending(flow, future, provisional)

        def gone(_: Flow) -> None:
            if not future.done():
                future.set_result(None)

        flow.on_close.append(gone)
        try:
            if not await _send(flow, request.serialize()):
                return None
            napping = asyncio.ensure_future(self._sleep(wait))
            waits: set[asyncio.Future[Any]] = {future, napping}
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                napping.cancel()
            return future.result() if future.done() else None
        finally:
            self._pending.pop(key, None)
            with contextlib.suppress(ValueError):
                flow.on_close.remove(gone)

    async def send(self, flow: Flow, request: Request, *, via: bool = True) -> bool:
        """Send a request no answer is awaited for (ACK; with `via=False` one whose Via
        is set already: the ACK or CANCEL of an INVITE we sent); whether it went."""
        if via:
            request.prepend("Via", self._via(flow, "z9hG4bK" + secrets.token_hex(10)))
        return await _send(flow, request.serialize())

    async def _response(self, response: Response, flow: Flow) -> None:
        try:
            key = (response.top_via.branch or "", response.cseq.method)
        except SipParseError:
            return
        pending = self._pending.get(key)
        if pending is None or pending.flow is not flow or pending.future.done():
            return  # not ours, from another flow, or late: dropped
        response.pop_via()
        if response.status >= 200:
            pending.future.set_result(response)
        elif response.status > 100 and pending.provisional is not None:
            await pending.provisional(response)


def provider_request_to_app(request: Request, inbound: Inbound, target: Uri) -> Request | None:
    """The provider's request of a dialog as it goes on to the app: a copy with one
    Max-Forwards less, `target` (the app's Contact) as Request-URI and the provider's
    Route taken off. None when Max-Forwards ran out: the provider had its 483 (an ACK
    gets no answer)."""
    forwarded = parse(request.serialize())
    assert isinstance(forwarded, Request)
    try:
        forwarded.decrement_max_forwards()
    except SipParseError:
        if request.method != "ACK":
            inbound.respond(483)
        return None
    forwarded.uri = target
    forwarded.remove("Route")
    return forwarded


def drop_own_record_route(message: Request | Response) -> None:
    """Take our Record-Route entry off what goes to the provider: it names us as the
    app reaches us, and the provider reaches us by the Contact we registered."""
    values = message.values("Record-Route")
    kept = [v for v in values if not _marked(v)]
    if len(kept) == len(values):
        return
    message.remove("Record-Route")
    for value in kept:
        message.add("Record-Route", value)


def _marked(value: str) -> bool:
    try:
        uri = parse_name_addr(value).uri
    except SipParseError:
        return False
    return isinstance(uri, SipUri) and MARK in uri.params


def _take_own_routes(request: Request) -> None:
    """Route entries on top that carry our mark (the app's route set starts with us)."""
    while routes := request.routes:
        uri = routes[0].uri
        if not (isinstance(uri, SipUri) and MARK in uri.params):
            break
        request.pop_value("Route")


async def _send(flow: Flow, data: bytes) -> bool:
    try:
        await flow.send(data)
    except (FlowClosed, OSError):
        return False
    return True
