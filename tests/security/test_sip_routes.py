"""Issue 14.2 and 14.10, in process: what softrelay writes into a message to find its
way back can be used only from where it was meant to be used, and a Route entry that
names softrelay itself is taken off before the request goes on (RFC 3261 16.4).

- A response is routed only when it comes from the flow its request went to.
- A Path token works only for the PBX of the serial it was made for.
- A Record-Route token works only for the two ends of its dialog (or that PBX on a new
  flow); one altered character and it works for nobody.
- Route entries naming us (as Linphone and baresip put them, with an outbound proxy)
  are gone from what the PBX receives, on REGISTER as on INVITE and in a dialog.

The relay runs on in-memory flows (the harness of tests/sip/test_relay.py), so every
step is a call whose effects are read back at once.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from mockphone import digest
from privacy.clock import ManualClock
from privacy.store import Store
from proxy.sip.flow import Flow, Transport
from proxy.sip.message import Request, Response
from proxy.sip.parser import parse
from proxy.sip.relay import Relay
from proxy.sip.settings import PbxSettings, SipSettings
from proxy.sip.uri import SipUri
from tests.sip.test_relay import (
    DOMAIN,
    PBX_SECRET,
    SERIAL,
    Wire,
    _flow,
    _link_pbx,
    _pbx_register,
    _phone_register,
    _reply,
    _request,
)

OTHER_SERIAL = "0099999"
PUBLIC_HOST = "sip.relay.example"


@pytest.fixture
async def relay(store: Store, clock: ManualClock) -> Relay:
    settings = SipSettings(
        DOMAIN,
        (PbxSettings(SERIAL, PBX_SECRET), PbxSettings(OTHER_SERIAL, PBX_SECRET)),
        public_host=PUBLIC_HOST,
    )
    return Relay(settings, store, clock, CollectorRegistry())


def _errors(relay: Relay, reason: str) -> float:
    """softrelay_sip_errors_total{reason=...} of this relay."""
    for family in relay.metrics.errors.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("reason") == reason:
                return sample.value
    return 0.0


async def _link_other_pbx(relay: Relay) -> tuple[Flow, Wire]:
    """The PBX of OTHER_SERIAL, linked with its secret as any PBX links."""
    flow, wire = _flow(Transport.TCP, ("203.0.113.77", 41000))

    def register(auth: str) -> bytes:
        return _pbx_register(auth).replace(SERIAL.encode(), OTHER_SERIAL.encode())

    await relay.handle(register(""), flow)
    challenge = wire.response().get("WWW-Authenticate") or ""
    answer = digest.answer(
        challenge,
        username=OTHER_SERIAL,
        password=PBX_SECRET,
        method="REGISTER",
        uri=f"sip:{DOMAIN}",
    )
    await relay.handle(register(answer.header), flow)
    assert wire.response().status == 200
    return flow, wire


async def _registered(relay: Relay, pbx: Flow, pbx_wire: Wire) -> tuple[Flow, Wire, Request]:
    """A phone registered through the PBX; its flow, wire, and the REGISTER the PBX got."""
    phone, phone_wire = _flow(Transport.TCP, ("198.51.100.23", 40001))
    await relay.handle(_phone_register(), phone)
    register = pbx_wire.request()
    await relay.handle(_reply(register, 200, "OK"), pbx)
    assert phone_wire.response().status == 200
    await relay.drain()
    return phone, phone_wire, register


def _invite_along(route: str, call_id: str = "c1", *, via_host: str = "203.0.113.9") -> bytes:
    return _request(
        "INVITE",
        "sip:alice@10.0.0.5:5062;transport=tcp",
        f"Via: SIP/2.0/TCP {via_host}:40000;branch=z9hG4bK{call_id}",
        f"Route: {route}",
        f"From: <sip:bob@{SERIAL}.{DOMAIN}>;tag=b1",
        f"To: <sip:alice@{SERIAL}.{DOMAIN}>",
        f"Call-ID: {call_id}",
        "CSeq: 1 INVITE",
        "Max-Forwards: 70",
        "Contact: <sip:bob@203.0.113.9:40000;transport=tcp>",
    )


def _bye_along(routes: list[str], call_id: str, *, via_host: str = "10.0.0.5") -> bytes:
    return _request(
        "BYE",
        "sip:bob@203.0.113.9:40000;transport=tcp",
        f"Via: SIP/2.0/TCP {via_host}:5062;branch=z9hG4bKbye-{call_id}",
        *(f"Route: {route}" for route in routes),
        f"From: <sip:alice@{SERIAL}.{DOMAIN}>;tag=a1",
        f"To: <sip:bob@{SERIAL}.{DOMAIN}>;tag=b1",
        f"Call-ID: {call_id}",
        "CSeq: 2 BYE",
        "Max-Forwards: 70",
    )


# --- responses ------------------------------------------------------------------------


async def test_a_response_from_any_flow_but_the_one_its_request_went_to_is_dropped(
    relay: Relay,
) -> None:
    """The REGISTER's 200 forged by the phone itself, with the exact Via the relay put
    on the request (more than an attacker can learn): dropped, nothing stored; the
    PBX's own answer to the same request still gets through."""
    pbx, pbx_wire, _ = await _link_pbx(relay)
    phone, phone_wire = _flow(Transport.TCP, ("198.51.100.66", 40666))
    await relay.handle(_phone_register(), phone)
    register = pbx_wire.request()
    answered = len(phone_wire.raw)
    await relay.handle(_reply(register, 200, "OK"), phone)  # forged, from the phone
    await relay.drain()
    assert len(phone_wire.raw) == answered, "nothing came back to the forger"
    assert await relay.store.find("registration") == []
    assert _errors(relay, "response_not_from_target") == 1
    # From the PBX, the answer is routed and the binding kept.
    await relay.handle(_reply(register, 200, "OK"), pbx)
    await relay.drain()
    assert phone_wire.response().status == 200
    assert len(await relay.store.find("registration")) == 1


