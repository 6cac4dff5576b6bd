"""CPU per relayed call, in process: the six messages of a SIPp call through `Relay`.

    .venv/bin/python bench/relay_inproc.py [--calls 2000] [--repeat 7] [--udp u1|un]
        [--profile [KEY]]

No sockets and no SIPp: what `bench/relay.py`'s softrelay path costs the relay's core
(parse, route, serialize, metrics), measured deterministically so that each change to
that path can be compared on its own. The UAC and the UAS of `bench/sipp/uac.xml` and
`uas.xml` are played here: INVITE (with SDP), 180, 200 (with SDP), ACK and BYE along
the route set, 200. The UAS is the static UDP PBX of serial 0077, as in `relay.py`.

First every call is run once to learn what the relay forwards (its Via, Record-Route),
and the UAS's and UAC's answers are built from that, as SIPp builds them from
`[last_Via:]`, `[last_Record-Route:]` and the route set. Then all the calls' 6 x N
inbound messages are replayed through `Relay.handle` (routing is stateless for calls:
the same message is forwarded the same way), `--repeat` times; the best run gives the
µs per call. The flow key is fixed, so the octets forwarded are the same on every run
and every version of the code: `digest` is their SHA-256, to show a change kept them.

With `--udp u1` or `--udp un` the datagrams go in through the UDP endpoint instead
(`proxy.sip.udp`, `SipTransports.deliver`: a flow per source address, a task per
message, the socket a fake that keeps what is sent): `u1` plays SIPp's UAC with one
socket for every call, `un` with one socket per call (SIPp's `-t un`), so each call
is a new UDP flow (its peer, token, dialog token, metrics) as `bench/relay.py
--uac-transport un` makes it. The calls go in batches of BATCH: the batch's INVITEs,
then its 180s, and so on, each wave handled to the end before the next, as the loop
takes in a burst of datagrams before it runs the flows' tasks. Each run then starts
from a fresh relay and endpoint (as a process that never heard these sources), the
flow ids counted from the same start, so that the octets forwarded are the same on
every run (the run stops if they are not).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import itertools
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path, where bench/push.py would
# shadow the `push` package: put the repository there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import uvloop  # noqa: E402 - after the sys.path fix above
from prometheus_client import CollectorRegistry  # noqa: E402

import proxy.sip.flow  # noqa: E402
from privacy.clock import ManualClock, parse_instant  # noqa: E402
from privacy.keys import Keyring  # noqa: E402
from privacy.policy import load_policy  # noqa: E402
from privacy.store import Store  # noqa: E402
from proxy.sip.flow import Flow, Transport  # noqa: E402
from proxy.sip.message import Request, Response  # noqa: E402
from proxy.sip.parser import parse  # noqa: E402
from proxy.sip.relay import Relay  # noqa: E402
from proxy.sip.settings import PbxSettings, SipSettings  # noqa: E402
from proxy.sip.transport_metrics import SipMetrics  # noqa: E402
from proxy.sip.transport_settings import TransportSettings  # noqa: E402
from proxy.sip.transports import SipTransports  # noqa: E402
from proxy.sip.udp import UdpEndpoint  # noqa: E402

UAC = ("127.0.0.1", 5061)
UAS = ("127.0.0.1", 5070)
LOCAL = ("127.0.0.1", 5060)
SDP = (
    "v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\n"
    "c=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


class Wire:
    """The peer's end of a flow: keeps the last message the relay sent it."""

    def __init__(self, sink: hashlib._Hash) -> None:
        self.last = b""
        self.sink = sink

    async def send(self, data: bytes) -> None:
        self.last = data
        self.sink.update(data)

    def close(self) -> None:
        pass


def _message(first: str, headers: list[str], body: str = "") -> bytes:
    lines = [first, *headers, f"Content-Length: {len(body)}", "", body]
    return "\r\n".join(lines).encode("latin-1")


