"""glibc's malloc, set once at the start of a `serve` process.

uvloop's TLS transport (`SSLProtocol`) holds a 256 KiB read buffer per connection
(`PyMem_RawMalloc`, so malloc). glibc serves a request that size with a fresh mmap, of
which only the pages a read touched are resident (~4 KB for an idle flow); but its
*dynamic* mmap threshold rises to the size of each mmapped block freed (up to 32 MiB),
so once one TLS connection has closed, later buffers come from the heap, reusing pages
that earlier connections' reads made resident: an idle TLS flow then costs ~47 KB
instead of ~25 KB (bench/README.md, "Idle flows, all transports"). Setting the
threshold pins it at glibc's starting value and turns the adjustment off. pymalloc's
arenas are mmapped apart from malloc, and blocks under 128 KiB go where they went before.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 128 * 1024  # glibc's default, where its dynamic threshold starts


def pin_mmap_threshold(libc: object | None = None) -> bool:
    """Pin glibc's mmap threshold at 128 KiB; whether it was set. Without glibc (musl,
    macOS: other allocators, other `mallopt` numbers, if any) nothing is called.
    `libc`: the C library to use, the process's own by default."""
    if libc is None:
        try:
            libc = ctypes.CDLL(None)
        except (OSError, TypeError):  # no C library to open by that name
            return False
    if not hasattr(libc, "gnu_get_libc_version"):  # only glibc exports it
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))  # type: ignore[attr-defined]
