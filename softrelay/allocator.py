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

With the threshold pinned, every TLS flow's buffer stays a mapping of its own, and once
closes in between have split them, one kernel mapping each: glibc's own cap on mmapped
blocks (M_MMAP_MAX, 65,536) is the kernel's whole `vm.max_map_count` (65,530 by
default), after which pymalloc's arenas and thread stacks could no longer be mapped. The
cap goes to half the kernel's limit; buffers past it come from the heap, as before.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
M_MMAP_MAX = -4
MMAP_THRESHOLD = 128 * 1024  # glibc's default, where its dynamic threshold starts
MAX_MAP_COUNT = Path("/proc/sys/vm/max_map_count")


def pin_mmap_threshold(libc: object | None = None, max_map_count: Path = MAX_MAP_COUNT) -> bool:
    """Pin glibc's mmap threshold at 128 KiB and cap its mmapped blocks at half of
    `max_map_count` (left as it is when that cannot be read); whether the threshold was
    set. Without glibc (musl, macOS: other allocators, other `mallopt` numbers, if any)
    nothing is called. `libc`: the C library to use, the process's own by default."""
    if libc is None:
        try:
            libc = ctypes.CDLL(None)
        except (OSError, TypeError):  # no C library to open by that name
            return False
    if not hasattr(libc, "gnu_get_libc_version"):  # only glibc exports it
        return False
    mallopt = libc.mallopt  # type: ignore[attr-defined]
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return False
    try:
        mappings = int(max_map_count.read_text())
    except (OSError, ValueError):
        return True
    mallopt(M_MMAP_MAX, mappings // 2)
    return True