def _lines(data: bytes, *names: str) -> list[str]:
    """The header lines of `data` with these names, in order (SIPp's `[last_X:]`)."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return [line for line in head if line.split(":", 1)[0].strip().lower() in names]


def _uac_request(
    method: str, call: int, uri: str, routes: list[str], tag: str, uac: tuple[str, int] = UAC
) -> bytes:
    cseq = 2 if method == "BYE" else 1
    to = "To: service <sip:service@0077.relay.test>" + (f";tag={tag}" if tag else "")
    return _message(
        f"{method} {uri} SIP/2.0",
        [
            f"Via: SIP/2.0/UDP {uac[0]}:{uac[1]};branch=z9hG4bK-{call}-{method.lower()}",
            *routes,
            f"From: sipp <sip:sipp@{uac[0]}:{uac[1]}>;tag=9999SIPpTag00{call}",
            to,
            f"Call-ID: {call}-9999@{uac[0]}",
            f"CSeq: {cseq} {method}",
            f"Contact: <sip:sipp@{uac[0]}:{uac[1]}>",
            "Max-Forwards: 70",
            "Subject: Performance Test",
            *(["Content-Type: application/sdp"] if method == "INVITE" else []),
        ],
        SDP if method == "INVITE" else "",
    )


def _uas_response(request: bytes, status: int, call: int, *, record_route: bool) -> bytes:
    reason = "Ringing" if status == 180 else "OK"
    invite = request.startswith(b"INVITE")
    via = _lines(request, "via", "v")
    rr = _lines(request, "record-route") if record_route else []
    tag = f";tag=9999SIPpTag01{call}" if invite else ""
    to = [line + tag for line in _lines(request, "to", "t")]
    sdp = invite and status == 200
    return _message(
        f"SIP/2.0 {status} {reason}",
        [
            *via,
            *rr,
            *_lines(request, "from", "f"),
            *to,
            *_lines(request, "call-id", "i"),
            *_lines(request, "cseq"),
            f"Contact: <sip:{UAS[0]}:{UAS[1]};transport=UDP>",
            *(["Content-Type: application/sdp"] if sdp else []),
        ],
        SDP if sdp else "",
    )


class Bench:
    def __init__(self, relay: Relay, sink: hashlib._Hash) -> None:
        self.relay = relay
        self.uac_wire = Wire(sink)
        self.uas_wire = Wire(sink)
        self.uac = Flow(Transport.UDP, UAC, LOCAL, self.uac_wire)
        self.uas = Flow(Transport.UDP, UAS, LOCAL, self.uas_wire)
        relay.udp_flow = lambda address: self.uas if address == UAS else None

    async def learn(self, call: int) -> list[tuple[bytes, Flow]]:
        """Play one call, checking each step; the six inbound messages with their flows."""
        relay, uac, uas = self.relay, self.uac, self.uas
        steps: list[tuple[bytes, Flow]] = []

        async def feed(data: bytes, flow: Flow, wire: Wire) -> bytes:
            wire.last = b""
            await relay.handle(data, flow)
            if not wire.last:
                raise SystemExit(f"call {call}: nothing forwarded for {data[:20]!r}")
            steps.append((data, flow))
            return wire.last

        invite = await feed(
            _uac_request("INVITE", call, "sip:service@0077.relay.test", [], ""), uac, self.uas_wire
        )
        await feed(_uas_response(invite, 180, call, record_route=True), uas, self.uac_wire)
        ok = await feed(_uas_response(invite, 200, call, record_route=True), uas, self.uac_wire)
        answer = parse(ok)
        assert isinstance(answer, Response)
        assert answer.status == 200
        # The route set, as the UAC keeps it (RFC 3261 12.1.2: Record-Route reversed).
        routes = [f"Route: {rr!s}" for rr in reversed(answer.record_routes)]
        target = str(answer.contacts[0].uri)
        tag = answer.to.tag or ""
        ack = await feed(_uac_request("ACK", call, target, routes, tag), uac, self.uas_wire)
        bye = await feed(_uac_request("BYE", call, target, routes, tag), uac, self.uas_wire)
        assert isinstance(parse(ack), Request)
        await feed(_uas_response(bye, 200, call, record_route=False), uas, self.uac_wire)
        return steps


class Socket:
    """The UDP socket's transport, faked: keeps the last datagram sent to each address,
    and a digest of all it sent in any order (a replay sends in waves, see BATCH)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.last: dict[tuple[str, int], bytes] = {}

    def digest(self) -> str:
        return hashlib.sha256(b"".join(sorted(self.sent))).hexdigest()[:16]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return LOCAL if name == "sockname" else default

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.last[addr] = data
        self.sent.append(hashlib.sha256(data).digest())

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


