"""HTML built from escaped parts, and the formats the console shows figures in.

    el("td", report["title"], class_="title")   ->  <td class="title">&lt;script&gt;</td>

Every text and attribute value is escaped on its way in; only an `Html` (what `el` and
`raw` return) passes unchanged. A page is made of `el` calls, so nothing from the data
(a crash report's title, a tenant name, a serial) can become markup, and no code path
has to remember to call `html.escape`.

`FORMATS` are the ways a figure reads (`percent`, `ms`, `time`, ...): the page renders
a figure with one at first, and console.js renders its live updates with the function
of the same name (`data-format`), so a number reads the same before and after an update.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal

NONE = "—"  # a figure with no value yet (no wakes in the window, no sweep yet)


class Html(str):
    """Markup, already escaped."""

    __slots__ = ()


Child = Html | str | int | float | None | Iterable["Child"]

# Elements without content (HTML's void elements): never closed.
_VOID = frozenset({"meta", "link", "input", "br", "hr", "img"})


def raw(markup: str) -> Html:
    """Markup written in this package's own code (a doctype), never data."""
    return Html(markup)


def text(value: object) -> Html:
    return Html(html.escape(str(value), quote=True))


def _children(children: Iterable[Child]) -> Iterable[str]:
    for child in children:
        if child is None:
            continue
        if isinstance(child, Html):
            yield child
        elif isinstance(child, str | int | float):
            yield text(child)
        else:
            yield from _children(child)


def _attribute(name: str) -> str:
    # Python names: `class_` for class, `data_figure` for data-figure, `aria_label`...
    return name.rstrip("_").replace("_", "-")


def el(tag: str, *children: Child, **attributes: str | int | float | bool | None) -> Html:
    """<tag attributes>children</tag>. An attribute that is None or False is left out,
    True writes it bare (`hidden`)."""
    parts = [tag]
    for name, value in attributes.items():
        if value is None or value is False:
            continue
        if value is True:
            parts.append(_attribute(name))
        else:
            parts.append(f'{_attribute(name)}="{text(value)}"')
    opening = f"<{' '.join(parts)}>"
    if tag in _VOID:
        return Html(opening)
    return Html(f"{opening}{''.join(_children(children))}</{tag}>")


def join(*children: Child) -> Html:
    return Html("".join(_children(children)))


# The formats (console.js has one function of each name, which must read the same).


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) or math.isinf(value) else float(value)


def _fixed(number: float, digits: int) -> str:
    """`number` with `digits` decimals as JavaScript's toFixed writes it: from the
    float's exact value, a tie away from zero (Python's format rounds a tie to even:
    0.25 would read 0.2 here and 0.3 after a live update)."""
    exact = Decimal(number).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    return f"{exact:.{digits}f}"


def count(value: object) -> str:
    number = _number(value)
    # Halves round up, as JavaScript's Math.round does (Python's round() goes to even).
    return NONE if number is None else str(math.floor(number + 0.5))


def decimal(value: object) -> str:
    """A rate or a load: two decimals."""
    number = _number(value)
    return NONE if number is None else _fixed(number, 2)


def percent(value: object) -> str:
    """A share 0..1 as a percentage with one decimal."""
    number = _number(value)
    return NONE if number is None else f"{_fixed(number * 100, 1)} %"


def ms(value: object) -> str:
    """A latency in milliseconds: one decimal below 10 ms, whole above."""
    number = _number(value)
    if number is None:
        return NONE
    return f"{_fixed(number, 1)} ms" if abs(number) < 10 else f"{_fixed(number, 0)} ms"


def time(value: object) -> str:
    """A unix time as UTC to the second."""
    number = _number(value)
    if number is None:
        return NONE
    moment = datetime.fromtimestamp(math.floor(number), UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


_UNITS = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))


def duration(value: object) -> str:
    """Seconds as their two largest units: "3 d 4 h", "12 min 5 s", "0 s"."""
    number = _number(value)
    if number is None:
        return NONE
    left = max(0, math.floor(number))
    parts: list[str] = []
    for unit, seconds in _UNITS:
        if left >= seconds or (unit == "s" and not parts):
            parts.append(f"{left // seconds} {unit}")
            left %= seconds
        elif parts:
            break  # two units that are next to each other, or the first alone
        if len(parts) == 2:
            break
    return " ".join(parts)


def health(value: object) -> str:
    if value is None:
        return NONE
    return "ok" if value is True else "down"


def plain(value: object) -> str:
    return NONE if value is None else str(value)


FORMATS: dict[str, Callable[[object], str]] = {
    "count": count,
    "decimal": decimal,
    "percent": percent,
    "ms": ms,
    "time": time,
    "duration": duration,
    "health": health,
    "plain": plain,
}


def figure(value: object, form: str, path: str | None = None, tag: str = "span") -> Html:
    """A figure in its format; with `path` (its place in the overview JSON, "wakes.
    success_rate") the page's script updates it live."""
    return el(tag, FORMATS[form](value), data_figure=path, data_format=form if path else None)
