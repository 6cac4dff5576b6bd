"""What `bench/crashreports.py` scrubs: events made by the stock sentry-sdk with planted
personal data of every kind the audit (issue 14) named, the count of what a scrubber
leaves of them per kind, and the adversarial events of the issue's point 1.

Import it as `bench.crashevents`; the bench puts the repository first on `sys.path`.
"""

from __future__ import annotations

import gzip
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import sentry_sdk
from sentry_sdk.envelope import Envelope, Item, PayloadRef
from sentry_sdk.integrations.modules import ModulesIntegration
from sentry_sdk.transport import Transport

OPT_IN = {"softrelay.opt_in": "yes"}
# (label, with the SDK's defaults): frames without locals or source lines and no list of
# installed modules (~8 KiB of JSON), or with them all (~16 KiB).
SIZES = (("~8 KiB", False), ("~16 KiB, SDK defaults", True))


@dataclass(frozen=True, slots=True)
class Planted:
    """A planted value, and the parts of it whose presence counts as left: a hex secret
    counts as left when either half is, since a scrubber can mangle only one part."""

    kind: str
    value: str
    parts: tuple[str, ...] = ()

    def left_in(self, text: str) -> bool:
        return any(part in text for part in self.parts or (self.value,))


def _hex(kind: str, value: str) -> Planted:
    half = len(value) // 2
    return Planted(kind, value, (value[:half], value[half:]))


DIGEST_RESPONSE = "6629fae49393a05397450978507c4ef1"
HA1 = "5f4dcc3b5aa765d61d8327deb882cf99"
PLANTED = (
    Planted("email", "alice.bench@example.org"),
    Planted("phone (E.164)", "+49 151 23456789"),
    Planted("SIP user", "sip:benchuser@"),
    Planted("IPv4", "198.51.100.23"),
    Planted("IPv6", "2001:db8:5::9"),
    Planted("password (local variable)", "s3cr3t-pass"),
    Planted("token (key auth_token)", "tok-bench-7781"),
    Planted("home directory", "/home/benchuser"),
    Planted("payment card", "4111 1111 1111 1111"),
    Planted("session (key session)", "bench-cookie"),
    # The audit's point 7: stored unchanged by the scrubber it found.
    Planted("free text: password <value>", "hunter2xyz"),
    Planted("free text: pw=", "pw-bench-5521"),
    Planted("free text: passwd = ", "passwd-bench-3307"),
    _hex("SIP Authorization: Digest response=", DIGEST_RESPONSE),
    _hex("ha1=<hex>", HA1),
    Planted("repr'd dict 'sip_password'", "repr-bench-4417"),
    Planted('JSON in a message {"password": ...}', "json-bench-8852"),
    Planted('display name "Alice Smith" <sip:...>', "Alice Smith"),
    Planted("display name Bob Jones <sip:...>", "Bob Jones"),
    Planted("key caller_name", "Carol Caller"),
    Planted("key display_name", "Dave Display"),
    Planted("key callee", "Erin Callee"),
    Planted("key contact", "Grace Contact"),
    Planted("key first_name", "Frankbench"),
)
KINDS = tuple(p.kind for p in PLANTED)

# Breadcrumb messages, in turn: free text as apps log it, each with planted values.
CRUMBS = (
    "tapped call, dialing +49 151 23456789 from 2001:db8:5::9",
    "login failed: password hunter2xyz",
    "retry REGISTER with pw=pw-bench-5521",
    "read config: passwd = passwd-bench-3307",
    'sent REGISTER\r\nAuthorization: Digest username="benchuser", realm="pbx.example.com", '
    f'nonce="4f1c2a9bd07e", uri="sip:pbx.example.com", response="{DIGEST_RESPONSE}"',
    f"cached credentials ha1={HA1}",
    "account settings {'sip_password': 'repr-bench-4417', 'port': 5060}",
    'push payload {"password": "json-bench-8852", "retries": 3}',
    'INVITE From: "Alice Smith" <sip:alice.smith@pbx.example.com>;tag=9f2',
    "INVITE To: Bob Jones <sip:bob.jones@pbx.example.com>",
)
PEOPLE = {
    "caller_name": "Carol Caller",
    "display_name": "Dave Display",
    "callee": "Erin Callee",
    "contact": "Grace Contact",
    "first_name": "Frankbench",
}


class _Recorder(Transport):
    """Keeps what the SDK would send: each envelope, serialised as the SDK serialises it."""

    def __init__(self) -> None:
        super().__init__({"dsn": None})
        self.envelopes: list[bytes] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        if any(item.type == "event" for item in envelope.items):
            self.envelopes.append(envelope.serialize())