async def test_a_branch_of_ours_cannot_be_recomputed_from_what_peers_see(relay: Relay) -> None:
    """The same request from two relays (two process keys) gets two branches, so the
    branch is keyed, not a hash of the visible values; a retransmission gets the same
    one (RFC 3261 16.11)."""
    _pbx, pbx_wire, _ = await _link_pbx(relay)
    phone, _ = _flow(Transport.TCP, ("198.51.100.23", 40001))
    invite = _request(
        "INVITE",
        f"sip:carol@{SERIAL}.{DOMAIN}",
        "Via: SIP/2.0/TCP 10.0.0.5:5062;branch=z9hG4bKkeyed",
        f"From: <sip:alice@{SERIAL}.{DOMAIN}>;tag=a1",
        f"To: <sip:carol@{SERIAL}.{DOMAIN}>",
        "Call-ID: keyed",
        "CSeq: 1 INVITE",
        "Max-Forwards: 70",
    )
    await relay.handle(invite, phone)
    first = pbx_wire.request().top_via.branch
    await relay.handle(invite, phone)
    assert pbx_wire.request().top_via.branch == first, "stable for a retransmission"
    relay._flow_key = bytes(32)
    await relay.handle(invite, phone)
    assert pbx_wire.request().top_via.branch != first, "another key, another branch"


# --- Path tokens ----------------------------------------------------------------------