FIRST_FLOW_ID = 1_000_000  # where each pass counts flow ids from (see UdpBench)
BATCH = 16  # calls per wave: under the max_pending (32) of the one UAC flow of u1


class UdpBench:
    """One pass of the calls through the UDP endpoint, from a fresh relay: the UAC's
    source is one address for all calls (`u1`) or one per call (`un`)."""

    def __init__(self, relay: Relay, clock: ManualClock, mode: str) -> None:
        self.relay = relay
        self.mode = mode
        settings = TransportSettings(udp_port=0, tcp_port=None)
        metrics = SipMetrics(CollectorRegistry())
        self.transports = SipTransports(settings, relay.handle, clock, metrics)
        self.endpoint = UdpEndpoint(self.transports)
        self.socket = Socket()
        self.endpoint.connection_made(self.socket)  # type: ignore[arg-type]  # a fake
        self.transports._udp = self.endpoint
        relay.udp_flow = self.transports.udp_flow
        # Flow ids name flows in tokens: the same ids on every pass, the same octets.
        proxy.sip.flow._ids = itertools.count(FIRST_FLOW_ID)
        self.endpoint.flow_to(UAS)  # the static PBX, first: its flow has the same id

    def uac(self, call: int) -> tuple[str, int]:
        return UAC if self.mode == "u1" else (UAC[0], 20_000 + call)

    async def feed(self, data: bytes, source: tuple[str, int]) -> None:
        """One datagram in, handled to the end (the flow's worker task done)."""
        endpoint = self.endpoint
        endpoint.datagram_received(data, source)
        peer = endpoint.peers.get(source)
        worker = None if peer is None else peer.worker
        if worker is not None:
            await worker

    async def learn(self, call: int) -> list[tuple[bytes, tuple[str, int]]]:
        """Play one call, checking each step; its six datagrams with their sources."""
        uac, last = self.uac(call), self.socket.last
        steps: list[tuple[bytes, tuple[str, int]]] = []

        async def feed(data: bytes, source: tuple[str, int], to: tuple[str, int]) -> bytes:
            last.pop(to, None)
            await self.feed(data, source)
            if to not in last:
                raise SystemExit(f"call {call}: nothing forwarded for {data[:20]!r}")
            steps.append((data, source))
            return last[to]

        uri = "sip:service@0077.relay.test"
        invite = await feed(_uac_request("INVITE", call, uri, [], "", uac), uac, UAS)
        await feed(_uas_response(invite, 180, call, record_route=True), UAS, uac)
        ok = await feed(_uas_response(invite, 200, call, record_route=True), UAS, uac)
        answer = parse(ok)
        assert isinstance(answer, Response)
        routes = [f"Route: {rr!s}" for rr in reversed(answer.record_routes)]
        target, tag = str(answer.contacts[0].uri), answer.to.tag or ""
        await feed(_uac_request("ACK", call, target, routes, tag, uac), uac, UAS)
        bye = await feed(_uac_request("BYE", call, target, routes, tag, uac), uac, UAS)
        await feed(_uas_response(bye, 200, call, record_route=False), UAS, uac)
        return steps


