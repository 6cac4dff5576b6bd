"""What an idle TLS flow costs under each way a server on uvloop can hold it, without
softrelay's own objects: N idle connections to a bare server, its VmRSS per flow
(delta / N and the second half's growth / (N/2), as bench/relay_idle.py reads it).

- `tcp`: a plain TCP transport and an empty protocol (the floor under any TLS design);
- `uvloop`: `loop.create_server(ssl=context)`, uvloop's own TLS transport (`SSLProtocol`,
  what `serve` uses);
- `memorybio`: a TCP transport with an `SSLObject` and two `MemoryBIO`s per connection,
  a TLS layer of one's own over the transport (as `proxy/sip/websocket.py`'s `WsLink`
  is for WebSocket);
- `socket`: a non-blocking `ssl.SSLSocket` per connection (OpenSSL's socket BIO, no
  memory BIOs), watched with `loop.add_reader`, no transport;
- `socket_flow`: `socket` with what softrelay keeps per flow besides its transport
  (a `Link` with the slots `StreamLink` has, a `Flow` with its close callback, a
  `StreamFramer`, the registry's dict, set and per-source entries): an estimate of a
  TLS transport of softrelay's own on raw sockets, short of writing it.

A second reading per TLS design comes after churn: 500 connections first send 64 KiB
each and close, so that the heap holds what connections that came and went left in it
(uvloop's 256 KiB read buffers, once freed, come back from the heap with the pages the
earlier reads touched).
Last, `uvloop` once more, fresh and after churn, with glibc's mmap threshold pinned
first (a server's `--pin`), as `serve` does (softrelay/allocator.py);
bench/relay_idle_malloc.py compares the two in interleaved rounds.

Each server does the handshake with serve's context (`proxy/sip/tls.py`) and reads
whatever comes after it; the clients (this process, blocking `ssl` sockets, trusting the
chain's root) read the session tickets, then stay silent. Run by bench/relay_idle.py
when TLS is measured, or alone:

    python bench/relay_idle_tls_designs.py CHAIN_DIR [N]   # prints one JSON object
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, cast

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from bench.harness import HOST, free_port, raise_nofile  # noqa: E402
from proxy.sip.flow import Flow, Transport  # noqa: E402
from proxy.sip.framing import StreamFramer  # noqa: E402
from proxy.sip.link import Link, address_of  # noqa: E402
from proxy.sip.tls import server_tls_context  # noqa: E402

DESIGNS = ("tcp", "uvloop", "memorybio", "socket", "socket_flow")
WARM = 200  # connections opened before the first reading (heap and loop warm-up)
SETTLE = 1.0  # seconds for the server to finish what the last handshakes left
CHURN_FLOWS = 500  # connections that come and go before the idle ones, with --churn
CHURN_BYTES = 64 * 1024


class _Plain(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport


class _MemoryBio(asyncio.Protocol):
    __slots__ = ("incoming", "outgoing", "tls", "transport")

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        with contextlib.suppress(ssl.SSLWantReadError):
            if self.tls.version() is None:
                self.tls.do_handshake()
            while self.tls.read(65536):
                pass
        if self.outgoing.pending:
            self.transport.write(self.outgoing.read())


def _read(loop: asyncio.AbstractEventLoop, tls: ssl.SSLSocket) -> None:
    """Handshake, then read whatever comes; a peer that closed or failed is closed."""
    try:
        if tls.version() is None:
            tls.do_handshake()
        while tls.recv(65536):
            pass
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return
    except (ssl.SSLError, OSError):
        pass
    # The peer closed (recv gave b"") or failed: stop watching, or the loop spins.
    loop.remove_reader(tls.fileno())
    tls.close()


class _Socket:
    __slots__ = ("loop", "tls")

    def __init__(self, loop: asyncio.AbstractEventLoop, tls: ssl.SSLSocket) -> None:
        self.loop, self.tls = loop, tls
        loop.add_reader(tls.fileno(), self.readable)

    def readable(self) -> None:
        _read(self.loop, self.tls)


class _SocketFlow(Link):
    """`_Socket` with softrelay's per-flow objects, kept as `SipTransports` keeps them;
    the slots are `StreamLink`'s with the socket in place of the transport."""

    __slots__ = ("_drained", "_edge", "_framer", "_kind", "loop", "tls")

    registry: ClassVar[dict[Flow, Link]] = {}
    live: ClassVar[set[Link]] = set()
    per_source: ClassVar[Counter[str]] = Counter()

    def __init__(self, loop: asyncio.AbstractEventLoop, tls: ssl.SSLSocket) -> None:
        super().__init__()
        self.loop, self.tls = loop, tls
        self._framer: StreamFramer | None = None
        self._edge = self._kind = self._drained = None
        loop.add_reader(tls.fileno(), self.readable)

    def readable(self) -> None:
        handshaking = self._framer is None
        _read(self.loop, self.tls)
        if handshaking and self.tls.version() is not None:
            peer = address_of(self.tls.getpeername())
            self._framer = StreamFramer()
            self.flow = Flow(Transport.TLS, peer, address_of(self.tls.getsockname()), self)
            self.flow.on_close.append(self._detach)
            self.registry[self.flow] = self
            self.live.add(self)
            self.per_source[peer[0]] += 1
            self.last_seen = self.loop.time()

    def _detach(self, flow: Flow) -> None:
        self.registry.pop(flow, None)

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