async def test_a_path_token_works_only_for_the_pbx_of_its_serial(relay: Relay) -> None:
    pbx, pbx_wire, _ = await _link_pbx(relay)
    phone, phone_wire, register = await _registered(relay, pbx, pbx_wire)
    path = str(register.paths[0])
    received = len(phone_wire.raw)

    # The phone itself (it sees its Path in the PBX's 200): refused.
    intruder, intruder_wire = _flow(Transport.TCP, ("198.51.100.66", 40666))
    for flow, wire in ((phone, phone_wire), (intruder, intruder_wire)):
        await relay.handle(_invite_along(path, f"x{flow.id}", via_host="198.51.100.66"), flow)
        assert wire.response().status == 403
    assert len(phone_wire.raw) == received + 1, "only the 403 reached the phone"

    # Another PBX, linked by its own serial: the token is not for it.
    other, other_wire = await _link_other_pbx(relay)
    await relay.handle(_invite_along(path, "other-pbx", via_host="203.0.113.77"), other)
    assert other_wire.response().status == 480
    assert len(phone_wire.raw) == received + 1

    # Its own PBX: the call goes through.
    await relay.handle(_invite_along(path, "own-pbx"), pbx)
    assert phone_wire.request().method == "INVITE"


async def test_a_path_token_outlives_a_pbx_reconnection(relay: Relay) -> None:
    """The PBX's registrar keeps the Path; on a new link of the same serial it still
    reaches the phone."""
    pbx, pbx_wire, _ = await _link_pbx(relay)
    _, phone_wire, register = await _registered(relay, pbx, pbx_wire)
    pbx.close()
    again, _, status = await _link_pbx(relay)
    assert status == 200
    await relay.handle(_invite_along(str(register.paths[0]), "relinked"), again)
    assert phone_wire.request().method == "INVITE"


# --- Record-Route tokens --------------------------------------------------------------


async def _call_from_pbx(relay: Relay) -> tuple[Flow, Wire, Flow, Wire, list[str]]:
    """The PBX calls a registered phone: both flows, and the route set the phone keeps
    (the Record-Route of the INVITE)."""
    pbx, pbx_wire, _ = await _link_pbx(relay)
    phone, phone_wire, register = await _registered(relay, pbx, pbx_wire)
    await relay.handle(_invite_along(str(register.paths[0]), "dialog"), pbx)
    invite = phone_wire.request()
    assert "dt=" in str(invite.record_routes[0])
    return pbx, pbx_wire, phone, phone_wire, [str(rr) for rr in invite.record_routes]


async def test_a_record_route_works_only_for_the_ends_of_its_dialog(relay: Relay) -> None:
    _pbx, pbx_wire, phone, _, routes = await _call_from_pbx(relay)
    sent = len(pbx_wire.raw)
    intruder, intruder_wire = _flow(Transport.TCP, ("198.51.100.66", 40666))
    await relay.handle(_bye_along(routes, "dialog", via_host="198.51.100.66"), intruder)
    assert intruder_wire.response().status == 403
    assert len(pbx_wire.raw) == sent, "nothing of the intruder's reached the PBX"
    await relay.handle(_bye_along(routes, "dialog"), phone)
    assert pbx_wire.request().method == "BYE"


async def test_a_record_route_altered_in_one_character_works_for_nobody(relay: Relay) -> None:
    _pbx, pbx_wire, phone, _, routes = await _call_from_pbx(relay)
    sent = len(pbx_wire.raw)
    token = routes[0].split("dt=")[1].rstrip(">")
    flipped = token[:-3] + ("a" if token[-3] != "a" else "b") + token[-2:]
    forged = [route.replace(token, flipped) for route in routes]
    await relay.handle(_bye_along(forged, "dialog"), phone)
    assert len(pbx_wire.raw) == sent
    assert _errors(relay, "route_refused") == 1


