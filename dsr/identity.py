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

The challenges in flight are short-lived (CHALLENGE_TTL) and used once. Alone, a
process keeps them in memory (`MemoryChallenges`, bounded). In a cluster the answer may
arrive at another node than the one that issued the challenge, so they are kept in Redis
(`SharedChallenges`, policy category `cluster_limits`, field `challenge`): a keyed hash
of the challenge id as the key, and only what the second REGISTER must repeat (a keyed
fingerprint of the subject, the Call-ID, From tag and CSeq softrelay made up), with the
challenge's lifetime as its expiry, taken with GETDEL so it is answered once whichever
node it reaches. Neither the PBX's nonce nor any Authorization is kept anywhere: the PBX
checks its own nonce. The fetch goes through the relay as a phone's REGISTER does, so a
PBX linked on another node is reached over the internal link (proxy/sip/nodes.py); the
relay's 480 (no node holds the PBX) or 503 (cannot tell now) is `PBX_OFFLINE`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import orjson

from cluster.redis import SharedRedis
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
class Pending:
    """A challenge issued: what the second REGISTER repeats, and whose it is."""

    subject: str  # the subject's keyed fingerprint (Challenges.fingerprint)
    call_id: str
    from_tag: str
    cseq: int


class Challenges(Protocol):
    """Where the challenges in flight are kept (see the module docstring)."""

    def fingerprint(self, subject: Subject) -> str: ...

    async def keep(self, challenge_id: str, pending: Pending) -> None: ...

    async def take(self, challenge_id: str) -> Pending | None:
        """The challenge, removed (used once); None: unknown or expired."""


class MemoryChallenges:
    """This process's memory: at most MAX_CHALLENGES, each for CHALLENGE_TTL (its clock)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._pending: OrderedDict[str, tuple[Pending, float]] = OrderedDict()

    def fingerprint(self, subject: Subject) -> str:
        return _fingerprint(self._key, subject)

    async def keep(self, challenge_id: str, pending: Pending) -> None:
        now = self._clock.now()
        while self._pending and (
            len(self._pending) >= MAX_CHALLENGES
            or now - next(iter(self._pending.values()))[1] > CHALLENGE_TTL
        ):
            self._pending.popitem(last=False)
        self._pending[challenge_id] = (pending, now)

    async def take(self, challenge_id: str) -> Pending | None:
        kept = self._pending.pop(challenge_id, None)
        if kept is None or self._clock.now() - kept[1] > CHALLENGE_TTL:
            return None
        return kept[0]


class SharedChallenges:
    """Redis, for every node of the cluster: a key per challenge that expires with it.
    ClusterUnavailable (503 from the middleware) when Redis cannot be reached."""

    PREFIX = "dsr:challenge:"

    def __init__(self, shared: SharedRedis) -> None:
        self._shared = shared
        # Derived from the cluster secret: every node hashes alike, Redis alone cannot
        # tell which id or subject a key stands for.
        self._key = hashlib.sha256(b"dsr-challenge\x00" + shared.settings.secret.encode()).digest()

    def fingerprint(self, subject: Subject) -> str:
        return _fingerprint(self._key, subject)

    def redis_key(self, challenge_id: str) -> str:
        digest = hashlib.blake2b(challenge_id.encode(), key=self._key, digest_size=16)
        return self.PREFIX + digest.hexdigest()

    async def keep(self, challenge_id: str, pending: Pending) -> None:
        value = orjson.dumps(
            {"s": pending.subject, "c": pending.call_id, "f": pending.from_tag, "q": pending.cseq}
        )
        async with self._shared.guard("DSR challenge"):
            await self._shared.client.set(
                self.redis_key(challenge_id), value, px=round(CHALLENGE_TTL * 1000)
            )

    async def take(self, challenge_id: str) -> Pending | None:
        async with self._shared.guard("DSR challenge"):
            raw = await self._shared.client.getdel(self.redis_key(challenge_id))
        if not isinstance(raw, bytes):
            return None
        fields = orjson.loads(raw)
        return Pending(str(fields["s"]), str(fields["c"]), str(fields["f"]), int(fields["q"]))


def _fingerprint(key: bytes, subject: Subject) -> str:
    text = f"{subject.sip_username}\x1f{subject.pbx_serial}".encode()
    return hmac.digest(key, text, "sha256")[:16].hex()


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
    def __init__(self, relay: Relay, challenges: Challenges, timeout: float) -> None:
        self._relay = relay
        self._challenges = challenges
        self._timeout = timeout
        self._replies = _Replies()
        self._flow = Flow(Transport.TCP, LOCAL, LOCAL, self._replies)

    async def challenge(self, subject: Subject) -> Challenge:
        """Ask the subject's PBX, wherever it is linked, for a digest challenge."""
        pending = Pending(
            self._challenges.fingerprint(subject),
            "dsr-" + secrets.token_hex(12),
            secrets.token_hex(6),
            1,
        )
        answer = await self._fetch(subject, pending, None)
        if answer.status not in (401, 407):
            raise IdentityError(
                Failure.PBX_ERROR, f"the PBX answered {answer.status} instead of a challenge"
            )
        header = "WWW-Authenticate" if answer.status == 401 else "Proxy-Authenticate"
        challenges = tuple(v for n, v in answer.headers if n.lower() == header.lower())
        if not challenges:
            raise IdentityError(Failure.PBX_ERROR, "the PBX sent no digest challenge")
        challenge_id = secrets.token_urlsafe(18)
        await self._challenges.keep(challenge_id, pending)
        return Challenge(challenge_id, self._uri(subject), challenges)

    async def verify(self, subject: Subject, challenge_id: str, authorization: str) -> None:
        """Return if the PBX accepts `authorization` for `subject`; else IdentityError.
        The challenge is used up either way."""
        pending = await self._challenges.take(challenge_id)
        if pending is None:
            raise IdentityError(Failure.NOT_PROVED, "unknown or expired challenge")
        if not hmac.compare_digest(pending.subject, self._challenges.fingerprint(subject)):
            raise IdentityError(Failure.NOT_PROVED, "the challenge was issued for another subject")
        if not authorization.startswith("Digest ") or any(c in authorization for c in "\r\n"):
            raise IdentityError(Failure.NOT_PROVED, "authorization: expected a Digest credential")
        answer = await self._fetch(
            subject,
            Pending(pending.subject, pending.call_id, pending.from_tag, pending.cseq + 1),
            authorization,
        )
        if not 200 <= answer.status < 300:
            raise IdentityError(Failure.NOT_PROVED, "the PBX refused the credentials")

    def _uri(self, subject: Subject) -> str:
        return f"sip:{subject.pbx_serial}.{self._relay.settings.domain}"

    async def _fetch(
        self, subject: Subject, pending: Pending, authorization: str | None
    ) -> Response:
        """The final answer to a REGISTER fetch sent into the relay as a phone's; the
        relay's own 480 (the PBX linked nowhere) or 503 (cannot tell or forward now) is
        PBX_OFFLINE."""
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
                answer = await waiter
        except TimeoutError:
            raise IdentityError(Failure.PBX_TIMEOUT, "the PBX did not answer in time") from None
        finally:
            del self._replies.waiting[pending.call_id]
        if answer.status in (480, 503):
            raise IdentityError(
                Failure.PBX_OFFLINE,
                f"the subject's PBX cannot be reached now (the relay answered {answer.status})",
            )
        return answer
