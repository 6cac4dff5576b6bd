"""Calls and texts the app places: through softrelay to its provider, which answers the
provider's digest challenge with the stored HA1, so the app never sends its SIP
password here (it proves its account by the device secret of its REGISTER on the app
leg, sipis/appleg.py).

    app                       softrelay (outgoing)                        provider
     | INVITE sip:bob@... ---> | From: the account's AOR, Contact: the one |
     | <------------ 100 ----- |   registered for it, our Via only         |
     |                         | INVITE (CSeq n) --------------------------> |
     |                         | <--------------------------- 407 ---------- |
     |                         | ACK --------------------------------------> |
     |                         | INVITE (CSeq n+1, Proxy-Authorization) ---> |
     | <--- 180 (CSeq n) ----- | <--------------------------- 180 ---------- |
     | <--- 200 (CSeq n, RR) - | <--------------------------- 200 ---------- |
     | ACK (CSeq n) ---------> | ACK (CSeq n+1) ---------------------------> |
     | BYE (CSeq n+1) -------> | BYE (CSeq n+2) ---------------------------> |
     | <--------------- BYE -- | <---------------------------------- BYE --- |

What goes to the provider is a request of the account: From is its address of record
(with its display name; the app's From tag kept), Contact the one softrelay registered
(the provider's requests of the dialog come there, and Registrations hands them to
sipis/calls.py, which hands them here), our Via alone (the app's address stays here),
and no Authorization or Route of the app's (the registrar is the outbound proxy; a
pre-loaded route could point the provider anywhere). A 401 or 407 is answered once with
the HA1 (again only for a stale nonce); a challenge after that means the stored HA1 is
wrong, and the app gets 403 "Stored Credentials Refused", never a challenge (that would
ask it for the password).

Each answered challenge re-sends the request with CSeq+1, so the dialog keeps an offset:
the provider's CSeq is the app's plus the offset, for the rest of the dialog. The app's
ACK of the 2xx then carries the answered INVITE's number, its later requests strictly
increasing ones; what comes back to the app has its own CSeq, Via and From again. The
app's route set starts with softrelay (our Record-Route, last in the 2xx), so its ACK,
BYE and re-INVITE come back on its flow. The provider's requests of the dialog (the
callee's BYE) go to the app's Contact with the app's From as their To.

A CANCEL from the app is answered 200 at once and CANCELs the INVITE outstanding at the
provider (its branch and CSeq, RFC 3261 9.1); the provider's 487 reaches the app.
Nothing is stored: dialogs live in memory, bounded. No log names a target, a user or an
address.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, Counter

from privacy.tasks import Tasks, TasksClosed
from proxy.sip.flow import FlowClosed
from proxy.sip.message import Request, Response
from proxy.sip.parser import parse
from proxy.sip.syntax import SipParseError
from proxy.sip.uri import Uri
from sipis.account import Account
from sipis.appleg import AppLeg, Binding, provider_request_to_app
from sipis.uac import (
    ChallengeError,
    ClientInvite,
    Inbound,
    Timeout,
    UacError,
    choose_challenge,
    digest_authorization,
)

log = logging.getLogger("softrelay.sipis")

DIALOGS_LIMIT: Final = 10_000  # calls placed at once (and invites under way), at most
STARTED: Final = ("INVITE", "MESSAGE")  # what an app may start through its provider
MAX_ANSWERS: Final = 2  # digest answers per request: one, and one more for a stale nonce
# Never passed on: the app's own credentials, and challenges (they ask for the password).
_CREDENTIALS: Final = ("Authorization", "Proxy-Authorization")
_CHALLENGES: Final = ("WWW-Authenticate", "Proxy-Authenticate")


class Provider(Protocol):
    """What calls need of the registrar engine (sipis/registrar.py Registrations)."""

    def contact(self, account_id: str) -> str | None: ...

    async def request(self, account: Account, request: Request) -> Response: ...

    async def send(self, account: Account, request: Request) -> None: ...

    async def invite(
        self, account: Account, request: Request, *, accepted: Callable[[Response], None]
    ) -> ClientInvite: ...


class CredentialsRefused(Exception):
    """The provider refused our answer to its challenge, or we hold none that fits."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False, slots=True)
