"""OpenSSL's share of an idle TLS flow by allocation site: what bench/relay_idle_openssl.py
measures in total (N server `SSLObject`s with their two `MemoryBIO`s after an in-memory
handshake with serve's context), broken down by the (file, line) OpenSSL passes to its
allocator.

Before `ssl` is imported, libcrypto is given malloc/realloc/free wrappers
(`CRYPTO_set_mem_functions`; OpenSSL refuses them once it has allocated anything, so the
return value is checked): each live block is kept with its size, glibc's usable size,
the site that allocated it (and the last one that reallocated it) and a sequence
number. After N handshakes, with the clients dropped, the blocks made since the first
connection and still live are summed per site. Slow (a Python call per allocation):
a few hundred connections are enough, the counts per connection come out whole.

    python bench/relay_idle_openssl_sites.py CHAIN_DIR [N]   # prints one JSON object
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
    hooks = (ctypes.cast(getattr(shim, name), ctypes.c_void_p) for name in ("hook_malloc", "hook_realloc", "hook_free"))
    if not crypto.CRYPTO_set_mem_functions(*hooks):
        raise RuntimeError("CRYPTO_set_mem_functions refused: libcrypto already allocated")
    shim.hook_seq.restype = ctypes.c_ulong
    shim.hook_next.restype = ctypes.c_void_p
    return shim


def live_blocks(shim: ctypes.CDLL) -> list[tuple[int, str, str, int]]:
    """(bytes, first site, last site, sequence number) of each live block."""
    size, line, rline, seq = ctypes.c_size_t(), ctypes.c_int(), ctypes.c_int(), ctypes.c_ulong()
    file, rfile = ctypes.c_char_p(), ctypes.c_char_p()
    out = []
    it = None
    while True:
        args = (ctypes.byref(size), ctypes.byref(file), ctypes.byref(line))
        it = shim.hook_next(ctypes.c_void_p(it), *args, ctypes.byref(rfile), ctypes.byref(rline), ctypes.byref(seq))
        if not it:
            return out
        first = f"{(file.value or b'?').decode()}:{line.value}"
        last = f"{(rfile.value or b'?').decode()}:{rline.value}"
        out.append((size.value, first, last, seq.value))


def measure(chain_dir: Path, n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        shim = install(Path(tmp))
    import contextlib
    import gc
    import ssl

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from proxy.sip.tls import server_tls_context

    server = server_tls_context(chain_dir / "chain.pem", chain_dir / "key.pem")
    client = ssl.create_default_context(cafile=str(chain_dir / "root.pem"))

    def pair() -> tuple[tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO], ssl.SSLObject]:
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
            "blocks_per_connection": sum(r[0] for _, r in rows) / count,
            "bytes_per_connection": sum(r[1] for _, r in rows) / count,
            "chunk_bytes_per_connection": sum(r[2] for _, r in rows) / count,
            "sites": [
                {
                    "site": first if first == last else f"{first} (realloc {last})",
                    "blocks": r[0] / count,
                    "bytes": r[1] / count,
                    "chunk_bytes": r[2] / count,
                }
                for (first, last), r in rows
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
    return {
        "connections": n,
        "openssl": ssl.OPENSSL_VERSION,
        "version": first_pair[0].version(),
        "cipher": (first_pair[0].cipher() or ("?",))[0],
        "idle_after_handshake": idle,
        "fresh_sslobject": before_handshake,
    }


if __name__ == "__main__":
    import json

    found = measure(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 300)
    print(json.dumps(found))
