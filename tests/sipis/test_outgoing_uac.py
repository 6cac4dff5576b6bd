"""The INVITE client transaction of the SIPIS client (unit, a UDP peer written here, a
manual clock): timer A until a provisional, the ACK of a non-2xx with the INVITE's
branch (again for a retransmitted answer), later 2xx to `accepted`, a CANCEL held
until a provisional came and sent with the INVITE's branch and CSeq, and the CANCEL
after `ring_limit` of ringing. Loopback UDP keeps the order of one socket's datagrams,
which the tests use to show that nothing was sent in between."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest

from proxy.sip.message import Request, Response
from proxy.sip.responses import make_response
from sipis.account import SipTransport
from sipis.uac import ClientInvite, Destination, Timeout, Uac, UacSettings
from tests.sipis.manualtime import ManualTime
from tests.sipis.test_uac import T1, T2, WAIT, Peer, udp_peer

__all__ = ["udp_peer"]  # the fixture


def invite() -> Request:
    return Request(
        "INVITE",
        "sip:bob@provider.test",
        [
            ("Max-Forwards", "70"),
            ("From", "<sip:alice@provider.test>;tag=a1"),
            ("To", "<sip:bob@provider.test>"),
            ("Call-ID", secrets.token_hex(6)),
            ("CSeq", "2 INVITE"),
            ("Route", "<sip:127.0.0.1;lr>"),
            ("Contact", "<sip:acc@127.0.0.1>"),
        ],
    )


class Sent:
    """The Uac under test, its peer, the manual time."""

    def __init__(self, uac: Uac, peer: Peer, time: ManualTime) -> None:
        self.uac, self.peer, self.time = uac, peer, time

    def answer(self, request: Request, status: int, tag: str = "b1") -> Response:
        response = make_response(request, status, to_tag=tag)
        assert self.peer.transport is not None
        self.peer.transport.sendto(response.serialize(), ("127.0.0.1", self.uac.udp_port))
        return response

    async def arrived(self) -> Request:
        return await asyncio.wait_for(self.peer.arrived.get(), WAIT)

    async def next_sleep(self) -> float:
        """When the transaction's next wait ends (it has begun one)."""
        while (wake := self.time.next_wake()) is None:
            await asyncio.wait_for(self.time.changed.wait(), WAIT)
            self.time.changed.clear()
        return wake


@pytest.fixture
async def sent(udp_peer: tuple[Peer, int]) -> AsyncIterator[tuple[Sent, Destination]]:
    peer, port = udp_peer
    time = ManualTime()
    uac = await Uac.create(UacSettings(t1=T1, t2=T2, bind_host="127.0.0.1"), time.clock, time.sleep)
    try:
        yield Sent(uac, peer, time), Destination("127.0.0.1", port, SipTransport.UDP)
    finally:
        await uac.close()


async def test_invite_is_resent_on_timer_a_until_a_provisional_and_a_486_is_acked(
    sent: tuple[Sent, Destination],
) -> None:
    s, destination = sent
    transaction = await s.uac.invite(destination, invite())
    first = await s.arrived()
    start = s.time.now()
    answers = asyncio.ensure_future(transaction.next())
    for interval in (T1, 2 * T1, 4 * T1):  # timer A doubles
        wake = await s.next_sleep()
        assert wake - s.time.now() == pytest.approx(interval)
        s.time.advance_to(wake)
        again = await s.arrived()
        assert again.serialize() == first.serialize()
    s.answer(first, 100)
    s.answer(first, 180)
    ringing = await asyncio.wait_for(answers, WAIT)
    assert ringing.status == 180
    answers = asyncio.ensure_future(transaction.next())
    s.time.advance_to(start + 30)  # past any timer A: none is running after a provisional
    s.answer(first, 486)
    busy = await asyncio.wait_for(answers, WAIT)
    assert busy.status == 486
    ack = await s.arrived()  # the next datagram: no INVITE was sent in between
    assert ack.method == "ACK"
    assert ack.top_via.branch == first.top_via.branch
    assert ack.cseq.number == 2
    assert ack.to.tag == "b1"
    assert ack.get_all("Route") == first.get_all("Route")
    s.answer(first, 486)  # our ACK was lost: the retransmitted 486 is ACKed again
    assert (await s.arrived()).serialize() == ack.serialize()


