"""Text messages (SIP MESSAGE, RFC 3428) for SIPIS accounts.

A provider's MESSAGE for an account whose app is connected (a binding on the app leg)
goes to the app at once, and the app's answer to the provider: nothing is stored. For
a sleeping app:

    provider                    softrelay (messages)                   push      app
       | MESSAGE ----------------> | stored in `pending_message`:          |         |
       | <-------------- 202 ----- |   sender and text encrypted           |         |
       |                           | -- new_message (nothing else) ------> | ------> |
       |                           | <--------------- REGISTER, Bearer <device secret> |
       |                           | -- MESSAGE (sender, text) -----------------------> |
       |                           | <------------------------------------------ 200 -- |
       |                           | deleted at once                                    |

What is kept is what the policy's `pending_message` declares: the account id, the
recipient (user and domain: the subject), the sender's SIP address (never a display
name), the content type and the text, and a random id to delete it by. A message the
app does not accept (no 2xx, its flow gone) stays for its next connection; the
retention (7 days after it arrived) removes what is never fetched. One delivery run per
account at a time, oldest first; bounded per account and in size. A push says only
"new message" (push/wake.py Reason.NEW_MESSAGE); no log names a sender or holds a text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from privacy.backend import StorageUnavailable
from privacy.clock import Clock
from privacy.store import Record, Store
from privacy.tasks import Tasks, TasksClosed
from proxy.sip.message import Request
from proxy.sip.parser import parse
from proxy.sip.syntax import SipParseError
from push.service import PushService
from push.wake import Reason, Service, TokenDead, WakeRequest
from sipis.account import Account
from sipis.accounts import MESSAGES
from sipis.appleg import AppLeg, Binding
from sipis.uac import Inbound

log = logging.getLogger("softrelay.sipis")


@dataclass(frozen=True, slots=True)
class MessageSettings:
    max_body: int = 8 * 1024  # bytes of text one MESSAGE may carry; more get 413
    max_waiting: int = 100  # messages stored per account; more get 480
    # How long the "new message" push is worth delivering (FCM TTL, APNs expiration).
    push_ttl: float = 3600.0


class MessageMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "softrelay_sipis_messages",
            "SIPIS text messages from providers, by what became of them",
            ["outcome"],
            registry=registry,
        )


class Messages:
    """See the module docstring. `from_provider` takes a MESSAGE outside a dialog."""

    def __init__(
        self,
        settings: MessageSettings,
        store: Store,
        leg: AppLeg,
        push: PushService | None,
        clock: Clock,
        registry: CollectorRegistry,
    ) -> None:
        self.settings = settings
        self._store = store
        self._leg = leg
        self._push = push
        self._clock = clock
        self._delivering: set[str] = set()  # accounts with a delivery run under way
        self._runs_changed = asyncio.Condition()
        self._tasks = Tasks(log, "sipis.message_failed")
        self.metrics = MessageMetrics(registry)
        # A push found a token dead (sipis/accounts.py forget_dead_token): set once the
        # registrar engine runs.
        self.dead_token: Callable[[Account, str], Awaitable[None]] | None = None
        leg.on_registered.append(self.app_registered)

    async def close(self) -> None:
        await self._tasks.close()

    # --- from the provider -----------------------------------------------------------

    async def from_provider(self, account: Account, request: Request, inbound: Inbound) -> None:
        body = request.body
        if len(body) > self.settings.max_body:
            inbound.respond(413)
            return
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            inbound.respond(415, "Text Must Be UTF-8")
            return
        binding = self._leg.binding(account.account_id)
        if binding is not None and await self._relay(binding, request, inbound):
            return
        try:
            sender = str(request.from_.uri)
            waiting = await self._store.find(MESSAGES, account_id=account.account_id)
            if len(waiting) >= self.settings.max_waiting:
                self.metrics.messages.labels("refused").inc()
                inbound.respond(480, None, (("Reason", 'SIP;cause=480;text="too many waiting"'),))
                return
            await self._store.put(
                MESSAGES,
                {
                    "message_id": secrets.token_urlsafe(12),
                    "account_id": account.account_id,
                    "sip_username": account.user,
                    "pbx_serial": account.domain,
                    "sender": sender,  # the address only: a display name is never kept
                    "content_type": (request.get("Content-Type") or "text/plain")[:128],
                    "body": text,
                },
            )
        except StorageUnavailable:
            inbound.respond(503, None, (("Retry-After", "5"),))
            return
        except SipParseError:
            inbound.respond(400, "Bad From")
            return
        self.metrics.messages.labels("stored").inc()
        inbound.respond(202)
        self._spawn(self._push_new_message(account))

    async def _relay(self, binding: Binding, request: Request, inbound: Inbound) -> bool:
        """The app is connected: the MESSAGE goes to it, its answer to the provider;
        whether it answered (else the message is stored)."""
        forwarded = parse(request.serialize())
        assert isinstance(forwarded, Request)
        forwarded.uri = binding.contact
        forwarded.remove("Route")
        response = await self._leg.request(binding.flow, forwarded)
        if response is None:
            return False
        self.metrics.messages.labels("relayed").inc()
        inbound.send(response)
        return True

    async def _push_new_message(self, account: Account) -> None:
        push = self._push
        if push is None:
            return
        target = account.push
        # APNs: the alert token (its VoIP token takes calls only); none: no push, and the
        # account's status says so (sipis/api.py). FCM: the one token.
        token = target.text_token
        try:
            service = Service(target.provider.lower())
        except ValueError:
            return
        app_id = push.app_for(service, target.app_id)
        if app_id is None or token is None:
            return
        deadline = self._clock.now() + self.settings.push_ttl
        result = await push.wake(WakeRequest(service, token, app_id, Reason.NEW_MESSAGE, deadline))
        if isinstance(result.outcome, TokenDead) and self.dead_token is not None:
            await self.dead_token(account, token)

    # --- to the app ------------------------------------------------------------------

    async def app_registered(self, binding: Binding) -> None:
        """The app connected: what waits for it goes out on its flow (a task)."""
        account_id = binding.account.account_id
        if account_id not in self._delivering:
            self._delivering.add(account_id)
            self._spawn(self._deliver(binding))

    async def _deliver(self, binding: Binding) -> None:
        account_id = binding.account.account_id
        try:
            waiting = await self._store.find(MESSAGES, account_id=account_id)
            for record in sorted(waiting, key=lambda r: (r.created_at, r.id)):
                response = await self._leg.request(binding.flow, _message_to(binding, record))
                if response is None or not 200 <= response.status < 300:
                    break  # kept for the app's next connection (or the retention)
                await self._store.delete(MESSAGES, message_id=str(record.fields["message_id"]))
                self.metrics.messages.labels("delivered").inc()
                log.debug("sipis.message_delivered")  # deleted: the event only, no ids
        except StorageUnavailable:
            log.warning("sipis.messages_store_unavailable")
        finally:
            self._delivering.discard(account_id)
            async with self._runs_changed:
                self._runs_changed.notify_all()

    async def idle(self, account_id: str) -> None:
        """Return once no delivery run for the account is under way (callers bound it)."""
        async with self._runs_changed:
            await self._runs_changed.wait_for(lambda: account_id not in self._delivering)

    def _spawn(self, work: object) -> None:
        assert asyncio.iscoroutine(work)
        with contextlib.suppress(TasksClosed):
            self._tasks.spawn(work)


def _message_to(binding: Binding, record: Record) -> Request:
    fields = record.fields
    account = binding.account
    body = str(fields["body"]).encode()
    headers = [
        ("Max-Forwards", "70"),
        ("From", f"<{fields['sender']}>;tag={secrets.token_hex(6)}"),
        ("To", f"<{account.aor}>"),
        ("Call-ID", secrets.token_hex(12)),
        ("CSeq", "1 MESSAGE"),
        ("Content-Type", str(fields.get("content_type") or "text/plain")),
    ]
    return Request("MESSAGE", binding.contact, headers, body)
