"""Sample SIP messages for the parser's tests: a message from header lines, and an
INVITE from a PBX to a phone with the fields every request needs."""

from __future__ import annotations

from proxy.sip.message import Request
from proxy.sip.parser import parse


def msg(*lines: str, body: bytes = b"", length: bool = True) -> bytes:
    """A message from header lines; Content-Length is added unless `length` is False."""
    head = list(lines)
    if length:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


BASE = (
    "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport",
    "Max-Forwards: 70",
    "To: <sip:alice@s1234.relay.example.net>",
    'From: "Bob" <sip:bob@pbx.example.com>;tag=1928301774',
    "Call-ID: a84b4c76e66710@pc33.example.com",
)


def invite(*extra: str, body: bytes = b"") -> bytes:
    return msg(
        "INVITE sip:alice@s1234.relay.example.net SIP/2.0",
        *BASE,
        "CSeq: 314159 INVITE",
        *extra,
        body=body,
    )


def request(data: bytes) -> Request:
    message = parse(data)
    assert isinstance(message, Request)
    return message
