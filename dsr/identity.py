"""Proving a data subject's identity through their PBX, without learning the password.

The subject (their app, or a page the operator serves) asks for a challenge; softrelay
sends a REGISTER *fetch* (no Contact: RFC 3261 10.2.4, it changes no binding) for
`sip:<user>@<serial>.<domain>` into the relay, exactly as a phone would, so it reaches
the PBX over its linked flow. The PBX answers 401 with its digest challenge, which goes
back to the subject. The subject computes the Authorization with the password only
they and the PBX hold, and sends it with the request; softrelay repeats the fetch with
that Authorization and the PBX decides: 200 proves the identity, anything else refuses
it. softrelay never sees the password, and the Authorization lives only in memory for
the one request it is sent in.

The challenges in flight are memory only, bounded and short-lived (the nonce lifetime);
a proof is used once.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

from privacy.clock import Clock
from privacy.store import Subject
from proxy.sip.flow import Flow, Transport
from proxy.sip.message import Response
from proxy.sip.parser import parse
from proxy.sip.relay import Relay
from proxy.sip.syntax import SipParseError

CHALLENGE_TTL = 300.0  # seconds a challenge may be answered
MAX_CHALLENGES = 10_000
LOCAL = ("127.0.0.1", 0)  # the in-process end of the flow the relay answers us on


class Failure(Enum):
    """Why an identity was not proved; the API maps each to its answer."""

    NOT_PROVED = "not_proved"  # a wrong, unknown, expired or misused proof: the caller's
    PBX_OFFLINE = "pbx_offline"  # the subject's PBX has no flow linked: retry later
    PBX_ERROR = "pbx_error"  # the PBX answered what a REGISTER fetch never gets
    PBX_TIMEOUT = "pbx_timeout"  # the PBX did not answer in time: retry later


class IdentityError(Exception):
    """The identity was not proved: `failure` says why, `reason` in a sentence."""

    def __init__(self, failure: Failure, reason: str) -> None:
        super().__init__(reason)
        self.failure = failure
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Challenge:
    id: str
    uri: str  # the digest-uri the Authorization must name
    www_authenticate: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Pending:
    subject: Subject
    call_id: str
    from_tag: str
    cseq: int
    created: float


class _Replies:
    """The relay's side of our in-process flow: responses resolve their waiters."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[Response]] = {}

    async def send(self, data: bytes) -> None:
        try:
            message = parse(data)
        except SipParseError:
            return
        if isinstance(message, Response):
            waiter = self.waiting.get(message.call_id)
            if waiter is not None and not waiter.done() and message.status >= 200:
                waiter.set_result(message)

    def close(self) -> None:
        pass


class PbxIdentity:
    def __init__(self, relay: Relay, clock: Clock, timeout: float) -> None:
        self._relay = relay
        self._clock = clock
        self._timeout = timeout
        self._replies = _Replies()
        self._flow = Flow(Transport.TCP, LOCAL, LOCAL, self._replies)
        self._pending: OrderedDict[str, _Pending] = OrderedDict()

    async def challenge(self, subject: Subject) -> Challenge:
        """Ask the subject's PBX for a digest challenge."""
        if self._relay.pbx_flow(subject.pbx_serial) is None:
            raise IdentityError(Failure.PBX_OFFLINE, "the subject's PBX is not connected")
        pending = _Pending(
            subject, "dsr-" + secrets.token_hex(12), secrets.token_hex(6), 1, self._clock.now()
        )
        answer = await self._fetch(pending, None)
        if answer.status not in (401, 407):
            raise IdentityError(
                Failure.PBX_ERROR, f"the PBX answered {answer.status} instead of a challenge"
            )
        header = "WWW-Authenticate" if answer.status == 401 else "Proxy-Authenticate"
        challenges = tuple(v for n, v in answer.headers if n.lower() == header.lower())
        if not challenges:
            raise IdentityError(Failure.PBX_ERROR, "the PBX sent no digest challenge")
        challenge_id = secrets.token_urlsafe(18)
        self._keep(challenge_id, pending)
        return Challenge(challenge_id, self._uri(subject), challenges)

    async def verify(self, subject: Subject, challenge_id: str, authorization: str) -> None:
        """Return if the PBX accepts `authorization` for `subject`; else IdentityError.
        The challenge is used up either way."""
        pending = self._pending.pop(challenge_id, None)
        if pending is None or self._clock.now() - pending.created > CHALLENGE_TTL:
            raise IdentityError(Failure.NOT_PROVED, "unknown or expired challenge")
        if pending.subject != subject:
            raise IdentityError(Failure.NOT_PROVED, "the challenge was issued for another subject")
        if not authorization.startswith("Digest ") or any(c in authorization for c in "\r\n"):
            raise IdentityError(Failure.NOT_PROVED, "authorization: expected a Digest credential")
        answer = await self._fetch(
            _Pending(subject, pending.call_id, pending.from_tag, pending.cseq + 1, 0.0),
            authorization,
        )
        if not 200 <= answer.status < 300:
            raise IdentityError(Failure.NOT_PROVED, "the PBX refused the credentials")

    def _keep(self, challenge_id: str, pending: _Pending) -> None:
        now = self._clock.now()
        while self._pending and (
            len(self._pending) >= MAX_CHALLENGES
            or now - next(iter(self._pending.values())).created > CHALLENGE_TTL
        ):
            self._pending.popitem(last=False)
        self._pending[challenge_id] = pending

    def _uri(self, subject: Subject) -> str:
        return f"sip:{subject.pbx_serial}.{self._relay.settings.domain}"

    async def _fetch(self, pending: _Pending, authorization: str | None) -> Response:
        subject = pending.subject
        aor = f"sip:{subject.sip_username}@{subject.pbx_serial}.{self._relay.settings.domain}"
        lines = [
            f"REGISTER {self._uri(subject)} SIP/2.0",
            f"Via: SIP/2.0/TCP {LOCAL[0]}:{LOCAL[1]};branch=z9hG4bK{secrets.token_hex(10)}",
            f"From: <{aor}>;tag={pending.from_tag}",
            f"To: <{aor}>",
            f"Call-ID: {pending.call_id}",
            f"CSeq: {pending.cseq} REGISTER",
            "Max-Forwards: 70",
            *([f"Authorization: {authorization}"] if authorization else []),
            "Content-Length: 0",
            "",
            "",
        ]
        waiter: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._replies.waiting[pending.call_id] = waiter
        try:
            await self._relay.handle("\r\n".join(lines).encode(), self._flow)
            async with asyncio.timeout(self._timeout):
                return await waiter
        except TimeoutError:
            raise IdentityError(Failure.PBX_TIMEOUT, "the PBX did not answer in time") from None
        finally:
            del self._replies.waiting[pending.call_id]
