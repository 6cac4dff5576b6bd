"""The mock parties' SDP asks for media at their own loopback address: a real client
answering a mock PBX's call (or called by a mock phone) sends nothing off the machine."""

from __future__ import annotations

import secrets

import pytest

from mockphone.pbx import MockPbx
from mockphone.phone import Kind, MockPhone, PhoneSpec
from mockphone.pushes import PushInbox
from mockphone.sip import RequestHandler, SipLink, Transport
from mockphone.sipwire import Request
from softrelay.embedded import EmbeddedRelay

PHONE_HOST = "127.0.0.9"  # not the PBX's 127.0.0.1: each offer must name its own party


def _recording(handler: RequestHandler, seen: list[Request]) -> RequestHandler:
    async def record(request: Request) -> None:
        seen.append(request)
        await handler(request)

    return record


def _connection_lines(request: Request) -> list[str]:
    body = request.body.decode()
    return [line for line in body.split("\r\n") if line.startswith(("c=", "o="))]


@pytest.mark.parametrize("transport", ["udp", "tcp", "ws"])
async def test_each_link_knows_its_own_socket_address(
    softrelay: EmbeddedRelay, transport: str
) -> None:
    async def ignore(request: Request) -> None:
        pass

    link = await SipLink.open(
        Transport(transport), softrelay.address, ignore, local_host=PHONE_HOST
    )
    try:
        assert link.media_host == PHONE_HOST
    finally:
        await link.close()


@pytest.mark.parametrize("transport", ["udp", "tcp", "ws"])
async def test_offers_name_the_offering_partys_own_address(
    softrelay: EmbeddedRelay, mock_pbx: MockPbx, push_inbox: PushInbox, transport: str
) -> None:
    password = secrets.token_urlsafe(12)
    mock_pbx.add_user("desk1", password)
    spec = PhoneSpec("desk1", password, Kind.DESKTOP, Transport(transport), local_host=PHONE_HOST)
    phone = MockPhone(
        spec, softrelay.address, serial=mock_pbx.serial, domain=softrelay.domain, inbox=push_inbox
    )
    try:
        assert await phone.start() == 200
        assert phone.link is not None
        assert mock_pbx.link is not None
        at_phone: list[Request] = []
        at_pbx: list[Request] = []
        phone.link.on_request = _recording(phone.link.on_request, at_phone)
        mock_pbx.link.on_request = _recording(mock_pbx.link.on_request, at_pbx)

        assert (await mock_pbx.call("desk1")).connected
        (offer,) = [r for r in at_phone if r.method == "INVITE"]
        assert _connection_lines(offer) == [
            "o=pbx 1 1 IN IP4 127.0.0.1",
            "c=IN IP4 127.0.0.1",
        ]

        assert (await phone.call("echo")).connected
        (offer,) = [r for r in at_pbx if r.method == "INVITE"]
        assert _connection_lines(offer) == [
            f"o=desk1 1 1 IN IP4 {PHONE_HOST}",
            f"c=IN IP4 {PHONE_HOST}",
        ]
    finally:
        await phone.stop()