async def test_a_relinked_pbx_and_a_phone_heard_anew_over_udp_keep_their_dialog(
    store: Store, clock: ManualClock
) -> None:
    """The PBX of the dialog's serial on a new flow may send along it; so may a phone on
    UDP whose flow was forgotten and made again (same socket, same address)."""
    settings = SipSettings(DOMAIN, (PbxSettings(SERIAL, PBX_SECRET),))
    relay = Relay(settings, store, clock, CollectorRegistry())
    pbx, pbx_wire, _ = await _link_pbx(relay)
    phone, _ = _flow(Transport.UDP, ("198.51.100.23", 40001))
    await relay.handle(
        _request(
            "INVITE",
            f"sip:carol@{SERIAL}.{DOMAIN}",
            "Via: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bKudp1",
            f"From: <sip:alice@{SERIAL}.{DOMAIN}>;tag=a1",
            f"To: <sip:carol@{SERIAL}.{DOMAIN}>",
            "Call-ID: udp-dialog",
            "CSeq: 1 INVITE",
            "Max-Forwards: 70",
        ),
        phone,
    )
    routes = [str(rr) for rr in reversed(pbx_wire.request().record_routes)]
    phone.close()
    again, again_wire = _flow(Transport.UDP, ("198.51.100.23", 40001))
    await relay.handle(_bye_along(routes, "udp-dialog"), again)
    assert pbx_wire.request().method == "BYE"
    # The PBX relinks; the phone's next in-dialog request follows it there.
    pbx.close()
    _relinked, relinked_wire, status = await _link_pbx(relay)
    assert status == 200
    await relay.handle(_bye_along(routes, "udp-dialog-2"), again)
    assert relinked_wire.request().method == "BYE"
    assert again_wire.raw == [], "no refusal to the phone"


# --- Route entries naming us (RFC 3261 16.4) -------------------------------------------


def _routes_to_us(request: Request) -> list[str]:
    """Route entries that name the relay: its address in the tests, or its names."""
    ours = {"127.0.0.1", PUBLIC_HOST, DOMAIN}
    return [
        str(r) for r in request.routes if isinstance(r.uri, SipUri) and r.uri.host.lower() in ours
    ]


@pytest.mark.parametrize(
    "route",
    [
        "<sip:127.0.0.1:5060;transport=tcp;lr>",  # baresip's outbound proxy
        "<sip:127.0.0.1:5060;transport=tcp;lr;lr>",  # as baresip writes it, twice lr
        "<sip:127.0.0.1;lr>",  # the default port, 5060
        f"<sip:{PUBLIC_HOST};lr>",  # our advertised name: its port is DNS's business
        f"<sip:{DOMAIN}:5060;transport=tcp;lr>",
        "<sip:127.0.0.1:5061;transport=tls;lr>",  # another listener of ours
    ],
)
async def test_a_register_arrives_at_the_pbx_without_a_route_naming_us(
    relay: Relay, route: str
) -> None:
    relay.listening([(Transport.TLS, ("127.0.0.1", 5061))])
    _pbx, pbx_wire, _ = await _link_pbx(relay)
    phone, _ = _flow(Transport.TCP, ("198.51.100.23", 40001))
    register = _phone_register().replace(
        b"Max-Forwards", f"Route: {route}\r\nMax-Forwards".encode()
    )
    await relay.handle(register, phone)
    forwarded = pbx_wire.request()
    assert forwarded.method == "REGISTER"
    assert _routes_to_us(forwarded) == []


async def test_an_invite_shaped_like_linphones_loses_our_route_keeps_the_next_hop(
    relay: Relay,
) -> None:
    """Linphone puts its outbound proxy (us) in a Route on INVITE; an entry after it
    that names another host is the PBX's business and stays."""
    _pbx, pbx_wire, _ = await _link_pbx(relay)
    phone, _ = _flow(Transport.TCP, ("198.51.100.23", 40001))
    await relay.handle(
        _request(
            "INVITE",
            f"sip:carol@{SERIAL}.{DOMAIN}",
            "Via: SIP/2.0/TCP 10.0.0.5:5062;branch=z9hG4bK.linphone1;rport",
            "Route: <sip:127.0.0.1:5060;transport=tcp;lr>",
            "Route: <sip:127.0.0.1:7070;lr>",  # our host, not our port: not us
            f"From: <sip:alice@{SERIAL}.{DOMAIN}>;tag=l1",
            f"To: <sip:carol@{SERIAL}.{DOMAIN}>",
            "Call-ID: linphone-1",
            "CSeq: 20 INVITE",
            "Max-Forwards: 70",
            "Contact: <sip:alice@10.0.0.5:5062;transport=tcp>",
        ),
        phone,
    )
    invite = pbx_wire.request()
    assert [str(r) for r in invite.routes] == ["<sip:127.0.0.1:7070;lr>"]


