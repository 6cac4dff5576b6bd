"""Incoming calls of SIPIS accounts: park, push, deliver to the app, stay in the dialog.

The provider sends an INVITE to the Contact softrelay registered for the account
(`sip:<account id>@<us>`, sipis/registrar.py); Registrations hands it here with the
account and its `Inbound`. A sleeping app (no binding on the app leg, sipis/appleg.py)
is woken as the relay wakes a phone (proxy/sip/wake.py), and the caller hears the same:

    provider                 softrelay (calls)                      push      app
       | INVITE ---------------> |                                    |         |
       | <------------- 100 ---- | park (bounded per account, in all) |         |
       |                         | -- incoming_call (no caller) ----> | ------> |
       | <-- 180 Push-Status --- |  (the provider accepted the push)  |         |
       |                         | <----------- REGISTER, Bearer <device secret> |
       |                         | ------------------------------- 200 -------> |
       |                         | -- INVITE (our Via, Record-Route) ---------> |
       | <------------- 180 ---- | <---------------------------------- 180 ---- |
       | <-- 200 (our Contact) - | <---------------------------------- 200 ---- |
       | ACK -------------------> | ----------------------------------- ACK ---> |
       | <------------- BYE ---- | <-------- BYE (Route: us) ------------------ |
       | 200 -------------------> | ----------------------------------- 200 ---> |

    no REGISTER within the wake timeout: 480 with a Reason
    the provider's CANCEL while parked: 200, 487, and the "call cancelled" push
    the app declines (486, 603...): its answer goes to the caller; we ACK the app

softrelay stays in the dialog. Towards the app by Record-Route: the app's requests of
the dialog come back on its flow. Towards the provider by the Contact: the app's 1xx/2xx
go out with the Contact softrelay registered for the account, so the provider (which
only knows that Contact; the app is behind NAT on a flow to us) sends the dialog's
requests there, and Registrations hands them here by the account id in it. The app's
requests of the dialog go to the account's provider (its registrar as outbound proxy),
which follows its own Record-Route to the caller.

Calls the app places go out through sipis/outgoing.py (this module hands it the app's
requests it takes and the provider's requests of those dialogs).

An app already connected gets the INVITE at once, without a push. One delivery per
parked call: it leaves the parked set as it goes. Nothing of the caller is in a push
(WakeRequest carries the account's token, the app and a random call id) or in a log.
Parked calls, dialogs and the answers awaited are in memory only, bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from privacy.clock import Clock
from privacy.tasks import Tasks, TasksClosed
from proxy.sip.flow import FlowClosed
from proxy.sip.message import Request, Response
from proxy.sip.parser import parse
from proxy.sip.responses import make_response
from proxy.sip.syntax import SipParseError
from proxy.sip.uri import Uri
from push.service import OVERLOADED, PushService
from push.wake import Delivered, Reason, Service, TokenDead, WakeRequest
from sipis.account import Account
from sipis.appleg import AppLeg, Binding, drop_own_record_route, provider_request_to_app
from sipis.outgoing import Outgoing, Provider
from sipis.uac import Inbound, Sleep, UacError, ack_of, answer_unavailable, cancel_of

log = logging.getLogger("softrelay.sipis")

TIMER_C = 180.0  # seconds an INVITE sent to the app may ring (RFC 3261 16.6 timer C)
DIALOGS_LIMIT = 10_000  # dialogs relayed at once, at most (the oldest are forgotten)
TICK = 1.0  # seconds between checks of the wake timeouts (`run_forever`)


@dataclass(frozen=True, slots=True)
class CallSettings:
    # SIPIS waits two minutes for the app (its T1); a woken app is back in seconds.
    wake_timeout: float = 120.0
    max_parked: int = 1_000  # parked INVITEs in all; more get 503
    max_per_account: int = 4  # parked INVITEs per account; more get 503
    retry_after: int = 5  # seconds, in those 503s


TextHandler = Callable[[Account, Request, Inbound], Awaitable[None]]
# A push found the account's token dead (sipis/accounts.py forget_dead_token).
DeadToken = Callable[[Account, str], Awaitable[None]]


@dataclass(eq=False, slots=True)
class _Call:
    account: Account
    invite: Request  # as the provider sent it: memory only
    inbound: Inbound
    deadline: float  # clock time
    to_tag: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    call_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    parked: bool = True
    forwarded: Request | None = None  # the INVITE as sent to the app (our Via on top)
    flow_binding: Binding | None = None


@dataclass(eq=False, slots=True)
class _Dialog:
    account: Account
    binding: Binding
    target: Uri  # the app's Contact: the Request-URI of the provider's requests to it


class CallMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.parked = Gauge("softrelay_sipis_parked", "SIPIS INVITEs parked now", registry=registry)
        self.ends = Counter(
            "softrelay_sipis_calls",
            "SIPIS incoming calls by how their INVITE ended here",
            ["end"],
            registry=registry,
        )


class Calls:
    """See the module docstring. `from_provider` is Registrations' handler."""

    def __init__(
        self,
        settings: CallSettings,
        leg: AppLeg,
        push: PushService | None,
        clock: Clock,
        registry: CollectorRegistry,
        *,
        texts: TextHandler | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self._provider: Provider | None = None  # set once the registrar engine runs
        # The calls and texts the apps place (sipis/outgoing.py).
        self.outgoing = Outgoing(leg, registry)
        self._leg = leg
        self._push = push
        self._clock = clock
        self._texts = texts
        self._sleep = sleep
        self.dead_token: DeadToken | None = None  # set once the registrar engine runs
        self._calls: dict[tuple[str, str], _Call] = {}  # (Call-ID, provider's branch)
        self._dialogs: OrderedDict[str, _Dialog] = OrderedDict()  # by Call-ID
        self._tasks = Tasks(log, "sipis.call_failed")
        self._closed = False
        self.metrics = CallMetrics(registry)
        leg.on_registered.append(self.app_registered)
        leg.on_request = self.from_app

    @property
    def provider(self) -> Provider | None:
        return self._provider

    @provider.setter
    def provider(self, provider: Provider | None) -> None:
        self._provider = provider
        self.outgoing.provider = provider

    def parked_for(self, account_id: str) -> int:
        return sum(
            1 for c in self._calls.values() if c.parked and c.account.account_id == account_id
        )

    # --- the provider's requests ---------------------------------------------------

    async def from_provider(self, account: Account, request: Request, inbound: Inbound) -> None:
        method = request.method
        if method == "CANCEL":
            await self._cancel(account, request, inbound)
        elif request.to.tag is not None and self.outgoing.has(request.call_id):
            await self.outgoing.from_provider(account, request, inbound)
        elif request.to.tag is not None:
            await self._in_dialog(account, request, inbound)
        elif method == "INVITE":
            await self._invite(account, request, inbound)
        elif method == "MESSAGE" and self._texts is not None:
            await self._texts(account, request, inbound)
        else:
            await answer_unavailable(request, inbound)

    async def _invite(self, account: Account, request: Request, inbound: Inbound) -> None:
        key = (request.call_id, request.top_via.branch or "")
        if key in self._calls:
            return  # a retransmission (the Uac absorbs most)
        if self._closed:
            inbound.respond(503, None, (("Retry-After", str(self.settings.retry_after)),))
            return
        call = _Call(account, request, inbound, self._clock.now() + self.settings.wake_timeout)
        binding = self._leg.binding(account.account_id)
        if binding is not None:  # the app is connected: no wake
            self._calls[key] = call
            inbound.respond(100)
            self._deliver(call, binding)
            return
        settings = self.settings
        parked = sum(1 for c in self._calls.values() if c.parked)
        if parked >= settings.max_parked or self.parked_for(account.account_id) >= (
            settings.max_per_account
        ):
            self.metrics.ends.labels("refused").inc()
            retry = (("Retry-After", str(settings.retry_after)),)
            inbound.send(make_response(request, 503, "Too Many Parked Calls", retry))
            return
        if self._push is None:
            self.metrics.ends.labels("not_woken").inc()
            self._answer(call, 480, "not reachable")
            return
        self._calls[key] = call
        self.metrics.parked.inc()
        inbound.respond(100)
        self._spawn(self._wake(call), "sipis.wake")

    async def _wake(self, call: _Call) -> None:
        push = self._push
        assert push is not None
        target = call.account.push
        try:
            service = Service(target.provider.lower())
        except ValueError:
            service = None
        app_id = None if service is None else push.app_for(service, target.app_id)
        if service is None or app_id is None:
            self._end(call, 480, "push not configured for this app", "push_failed")
            return
        if not target.live:  # declared dead before: not pushed again
            self._end(call, 480, "push token no longer valid", "push_failed")
            return
        result = await push.wake(
            WakeRequest(
                service, target.token, app_id, Reason.INCOMING_CALL, call.deadline, call.call_uuid
            )
        )
        outcome = result.outcome
        if isinstance(outcome, TokenDead):
            # Cleared whatever became of the call meanwhile, before the caller hears (a
            # next call finds it gone); the caller hears even if the store fails.
            try:
                if self.dead_token is not None:
                    await self.dead_token(call.account, target.token)
            finally:
                self._end(call, 480, "push token no longer valid", "push_failed")
            return
        if not call.parked or self._calls.get(_key(call)) is not call:
            return  # delivered, cancelled or timed out meanwhile
        if isinstance(outcome, Delivered):
            headers = (("Push-Status", "delivered"),)
            response = make_response(call.invite, 180, None, headers, to_tag=call.to_tag)
            call.inbound.send(response)
        elif outcome == OVERLOADED:
            self._end(call, 503, "push service busy", "refused")
        else:
            self._end(call, 480, "push failed", "push_failed")

    def _answer(self, call: _Call, status: int, text: str) -> None:
        headers: tuple[tuple[str, str], ...] = ()
        if text:
            headers = (("Reason", f'SIP;cause={status};text="{text}"'),)
        if status == 503:
            headers = (*headers, ("Retry-After", str(self.settings.retry_after)))
        call.inbound.send(make_response(call.invite, status, None, headers, to_tag=call.to_tag))

    def _end(self, call: _Call, status: int, text: str, end: str) -> None:
        """Answer a parked INVITE finally and forget it."""
        if not self._unpark(call):
            return
        self._calls.pop(_key(call), None)
        self.metrics.ends.labels(end).inc()
        self._answer(call, status, text)

    def _unpark(self, call: _Call) -> bool:
        if not call.parked or self._calls.get(_key(call)) is not call:
            return False
        call.parked = False
        self.metrics.parked.dec()
        return True

    async def _cancel(self, account: Account, cancel: Request, inbound: Inbound) -> None:
        call = self._calls.get((cancel.call_id, cancel.top_via.branch or ""))
        if call is None or call.account.account_id != account.account_id:
            inbound.respond(481)
            return
        inbound.respond(200)
        if call.parked:
            self._end(call, 487, "", "cancelled")
            self._spawn(self._cancelled_push(call), "sipis.cancel_push")
            return
        forwarded, binding = call.forwarded, call.flow_binding
        if forwarded is not None and binding is not None:
            # Delivered: the app's INVITE transaction is CANCELled; its 487 comes back.
            await self._leg.send(binding.flow, cancel_of(forwarded), via=False)

    async def _cancelled_push(self, call: _Call) -> None:
        push = self._push
        if push is None:
            return
        target = call.account.push
        service = Service(target.provider.lower())
        app_id = push.app_for(service, target.app_id)
        if app_id is None or not target.live:
            return
        deadline = self._clock.now() + self.settings.wake_timeout
        await push.wake(
            WakeRequest(
                service, target.token, app_id, Reason.CALL_CANCELLED, deadline, call.call_uuid
            )
        )

    async def expire(self) -> int:
        """480 to every parked INVITE past its wake timeout; how many."""
        now = self._clock.now()
        late = [c for c in self._calls.values() if c.parked and c.deadline <= now]
        for call in late:
            self._end(call, 480, "wake timeout", "timeout")
        return len(late)

    async def run_forever(self) -> None:
        """The wake timeouts, checked every TICK (the app's task owns it)."""
        while True:
            await self._sleep(TICK)
            await self.expire()

    async def close(self) -> None:
        """At shutdown: every parked INVITE gets 503 with Retry-After; nothing more is
        parked; the tasks under way are cancelled."""
        self._closed = True
        for call in [c for c in self._calls.values() if c.parked]:
            self._end(call, 503, "softrelay shutting down", "shutdown")
        await self._tasks.close()
        await self.outgoing.close()

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        with contextlib.suppress(TasksClosed):  # closing: spawn closed the coroutine
            self._tasks.spawn(work, name=name)

    # --- delivery --------------------------------------------------------------------

    async def app_registered(self, binding: Binding) -> None:
        """The app connected for its account: its parked calls go out on its flow."""
        account_id = binding.account.account_id
        waiting = [
            c for c in self._calls.values() if c.parked and c.account.account_id == account_id
        ]
        for call in waiting:
            if self._unpark(call):
                self.metrics.ends.labels("delivered").inc()
                self._deliver(call, binding)

    def _deliver(self, call: _Call, binding: Binding) -> None:
        call.flow_binding = binding
        self._spawn(self._relay_invite(call, binding), "sipis.deliver")

    async def _relay_invite(self, call: _Call, binding: Binding) -> None:
        invite = parse(call.invite.serialize())  # a copy: the provider's stays as it came
        assert isinstance(invite, Request)
        try:
            invite.decrement_max_forwards()
        except SipParseError:
            self._calls.pop(_key(call), None)
            self._answer(call, 483, "")
            return
        invite.uri = binding.contact
        invite.remove("Route")
        invite.prepend("Record-Route", self._leg.record_route(binding.flow))
        call.forwarded = invite

        async def provisional(response: Response) -> None:
            await self._to_provider(call, response)

        final = await self._leg.request(binding.flow, invite, provisional=provisional, wait=TIMER_C)
        self._calls.pop(_key(call), None)
        if final is None:
            if not call.inbound.answered:
                self.metrics.ends.labels("app_silent").inc()
                self._answer(call, 480, "app did not answer")
            return
        if 200 <= final.status < 300:
            self._remember_dialog(call, binding, final)  # before its Contact is ours
        await self._to_provider(call, final)
        if not 200 <= final.status < 300:
            await self._leg.send(binding.flow, ack_of(invite, final), via=False)

    async def _to_provider(self, call: _Call, response: Response) -> None:
        """The app's answer to the INVITE, to the caller: with our registered Contact."""
        if call.inbound.answered and not 200 <= response.status < 300:
            return  # answered already (a CANCEL's 487 went first)
        _replace_contact(response, self._our_contact(call.account))
        drop_own_record_route(response)
        call.inbound.send(response)

    def _our_contact(self, account: Account) -> str | None:
        return None if self.provider is None else self.provider.contact(account.account_id)

    def _remember_dialog(self, call: _Call, binding: Binding, final: Response) -> None:
        """The app's 2xx: its Contact is the remote target of the provider's requests."""
        target: Uri = binding.contact
        with contextlib.suppress(SipParseError):
            if final.contacts:
                target = final.contacts[0].uri
        while len(self._dialogs) >= DIALOGS_LIMIT:
            self._dialogs.popitem(last=False)
        self._dialogs[call.invite.call_id] = _Dialog(call.account, binding, target)

    # --- requests of a dialog --------------------------------------------------------

    async def _in_dialog(self, account: Account, request: Request, inbound: Inbound) -> None:
        """The provider's request of a relayed dialog (ACK, BYE, re-INVITE...): to the app."""
        dialog = self._dialogs.get(request.call_id)
        if dialog is None or dialog.account.account_id != account.account_id:
            if request.method != "ACK":
                inbound.respond(481)
            return
        flow = dialog.binding.flow
        forwarded = provider_request_to_app(request, inbound, dialog.target)
        if forwarded is None:
            return
        if request.method == "ACK":
            await self._leg.send(flow, forwarded)
            return

        async def provisional(response: Response) -> None:
            _replace_contact(response, self._our_contact(account))
            inbound.send(response)

        final = await self._leg.request(flow, forwarded, provisional=provisional)
        if final is None:
            inbound.respond(408 if not flow.closed else 480)
            return
        if 200 <= final.status < 300:
            _replace_contact(final, self._our_contact(account))
        inbound.send(final)
        if request.method == "BYE" and final.status < 300:
            self._dialogs.pop(request.call_id, None)

    async def from_app(self, binding: Binding, request: Request) -> None:
        """The app's request on its flow (our Route taken off): a request of a dialog we
        relay goes to the provider; a call or text the app places, to sipis/outgoing.py;
        the rest is not served."""
        if self.outgoing.takes(request):
            await self.outgoing.from_app(binding, request)
            return
        dialog = self._dialogs.get(request.call_id)
        in_dialog = request.to.tag is not None
        if not in_dialog or dialog is None or dialog.binding.flow is not binding.flow:
            if request.method != "ACK":
                status, reason = (481, None) if in_dialog else (501, "Not Served From Apps")
                await self._leg.reply(request, binding.flow, status, reason)
            return
        provider = self.provider
        if provider is None:
            await self._leg.reply(request, binding.flow, 503)
            return
        try:
            request.decrement_max_forwards()
        except SipParseError:
            await self._leg.reply(request, binding.flow, 483)
            return
        if request.has("Contact"):
            _replace_contact(request, provider.contact(binding.account.account_id))
        if request.method == "ACK":
            with contextlib.suppress(UacError):
                await provider.send(dialog.account, request)
            return
        self._spawn(self._app_request(provider, dialog, binding, request), "sipis.app_request")

    async def _app_request(
        self, provider: Provider, dialog: _Dialog, binding: Binding, request: Request
    ) -> None:
        try:
            response = await provider.request(dialog.account, request)
        except UacError:
            await self._leg.reply(request, binding.flow, 408)
            return
        response.pop_via()  # ours (the Uac's): the app's is next
        with contextlib.suppress(FlowClosed, OSError):
            await binding.flow.send(response.serialize())
        if request.method == "BYE" and response.status < 300:
            self._dialogs.pop(request.call_id, None)


def _key(call: _Call) -> tuple[str, str]:
    return (call.invite.call_id, call.invite.top_via.branch or "")


def _replace_contact(message: Request | Response, contact: str | None) -> None:
    if contact is not None and message.has("Contact"):
        message.set("Contact", contact)
