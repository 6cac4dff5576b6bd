"""A server and a client TLS object, handshaken through memory BIOs (no socket), as
uvloop's TLS transport holds a server connection. `ssl` is imported only when called:
relay_idle_openssl_sites.py hooks OpenSSL's allocator before anything imports it."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

Server = tuple["ssl.SSLObject", "ssl.MemoryBIO", "ssl.MemoryBIO"]


def in_memory_pair(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[Server, ssl.SSLObject]:
    """The server's SSLObject with its two BIOs, and the client's, after the handshake."""
    import ssl

    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    for _ in range(10):
        for side in (cli, srv):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    if srv.version() is None:
        raise RuntimeError("the in-memory handshake did not finish")
    return (srv, s_in, s_out), cli
