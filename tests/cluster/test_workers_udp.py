"""UDP calls through `softrelay serve --workers 2`, real processes on one shared SIP
port (SO_REUSEPORT): a static UDP PBX answers calls from callers that each send from a
socket of their own.

The kernel picks the worker of a datagram by its 4-tuple: the callers' requests spread
over both workers. Answers the PBX sent to the shared port would all reach one worker,
half of them not the sender, and cross the internal link; so each worker sends its
requests to the PBX from a UDP socket of its own, which its Via names, and the PBX's
answers come back to it (`SipTransports.udp_out`). Every call completes end to end, the
PBX heard both workers, each from its own port and never from the shared one, and the
workers' own /metrics show both handled calls and not one answer crossed between them.

Every wait is for a datagram or a printed line, bounded; nothing sleeps."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any, cast

import aiohttp

from mockphone.sipwire import Request, Response, make_response, parse, sip_message
from tests.cluster.serves import (
    metrics_ports,
    printed_port,
    running_workers,
    sample,
    scrape,
    two_free_ports,
    workers_config,
)
from tests.limits import LONGEST_WAIT
from tests.peers import DOMAIN, SDP, STEP_TIMEOUT

STATIC_SERIAL = "0077"  # the PBX configured by its UDP address (no link, no digest)
CALLERS = 32  # each from its own socket: all on one worker by chance is 2 ** -31
# Calls under way at once. The PBX's answers all come on one UDP flow, which queues at
# most [sip.limits] max_pending (32) messages for its handler and drops the rest as
# overload (this PBX, unlike a real one, never retransmits what was dropped); a call has
# at most two answers (180, 200) outstanding, so 8 calls stay well below it. (At 32 at
# once, the 64 answers of a burst overflow it now and then, with or without workers.)
AT_ONCE = 8


class Datagrams(asyncio.DatagramProtocol):
    """One UDP socket's messages, in the order they came, with their source."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[Request | Response, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport is not a subclass of asyncio's, though it is one.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait((parse(data), (addr[0], addr[1])))

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def send(self, data: bytes, to: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, to)

    async def next(self) -> tuple[Request | Response, tuple[str, int]]:
        return await asyncio.wait_for(self.received.get(), STEP_TIMEOUT)


class StaticPbx(Datagrams):
    """The UAS: every INVITE gets 180 then 200 (Record-Route echoed), an ACK is taken,
    a BYE gets 200. A retransmitted request gets the same answers again."""

    def __init__(self) -> None:
        super().__init__()
        self.answered: dict[str, list[bytes]] = {}  # branch -> what it answered
        self.acked: set[str] = set()  # Call-IDs
        self.sources: set[tuple[str, int]] = set()  # where requests came from
        self.ended: set[str] = set()  # Call-IDs whose BYE was answered
        self.tags = (f"pbx{n}" for n in itertools.count())

    def datagram_received(self, data: bytes, addr: Any) -> None:
        message = parse(data)
        source = (addr[0], addr[1])
        assert isinstance(message, Request), message
        self.sources.add(source)
        branch = message.top_via.branch or ""
        if message.method == "ACK":
            self.acked.add(message.call_id)
            return
        if branch not in self.answered:
            self.answered[branch] = self._answers(message)
        for answer in self.answered[branch]:
            self.send(answer, source)

    def _answers(self, request: Request) -> list[bytes]:
        if request.method == "BYE":
            self.ended.add(request.call_id)
            return [make_response(request, 200).serialize()]
        assert request.method == "INVITE", request.method
        tag = next(self.tags)
        routes = [("Record-Route", value) for value in request.get_all("Record-Route")]
        contact = [("Contact", f"<sip:pbx@127.0.0.1:{self.port}>")]
        return [
            make_response(request, 180, headers=routes, to_tag=tag).serialize(),
            make_response(
                request,
                200,
                headers=[*routes, *contact, ("Content-Type", "application/sdp")],
                to_tag=tag,
                body=SDP.encode(),
            ).serialize(),
        ]


async def _call(relay: tuple[str, int], number: int, at_once: asyncio.Semaphore) -> list[int]:
    """One call from a socket of its own: INVITE, 180, 200, ACK, BYE, 200 along the
    route set; the statuses it got, in order."""
    async with at_once:
        return await _one_call(relay, number)


