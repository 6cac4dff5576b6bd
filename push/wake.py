"""What the relay asks of push, and what push answers.

A `WakeRequest` names a binding's push identity (RFC 8599 `pn-provider`, `pn-prid`, and
the app it belongs to), why the phone is woken, and the clock time by which it must be.
Every provider answers with one `Outcome`, modelled by what the caller does next:

    Outcome
    ├── Delivered          the provider accepted the push: wait for the phone
    ├── TokenDead          the token will never work again: delete it, fail the call fast
    ├── TemporaryFailure   try again, not before `retry_after` (if given), within the deadline
    └── PermanentFailure   configuration or credentials are wrong: do not retry, alert

Library exceptions never cross this boundary: each provider translates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Service(StrEnum):
    """RFC 8599 `pn-provider` values softrelay serves."""

    APNS = "apns"  # Apple production
    APNS_SANDBOX = "apns.dev"  # Apple development (sandbox) builds
    FCM = "fcm"

    @property
    def family(self) -> str:
        return "apns" if self in (Service.APNS, Service.APNS_SANDBOX) else "fcm"


class Reason(StrEnum):
    INCOMING_CALL = "incoming_call"  # APNs VoIP push / FCM high-priority data message
    CALL_CANCELLED = "call_cancelled"  # iOS requires every VoIP push to end in a CallKit report
    REREGISTER = "reregister"  # background refresh of a long-lived binding, never a VoIP push
    NEW_MESSAGE = "new_message"  # SIPIS: a text waits; says nothing of sender or text, no VoIP push


@dataclass(frozen=True, slots=True)
class WakeRequest:
    service: Service
    token: str  # pn-prid: secret-ish, never logged or stored outside the registration
    app_id: str  # the configured app (APNs bundle id, FCM app) the binding belongs to
    reason: Reason
    deadline: float  # clock time after which a push is useless
    call_id: str = ""  # opaque id the app reports to CallKit; empty for re-register


@dataclass(frozen=True, slots=True)
class Delivered:
    pass


@dataclass(frozen=True, slots=True)
class TokenDead:
    reason: str  # e.g. Unregistered, BadDeviceToken, UNREGISTERED


@dataclass(frozen=True, slots=True)
class TemporaryFailure:
    reason: str
    retry_after: float | None = None  # seconds, from Retry-After when the provider sent one


@dataclass(frozen=True, slots=True)
class PermanentFailure:
    reason: str


Outcome = Delivered | TokenDead | TemporaryFailure | PermanentFailure


def outcome_label(outcome: Outcome) -> str:
    """The metric and log label of an outcome."""
    return {
        Delivered: "delivered",
        TokenDead: "token_dead",
        TemporaryFailure: "temporary_failure",
        PermanentFailure: "permanent_failure",
    }[type(outcome)]
