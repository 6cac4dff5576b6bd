"""Where an idle flow's memory goes: `softrelay serve` under a wrapper that can run
another tree's code (the commit before a change, for a before/after in one run) and,
when asked, trace allocations.

The wrapper takes two arguments before `serve ...`: TREE (a checkout whose packages are
imported first; "-": this one) and OUT (a directory; "-": no tracing). With OUT it
starts tracemalloc (one frame per allocation) and, on SIGUSR1 and SIGUSR2, collects
garbage and writes `before`/`after`: a tracemalloc snapshot and a census of the objects
the garbage collector tracks (count and `sys.getsizeof` per type). The bench sends
SIGUSR1 before it opens the idle flows and SIGUSR2 once the server holds them all.

tracemalloc sees what Python allocates (objects, and C code through PyMem, uvloop's
per-connection buffers included), not what OpenSSL or libuv allocate with malloc, and
it counts virtual bytes: a buffer the kernel never wrote to costs no RSS. So RSS per
flow comes from the runs without tracing; this says which lines allocate what.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

SERVE_FROM = """
import gc, json, os, signal, sys
from collections import Counter
tree, out = sys.argv.pop(1), sys.argv.pop(1)
if tree != "-":
    sys.path.insert(0, tree)
if out != "-":
    import tracemalloc
    tracemalloc.start(1)
    def take(tag):
        gc.collect()
        tracemalloc.take_snapshot().dump(os.path.join(out, tag + ".snap"))
        counts, sizes = Counter(), Counter()
        for o in gc.get_objects():
            kind = type(o)
            name = f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', '?')}"
            counts[name] += 1
            try:
                sizes[name] += sys.getsizeof(o)
            except Exception:  # a proxy to a dead object, a broken __sizeof__
                pass
        path = os.path.join(out, tag + ".json")
        with open(path + ".tmp", "w") as f:
            json.dump({"counts": counts, "sizes": sizes}, f)
        os.replace(path + ".tmp", path)
    def handler(tag):
        def run(*_):
            try:
                take(tag)
            except BaseException as exc:  # never into the server's own code
                with open(os.path.join(out, tag + ".json"), "w") as f:
                    json.dump({"error": repr(exc)}, f)
        return run
    signal.signal(signal.SIGUSR1, handler("before"))
    signal.signal(signal.SIGUSR2, handler("after"))
from softrelay.cli import main
sys.exit(main(sys.argv[1:]))
"""

TOP = 15  # lines, files and types reported


def summary(out: Path, flows: int) -> dict[str, Any]:
    """Bytes per flow by allocating line and by file, and objects per flow by type,
    from the snapshots the wrapper wrote in `out` around `flows` idle flows."""
    before = tracemalloc.Snapshot.load(str(out / "before.snap"))
    after = tracemalloc.Snapshot.load(str(out / "after.snap"))
    n = max(flows, 1)

    def rows(key: str) -> list[dict[str, Any]]:
        found = []
        for stat in after.compare_to(before, key)[:TOP]:
            frame = stat.traceback[0]
            where = (
                f"{_short(frame.filename)}:{frame.lineno}"
                if key == "lineno"
                else _short(frame.filename)
            )
            found.append(
                {
                    "where": where,
                    "bytes_per_flow": round(stat.size_diff / n),
                    "blocks_per_flow": round(stat.count_diff / n, 2),
                }
            )
        return found

    total = sum(s.size_diff for s in after.compare_to(before, "filename"))
    census_before = json.loads((out / "before.json").read_text())
    census_after = json.loads((out / "after.json").read_text())
    types = []
    if "error" in census_before or "error" in census_after:
        census_after = {"counts": {}, "sizes": {}}  # the census failed: bytes by line only
    for name, count in census_after["counts"].items():
        more = count - census_before["counts"].get(name, 0)
        if more >= n // 2:
            size = census_after["sizes"][name] - census_before["sizes"].get(name, 0)
            types.append(
                {
                    "type": name,
                    "per_flow": round(more / n, 2),
                    "bytes_per_flow": round(size / n),
                }
            )
    types.sort(key=lambda row: -row["bytes_per_flow"])
    return {
        "traced_bytes_per_flow": round(total / n),
        "by_line": rows("lineno"),
        "by_file": rows("filename"),
        "gc_objects": types[:TOP],
    }


def _short(filename: str) -> str:
    """A path from the package on: site-packages/aiohttp/x.py -> aiohttp/x.py."""
    for marker in ("site-packages/", "lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    parts = Path(filename).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else filename