async def _one_call(relay: tuple[str, int], number: int) -> list[int]:
    loop = asyncio.get_running_loop()
    transport, caller = await loop.create_datagram_endpoint(Datagrams, local_addr=("127.0.0.1", 0))
    try:
        here = f"127.0.0.1:{caller.port}"
        call_id = f"udp-workers-{number}"
        dialog = [
            f"From: <sip:caller{number}@{here}>;tag=c{number}",
            f"Call-ID: {call_id}",
            "Max-Forwards: 70",
        ]
        target = f"sip:pbx@{STATIC_SERIAL}.{DOMAIN}"
        caller.send(
            sip_message(
                f"INVITE {target} SIP/2.0",
                f"Via: SIP/2.0/UDP {here};branch=z9hG4bK-inv-{number}",
                *dialog,
                f"To: <{target}>",
                "CSeq: 1 INVITE",
                f"Contact: <sip:caller{number}@{here}>",
                "Content-Type: application/sdp",
                body=SDP,
            ),
            relay,
        )
        statuses = []
        while True:
            answer, source = await caller.next()
            assert isinstance(answer, Response), answer
            assert source == relay, source
            assert answer.cseq.method == "INVITE", answer
            statuses.append(answer.status)
            if answer.status >= 200:
                break
        assert answer.status == 200, statuses
        # The route set: Record-Route reversed (RFC 3261 12.1.2); the target: Contact.
        routes = [("Route", value) for value in reversed(answer.get_all("Record-Route"))]
        assert routes, answer
        to = answer.get("To")
        remote = answer.contacts[0].uri
        for method, cseq in (("ACK", 1), ("BYE", 2)):
            caller.send(
                sip_message(
                    f"{method} {remote} SIP/2.0",
                    f"Via: SIP/2.0/UDP {here};branch=z9hG4bK-{method.lower()}-{number}",
                    *(f"{name}: {value}" for name, value in routes),
                    *dialog,
                    f"To: {to}",
                    f"CSeq: {cseq} {method}",
                ),
                relay,
            )
        bye, source = await caller.next()
        assert isinstance(bye, Response), bye
        assert source == relay, source
        assert (bye.status, bye.cseq.method) == (200, "BYE"), bye
        statuses.append(bye.status)
        return statuses
    finally:
        transport.close()


async def test_udp_calls_spread_over_two_workers_complete_with_answers_crossing_between_them(
    tmp_path: Path, redis_url: str
) -> None:
    loop = asyncio.get_running_loop()
    pbx_transport, pbx = await loop.create_datagram_endpoint(StaticPbx, local_addr=("127.0.0.1", 0))
    static = f'[[sip.pbx]]\nserial = "{STATIC_SERIAL}"\nstatic = "udp:127.0.0.1:{pbx.port}"\n'
    config = workers_config(tmp_path, cluster=True, internal_base=two_free_ports(), more=static)
    at_once = asyncio.Semaphore(AT_ONCE)
    try:
        async with running_workers(config, tmp_path / "var", redis_url) as workers:
            sip = printed_port(workers, r"softrelay: sip udp\+tcp 127\.0\.0\.1:(\d+)$")
            try:
                async with asyncio.timeout(LONGEST_WAIT):
                    results = await asyncio.gather(
                        *(_call(("127.0.0.1", sip), n, at_once) for n in range(CALLERS))
                    )
            except BaseException:
                print(workers.log())
                raise
            assert results == [[180, 200, 200]] * CALLERS
            every = {f"udp-workers-{n}" for n in range(CALLERS)}
            assert pbx.acked == pbx.ended == every
            # From each worker's own socket (two ports: both workers sent), never the
            # shared one, which the workers' answers to the callers came from.
            assert len(pbx.sources) == 2, pbx.sources
            assert ("127.0.0.1", sip) not in pbx.sources, pbx.sources
            async with aiohttp.ClientSession() as session:
                metrics = metrics_ports(workers)
                assert sorted(metrics) == [0, 1]
                seen = [await scrape(session, metrics[i]) for i in (0, 1)]
            requests = [sample(s, "softrelay_sip_messages_total", kind="request") for s in seen]
            assert all(count > 0 for count in requests), requests  # both handled calls
            crossed = [
                sample(s, "softrelay_node_frames_total", way=way, kind=kind)
                for s in seen
                for way in ("out", "in")
                for kind in ("response", "route")
            ]
            # Each caller's requests come from one socket, so reach one worker, which
            # made the dialog's token; the PBX answers where the Via says: nothing crosses.
            assert crossed == [0.0] * 8, crossed
            for s in seen:
                reason = "response_not_from_target"
                assert sample(s, "softrelay_sip_errors_total", reason=reason) == 0
                dropped = sample(
                    s, "softrelay_sip_messages_dropped_total", transport="udp", reason="overload"
                )
                assert dropped == 0
            assert await workers.stop() == 0, workers.log()
    finally:
        pbx_transport.close()
