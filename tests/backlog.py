"""How many connections a listener's kernel queue takes before its server accepts any."""

from __future__ import annotations

import contextlib
import select
import socket

BURST = 300  # connections at once: over asyncio's default backlog of 100, aiohttp's 128


def queued_burst(port: int, count: int = BURST) -> int:
    """Opens `count` connections to `port` on 127.0.0.1 without yielding to the event
    loop (so the server accepts none meanwhile) and returns how many the kernel
    established; a full accept queue drops the rest's SYNs. All are closed again."""
    sockets = []
    try:
        for _ in range(count):
            client = socket.socket()
            sockets.append(client)
            client.setblocking(False)
            # Loopback's handshake completes in the call, unless the queue is full.
            with contextlib.suppress(BlockingIOError):
                client.connect(("127.0.0.1", port))
        _, writable, _ = select.select([], sockets, [], 0)
        return sum(1 for s in writable if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0)
    finally:
        for client in sockets:
            client.close()