async def run_udp(
    calls: int, repeat: int, profile: str, mode: str, store: Store, clock: ManualClock
) -> None:
    """`--udp u1|un`: every pass from a fresh relay and UDP endpoint (see UdpBench)."""
    settings = SipSettings("relay.test", (PbxSettings("0077", "", static=UAS),))

    def fresh() -> UdpBench:
        relay = Relay(settings, store, clock, CollectorRegistry())
        relay._flow_key = bytes(32)  # fixed, so the forwarded octets are comparable
        return UdpBench(relay, clock, mode)

    bench = fresh()
    learnt = [await bench.learn(call) for call in range(calls)]
    # Waves: message k of each call of a batch, in call order (the flows' ids follow it).
    waves = [
        [call[k] for call in learnt[start : start + BATCH]]
        for start in range(0, calls, BATCH)
        for k in range(len(learnt[0]))
    ]
    expected = bench.socket.digest()

    async def replay(bench: UdpBench) -> None:
        received, wait = bench.endpoint.datagram_received, bench.transports._tasks.wait
        for wave in waves:
            for data, source in wave:
                received(data, source)
            await wait()

    best, digest = float("inf"), ""
    for _ in range(repeat):
        bench = fresh()
        started = time.perf_counter()
        await replay(bench)
        best = min(best, time.perf_counter() - started)
        digest = bench.socket.digest()
        if digest != expected:
            raise SystemExit(f"a replay forwarded other octets ({digest}) than learnt ({expected})")
    print(
        f"{best / calls * 1e6:.1f} µs per call ({len(learnt[0])} messages, UDP {mode}),"
        f" best of {repeat} x {calls} calls; digest {digest}"
    )
    if profile:
        bench = fresh()
        profiler = cProfile.Profile()
        profiler.enable()
        await replay(bench)
        profiler.disable()
        pstats.Stats(profiler).sort_stats(profile).print_stats(30)


async def run(calls: int, repeat: int, profile: str, udp: str = "") -> None:
    clock = ManualClock(parse_instant("2026-03-01T12:00:00Z"))
    with tempfile.TemporaryDirectory() as tmp:
        store = await Store.create(load_policy("auerproxy"), Keyring.generate(), Path(tmp), clock)
        try:
            if udp:
                await run_udp(calls, repeat, profile, udp, store, clock)
                return
            settings = SipSettings("relay.test", (PbxSettings("0077", "", static=UAS),))
            relay = Relay(settings, store, clock, CollectorRegistry())
            relay._flow_key = bytes(32)  # fixed, so the forwarded octets are comparable
            sink = hashlib.sha256()
            bench = Bench(relay, sink)
            script: list[tuple[bytes, Flow]] = []
            for call in range(calls):
                script += await bench.learn(call)
            handle = relay.handle
            digest = ""
            best = float("inf")
            for _ in range(repeat):
                bench.uac_wire.sink = bench.uas_wire.sink = sink = hashlib.sha256()
                started = time.perf_counter()
                for data, flow in script:
                    await handle(data, flow)
                best = min(best, time.perf_counter() - started)
                digest = sink.hexdigest()[:16]
            print(
                f"{best / calls * 1e6:.1f} µs per call ({len(script) // calls} messages),"
                f" best of {repeat} x {calls} calls; digest {digest}"
            )
            if profile:
                profiler = cProfile.Profile()
                profiler.enable()
                for data, flow in script:
                    await handle(data, flow)
                profiler.disable()
                stats = pstats.Stats(profiler)
                stats.sort_stats(profile).print_stats(30)
        finally:
            await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--profile",
        nargs="?",
        const="tottime",
        default="",
        help="one more pass under cProfile, sorted by this pstats key (tottime)",
    )
    parser.add_argument(
        "--udp",
        choices=("u1", "un"),
        default="",
        help="through the UDP endpoint, the UAC on one source address (u1) or one per call (un)",
    )
    args = parser.parse_args()
    uvloop.run(run(args.calls, args.repeat, args.profile, args.udp))


if __name__ == "__main__":
    main()