async def _serve(design: str, chain_dir: Path, port: int) -> None:
    loop = asyncio.get_running_loop()
    context = server_tls_context(chain_dir / "chain.pem", chain_dir / "key.pem")
    held: list[_Socket | _SocketFlow] = []
    if design == "tcp":
        await loop.create_server(_Plain, HOST, port)
    elif design == "uvloop":
        await loop.create_server(_Plain, HOST, port, ssl=context)
    elif design == "memorybio":
        await loop.create_server(lambda: _MemoryBio(context), HOST, port)
    else:
        listener = socket.create_server((HOST, port), backlog=4096)
        listener.setblocking(False)

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    return
                conn.setblocking(False)
                tls = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
                held.append((_SocketFlow if design == "socket_flow" else _Socket)(loop, tls))

        loop.add_reader(listener.fileno(), accept)
    print("ready", flush=True)
    await loop.create_future()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _anonymous(pid: int) -> tuple[int, int]:
    """Virtual and resident bytes of the heap and the anonymous mappings (where malloc's
    blocks are; uvloop's 256 KiB read buffers among them, adjacent ones merged)."""
    virtual = resident = 0
    anonymous = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's first line
            anonymous = len(fields) == 5 or fields[5] == "[heap]"
        elif anonymous and fields[0] == "Size:":
            virtual += int(fields[1]) * 1024
        elif anonymous and fields[0] == "Rss:":
            resident += int(fields[1]) * 1024
    return virtual, resident


def _mappings(pid: int) -> int:
    return len(Path(f"/proc/{pid}/maps").read_text().splitlines())


def start_server(
    design: str, chain_dir: Path, port: int, pin: bool = False
) -> subprocess.Popen[str]:
    """A bare server of `design` on `port`, ready; `pin`: glibc's threshold pinned first."""
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", design, str(chain_dir), str(port)]
        + (["--pin"] if pin else []),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    if server.stdout.readline().strip() != "ready":
        server.kill()
        server.wait()
        raise RuntimeError(f"{design}: the server did not start")
    return server


def measure_design(
    design: str, chain_dir: Path, n: int, churn: int = 0, pin: bool = False
) -> dict[str, Any]:
    """`churn`: first CHURN_FLOWS connections each send `churn` bytes and close, as
    phones that come and go leave the server's heap before the idle ones arrive."""
    port = free_port()
    server = start_server(design, chain_dir, port, pin)
    try:
        client = ssl.create_default_context(cafile=str(chain_dir / "root.pem"))
        held: list[socket.socket] = []

        def open_flows(count: int) -> None:
            for _ in range(count):
                sock = socket.create_connection((HOST, port))
                if design != "tcp":
                    sock = client.wrap_socket(sock, server_hostname="localhost")
                    sock.setblocking(False)
                    with contextlib.suppress(ssl.SSLWantReadError):
                        sock.recv(1)  # takes in the tickets: the server's flight is done
                held.append(sock)

        if churn:
            open_flows(CHURN_FLOWS)
            for sock in held:
                sock.setblocking(True)
                sock.sendall(b"x" * churn)
            time.sleep(SETTLE)
            for sock in held:
                sock.close()
            held.clear()
        open_flows(WARM)
        time.sleep(SETTLE)
        start = _rss(server.pid)
        start_anon = _anonymous(server.pid)
        open_flows(n // 2)
        time.sleep(SETTLE)
        half = _rss(server.pid)
        open_flows(n - n // 2)
        time.sleep(SETTLE)
        end = _rss(server.pid)
        end_anon = _anonymous(server.pid)
        mappings = _mappings(server.pid)
        for sock in held:
            sock.close()
        return {
            "design": design,
            "churn_bytes": churn,
            "pinned_mmap_threshold": pin,
            "flows": n,
            "bytes_per_flow": round((end - start) / n),
            "marginal_bytes_per_flow": round((end - half) / (n - n // 2)),
            # heap and anonymous mappings: what each flow maps, and what of it is resident
            "anonymous_virtual_bytes_per_flow": round((end_anon[0] - start_anon[0]) / n),
            "anonymous_resident_bytes_per_flow": round((end_anon[1] - start_anon[1]) / n),
            "mappings": mappings,  # /proc/PID/maps lines at the end (vm.max_map_count)
        }
    finally:
        server.kill()
        server.wait()


def measure(chain_dir: Path, n: int) -> dict[str, Any]:
    """Every design on a fresh server, then the TLS ones after churn, then uvloop's
    with glibc's mmap threshold pinned, fresh and after churn."""
    raise_nofile(2 * (n + WARM + CHURN_FLOWS) + 1024)
    fresh = [measure_design(design, chain_dir, n) for design in DESIGNS]
    churned = [measure_design(d, chain_dir, n, CHURN_BYTES) for d in DESIGNS if d != "tcp"]
    # uvloop's transport as serve runs it: glibc's threshold pinned (softrelay/allocator.py)
    pinned = [measure_design("uvloop", chain_dir, n, churn, pin=True) for churn in (0, CHURN_BYTES)]
    return {"designs": fresh + churned + pinned}


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        import uvloop

        if sys.argv[5:] == ["--pin"]:
            from softrelay.allocator import pin_mmap_threshold

            assert pin_mmap_threshold()
        uvloop.run(_serve(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])))
    else:
        count = int(sys.argv[2]) if len(sys.argv) > 2 else 4000
        print(json.dumps(measure(Path(sys.argv[1]), count)))
