"""OpenSSL's share of an idle TLS flow by allocation site: what bench/relay_idle_openssl.py
measures in total (N server `SSLObject`s with their two `MemoryBIO`s after an in-memory
handshake with serve's context), broken down by the (file, line) OpenSSL passes to its
allocator.

Before `ssl` is imported, libcrypto is given malloc/realloc/free hooks
(`CRYPTO_set_mem_functions`; OpenSSL refuses them once it has allocated anything, so the
return value is checked). The hooks are a few lines of C built here with `cc`: each live
block carries its size, the site that allocated it (and the last one that reallocated
it) and a sequence number. After N handshakes, with the clients dropped, the blocks
made since the first connection and still live are summed per site, in bytes asked
and in glibc chunk bytes (what the heap gives them, which is what mallinfo2 and
bench/relay_idle_openssl.py count). A few hundred connections are enough: the blocks
per connection come out whole. The same handshakes once more with the server's
`SSLSocket` on one end of a socket pair (OpenSSL's socket BIO, no memory BIOs): what a
TLS transport on raw sockets would keep per connection.

    python bench/relay_idle_openssl_sites.py CHAIN_DIR [N] [--num-tickets K]   # one JSON object
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

# The hooks are C, not ctypes callbacks: OpenSSL frees memory while CPython's `_ssl`
# has an exception set (a handshake's SSLWantReadError), where a Python callback fails.
# Each block carries a header in a list of live blocks: size, site, sequence number.
_SHIM = r"""
#include <stddef.h>
#include <stdlib.h>
struct head { struct head *prev, *next; size_t size; const char *file, *rfile;
              int line, rline; unsigned long seq; long pad; };
static struct head live = {&live, &live};
static unsigned long seq;
static void link_(struct head *h) { h->next = live.next; h->prev = &live;
                                    live.next->prev = h; live.next = h; }
