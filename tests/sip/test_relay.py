"""The relay's routing, on in-memory flows: a PBX links by serial with its secret, a
phone registers through it with the PBX's own challenge passed through, calls cross in
both directions, and nothing of the Authorization header or the password is stored."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from mockphone import digest
from privacy.audit import scan_for_canaries
from privacy.clock import ManualClock
from privacy.store import Store
from proxy.sip.flow import Flow, Transport
from proxy.sip.message import Request, Response
from proxy.sip.parser import parse
from proxy.sip.relay import Relay
from proxy.sip.settings import PbxSettings, SipSettings

DOMAIN = "relay.test"
SERIAL = "0042137"
PBX_SECRET = "pbx-secret-5f1c"
PHONE_PASSWORD = "phone-password-canary-93ab"


class Wire:
    """One end of an in-memory flow: what the relay sent to this peer."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []

    async def send(self, data: bytes) -> None:
        self.raw.append(data)

    def close(self) -> None:
        pass

    def last(self) -> Request | Response:
        return parse(self.raw[-1])

    def response(self) -> Response:
        message = self.last()
        assert isinstance(message, Response)
        return message

    def request(self) -> Request:
        message = self.last()
        assert isinstance(message, Request)
        return message


def _flow(transport: Transport, remote: tuple[str, int]) -> tuple[Flow, Wire]:
    wire = Wire()
    return Flow(transport, remote, ("127.0.0.1", 5060), wire), wire


def _request(method: str, uri: str, *headers: str, body: str = "") -> bytes:
    lines = [f"{method} {uri} SIP/2.0", *headers, f"Content-Length: {len(body)}", "", body]
    return "\r\n".join(lines).encode()


def _reply(request: Request | Response, status: int, reason: str, *extra: str) -> bytes:
    assert isinstance(request, Request)
    keep = [
        f"{n}: {v}"
        for n, v in request.headers
        if n.lower() in ("via", "from", "to", "call-id", "cseq", "record-route")
    ]
    to_fixed = [
        h if not h.lower().startswith("to:") or "tag=" in h else h + ";tag=pbx1" for h in keep
    ]
    lines = [f"SIP/2.0 {status} {reason}", *to_fixed, *extra, "Content-Length: 0", "", ""]
    return "\r\n".join(lines).encode()


def _counted_relay(store: Store, clock: ManualClock) -> tuple[Relay, CollectorRegistry]:
    registry = CollectorRegistry()
    settings = SipSettings(DOMAIN, (PbxSettings(SERIAL, PBX_SECRET),))
    return Relay(settings, store, clock, registry), registry


@pytest.fixture
async def relay(store: Store, clock: ManualClock) -> Relay:
    settings = SipSettings(DOMAIN, (PbxSettings(SERIAL, PBX_SECRET),))
    return Relay(settings, store, clock, CollectorRegistry())


def _pbx_register(auth: str = "") -> bytes:
    return _request(
        "REGISTER",
        f"sip:{DOMAIN}",
        "Via: SIP/2.0/TCP 203.0.113.9:40000;branch=z9hG4bKpbx1",
        f"From: <sip:{SERIAL}@{DOMAIN}>;tag=p1",
        f"To: <sip:{SERIAL}@{DOMAIN}>",
        "Call-ID: pbxreg-1",
        "CSeq: 1 REGISTER",
        "Max-Forwards: 70",
        "Contact: <sip:pbx@203.0.113.9:40000;transport=tcp>",
        "Expires: 600",
        *([f"Authorization: {auth}"] if auth else []),
    )


def _pbx_answer(challenge: str, secret: str = PBX_SECRET) -> str:
    """The PBX's Authorization answering `challenge` with `secret`."""
    return digest.answer(
        challenge, username=SERIAL, password=secret, method="REGISTER", uri=f"sip:{DOMAIN}"
    ).header


async def _link_pbx(relay: Relay, secret: str = PBX_SECRET) -> tuple[Flow, Wire, int]:
    flow, wire = _flow(Transport.TCP, ("203.0.113.9", 40000))
    await relay.handle(_pbx_register(), flow)
    challenge = wire.response()
    assert challenge.status == 401
    # Answered by the mock parties' digest, not the relay's: a shared bug cannot pass.
    auth = _pbx_answer(challenge.get("WWW-Authenticate") or "", secret)
    await relay.handle(_pbx_register(auth), flow)
    return flow, wire, wire.response().status


