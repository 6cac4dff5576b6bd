"""What `bench/crashreports.py` scrubs: events made by the stock sentry-sdk with planted
personal data of every kind the audit (issue 14) named, the count of what a scrubber
leaves of them per kind, and the adversarial events of the issue's point 1.

Import it as `bench.crashevents`; the bench puts the repository first on `sys.path`.
"""

from __future__ import annotations

import gzip
import hashlib
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
# installed modules (~7.7 KiB of JSON), or with them all (~16 KiB).
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


FIRST = [
    "Alice",
    "Bruno",
    "Chiara",
    "Dmitri",
    "Elif",
    "Femi",
    "Greta",
    "Hiroshi",
    "Ines",
    "Jonas",
    "Kalani",
    "Lotte",
]
LAST = [
    "Smith",
    "Okafor",
    "Rossi",
    "Ivanova",
    "Yilmaz",
    "Adeyemi",
    "Lindqvist",
    "Tanaka",
    "Moreau",
    "Bauer",
    "Jansen",
]


def _name(i: int, k: int) -> str:
    """A person's name for event i, the k-th of its kinds (names recur across events)."""
    return f"{FIRST[(i + 5 * k) % len(FIRST)]} {LAST[(i // len(FIRST) + 3 * k) % len(LAST)]}"


def _card(i: int) -> str:
    """A Luhn-valid card number of 16 digits, in groups of four."""
    digits = [int(d) for d in f"411111{i % 10**9:09d}"]
    total = sum(d if n % 2 else (d * 2 - 9 if d > 4 else d * 2) for n, d in enumerate(digits))
    number = "".join(map(str, digits)) + str(-total % 10)
    return " ".join(number[n : n + 4] for n in range(0, 16, 4))


@dataclass(frozen=True, slots=True)
class Values:
    """The personal data planted in event i: each event its own, as users' reports differ
    (a scrubber that remembers what it saw gains only on what recurs, as in production)."""

    i: int

    @property
    def email(self) -> str:
        return f"alice.b{self.i}@example.org"

    @property
    def phone(self) -> str:
        return f"+49 151 {23456789 + self.i % 10**7}"

    @property
    def sip_user(self) -> str:
        return f"bench{self.i}user"

    @property
    def ipv4(self) -> str:
        return f"198.51.{100 + self.i // 254 % 100}.{self.i % 254 + 1}"

    @property
    def ipv6(self) -> str:
        return f"2001:db8:5::{self.i % 65535 + 1:x}"

    def hexed(self, salt: str) -> str:
        return hashlib.md5(f"{salt}{self.i}".encode()).hexdigest()  # a fake digest

    def planted(self) -> tuple[Planted, ...]:
        i = self.i
        return (
            Planted("email", self.email),
            Planted("phone (E.164)", self.phone),
            Planted("SIP user", f"sip:{self.sip_user}@"),
            Planted("IPv4", self.ipv4),
            Planted("IPv6", self.ipv6),
            Planted("local variable sip_password", f"s3cr3t-pass-{i}"),
            Planted("token (key auth_token)", f"tok-bench-{i}"),
            Planted("home directory", f"/home/bench{i}"),
            Planted("payment card", _card(i)),
            Planted("key session_id", f"bench-cookie-{i}"),
            # The audit's point 7: stored unchanged by the scrubber it found.
            Planted("free text: password <value>", f"hunter{i}xyz"),
            Planted("free text: pw=", f"pw-bench-{i}"),
            Planted("free text: passwd = ", f"passwd-bench-{i}"),
            _hex("SIP Authorization: Digest response=", self.hexed("response")),
            _hex("ha1=<hex>", self.hexed("ha1")),
            Planted("repr'd dict 'sip_password'", f"repr-bench-{i}"),
            Planted('JSON in a message {"password": ...}', f"json-bench-{i}"),
            Planted('display name "..." <sip:...>', _name(i, 0)),
            Planted("display name ... <sip:...> (bare)", _name(i, 1)),
            Planted("key caller_name", _name(i, 2)),
            Planted("key display_name", _name(i, 3)),
            Planted("key callee", _name(i, 4)),
            Planted("key contact", _name(i, 5)),
            Planted("key first_name", FIRST[(i + 6) % len(FIRST)] + "bench"),
        )

    def crumbs(self) -> tuple[str, ...]:
        """Breadcrumb messages, in turn: free text as apps log it, with planted values."""
        i, (display, bare) = self.i, (_name(self.i, 0), _name(self.i, 1))
        return (
            f"tapped call, dialing {self.phone} from {self.ipv6}",
            f"login failed: password hunter{i}xyz",
            f"retry REGISTER with pw=pw-bench-{i}",
            f"read config: passwd = passwd-bench-{i}",
            f'sent REGISTER\r\nAuthorization: Digest username="{self.sip_user}", '
            f'realm="pbx.example.com", nonce="4f1c2a9bd07e", uri="sip:pbx.example.com", '
            f'response="{self.hexed("response")}"',
            f"cached credentials ha1={self.hexed('ha1')}",
            f"account settings {{'sip_password': 'repr-bench-{i}', 'port': 5060}}",
            f'push payload {{"password": "json-bench-{i}", "retries": 3}}',
            f'INVITE From: "{display}" <sip:{display.split()[0].lower()}@pbx.example.com>;tag=9f2',
            f"INVITE To: {bare} <sip:{bare.split()[0].lower()}@pbx.example.com>",
        )

    def people(self) -> dict[str, str]:
        i = self.i
        return {
            "caller_name": _name(i, 2),
            "display_name": _name(i, 3),
            "callee": _name(i, 4),
            "contact": _name(i, 5),
            "first_name": FIRST[(i + 6) % len(FIRST)] + "bench",
        }


