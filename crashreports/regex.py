"""RE2, typed: the only regular-expression engine that crash-report text meets.

RE2 runs every search in time linear in the text (no backtracking), so a hostile
report cannot stall a scrubber the way stdlib `re` can; why RE2 and not Hyperscan is
in `crashreports.patterns`. google-re2 ships no type information: this module gives
the part we use a type, and turns RE2's compile error into `ValueError` once.

`Program` calls the binding's matcher (`re2._re2.RE2.Match`, which releases the GIL)
directly. `search` is one call with captures: RE2 finds the match with its DFA and runs
its captures engine over just the matched bytes, so it costs what a search without
captures costs (~2.3 µs on an 8-20 byte span) and tells which groups took part as
well; `find` and `spans` split the same work in two calls (a search without captures,
then one anchored at both ends of its match), ~2 µs more per match, for callers that
need only where a match is. On 1 MiB of one repeated token either is ~6 times faster
per match than a search through the `re2` module's Python wrapper. (The version is
pinned in pyproject.toml.)
"""

from __future__ import annotations

from typing import Protocol, cast

import re2  # type: ignore[import-untyped]  # google-re2 ships neither stubs nor py.typed
from re2 import _re2  # its extension module (Any, like the package)

Span = tuple[int, int]
_UNANCHORED = _re2.RE2.Anchor.UNANCHORED
_BOTH = _re2.RE2.Anchor.ANCHOR_BOTH


class Match(Protocol):
    def span(self, group: int = 0) -> Span: ...
    def start(self, group: int = 0) -> int: ...
    def end(self, group: int = 0) -> int: ...


class Regex(Protocol):
    @property
    def pattern(self) -> str: ...
    @property
    def groups(self) -> int: ...
    @property
    def groupindex(self) -> dict[str, int]: ...
    def search(self, text: bytes | str, pos: int = ...) -> Match | None: ...
    def match(self, text: bytes | str, pos: int = ...) -> Match | None: ...


# The DFA's memory per program (RE2's default is 8 MiB): with less, an alternation of all
# the span rules resets its cache on every search (measured 13-28 µs per search, 3-6 µs
# with 16 MiB). It is taken only as states are built.
MAX_MEM = 16 << 20


def _options(*, capture: bool = True) -> object:
    options = re2.Options()
    options.max_mem = MAX_MEM
    options.log_errors = False  # RE2 would print the pattern to stderr; we raise instead
    options.never_capture = not capture
    return options


def compile_re2(pattern: str) -> Regex:
    """`pattern` compiled by RE2 (UTF-8); ValueError names what RE2 cannot do."""
    try:
        return cast(Regex, re2.compile(pattern, _options()))
    except re2.error as exc:
        detail = exc.args[0] if exc.args else "invalid"
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise ValueError(str(detail)) from None


class Program:
    """One pattern for many searches over UTF-8 bytes: where, then which groups."""

    __slots__ = ("_find", "_groups", "groupindex", "pattern")

    def __init__(self, pattern: str) -> None:
        compile_re2(pattern)  # the error, if any, with its reason
        self.pattern = pattern
        self._find = _re2.RE2(pattern.encode(), _options(capture=False)).Match
        groups = _re2.RE2(pattern.encode(), _options())
        self._groups = groups.Match
        self.groupindex: dict[str, int] = {
            name.decode(): index for name, index in groups.NamedCapturingGroups()
        }

    def find(self, data: bytes, pos: int) -> Span:
        """The leftmost match at or after `pos` (the text before is context), or (-1, -1)."""
        span: Span = self._find(_UNANCHORED, data, pos, len(data))[0]
        return span

    def search(self, data: bytes, pos: int) -> list[Span]:
        """The span of the leftmost match at or after `pos` (the text before is context)
        and of each of its groups ((-1, -1): none; all of them when there is no match)."""
        spans: list[Span] = self._groups(_UNANCHORED, data, pos, len(data))
        return spans

    def spans(self, data: bytes, start: int, end: int) -> list[Span]:
        """The span of every group (or (-1, -1)) of the match `find` returned."""
        spans: list[Span] = self._groups(_BOTH, data, start, end)
        return spans

    def __reduce__(self) -> tuple[type[Program], tuple[str]]:
        return (Program, (self.pattern,))


__all__ = ["Match", "Program", "Regex", "Span", "compile_re2"]