async def test_pbx_links_with_its_secret_and_wrong_secret_is_refused(relay: Relay) -> None:
    _, _, status = await _link_pbx(relay, "wrong-secret")
    assert status == 403
    assert relay.pbx_flow(SERIAL) is None
    flow, _, status = await _link_pbx(relay)
    assert status == 200
    assert relay.pbx_flow(SERIAL) is flow
    (link,) = await relay.store.find("pbx_link", pbx_serial=SERIAL)
    assert link.fields["pbx_ip"] == "203.0.113.9"


async def test_pbx_linked_gauge_per_serial_follows_its_link(
    store: Store, clock: ManualClock
) -> None:
    """Each configured dial-out PBX has its 0/1 series from the start (an offline alert
    needs the 0), set to 1 by its link, back to 0 when its flow closes; a static PBX,
    which never links, has none."""
    registry = CollectorRegistry()
    pbxs = (PbxSettings(SERIAL, PBX_SECRET), PbxSettings("0099999", "", static=("192.0.2.1", 5060)))
    relay = Relay(SipSettings(DOMAIN, pbxs), store, clock, registry)

    def linked(serial: str) -> float | None:
        return registry.get_sample_value("softrelay_sip_pbx_linked", {"serial": serial})

    assert (linked(SERIAL), linked("0099999")) == (0.0, None)
    flow, _, status = await _link_pbx(relay, "wrong-secret")
    assert (status, linked(SERIAL)) == (403, 0.0)
    flow, _, status = await _link_pbx(relay)
    assert (status, linked(SERIAL)) == (200, 1.0)
    assert registry.get_sample_value("softrelay_sip_pbx_links") == 1.0
    flow.close()
    assert linked(SERIAL) == 0.0
    assert registry.get_sample_value("softrelay_sip_pbx_links") == 0.0


async def test_pbx_over_udp_is_refused(relay: Relay) -> None:
    flow, wire = _flow(Transport.UDP, ("203.0.113.9", 5060))
    await relay.handle(_pbx_register(), flow)
    reply = wire.response()
    assert reply.status == 403


def _phone_register(auth: str = "", cseq: int = 1, expires: int = 3600) -> bytes:
    return _request(
        "REGISTER",
        f"sip:{SERIAL}.{DOMAIN}",
        "Via: SIP/2.0/TCP 10.0.0.5:5062;branch=z9hG4bKph" + str(cseq) + ";rport",
        f"From: <sip:alice@{SERIAL}.{DOMAIN}>;tag=a1",
        f"To: <sip:alice@{SERIAL}.{DOMAIN}>",
        "Call-ID: phonereg-1",
        f"CSeq: {cseq} REGISTER",
        "Max-Forwards: 70",
        "<sip:alice@10.0.0.5:5062;transport=tcp;pn-provider=apns;pn-prid=f00dfeed"
        "f00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeed;pn-param=ABCD.com.example.phone.voip>"
        ';+sip.instance="<urn:uuid:00000000-0000-0000-0000-000000000001>"'.join(["Contact: ", ""]),
        f"Expires: {expires}",
        *([f"Authorization: {auth}"] if auth else []),
    )