KINDS = tuple(p.kind for p in Values(0).planted())


class _Recorder(Transport):
    """Keeps what the SDK would send: each envelope, serialised as the SDK serialises it."""

    def __init__(self) -> None:
        super().__init__({"dsn": None})
        self.envelopes: list[bytes] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        if any(item.type == "event" for item in envelope.items):
            self.envelopes.append(envelope.serialize())


# The SDK itself drops a local or a data key named exactly `password` or `session` (its
# EventScrubber's denylist); `sip_password` and `session_id` reach the server, and name
# their secret all the same.
def _deep(level: int, values: Values, sip_password: str, profile: dict[str, Any]) -> None:
    if level == 0:
        raise ValueError(
            f"REGISTER sip:{values.sip_user}@pbx.example.com from {values.ipv4} failed for "
            f"{values.email}, callback {values.phone}, log /home/bench{values.i}/phone.log"
        )
    _deep(level - 1, values, sip_password, profile)


def sdk_envelopes(count: int, full: bool, start: int = 0) -> list[bytes]:
    """Envelopes of one event each, as the SDK sends them (before compression), for the
    events `start` to `start + count` (their planted `Values`); `full`: the SDK's
    defaults (locals and source lines of frames, installed modules)."""
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
        for i in range(start, start + count):
            values = Values(i)
            crumbs, people = values.crumbs(), values.people()
            with sentry_sdk.new_scope() as scope:
                for key, value in OPT_IN.items():
                    scope.set_tag(key, value)
                scope.set_user({"id": f"u{i}", "email": values.email})
                scope.set_context("device", {"model": "iPhone15,2", "name": "Alice's iPhone"})
                scope.set_context("os", {"name": "iOS", "version": "17.4.1"})
                scope.set_extra("account", {"auth_token": f"tok-bench-{i}", "card": _card(i)})
                scope.set_extra("call", people)
                for n in range(20):
                    data: dict[str, Any] = {"screen": "dialer", "session_id": f"bench-cookie-{i}"}
                    if n % 5 == 0:
                        data |= {"callee": people["callee"], "caller_name": people["caller_name"]}
                    scope.add_breadcrumb(category="ui.click", message=crumbs[n % 10], data=data)
                try:
                    _deep(8, values, f"s3cr3t-pass-{i}", {"n": i})
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


def gzip_sdk(body: bytes) -> bytes:
    """Compressed as the SDK's transport does it when told to use gzip (level 9)."""
    return gzip.compress(body, 9)


def left_by_kind(
    raw: list[bytes], scrubbed: list[str | bytes], start: int = 0
) -> dict[str, list[int]]:
    """Per kind: [events whose scrubbed form still holds it, events whose raw form held
    it], of the events `start`, `start + 1`, ... (their planted `Values`)."""
    counts = {kind: [0, 0] for kind in KINDS}
    for i, (before, after) in enumerate(zip(raw, scrubbed, strict=True), start):
        text_before = before.decode()
        text_after = after if isinstance(after, str) else after.decode()
        for planted in Values(i).planted():
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