async def test_in_a_dialog_our_outbound_route_and_both_record_routes_are_taken_off(
    relay: Relay,
) -> None:
    """baresip's BYE: its outbound proxy first, then the dialog's route set."""
    _, pbx_wire, phone, _, routes = await _call_from_pbx(relay)
    outbound = "<sip:127.0.0.1:5060;transport=tcp;lr>"
    await relay.handle(_bye_along([outbound, *reversed(routes)], "dialog"), phone)
    bye = pbx_wire.request()
    assert bye.method == "BYE"
    assert bye.routes == []


@pytest.mark.parametrize(
    "route",
    [
        f"<sip:{PUBLIC_HOST.upper()}:5060;transport=tcp;lr>",  # our name, any case, a port
        "<SIP:127.0.0.1:5060;transport=tcp;lr>",  # the scheme in capitals
        "<sip:127.0.0.1:5060;transport=TLS;lr>",  # our port decides, whatever transport
        "<sip:127.0.0.1;transport=TCP;lr>",  # no port: 5060 for TCP
        "<sip:[::1]:5060;transport=tcp;lr>",  # our IPv6 address, bracketed
        "<sip:[0:0:0:0:0:0:0:1];lr>",  # ... written out, without a port
        "<sip:[::ffff:127.0.0.1]:5060;lr>",  # our IPv4 address, IPv4-mapped
    ],
)
async def test_our_address_in_any_spelling_is_taken_off_a_register(
    relay: Relay, route: str
) -> None:
    relay.listening([(Transport.TCP, ("::1", 5060))])
    _pbx, pbx_wire, _ = await _link_pbx(relay)
    phone, _ = _flow(Transport.TCP, ("198.51.100.23", 40001))
    register = _phone_register().replace(
        b"Max-Forwards", f"Route: {route}\r\nMax-Forwards".encode()
    )
    await relay.handle(register, phone)
    forwarded = pbx_wire.request()
    assert forwarded.method == "REGISTER"
    assert forwarded.routes == [], [str(r) for r in forwarded.routes]


@pytest.mark.parametrize(
    "route",
    [
        "<sip:127.0.0.2:5060;lr>",  # another address on our port
        "<sip:127.0.0.1:5070;lr>",  # our address, another port
        "<sip:127.0.0.1;transport=tls;lr>",  # no port: TLS means 5061, not ours here
        "<sip:pbx.example;lr>",
    ],
)
async def test_an_entry_that_does_not_name_us_stays(relay: Relay, route: str) -> None:
    _pbx, pbx_wire, _ = await _link_pbx(relay)
    phone, _ = _flow(Transport.TCP, ("198.51.100.23", 40001))
    register = _phone_register().replace(
        b"Max-Forwards", f"Route: {route}\r\nMax-Forwards".encode()
    )
    await relay.handle(register, phone)
    assert [str(r) for r in pbx_wire.request().routes] == [route]


async def test_only_the_top_entries_naming_us_are_taken_off(relay: Relay) -> None:
    """RFC 3261 16.4 pre-processes the top of the route set: an entry naming us after a
    foreign one is the foreign hop's to route, and stays where it is."""
    _pbx, pbx_wire, _ = await _link_pbx(relay)
    phone, _ = _flow(Transport.TCP, ("198.51.100.23", 40001))
    routes = ["<sip:127.0.0.1:5060;lr>", "<sip:pbx.example;lr>", f"<sip:{PUBLIC_HOST};lr>"]
    register = _phone_register().replace(
        b"Max-Forwards", "".join(f"Route: {r}\r\n" for r in routes).encode() + b"Max-Forwards"
    )
    await relay.handle(register, phone)
    assert [str(r) for r in pbx_wire.request().routes] == routes[1:]