async def test_phone_registers_through_its_pbx_and_a_call_crosses_both_ways(
    relay: Relay, store: Store, tmp_path: Path
) -> None:
    pbx, pbx_wire, _ = await _link_pbx(relay)
    phone, phone_wire = _flow(Transport.TCP, ("198.51.100.23", 40001))

    # REGISTER goes to the PBX with a Path back to the phone's flow.
    await relay.handle(_phone_register(), phone)
    forwarded = pbx_wire.request()
    assert forwarded.method == "REGISTER"
    assert "ft=" in str(forwarded.paths[0])
    # The PBX challenges; the challenge goes back to the phone.
    await relay.handle(
        _reply(forwarded, 401, "Unauthorized", 'WWW-Authenticate: Digest realm="pbx", nonce="n1"'),
        pbx,
    )
    challenge = phone_wire.response()
    assert challenge.status == 401
    assert challenge.vias[0].branch == "z9hG4bKph1"
    # The phone answers; the PBX accepts; the binding is stored, the credentials are not.
    auth = (
        f'Digest username="alice", realm="pbx", nonce="n1", uri="sip:x", '
        f'response="{PHONE_PASSWORD}"'
    )
    await relay.handle(_phone_register(auth, cseq=2), phone)
    forwarded = pbx_wire.request()
    assert forwarded.get("Authorization") == auth
    await relay.handle(_reply(forwarded, 200, "OK", f"Contact: {forwarded.get('Contact')}"), pbx)
    ok = phone_wire.response()
    assert ok.status == 200
    await relay.drain()
    (binding,) = await store.find("registration", pbx_serial=SERIAL, sip_username="alice")
    assert binding.fields["phone_ip"] == "198.51.100.23"
    assert binding.fields["push_provider"] == "apns"
    assert str(binding.fields["push_token"]).startswith("f00dfeed")

    # The PBX calls the phone: INVITE routed by the Path, Record-Routed.
    path = str(forwarded.paths[0])
    await relay.handle(
        _request(
            "INVITE",
            "sip:alice@10.0.0.5:5062;transport=tcp",
            "Via: SIP/2.0/TCP 203.0.113.9:40000;branch=z9hG4bKinv1",
            f"Route: {path}",
            f"From: <sip:bob@{SERIAL}.{DOMAIN}>;tag=b1",
            f"To: <sip:alice@{SERIAL}.{DOMAIN}>",
            "Call-ID: call-1",
            "CSeq: 1 INVITE",
            "Max-Forwards: 70",
            "Contact: <sip:bob@203.0.113.9:40000;transport=tcp>",
        ),
        pbx,
    )
    invite = phone_wire.request()
    assert invite.method == "INVITE"
    assert invite.record_routes
    assert not invite.routes
    assert invite.max_forwards == 69
    # 200 OK from the phone reaches the PBX through the Via we added.
    await relay.handle(
        _reply(invite, 200, "OK", "Contact: <sip:alice@10.0.0.5:5062;transport=tcp>"), phone
    )
    answered = pbx_wire.response()
    assert answered.status == 200
    assert answered.vias[0].branch == "z9hG4bKinv1"
    # The phone hangs up: BYE follows the Record-Route to the PBX.
    rr = str(invite.record_routes[0])
    await relay.handle(
        _request(
            "BYE",
            "sip:bob@203.0.113.9:40000;transport=tcp",
            "Via: SIP/2.0/TCP 10.0.0.5:5062;branch=z9hG4bKbye1",
            f"Route: {rr}",
            f"From: <sip:alice@{SERIAL}.{DOMAIN}>;tag=pbx1",
            f"To: <sip:bob@{SERIAL}.{DOMAIN}>;tag=b1",
            "Call-ID: call-1",
            "CSeq: 2 BYE",
            "Max-Forwards: 70",
        ),
        phone,
    )
    bye = pbx_wire.request()
    assert bye.method == "BYE"

    # The phone calls out: routed by serial to the PBX.
    await relay.handle(
        _request(
            "INVITE",
            f"sip:carol@{SERIAL}.{DOMAIN}",
            "Via: SIP/2.0/TCP 10.0.0.5:5062;branch=z9hG4bKout1",
            f"From: <sip:alice@{SERIAL}.{DOMAIN}>;tag=a9",
            f"To: <sip:carol@{SERIAL}.{DOMAIN}>",
            "Call-ID: call-2",
            "CSeq: 1 INVITE",
            "Max-Forwards: 70",
            "Contact: <sip:alice@10.0.0.5:5062;transport=tcp>",
        ),
        phone,
    )
    out = pbx_wire.request()
    assert out.method == "INVITE"
    assert out.record_routes

    await store.close()
    hits = scan_for_canaries(tmp_path, [PHONE_PASSWORD, "198.51.100.23", "f00dfeedf00dfeed"])
    assert hits == []


async def test_malformed_request_gets_400_and_garbage_is_dropped(relay: Relay) -> None:
    phone, wire = _flow(Transport.UDP, ("198.51.100.23", 5060))
    await relay.handle(
        _request(
            "OPTIONS",
            "sip:x@relay.test",
            "Via: SIP/2.0/UDP 10.0.0.5;branch=z9hG4bKo1",
            "From: <sip:a@relay.test>;tag=1",
            "To: <sip:x@relay.test>",
            "Call-ID: o1",
            "CSeq: one OPTIONS",
        ),
        phone,
    )
    await relay.handle(b"\x00\xffnot sip at all", phone)
    assert [r.split(b"\r\n")[0] for r in wire.raw] == [b"SIP/2.0 400 Bad CSeq header"]