def _deep(level: int, user_email: str, password: str, profile: dict[str, Any]) -> None:
    if level == 0:
        raise ValueError(
            f"REGISTER sip:benchuser@pbx.example.com from 198.51.100.23 failed for "
            f"{user_email}, callback +49 151 23456789, log /home/benchuser/phone.log"
        )
    _deep(level - 1, user_email, password, profile)


def sdk_envelopes(count: int, full: bool) -> list[bytes]:
    """`count` envelopes of one event each, as the SDK sends them (before compression);
    `full`: the SDK's defaults (locals and source lines of frames, installed modules)."""
    recorder = _Recorder()
    sentry_sdk.init(
        transport=recorder,
        release="com.example.phone@2.4.1",
        max_breadcrumbs=30,
        include_local_variables=full,
        include_source_context=full,
        disabled_integrations=[] if full else [ModulesIntegration()],
    )
    try:
        for i in range(count):
            with sentry_sdk.new_scope() as scope:
                for key, value in OPT_IN.items():
                    scope.set_tag(key, value)
                scope.set_user({"id": f"u{i}", "email": "alice.bench@example.org"})
                scope.set_context("device", {"model": "iPhone15,2", "name": "Alice's iPhone"})
                scope.set_context("os", {"name": "iOS", "version": "17.4.1"})
                scope.set_extra(
                    "account", {"auth_token": "tok-bench-7781", "card": "4111 1111 1111 1111"}
                )
                scope.set_extra("call", PEOPLE)
                for n in range(20):
                    data: dict[str, Any] = {"screen": "dialer", "session": "bench-cookie"}
                    if n % 5 == 0:
                        data |= {"callee": "Erin Callee", "caller_name": "Carol Caller"}
                    scope.add_breadcrumb(
                        category="ui.click", message=CRUMBS[n % len(CRUMBS)], data=data
                    )
                try:
                    _deep(8, "alice.bench@example.org", "s3cr3t-pass", {"n": i})
                except ValueError:
                    sentry_sdk.capture_exception()
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)
    return recorder.envelopes


def event_of(envelope: bytes) -> bytes:
    """The JSON payload of the (only) event item of an SDK envelope."""
    _, item_header, rest = envelope.split(b"\n", 2)
    length = orjson.loads(item_header)["length"]
    payload: bytes = rest[:length]
    return payload


def renumbered(envelope: bytes) -> bytes:
    """The same envelope under a fresh event id (header and payload; same length)."""
    old = orjson.loads(envelope.split(b"\n", 1)[0])["event_id"].encode()
    return envelope.replace(old, uuid.uuid4().hex.encode())


def gzip_sdk(body: bytes) -> bytes:
    """Compressed as the SDK's transport does it when told to use gzip (level 9)."""
    return gzip.compress(body, 9)


def left_by_kind(raw: list[bytes], scrubbed: list[str | bytes]) -> dict[str, list[int]]:
    """Per kind: [events whose scrubbed form still holds it, events whose raw form held it]."""
    counts = {kind: [0, 0] for kind in KINDS}
    for before, after in zip(raw, scrubbed, strict=True):
        text_before = before.decode()
        text_after = after if isinstance(after, str) else after.decode()
        for planted in PLANTED:
            if planted.value in text_before:
                counts[planted.kind][1] += 1
                counts[planted.kind][0] += planted.left_in(text_after)
    return counts


# --- point 1: events whose strings make a backtracking engine work quadratically ------


def adversarial_texts(size: int) -> dict[str, str]:
    """One string of about `size` characters per rule shape that backtracked (issue 14,
    point 1): `query` is the issue's own `x=1&tokentoken...`; `fcm` a long run of
    word-dash pairs before a colon; `sip` many `sip:` starts with no reachable '@';
    `pem` BEGIN lines without an END."""
    return {
        "query": "x=1&" + "token" * (size // 5),
        "fcm": "a-" * (size // 2) + ":",
        "sip": "sip:x:" * (size // 6) + "/@",
        "pem": "-----BEGIN A-----" * (size // 17),
    }


def adversarial_event(text: str) -> dict[str, Any]:
    return {"message": text, "platform": "python", "level": "error", "tags": OPT_IN}


def envelope_of(event: dict[str, Any]) -> bytes:
    """An envelope holding `event`, as the SDK serialises one."""
    envelope = Envelope(headers={"event_id": uuid.uuid4().hex})
    # What `Envelope.add_event` does, without its TypedDict of an event.
    envelope.add_item(Item(payload=PayloadRef(json=event), type="event"))
    return envelope.serialize()