static void unlink_(struct head *h) { h->prev->next = h->next; h->next->prev = h->prev; }
void *hook_malloc(size_t n, const char *file, int line) {
    struct head *h = malloc(sizeof *h + n);
    if (!h) return NULL;
    h->size = n; h->file = h->rfile = file; h->line = h->rline = line; h->seq = seq++;
    link_(h); return h + 1;
}
void *hook_realloc(void *p, size_t n, const char *file, int line) {
    if (!p) return hook_malloc(n, file, line);
    struct head *h = (struct head *)p - 1, *g;
    unlink_(h);
    g = realloc(h, sizeof *g + n);
    if (!g) { link_(h); return NULL; }
    g->size = n; g->rfile = file; g->rline = line; link_(g); return g + 1;
}
void hook_free(void *p, const char *file, int line) {
    if (!p) return;
    struct head *h = (struct head *)p - 1; unlink_(h); free(h);
}
unsigned long hook_seq(void) { return seq++; }
/* Walks the live blocks: the next one after `it` (NULL: the first), or NULL. */
void *hook_next(void *it, size_t *size, const char **file, int *line,
                const char **rfile, int *rline, unsigned long *s) {
    struct head *h = it ? ((struct head *)it)->next : live.next;
    if (h == &live) return NULL;
    *size = h->size; *file = h->file; *line = h->line; *rfile = h->rfile;
    *rline = h->rline; *s = h->seq; return h;
}
"""


def _chunk(size: int) -> int:
    """glibc's chunk for a request of `size` bytes: 8 bytes of header, 16-byte steps,
    32 at least (request2size)."""
    return max(32, (size + 8 + 15) & ~15)


def install(work: Path) -> ctypes.CDLL:
    if "ssl" in sys.modules or "_ssl" in sys.modules:
        raise RuntimeError("ssl was imported before the allocator hooks")
    source, lib = work / "hooks.c", work / "hooks.so"
    source.write_text(_SHIM)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    shim = ctypes.CDLL(str(lib))
    crypto = ctypes.CDLL("libcrypto.so.3")
    crypto.CRYPTO_set_mem_functions.restype = ctypes.c_int
    crypto.CRYPTO_set_mem_functions.argtypes = [ctypes.c_void_p] * 3
    hooks = (
        ctypes.cast(getattr(shim, name), ctypes.c_void_p)
        for name in ("hook_malloc", "hook_realloc", "hook_free")
    )
    if not crypto.CRYPTO_set_mem_functions(*hooks):
        raise RuntimeError("CRYPTO_set_mem_functions refused: libcrypto already allocated")
    shim.hook_seq.restype = ctypes.c_ulong
    shim.hook_next.restype = ctypes.c_void_p
    return shim


def live_blocks(shim: ctypes.CDLL) -> list[tuple[int, str, str, int]]:
    """(bytes, first site, last site, sequence number) of each live block."""
    size, line, rline, seq = ctypes.c_size_t(), ctypes.c_int(), ctypes.c_int(), ctypes.c_ulong()
    file, rfile = ctypes.c_char_p(), ctypes.c_char_p()
    out: list[tuple[int, str, str, int]] = []
    it = None
    while True:
        args = (ctypes.byref(size), ctypes.byref(file), ctypes.byref(line))
        it = shim.hook_next(
            ctypes.c_void_p(it), *args, ctypes.byref(rfile), ctypes.byref(rline), ctypes.byref(seq)
        )
        if not it:
            return out
        first = f"{(file.value or b'?').decode()}:{line.value}"
        last = f"{(rfile.value or b'?').decode()}:{rline.value}"
        out.append((size.value, first, last, seq.value))


# What each site allocates (OpenSSL 3.0, by file; the lines are 3.0.19's). My reading
# of the source, checked against the sizes: the memory BIOs' buffers are 4/3 of the
# largest flight each held (ClientHello 517 B -> 692, the server's first flight with
# the P-256 chain 1,230 B -> 1,644).
SITES = {
    "ssl/ssl_lib.c": "SSL_new: the SSL structure (record layer and handshake state inline)",
    "crypto/buffer/buffer.c:135": "BUF_MEM_grow_clean: the 2 memory BIOs' data, kept at the"
    " size of the largest flight they held",
    "crypto/buffer/buffer.c:35": "BUF_MEM_new: the 2 memory BIOs' buffer headers",
    "crypto/bio/bss_mem.c": "BIO_s_mem: the 2 memory BIOs' state",
    "crypto/bio/bio_lib.c": "BIO_new: the 2 BIOs",
    "providers/implementations/ciphers/cipher_aes_gcm.c": "AES-GCM contexts: the read and"
    " write record keys",
    "crypto/evp/evp_enc.c": "EVP_CIPHER_CTX: the read and write cipher contexts",
    "ssl/ssl_sess.c": "SSL_SESSION: the connection's session (what a ticket encodes)",
    "crypto/threads_pthread.c": "locks (SSL, session, BIOs, keys)",
    "ssl/ssl_cert.c": "ssl_cert_dup: the connection's copy of the context's CERT",
    "providers/implementations/digests/sha2_prov.c": "SHA-384 contexts (handshake transcript)",
    "crypto/evp/digest.c": "EVP_MD_CTX: the digest contexts",
    "crypto/evp/p_lib.c": "EVP_PKEY: the X25519 key shares (ours and the client's), kept",
    "crypto/ec/ecx_key.c": "X25519 keys of the key shares",
    "ssl/t1_lib.c": "the signature algorithms shared with the peer",
    "crypto/x509/x509_vpm.c": "X509_VERIFY_PARAM: the connection's verify parameters",
    "crypto/stack/stack.c": "stacks (cipher lists, CA names)",
    "include/internal/packet.h": "copies of the peer's extension data",
}


def meaning(site: str) -> str:
    path = site.split(" ")[0].removeprefix("../")
    file = path.rsplit(":", 1)[0]
    return SITES.get(path) or SITES.get(file) or "?"


def measure(chain_dir: Path, n: int, num_tickets: int | None = None) -> dict[str, Any]:
    """`num_tickets`: override serve's (2) to see what tickets cost an idle connection."""
    with tempfile.TemporaryDirectory() as tmp:
        shim = install(Path(tmp))
    import contextlib
    import gc
    import socket
    import ssl

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.tls_pair import Server, in_memory_pair
    from proxy.sip.tls import server_tls_context

    server = server_tls_context(chain_dir / "chain.pem", chain_dir / "key.pem")
    if num_tickets is not None:
        server.num_tickets = num_tickets
    client = ssl.create_default_context(cafile=str(chain_dir / "root.pem"))

    def pair() -> tuple[Server, ssl.SSLObject]:
        return in_memory_pair(server, client)

    def tally(since: int, count: int) -> dict[str, Any]:
        gc.collect()
        sites: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        for size, first, last, seq in live_blocks(shim):
            if seq >= since:
                row = sites[(first, last)]
                row[0] += 1
                row[1] += size
                row[2] += _chunk(size)
        rows = sorted(sites.items(), key=lambda kv: -kv[1][2])
        return {
            "blocks_per_connection": round(sum(r[0] for _, r in rows) / count, 2),
            "bytes_per_connection": round(sum(r[1] for _, r in rows) / count),
            # what glibc's heap gives them: 8-byte headers, 16-byte steps
            "chunk_bytes_per_connection": round(sum(r[2] for _, r in rows) / count),
            "sites": [
                {
                    "site": (site := first if first == last else f"{first} (realloc {last})"),
                    "what": meaning(site),
                    "blocks": round(r[0] / count, 2),
                    "bytes": round(r[1] / count),
                    "chunk_bytes": round(r[2] / count),
                }
                for (first, last), r in rows
                if r[2] >= count  # a byte per connection or more
            ],
        }

    first_pair, _ = pair()  # what the first handshake allocates once is not counted
    since = shim.hook_seq()
    held, clients = [], []
    for _ in range(n):
        srv, cli = pair()
        held.append(srv)
        clients.append(cli)
    clients.clear()
    idle = tally(since, n)
    since = shim.hook_seq()
    fresh = [
        (server.wrap_bio(i, o, server_side=True), i, o)
        for i, o in ((ssl.MemoryBIO(), ssl.MemoryBIO()) for _ in range(n))
    ]
    before_handshake = tally(since, len(fresh))

    def socket_pair() -> ssl.SSLSocket:
        """The same handshake with the server's `SSLSocket` on a socket (OpenSSL's
        socket BIO, no memory BIOs): what a TLS transport on raw sockets would hold."""
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        srv = server.wrap_socket(ours, server_side=True, do_handshake_on_connect=False)
        cli = client.wrap_socket(theirs, server_hostname="localhost", do_handshake_on_connect=False)
        for _ in range(10):
            for side in (cli, srv):
                with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    side.do_handshake()
        with contextlib.suppress(ssl.SSLWantReadError):
            cli.recv(1)  # the tickets
        if srv.version() is None:
            raise RuntimeError("the socket handshake did not finish")
        cli.close()
        return srv

    socket_pair()
    since = shim.hook_seq()
    on_sockets = [socket_pair() for _ in range(n)]
    socket_bio = tally(since, len(on_sockets))
    return {
        "connections": n,
        "openssl": ssl.OPENSSL_VERSION,
        "version": first_pair[0].version(),
        "cipher": (first_pair[0].cipher() or ("?",))[0],
        "num_tickets": server.num_tickets,
        "idle_after_handshake": idle,
        "fresh_sslobject": before_handshake,
        "idle_on_socket_bio": socket_bio,
    }


if __name__ == "__main__":
    import json

    tickets = None
    if "--num-tickets" in sys.argv:
        at = sys.argv.index("--num-tickets")
        tickets = int(sys.argv.pop(at + 1))
        sys.argv.pop(at)
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    print(json.dumps(measure(Path(sys.argv[1]), count, tickets)))
