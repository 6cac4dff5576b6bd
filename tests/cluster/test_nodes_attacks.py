"""The attacks of tests/security repeated across the nodes of a cluster: a response
forged on another node, a token used on another node by someone it was not made for,
and the internal link spoken to without the cluster secret. Each gets nothing.

"Nothing" is shown by order, not by waiting: what the attacker sends next on the same
path arrives first (a flow's messages are handled in order, and so are the frames of
one internal link connection)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets

from mockphone.sipwire import Request, Response, make_response
from proxy.sip.nodes import MAGIC, NONCE
from softrelay.app import REGISTRY
from tests.cluster.test_nodes_sip import linked_pbx, registered
from tests.cluster.world import StartNode, cluster_secret, start_node
from tests.peers import PHONE_DOMAIN, PHONE_IP, SDP, STEP_TIMEOUT, sip_message
from tests.sip.test_wake_e2e import TcpPhone

__all__ = ["cluster_secret", "start_node"]  # fixtures


def _invite(phone: TcpPhone, call_id: str, *routes: str) -> bytes:
    return sip_message(
        f"INVITE sip:carol@{PHONE_DOMAIN} SIP/2.0",
        phone.via(),
        *(f"Route: {route}" for route in routes),
        "Max-Forwards: 70",
        f"From: <sip:mallory@{PHONE_DOMAIN}>;tag=m-{call_id}",
        f"Call-ID: {call_id}",
        f"To: <sip:carol@{PHONE_DOMAIN}>",
        "CSeq: 1 INVITE",
        f"Contact: <sip:mallory@{PHONE_IP}:{phone.port};transport=tcp>",
        "Content-Type: application/sdp",
        body=SDP,
    )


async def test_a_response_forged_on_another_node_does_not_reach_the_caller(
    start_node: StartNode,
) -> None:
    """The PBX (on A) calls a phone on A. Mallory, on B, sends a 200 with the INVITE's
    own Via (A's, with its flow token and sealed branch): B hands it to A, which finds
    it did not come from where the INVITE went, and drops it. The PBX next gets
    Mallory's following INVITE, not the forged answer."""
    a, b = await start_node("a"), await start_node("b")
    pbx = await linked_pbx(a)
    alice, contact, path = await registered(a, pbx, "pw-alice")
    mallory = await TcpPhone.connect(b.sip_port)
    try:
        await pbx.invite(contact, path, "forged-1")
        invite = await alice.request("INVITE")
        assert re.search(r";ft=[a-z2-7]+\.node-a", invite.get("Via") or ""), invite.get("Via")
        await mallory.send(make_response(invite, 200, to_tag="mallory", body=SDP.encode()))
        await mallory.send(_invite(mallory, "after-forged-1"))
        after = await pbx.receive()
        assert isinstance(after, Request), f"the forged answer came through:\n{pbx.last()}"
        assert after.call_id == "after-forged-1"
    finally:
        for peer in (mallory, alice, pbx):
            await peer.close()


async def test_a_dialog_token_of_node_b_used_from_node_c_gets_403(start_node: StartNode) -> None:
    """The PBX (on A) calls alice (on B): B's Record-Route carries the dialog's token.
    Mallory, on C, sends a BYE along that route: C hands it to B, which answers 403 (not
    an end of that dialog); alice gets nothing, the PBX's own BYE after it."""
    a, b, c = await start_node("a"), await start_node("b"), await start_node("c")
    pbx = await linked_pbx(a)
    alice, contact, path = await registered(b, pbx, "pw-alice")
    mallory = await TcpPhone.connect(c.sip_port)
    try:
        dialog = await pbx.invite(contact, path, "dialog-1")
        invite = await alice.request("INVITE")
        routes = invite.get_all("Record-Route")
        assert routes
        assert all(re.search(r";dt=[a-z2-7]+\.node-b", r) for r in routes), routes
        await mallory.send(
            sip_message(
                f"BYE sip:alice@{PHONE_IP} SIP/2.0",
                mallory.via(),
                *(f"Route: {route}" for route in routes),
                "Max-Forwards: 70",
                *dialog,
                "To: <sip:alice@x>;tag=a",
                "CSeq: 2 BYE",
            )
        )
        refused = await mallory.receive()
        assert isinstance(refused, Response), mallory.last()
        assert refused.status == 403, mallory.last()
        # The Path token of B, from Mallory (not the PBX of its serial): 403 as well.
        await mallory.send(_invite(mallory, "path-1", str(path)))
        refused = await mallory.final("INVITE")
        assert refused.status == 403, mallory.last()
        # What alice gets next is the PBX's CANCEL, not Mallory's BYE.
        await pbx.send(
            sip_message(
                f"CANCEL {contact.uri} SIP/2.0",
                f"Via: {invite.get_all('Via')[-1]}",  # the PBX's, as in its INVITE
                f"Route: {path}",
                "Max-Forwards: 70",
                *dialog,
                f"To: <sip:alice@{PHONE_DOMAIN}>",
                "CSeq: 1 CANCEL",
            )
        )
        cancel = await alice.request("CANCEL")
        assert cancel.call_id == "dialog-1"
    finally:
        for peer in (mallory, alice, pbx):
            await peer.close()


async def test_the_internal_link_refuses_a_peer_without_the_cluster_secret(
    start_node: StartNode, cluster_secret: str
) -> None:
    """A connection to a node's internal link that cannot prove the secret is closed
    without an answer; one that proves it but sends a frame not sealed with the
    connection's key is closed at that frame, which is not acted upon."""
    a = await start_node("a")
    host, port = a.nodes.address

    # Without the secret: a made-up proof.
    reader, writer = await asyncio.open_connection(host, port)
    greeting = await asyncio.wait_for(reader.readexactly(len(MAGIC) + NONCE), STEP_TIMEOUT)
    assert greeting.startswith(MAGIC)
    where = b"127.0.0.1:9"
    writer.write(bytes((4,)) + b"evil" + bytes((len(where),)) + where + os.urandom(NONCE + 32))
    assert await asyncio.wait_for(reader.read(), STEP_TIMEOUT) == b"", "closed, no welcome"
    writer.close()

    # With the secret, then a frame whose MAC does not match its bytes.
    key = hashlib.sha256(b"softrelay node link\0" + cluster_secret.encode()).digest()
    reader, writer = await asyncio.open_connection(host, port)
    greeting = await asyncio.wait_for(reader.readexactly(len(MAGIC) + NONCE), STEP_TIMEOUT)
    theirs, ours, me = greeting[len(MAGIC) :], os.urandom(NONCE), b"node-x"
    proof = hmac.digest(key, b"\0".join((b"hello", theirs, ours, me, where)), "sha256")
    writer.write(bytes((len(me),)) + me + bytes((len(where),)) + where + ours + proof)
    welcome = await asyncio.wait_for(reader.readexactly(32), STEP_TIMEOUT)
    assert welcome == hmac.digest(key, b"\0".join((b"welcome", ours, theirs, me)), "sha256")
    body = b'{"k":"closed","f":1}\n'
    writer.write((16 + len(body)).to_bytes(4, "big") + secrets.token_bytes(16) + body)
    assert await asyncio.wait_for(reader.read(), STEP_TIMEOUT) == b""
    writer.close()
    registry = a.server.app[REGISTRY]
    assert registry.get_sample_value("softrelay_node_links_refused_total") == 2
