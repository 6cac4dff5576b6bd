"""OpenSSL's share of an idle TLS flow, apart from any event loop: N server-side
`ssl.SSLObject`s (each with its two `ssl.MemoryBIO`s, as asyncio's and uvloop's TLS
transports hold them) after a full handshake against an in-memory client, with the
server context `serve` makes (proxy/sip/tls.py) and the bench's certificate chain.
Bytes in use are glibc's (mallinfo2: what OpenSSL and Python hold, not what the heap
keeps free), before and after, the clients dropped first; also a fresh SSLObject
without a handshake, the SSL mode CPython set (SSL_MODE_RELEASE_BUFFERS or not) and
the context's session cache. Run in a process of its own by bench/relay_idle.py:

    python bench/relay_idle_openssl.py CHAIN_DIR [N]   # prints one JSON object
"""

from __future__ import annotations

import ctypes
import gc
import json
import ssl
import sys
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from bench.tls_pair import Server, in_memory_pair  # noqa: E402
from proxy.sip.tls import server_tls_context  # noqa: E402

SSL_CTRL_MODE = 33  # ssl.h: SSL_ctrl(ssl, SSL_CTRL_MODE, 0, NULL) reads the mode
SSL_MODE_RELEASE_BUFFERS = 0x10


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _in_use() -> int:
    gc.collect()
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _mode(obj: ssl.SSLObject) -> int:
    """The SSL mode of an SSLObject's SSL*: CPython's PySSLSocket holds it right after
    PyObject_HEAD and a weak reference (3.11's layout)."""
    import _ssl

    libssl = ctypes.CDLL(_ssl.__file__)
    ctrl = libssl.SSL_ctrl
    ctrl.restype = ctypes.c_long
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    ptr = ctypes.c_void_p.from_address(id(obj._sslobj) + 24).value  # type: ignore[attr-defined]  # CPython internals
    return int(ctrl(ptr, SSL_CTRL_MODE, 0, None))


def measure(chain_dir: Path, n: int) -> dict[str, Any]:
    server = server_tls_context(chain_dir / "chain.pem", chain_dir / "key.pem")
    client = ssl.create_default_context(cafile=str(chain_dir / "root.pem"))

    def pair() -> tuple[Server, ssl.SSLObject]:
        return in_memory_pair(server, client)

    first, _ = pair()  # what the first handshake allocates once is not counted
    before = _in_use()
    held, clients = [], []
    for _ in range(n):
        srv, cli = pair()
        held.append(srv)
        clients.append(cli)
    clients.clear()
    after = _in_use()
    before_fresh = _in_use()
    fresh = [
        (server.wrap_bio(i, o, server_side=True), i, o)
        for i, o in ((ssl.MemoryBIO(), ssl.MemoryBIO()) for _ in range(n))
    ]
    after_fresh = _in_use()
    mode = _mode(first[0])
    return {
        "connections": n,
        "bytes_per_idle_server_connection": (after - before) // n,
        "bytes_per_fresh_sslobject": (after_fresh - before_fresh) // len(fresh),
        "version": first[0].version(),
        "cipher": (first[0].cipher() or ("?",))[0],
        "ssl_mode": hex(mode),
        "release_buffers": bool(mode & SSL_MODE_RELEASE_BUFFERS),
        "num_tickets": server.num_tickets,
        "op_no_ticket": bool(server.options & ssl.OP_NO_TICKET),
        "session_stats": server.session_stats(),
        "openssl": ssl.OPENSSL_VERSION,
    }


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2000)))