async def test_invite_without_any_answer_times_out_on_timer_b(
    sent: tuple[Sent, Destination],
) -> None:
    s, destination = sent
    transaction = await s.uac.invite(destination, invite())
    start = s.time.now()
    answers = asyncio.ensure_future(transaction.next())
    for _ in range(20):  # timer A fires 6 times before timer B
        if answers.done():
            break
        wake = s.time.next_wake()
        if wake is not None:
            s.time.advance_to(wake)
            continue
        changed = asyncio.ensure_future(s.time.changed.wait())
        await asyncio.wait({answers, changed}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        changed.cancel()
        s.time.changed.clear()
    with pytest.raises(Timeout):
        answers.result()
    assert s.time.now() - start == pytest.approx(64 * T1)


async def test_later_2xx_go_to_accepted_not_to_the_transaction(
    sent: tuple[Sent, Destination],
) -> None:
    s, destination = sent
    later: asyncio.Queue[Response] = asyncio.Queue()
    transaction = await s.uac.invite(destination, invite(), accepted=later.put_nowait)
    first = await s.arrived()
    s.answer(first, 200)
    ok = await asyncio.wait_for(transaction.next(), WAIT)
    assert ok.status == 200
    s.answer(first, 200)  # a retransmission: the app must see it to ACK again
    s.answer(first, 200, tag="b2")  # another fork answered
    again = await asyncio.wait_for(later.get(), WAIT)
    fork = await asyncio.wait_for(later.get(), WAIT)
    assert (again.to.tag, fork.to.tag) == ("b1", "b2")
    assert s.peer.arrived.empty()  # the ACK of a 2xx is the dialog's, never the transaction's


async def _cancelled(s: Sent, first: Request, transaction: ClientInvite) -> None:
    cancel = await s.arrived()
    assert cancel.method == "CANCEL"
    assert cancel.top_via.branch == first.top_via.branch
    assert cancel.cseq.number == first.cseq.number
    assert cancel.call_id == first.call_id
    assert cancel.get_all("Route") == first.get_all("Route")
    s.answer(cancel, 200)
    s.answer(first, 487)
    terminated = await asyncio.wait_for(transaction.next(), WAIT)
    assert terminated.status == 487
    assert (await s.arrived()).method == "ACK"


async def test_cancel_waits_for_a_provisional_then_goes_with_the_invites_branch(
    sent: tuple[Sent, Destination],
) -> None:
    s, destination = sent
    transaction = await s.uac.invite(destination, invite())
    first = await s.arrived()
    await transaction.cancel()  # nothing may go before a provisional (RFC 3261 9.1)
    s.answer(first, 100)  # the CANCEL goes now: the next datagram the peer gets
    await _cancelled(s, first, transaction)


async def test_invite_ringing_past_the_limit_is_cancelled(
    sent: tuple[Sent, Destination],
) -> None:
    s, destination = sent
    transaction = await s.uac.invite(destination, invite(), ring_limit=60)
    first = await s.arrived()
    s.answer(first, 180)
    assert (await asyncio.wait_for(transaction.next(), WAIT)).status == 180
    answers = asyncio.ensure_future(transaction.next())
    wake = await s.next_sleep()
    assert wake - s.time.now() == pytest.approx(60)
    s.time.advance_to(wake)
    cancel = await s.arrived()
    assert cancel.method == "CANCEL"
    s.answer(cancel, 200)
    s.answer(first, 487)
    assert (await asyncio.wait_for(answers, WAIT)).status == 487
