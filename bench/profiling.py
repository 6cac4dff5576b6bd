"""What every bench's profile report shares: own time summed per layer, the top
functions, and the comma-separated counts of its command line.

Import it as `bench.profiling`; a bench run as a script puts the repository first on
`sys.path` to make that possible.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

# pstats' own table, untyped there: (file, line, function) -> (cc, calls, tt, ct, callers)
Stats = dict[tuple[str, int, str], tuple[Any, ...]]
Needles = tuple[tuple[str, str], ...]  # (part of a file name or builtin, its layer)


def own_time(
    table: Stats,
    files: Needles,
    builtins: Needles,
    *,
    other_builtins: str = "other builtins",
    other: str = "other Python",
) -> tuple[Counter[str], list[tuple[float, int, str]]]:
    """Own seconds per layer (the first needle found names it), and every function as
    (own seconds, calls, "file:line name"), most expensive first."""
    layers: Counter[str] = Counter()
    functions: list[tuple[float, int, str]] = []
    for (filename, line, name), (_, calls, tottime, _, _) in table.items():
        if filename == "~":
            layer = next((lay for needle, lay in builtins if needle in name), other_builtins)
            where = name
        else:
            layer = next((lay for needle, lay in files if needle in filename), other)
            where = f"{Path(filename).name}:{line} {name}"
        layers[layer] += tottime
        functions.append((tottime, calls, where))
    functions.sort(reverse=True)
    return layers, functions


def positive_ints(text: str) -> list[int]:
    """An argparse type: "1,100,1000" -> [1, 100, 1000], each at least 1."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("values must be integers of at least 1")
    return values