async def test_phone_of_an_unlinked_pbx_gets_480(relay: Relay) -> None:
    phone, wire = _flow(Transport.TCP, ("198.51.100.23", 40001))
    await relay.handle(_phone_register(), phone)
    reply = wire.response()
    assert reply.status == 480


async def test_forged_route_token_reaches_no_flow(relay: Relay) -> None:
    pbx, pbx_wire, _ = await _link_pbx(relay)
    await relay.handle(
        _request(
            "INVITE",
            "sip:alice@10.0.0.5",
            "Via: SIP/2.0/TCP 203.0.113.9:40000;branch=z9hG4bKf1",
            "Route: <sip:127.0.0.1:5060;transport=tcp;lr;ft=aaaaaaaaaaaaaaaaaaaaaaaaaa>",
            f"From: <sip:bob@{SERIAL}.{DOMAIN}>;tag=b1",
            f"To: <sip:alice@{SERIAL}.{DOMAIN}>",
            "Call-ID: f1",
            "CSeq: 1 INVITE",
            "Max-Forwards: 70",
        ),
        pbx,
    )
    reply = pbx_wire.response()
    assert reply.status == 480


async def test_static_pbx_is_reached_over_udp_without_registering(
    store: Store, clock: ManualClock
) -> None:
    settings = SipSettings(DOMAIN, (PbxSettings("0077", "", static=("127.0.0.1", 5070)),))
    relay = Relay(settings, store, clock, CollectorRegistry())
    pbx, pbx_wire = _flow(Transport.UDP, ("127.0.0.1", 5070))
    relay.udp_flow = lambda address: pbx if address == ("127.0.0.1", 5070) else None
    phone, phone_wire = _flow(Transport.UDP, ("198.51.100.23", 40001))
    await relay.handle(
        _request(
            "INVITE",
            f"sip:service@0077.{DOMAIN}",
            "Via: SIP/2.0/UDP 198.51.100.23:40001;branch=z9hG4bKs1",
            f"From: <sip:alice@0077.{DOMAIN}>;tag=a1",
            f"To: <sip:service@0077.{DOMAIN}>",
            "Call-ID: s1",
            "CSeq: 1 INVITE",
            "Max-Forwards: 70",
            "Contact: <sip:alice@198.51.100.23:40001>",
        ),
        phone,
    )
    invite = pbx_wire.request()
    assert invite.method == "INVITE"
    assert "dt=" in str(invite.record_routes[0])
    await relay.handle(_reply(invite, 200, "OK"), pbx)
    assert phone_wire.response().status == 200


async def test_pbx_answering_the_md5_challenge_links_too(relay: Relay) -> None:
    flow, wire = _flow(Transport.TCP, ("203.0.113.9", 40000))
    await relay.handle(_pbx_register(), flow)
    offered = wire.response().get_all("WWW-Authenticate")
    assert ["SHA-256" in offered[0], "MD5" in offered[1]] == [True, True]
    auth = _pbx_answer(offered[1])
    assert "algorithm=MD5" in auth
    await relay.handle(_pbx_register(auth), flow)
    assert wire.response().status == 200
    assert relay.pbx_flow(SERIAL) is flow


async def test_double_record_route_when_the_sides_use_different_transports(
    relay: Relay,
) -> None:
    pbx, pbx_wire, _ = await _link_pbx(relay)  # TCP
    phone, phone_wire = _flow(Transport.UDP, ("198.51.100.23", 40001))
    await relay.handle(
        _request(
            "INVITE",
            f"sip:carol@{SERIAL}.{DOMAIN}",
            "Via: SIP/2.0/UDP 198.51.100.23:40001;branch=z9hG4bKd1",
            f"From: <sip:alice@{SERIAL}.{DOMAIN}>;tag=a1",
            f"To: <sip:carol@{SERIAL}.{DOMAIN}>",
            "Call-ID: d1",
            "CSeq: 1 INVITE",
            "Max-Forwards: 70",
            "Contact: <sip:alice@198.51.100.23:40001>",
        ),
        phone,
    )
    invite = pbx_wire.request()
    top, bottom = (str(rr) for rr in invite.record_routes)
    assert "transport=tcp" in top  # the PBX (callee) reaches us over its TCP flow
    assert "transport" not in bottom  # the phone (caller) over UDP
    # The PBX hangs up along the route set it learned: both of our entries.
    await relay.handle(
        _request(
            "BYE",
            "sip:alice@198.51.100.23:40001",
            "Via: SIP/2.0/TCP 203.0.113.9:40000;branch=z9hG4bKd2",
            f"Route: {top}, {bottom}",
            f"From: <sip:carol@{SERIAL}.{DOMAIN}>;tag=c1",
            f"To: <sip:alice@{SERIAL}.{DOMAIN}>;tag=a1",
            "Call-ID: d1",
            "CSeq: 1 BYE",
            "Max-Forwards: 70",
        ),
        pbx,
    )
    bye = phone_wire.request()
    assert bye.method == "BYE"
    assert bye.routes == []