async def test_a_strict_routing_previous_hop_is_undone_as_16_4_says(relay: Relay) -> None:
    """A hop that routes strictly puts our Record-Route in the Request-URI and the
    remote target last in the Route set: the request goes where our token says, with
    that target as its Request-URI again and no Route left naming it."""
    _pbx, pbx_wire, phone, _, routes = await _call_from_pbx(relay)
    ours = routes[0].strip("<>")
    target = "sip:bob@203.0.113.9:40000;transport=tcp"
    bye = _bye_along([*routes[1:], f"<{target}>"], "dialog").replace(
        f"BYE {target} SIP/2.0".encode(), f"BYE {ours} SIP/2.0".encode()
    )
    await relay.handle(bye, phone)
    forwarded = pbx_wire.request()
    assert forwarded.method == "BYE"
    assert str(forwarded.uri) == target
    assert forwarded.routes == []


# --- responses over every transport ----------------------------------------------------


@pytest.mark.parametrize("transport", [Transport.UDP, Transport.TCP, Transport.WS])
async def test_a_2xx_to_an_invite_forged_by_the_callees_neighbour_is_dropped(
    relay: Relay, transport: Transport
) -> None:
    """The PBX calls Alice's phone; Bob's phone (registered at the same PBX, on the same
    transport and address) answers 200 with the exact Via set Alice got: dropped on
    UDP, TCP and WebSocket alike; Alice's own answer goes through."""
    pbx, pbx_wire, _ = await _link_pbx(relay)
    alice, alice_wire = _flow(transport, ("198.51.100.23", 40001))
    bob, bob_wire = _flow(transport, ("198.51.100.23", 40002))
    await relay.handle(_phone_register(), alice)
    register = pbx_wire.request()
    await relay.handle(_reply(register, 200, "OK"), pbx)
    await relay.handle(_invite_along(str(register.paths[0]), "ring"), pbx)
    invite = alice_wire.request()
    sent = len(pbx_wire.raw)
    await relay.handle(_reply(invite, 200, "OK"), bob)
    assert len(pbx_wire.raw) == sent, "nothing of Bob's reached the PBX"
    assert bob_wire.raw == []
    assert _errors(relay, "response_not_from_target") == 1
    await relay.handle(_reply(invite, 200, "OK"), alice)
    assert pbx_wire.response().status == 200


async def test_a_register_answer_replayed_after_its_transaction_stores_nothing(
    relay: Relay, clock: ManualClock
) -> None:
    """The PBX's 401 ended a REGISTER; the same Via answered 200 later (by the PBX's own
    flow, which is all a forger can hope to sound like) changes no binding, and neither
    does a first answer that comes after timer F."""
    pbx, pbx_wire, _ = await _link_pbx(relay)
    phone, phone_wire = _flow(Transport.TCP, ("198.51.100.23", 40001))
    await relay.handle(_phone_register(), phone)
    register = pbx_wire.request()
    await relay.handle(_reply(register, 401, "Unauthorized"), pbx)
    await relay.handle(_reply(register, 200, "OK"), pbx)
    await relay.drain()
    assert await relay.store.find("registration") == []
    await relay.handle(_phone_register(cseq=2), phone)
    late = pbx_wire.request()
    clock.advance(33)  # timer F (32 s) has run out: the phone gave up
    await relay.handle(_reply(late, 200, "OK"), pbx)
    await relay.drain()
    assert await relay.store.find("registration") == []
    assert [m.status for m in map(_parse_response, phone_wire.raw)] == [401, 200, 200]


def _parse_response(data: bytes) -> Response:
    message = parse(data)
    assert isinstance(message, Response)
    return message