class _Dialog:
    """A call the app placed, from its INVITE until the BYE."""

    account: Account
    binding: Binding  # the app's flow
    app_from: str  # the app's From header: what its side of the dialog shows
    our_from: str  # the From towards the provider
    app_contact: Uri  # the app's Contact: the target of the provider's requests
    offset: int = 0  # provider CSeq = app CSeq + offset
    app_branch: str = ""  # the branch of the app's INVITE under way
    invite: ClientInvite | None = None  # the INVITE outstanding at the provider
    cancelled: bool = False
    established: bool = False  # a 2xx came


class OutgoingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.ends = Counter(
            "softrelay_sipis_outgoing",
            "Requests SIPIS apps placed through their provider, by method and outcome",
            ["method", "outcome"],
            registry=registry,
        )


class Outgoing:
    """See the module docstring. sipis/calls.py hands it the app's requests it `takes`
    and the provider's requests of the dialogs it `has`."""

    def __init__(self, leg: AppLeg, registry: CollectorRegistry) -> None:
        self.provider: Provider | None = None  # set once the registrar engine runs
        self._leg = leg
        self._dialogs: OrderedDict[str, _Dialog] = OrderedDict()  # by Call-ID
        # Non-INVITE requests of the apps under way (Call-ID, branch, method): a
        # retransmission over UDP is not sent to the provider again.
        self._under_way: set[tuple[str, str, str]] = set()
        self._tasks = Tasks(log, "sipis.outgoing_failed")
        self.metrics = OutgoingMetrics(registry)

    def has(self, call_id: str) -> bool:
        return call_id in self._dialogs

    def takes(self, request: Request) -> bool:
        """Whether the app's `request` is ours: a new INVITE or MESSAGE, a CANCEL
        (there is no other INVITE of the app's to cancel), or a request of a call the
        app placed."""
        if request.call_id in self._dialogs:
            return True
        return request.to.tag is None and request.method in (*STARTED, "CANCEL")

    # --- the app's requests --------------------------------------------------------

    async def from_app(self, binding: Binding, request: Request) -> None:
        flow = binding.flow
        provider = self.provider
        dialog = self._dialogs.get(request.call_id)
        if request.method == "CANCEL":
            await self._cancel(binding, request, dialog)
            return
        if provider is None:
            await self._leg.reply(request, flow, 503, None, (("Retry-After", "5"),))
            return
        if dialog is not None and dialog.binding.flow is not flow:
            await self._leg.reply(request, flow, 481)
            return
        if request.to.tag is None:
            if dialog is not None:  # same Call-ID, no To tag: a retransmission or a merge
                if request.method == "INVITE" and request.top_via.branch != dialog.app_branch:
                    await self._leg.reply(request, flow, 482)
                return
            if request.method == "INVITE":
                dialog = self._open(provider, binding, request)
                if dialog is None:
                    return
                await self._leg.reply(request, flow, 100)
                self._spawn(self._invite(provider, dialog, request), "sipis.outgoing_invite")
            else:
                self._once(request, self._message(provider, binding, request))
            return
        if dialog is None:
            if request.method != "ACK":
                await self._leg.reply(request, flow, 481)
            return
        if request.method == "ACK":
            if dialog.established:
                ack = self._towards_provider(provider, dialog, request)
                if ack is not None:
                    with contextlib.suppress(UacError):
                        await provider.send(dialog.account, ack)
            return  # an ACK of a non-2xx was the hop's: ours to the provider went already
        if request.method == "INVITE":
            await self._leg.reply(request, flow, 100)
            self._spawn(self._invite(provider, dialog, request), "sipis.outgoing_reinvite")
        else:
            self._once(request, self._in_dialog(provider, dialog, request))

    def _open(self, provider: Provider, binding: Binding, request: Request) -> _Dialog | None:
        """The state of a new call the app places; None when refused (answered)."""
        flow = binding.flow
        account = binding.account
        tag = request.from_.tag
        if tag is None or provider.contact(account.account_id) is None:
            self.metrics.ends.labels("INVITE", "refused").inc()
            if tag is None:
                reply = self._leg.reply(request, flow, 400, "Missing From Tag")
            else:  # the provider could not reach us for the dialog's requests
                retry = (("Retry-After", "30"),)
                reply = self._leg.reply(request, flow, 503, "Not Registered At Provider", retry)
            self._spawn(reply, "sipis.reply")
            return None
        while len(self._dialogs) >= DIALOGS_LIMIT:
            self._dialogs.popitem(last=False)  # the oldest is forgotten, as calls.py does
        try:
            app_contact: Uri = request.contacts[0].uri
        except (SipParseError, IndexError):
            app_contact = binding.contact
        dialog = _Dialog(
            account,
            binding,
            app_from=request.get("From") or "",
            our_from=f"{_from_of(account)};tag={tag}",
            app_contact=app_contact,
            app_branch=request.top_via.branch or "",
        )
        self._dialogs[request.call_id] = dialog
        return dialog

    async def _invite(self, provider: Provider, dialog: _Dialog, request: Request) -> None:
        """An INVITE of the app's (the first or a re-INVITE) to the provider, its
        responses back, answering challenges on the way."""
        flow = dialog.binding.flow
        dialog.app_branch = request.top_via.branch or ""
        dialog.cancelled = False
        outcome = "failed"
        try:
            out = self._towards_provider(provider, dialog, request)
            if out is None:
                await self._leg.reply(request, flow, 483)
                return
            answers = 0
            while True:
                if dialog.cancelled:
                    await self._leg.reply(request, flow, 487)
                    outcome = "cancelled"
                    return
                sent = _copy(out)  # the Uac adds its Via to what it sends

                def accepted(response: Response) -> None:
                    self._spawn(self._to_app(dialog, request, response), "sipis.outgoing_2xx")

                invite = await provider.invite(dialog.account, sent, accepted=accepted)
                dialog.invite = invite
                if dialog.cancelled:
                    await invite.cancel()
                final = await self._final(dialog, request, invite)
                dialog.invite = None
                if final.status not in (401, 407):
                    break
                answers += 1
                out = _answered(out, final, dialog.account, answers)
                dialog.offset += 1
            if 200 <= final.status < 300:
                dialog.established = True
                outcome = "answered"
            elif final.status == 487:
                outcome = "cancelled"
            await self._to_app(dialog, request, final)
        except CredentialsRefused as exc:
            outcome = "credentials_refused"
            log.info("sipis.outgoing_credentials_refused")
            await self._leg.reply(request, flow, 403, _phrase(exc.reason))
        except Timeout:
            outcome = "timeout"
            await self._leg.reply(request, flow, 408)
        except UacError:
            outcome = "unreachable"
            await self._leg.reply(request, flow, 503, "Provider Unreachable")
        finally:
            dialog.invite = None
            self.metrics.ends.labels("INVITE", outcome).inc()
            if not dialog.established:
                self._forget(request.call_id, dialog)

    async def _final(self, dialog: _Dialog, request: Request, invite: ClientInvite) -> Response:
        """The INVITE's final response; its provisionals go to the app meanwhile."""
        while True:
            response = await invite.next()
            if response.status >= 200:
                return response
            await self._to_app(dialog, request, response)

    async def _cancel(self, binding: Binding, cancel: Request, dialog: _Dialog | None) -> None:
        """The app's CANCEL: 200 at once (hop by hop); the INVITE at the provider is
        CANCELled, and its 487 goes to the app as the INVITE's answer."""
        flow = binding.flow
        if (
            dialog is None
            or dialog.binding.flow is not flow
            or dialog.established
            or cancel.top_via.branch != dialog.app_branch
        ):
            await self._leg.reply(cancel, flow, 481)
            return
        await self._leg.reply(cancel, flow, 200)
        dialog.cancelled = True
        if dialog.invite is not None:
            await dialog.invite.cancel()

    async def _in_dialog(self, provider: Provider, dialog: _Dialog, request: Request) -> None:
        """The app's BYE (or other request) of a call it placed: to the provider."""
        out = self._towards_provider(provider, dialog, request)
        flow = dialog.binding.flow
        if out is None:
            await self._leg.reply(request, flow, 483)
            return
        try:
            response, answers = await self._transact(dialog.account, out, provider)
        except CredentialsRefused as exc:
            await self._leg.reply(request, flow, 403, _phrase(exc.reason))
            return
        except UacError:
            await self._leg.reply(request, flow, 408)
            return
        dialog.offset += answers
        await self._to_app(dialog, request, response)
        if request.method == "BYE" and response.status < 300:
            self._forget(request.call_id, dialog)

    async def _message(self, provider: Provider, binding: Binding, request: Request) -> None:
        """A request outside a dialog (MESSAGE): to the provider as the account's, its
        answer back. Nothing is kept."""
        flow = binding.flow
        account = binding.account
        tag = request.from_.tag
        if tag is None:
            await self._leg.reply(request, flow, 400, "Missing From Tag")
            return
        dialog = _Dialog(
            account,
            binding,
            app_from=request.get("From") or "",
            our_from=f"{_from_of(account)};tag={tag}",
            app_contact=binding.contact,
        )
        out = self._towards_provider(provider, dialog, request)
        method = request.method
        if out is None:
            await self._leg.reply(request, flow, 483)
            return
        try:
            response, answers = await self._transact(account, out, provider)
        except CredentialsRefused as exc:
            self.metrics.ends.labels(method, "credentials_refused").inc()
            log.info("sipis.outgoing_credentials_refused")
            await self._leg.reply(request, flow, 403, _phrase(exc.reason))
            return
        except UacError:
            self.metrics.ends.labels(method, "unreachable").inc()
            await self._leg.reply(request, flow, 408)
            return
        dialog.offset = answers
        self.metrics.ends.labels(method, "answered" if response.status < 300 else "failed").inc()
        await self._to_app(dialog, request, response)

    async def _transact(
        self, account: Account, out: Request, provider: Provider
    ) -> tuple[Response, int]:
        """A non-INVITE request to the provider, challenges answered; its final response
        and how many answers it took (each one CSeq+1)."""
        answers = 0
        while True:
            sent = _copy(out)
            response = await provider.request(account, sent)
            if response.status not in (401, 407):
                return response, answers
            answers += 1
            out = _answered(out, response, account, answers)

    # --- the provider's requests of a call the app placed ---------------------------

    async def from_provider(self, account: Account, request: Request, inbound: Inbound) -> None:
        """The callee's BYE (or re-INVITE, ACK...) of a call the app placed: to the app."""
        dialog = self._dialogs.get(request.call_id)
        if dialog is None or dialog.account.account_id != account.account_id:
            if request.method != "ACK":
                inbound.respond(481)
            return
        forwarded = provider_request_to_app(request, inbound, dialog.app_contact)
        if forwarded is None:
            return
        forwarded.set("To", dialog.app_from)  # the app's side of the dialog, as it knows it
        flow = dialog.binding.flow
        if request.method == "ACK":
            await self._leg.send(flow, forwarded)
            return
        provider = self.provider
        contact = None if provider is None else provider.contact(account.account_id)

        def for_provider(response: Response) -> Response:
            response.set("To", request.get("To") or "")
            if contact is not None and response.has("Contact"):
                response.set("Contact", contact)
            return response

        async def provisional(response: Response) -> None:
            inbound.send(for_provider(response))

        final = await self._leg.request(flow, forwarded, provisional=provisional)
        if final is None:
            inbound.respond(408 if not flow.closed else 480)
            return
        inbound.send(for_provider(final))
        if request.method == "BYE" and final.status < 300:
            self._forget(request.call_id, dialog)

    # --- rewriting ---------------------------------------------------------------------

    def _towards_provider(
        self, provider: Provider, dialog: _Dialog, request: Request
    ) -> Request | None:
        """The app's request as the account's, for the provider; None when
        Max-Forwards ran out."""
        out = parse(request.serialize())  # a copy: the app's stays for its answers
        assert isinstance(out, Request)
        try:
            out.decrement_max_forwards()
        except SipParseError:
            return None
        out.remove("Via")
        for name in _CREDENTIALS:
            out.remove(name)
        out.remove("Record-Route")
        if request.to.tag is None:
            out.remove("Route")  # the registrar is the outbound proxy, nothing else
        out.set("From", dialog.our_from)
        cseq = request.cseq
        out.set("CSeq", f"{cseq.number + dialog.offset} {cseq.method}")
        contact = provider.contact(dialog.account.account_id)
        if contact is not None and out.has("Contact"):
            out.set("Contact", contact)
        return out

    async def _to_app(self, dialog: _Dialog, request: Request, response: Response) -> None:
        """The provider's response to `request` of the app's, as the app knows it: its
        Via, From and CSeq; softrelay last in a dialog's Record-Route; no challenge."""
        flow = dialog.binding.flow
        answer = parse(response.serialize())
        assert isinstance(answer, Response)
        answer.remove("Via")
        for via in reversed(request.get_all("Via")):
            answer.prepend("Via", via)
        answer.set("From", request.get("From") or dialog.app_from)
        answer.set("CSeq", request.get("CSeq") or "")
        for name in _CHALLENGES:
            answer.remove(name)
        if request.method == "INVITE" and answer.status < 300 and response.to.tag is not None:
            answer.add("Record-Route", self._leg.record_route(flow))
        with contextlib.suppress(FlowClosed, OSError):
            await flow.send(answer.serialize())

    # --- the rest ----------------------------------------------------------------------

    def _once(self, request: Request, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` for a non-INVITE request unless it is already under way."""
        key = (request.call_id, request.top_via.branch or "", request.method)
        if key in self._under_way or len(self._under_way) >= DIALOGS_LIMIT:
            work.close()
            return
        self._under_way.add(key)

        async def running() -> None:
            try:
                await work
            finally:
                self._under_way.discard(key)

        self._spawn(running(), "sipis.outgoing_request")

    def _forget(self, call_id: str, dialog: _Dialog) -> None:
        if self._dialogs.get(call_id) is dialog:
            del self._dialogs[call_id]

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        with contextlib.suppress(TasksClosed):  # closing: spawn closed the coroutine
            self._tasks.spawn(work, name=name)

    async def close(self) -> None:
        """At shutdown: the requests under way are cancelled; dialogs are forgotten."""
        await self._tasks.close()
        self._dialogs.clear()


def _answered(out: Request, response: Response, account: Account, answers: int) -> Request:
    """`out` again with CSeq+1 and the answer to the challenge in `response` from the
    account's HA1. CredentialsRefused when we hold none that fits, or our last answer
    was refused (a second challenge that is not for a stale nonce)."""
    header = "WWW-Authenticate" if response.status == 401 else "Proxy-Authenticate"
    try:
        challenge = choose_challenge(response.get_all(header), account.credential)
    except ChallengeError as exc:
        raise CredentialsRefused(exc.reason) from exc
    if answers > MAX_ANSWERS or (answers > 1 and not challenge.stale):
        raise CredentialsRefused("stored credentials refused")
    again = _copy(out)
    cseq = out.cseq
    again.set("CSeq", f"{cseq.number + 1} {cseq.method}")
    value = digest_authorization(
        challenge,
        account.credential,
        method=cseq.method,
        uri=str(out.uri),
        nc=1,
        cnonce=secrets.token_hex(8),
    )
    name = "Authorization" if response.status == 401 else "Proxy-Authorization"
    again.remove(name)
    again.add(name, value)
    return again


def _copy(request: Request) -> Request:
    """A copy to change (a request for the provider has no Via yet: not re-parsed)."""
    return Request(request.method, request.uri, request.headers, request.body)


def _from_of(account: Account) -> str:
    """The account's From (without a tag): its display name, if any, and its AOR."""
    uri = f"<{account.aor}>"
    name = account.display_name
    if not name:
        return uri
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{quoted}" {uri}'


def _phrase(reason: str) -> str:
    """A short reason phrase (no user, no HA1: the ChallengeError reasons name none)."""
    text = "".join(c for c in reason if c.isprintable() and c not in "\r\n")[:64]
    return text.title() if text else "Forbidden"