async def test_refreshes_within_the_interval_write_the_binding_once(
    store: Store, clock: ManualClock
) -> None:
    relay, registry = _counted_relay(store, clock)
    pbx, pbx_wire, _ = await _link_pbx(relay)
    phone, _ = _flow(Transport.TCP, ("198.51.100.23", 40001))
    for cseq, advance in ((1, 0), (2, 60), (3, 3600)):
        clock.advance(advance)
        await relay.handle(_phone_register(cseq=cseq), phone)
        await relay.handle(_reply(pbx_wire.request(), 200, "OK"), pbx)
        await relay.drain()
    # The first write and the one after the hour; the refresh a minute later is coalesced.
    assert registry.get_sample_value("softrelay_sip_bindings_written_total") == 2
    (binding,) = await store.find("registration", pbx_serial=SERIAL)
    assert binding.last_used_at == clock.now()
    # Two REGISTERs of the PBX, three of the phone.
    assert (
        registry.get_sample_value("softrelay_sip_routing_seconds_count", {"kind": "register"}) == 5
    )


async def test_headers_routing_needs_are_checked_others_are_passed_on(relay: Relay) -> None:
    _, pbx_wire, _ = await _link_pbx(relay)
    phone, phone_wire = _flow(Transport.TCP, ("198.51.100.23", 40001))

    def invite(branch: str, extra: str) -> bytes:
        return _request(
            "INVITE",
            f"sip:carol@{SERIAL}.{DOMAIN}",
            f"Via: SIP/2.0/TCP 10.0.0.5:5062;branch=z9hG4bK{branch}",
            f"From: <sip:alice@{SERIAL}.{DOMAIN}>;tag=a1",
            f"To: <sip:carol@{SERIAL}.{DOMAIN}>",
            "Call-ID: h1",
            "CSeq: 1 INVITE",
            extra,
        )

    # A malformed header the relay does not read goes on to the PBX untouched.
    await relay.handle(invite("h1", "Expires: soon"), phone)
    assert pbx_wire.request().get("Expires") == "soon"
    # One it needs (Max-Forwards) gets a 400 and goes nowhere.
    sent = len(pbx_wire.raw)
    await relay.handle(invite("h2", "Max-Forwards: many"), phone)
    assert phone_wire.response().status == 400
    assert len(pbx_wire.raw) == sent


async def _register_phone(
    relay: Relay, pbx: Flow, pbx_wire: Wire, phone: Flow, cseq: int, expires: int = 3600
) -> None:
    await relay.handle(_phone_register(cseq=cseq, expires=expires), phone)
    await relay.handle(_reply(pbx_wire.request(), 200, "OK"), pbx)
    await relay.drain()


async def test_binding_stores_its_expiry_and_a_refresh_is_written_before_it_lapses(
    store: Store, clock: ManualClock
) -> None:
    relay, registry = _counted_relay(store, clock)
    pbx, pbx_wire, _ = await _link_pbx(relay)
    phone, _ = _flow(Transport.TCP, ("198.51.100.23", 40001))
    registered_at = int(clock.now())
    await _register_phone(relay, pbx, pbx_wire, phone, 1, expires=600)
    (binding,) = await store.find("registration", pbx_serial=SERIAL)
    assert binding.fields["expires_at"] == registered_at + 600
    # 200 s on, the stored expiry (400 s away) still covers half a refresh: not written.
    clock.advance(200)
    await _register_phone(relay, pbx, pbx_wire, phone, 2, expires=600)
    assert registry.get_sample_value("softrelay_sip_bindings_written_total") == 1
    # 400 s on, it would lapse within half of the new one: written, though the
    # last-use interval (1 h) has not passed.
    clock.advance(200)
    await _register_phone(relay, pbx, pbx_wire, phone, 3, expires=600)
    assert registry.get_sample_value("softrelay_sip_bindings_written_total") == 2
    (binding,) = await store.find("registration", pbx_serial=SERIAL)
    assert binding.fields["expires_at"] == registered_at + 400 + 600


async def test_unregister_deletes_the_binding(relay: Relay, store: Store) -> None:
    pbx, pbx_wire, _ = await _link_pbx(relay)
    phone, phone_wire = _flow(Transport.TCP, ("198.51.100.23", 40001))
    await _register_phone(relay, pbx, pbx_wire, phone, 1)
    assert len(await store.find("registration", pbx_serial=SERIAL)) == 1
    await _register_phone(relay, pbx, pbx_wire, phone, 2, expires=0)
    assert phone_wire.response().status == 200
    assert await store.find("registration", pbx_serial=SERIAL) == []


def _errors(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("softrelay_sip_errors_total", {"reason": reason})


async def test_register_retransmissions_are_absorbed_not_forwarded_again(
    store: Store, clock: ManualClock
) -> None:
    relay, registry = _counted_relay(store, clock)
    pbx, pbx_wire, _ = await _link_pbx(relay)
    phone, phone_wire = _flow(Transport.UDP, ("198.51.100.23", 40001))
    before = len(pbx_wire.raw)
    await relay.handle(_phone_register(), phone)
    await relay.handle(_phone_register(), phone)  # retransmitted before the PBX answered
    assert len(pbx_wire.raw) == before + 1, "the PBX sees the REGISTER once"
    await relay.handle(_reply(pbx_wire.request(), 200, "OK"), pbx)
    await relay.drain()
    assert phone_wire.response().status == 200
    # The 200 was lost on UDP: the retransmission gets the same answer from the relay.
    clock.advance(4)
    await relay.handle(_phone_register(), phone)
    assert len(pbx_wire.raw) == before + 1
    assert phone_wire.raw[-1] == phone_wire.raw[-2]
    assert _errors(registry, "retransmission_absorbed") == 2
    # Past timer J the answer is forgotten, and the same request is a new one.
    clock.advance(40)
    await relay.handle(_phone_register(), phone)
    assert len(pbx_wire.raw) == before + 2


async def test_overloaded_relay_answers_new_requests_503_and_finishes_dialogs(
    store: Store, clock: ManualClock
) -> None:
    relay, registry = _counted_relay(store, clock)
    _, pbx_wire, _ = await _link_pbx(relay)
    phone, phone_wire = _flow(Transport.TCP, ("198.51.100.23", 40001))
    invite = _request(
        "INVITE",
        f"sip:bob@{SERIAL}.{DOMAIN}",
        "Via: SIP/2.0/TCP 10.0.0.5:5062;branch=z9hG4bKinv1",
        f"From: <sip:alice@{SERIAL}.{DOMAIN}>;tag=a1",
        f"To: <sip:bob@{SERIAL}.{DOMAIN}>",
        "Call-ID: call-1",
        "CSeq: 1 INVITE",
        "Max-Forwards: 70",
        "Contact: <sip:alice@10.0.0.5:5062;transport=tcp>",
    )
    bye = _request(
        "BYE",
        f"sip:bob@{SERIAL}.{DOMAIN}",
        "Via: SIP/2.0/TCP 10.0.0.5:5062;branch=z9hG4bKbye1",
        f"From: <sip:alice@{SERIAL}.{DOMAIN}>;tag=a1",
        f"To: <sip:bob@{SERIAL}.{DOMAIN}>;tag=b1",
        "Call-ID: call-0",
        "CSeq: 2 BYE",
        "Max-Forwards: 70",
    )
    sent = len(pbx_wire.raw)
    for _ in range(3):  # the loop lags 500 ms, over the 100 ms default, three probes in a row
        relay.overload.observe(0.5)
    await relay.handle(invite, phone)
    refused = phone_wire.response()
    assert (refused.status, refused.get("Retry-After")) == (503, "5")
    assert len(pbx_wire.raw) == sent, "the refused INVITE does not reach the PBX"
    await relay.handle(bye, phone)  # in a dialog: routed even now
    assert pbx_wire.request().method == "BYE"
    for _ in range(3):  # under the limit, not under half of it: still shedding
        relay.overload.observe(0.07)
    await relay.handle(invite, phone)
    assert phone_wire.response().status == 503
    for _ in range(3):
        relay.overload.observe(0.01)
    await relay.handle(invite, phone)
    assert pbx_wire.request().method == "INVITE"
    assert _errors(registry, "overload") == 2
