"""The scrubber: a chain of small steps that a crash report passes before it is kept.

Compiled once when the configuration loads (`compile_chain`), run on the parsed event in
memory: nothing of the raw report is written anywhere before the chain has run. Each
step takes the event and returns it (changed or not), or raises `DropEvent` so that
nothing of it is stored. In order:

    RequireOptIn      drops a report whose app did not say its user opted in
    LimitDepth        cuts nesting past a fixed depth (no step recurses without bound)
    KeepTopLevel      keeps only the event keys that a crash report needs
    RemoveIdentifying removes the user, server name, command line, request bodies and
                      cookies, the device's given name, and the source lines of frames
    FilterKeys        replaces the value of every sensitive key, in every nested mapping
    ScrubValues       replaces personal data found by its shape in every string, keys
                      included (`crashreports.patterns`)
    ScrubTree         the last three in one walk over the event, as `compile_chain` runs
                      them (one walk over a 15 KiB event cost more than twice all of the
                      SDK EventScrubber's work); same result as the three in turn
    FilterLogParams   a log call's parameter that its scrubbed message no longer shows
                      ("password %s" with "hunter2": the message says "password
                      [filtered]") is filtered too: alone, a parameter has no context

The chain has a CPU budget per event (`crashreports.budget`): the walk and the rules
tick a deadline, and an event over budget is dropped (`DropEvent("over_budget")`), so a
report built to be slow costs at most its budget and is never kept half scrubbed.

What stays: device model and OS, app version, stack frames (function, module, line),
breadcrumb categories and times, tags, levels; each string in them scrubbed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from crashreports.budget import UNLIMITED, Clock, Deadline, OverBudget
from crashreports.patterns import JOINT, ValuePatterns
from crashreports.regex import Regex, compile_re2

Event = dict[str, Any]
FILTERED = "[filtered]"
MAX_DEPTH = 24
# Substrings of a key (lower case, without '-', '_', ' ' and '.') whose value is secret.
SENSITIVE_KEYS = (
    "password",
    "passwd",
    "passphrase",
    "pwd",
    "secret",
    "token",
    "auth",
    "credential",
    "cookie",
    "session",
    "apikey",
    "privatekey",
    "digest",
    "csrf",
    "xsrf",
    "signature",
    "bearer",
    "jwt",
    "ha1",
)
# Substrings of a key whose value names a person (a display name, a caller): removed too.
PERSON_KEYS = (
    "displayname",
    "firstname",
    "lastname",
    "fullname",
    "givenname",
    "familyname",
    "middlename",
    "surname",
    "nickname",
    "username",
    "realname",
    "callername",
    "calleename",
    "callee",
    "caller",
    "contact",
    "sendername",
    "recipient",
)
# Keys of an event that a crash report needs; anything else is not kept.
TOP_LEVEL = frozenset(
    {
        "event_id",
        "timestamp",
        "start_timestamp",
        "platform",
        "level",
        "logger",
        "release",
        "dist",
        "environment",
        "exception",
        "threads",
        "message",
        "logentry",
        "breadcrumbs",
        "contexts",
        "tags",
        "extra",
        "request",
        "sdk",
        "fingerprint",
        "transaction",
        "modules",
        "debug_meta",
    }
)
_JOINT = JOINT
# Bounds of `ScrubTree.keys`: keys up to this long are remembered, this many (then none).
KEY_CHARS = 128
KEY_ENTRIES = 8192
# Dropped from a key, lower case, before the sensitive words are looked for in it.
_FOLD = str.maketrans("", "", "_- .")


class DropEvent(Exception):
    """A report that must not be kept at all; `reason` is the counter label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Step(Protocol):
    def __call__(self, event: Event, deadline: Deadline = ...) -> Event: ...


@dataclass(frozen=True, slots=True)
class RequireOptIn:
    """The app says its user opted in with a tag (`tag` = `value`)."""

    tag: str
    value: str

    def __call__(self, event: Event, deadline: Deadline = UNLIMITED) -> Event:
        tags = event.get("tags")
        if isinstance(tags, dict):
            found = tags.get(self.tag)
        elif isinstance(tags, list):
            found = next(
                (p[1] for p in tags if isinstance(p, list) and len(p) == 2 and p[0] == self.tag),
                None,
            )
        else:
            found = None
        if found != self.value:
            raise DropEvent("no_opt_in")
        return event


def _cut(node: Any, depth: int) -> Any:
    if isinstance(node, dict):
        if depth <= 0:
            return FILTERED
        return {k: _cut(v, depth - 1) for k, v in node.items()}
    if isinstance(node, list):
        if depth <= 0:
            return FILTERED
        return [_cut(v, depth - 1) for v in node]
    return node


@dataclass(frozen=True, slots=True)
class LimitDepth:
    depth: int = MAX_DEPTH

    def __call__(self, event: Event, deadline: Deadline = UNLIMITED) -> Event:
        cut: Event = _cut(event, self.depth)
        return cut


@dataclass(frozen=True, slots=True)
class KeepTopLevel:
    keys: frozenset[str] = TOP_LEVEL

    def __call__(self, event: Event, deadline: Deadline = UNLIMITED) -> Event:
        return {k: v for k, v in event.items() if k in self.keys}


def _pop_in(event: Event, path: tuple[str, ...]) -> None:
    node: Any = event
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


@dataclass(frozen=True, slots=True)
class RemoveIdentifying:
    """Fields removed outright, whatever they hold."""

    paths: tuple[tuple[str, ...], ...] = (
        ("user",),
        ("server_name",),
        ("request", "data"),
        ("request", "cookies"),
        ("request", "env"),
        ("extra", "sys.argv"),
        ("contexts", "device", "name"),
        ("contexts", "process", "argv"),
        ("contexts", "runtime", "raw_description"),
        ("contexts", "user"),
    )

    def __call__(self, event: Event, deadline: Deadline = UNLIMITED) -> Event:
        for path in self.paths:
            _pop_in(event, path)
        for frame in _frames(event):
            # Source lines around a frame are the app's code, with its literals: the
            # developer has the code, and function, module and line are kept.
            for key in ("pre_context", "context_line", "post_context"):
                frame.pop(key, None)
        return event


def _frames(event: Event) -> Iterator[dict[str, Any]]:
    for holder in ("exception", "threads"):
        section = event.get(holder)
        values = section.get("values") if isinstance(section, dict) else None
        for value in values if isinstance(values, list) else ():
            trace = value.get("stacktrace") if isinstance(value, dict) else None
            frames = trace.get("frames") if isinstance(trace, dict) else None
            for frame in frames if isinstance(frames, list) else ():
                if isinstance(frame, dict):
                    yield frame


def _is_secret(key: str, sensitive: Regex) -> bool:
    return sensitive.search(key.lower().translate(_FOLD)) is not None


def _filter_keys(node: Any, sensitive: Regex) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if _is_secret(key, sensitive) and value not in (None, ""):
                out[key] = FILTERED
            else:
                out[key] = _filter_keys(value, sensitive)
        return out
    if isinstance(node, list):
        return [_filter_keys(v, sensitive) for v in node]
    return node


@dataclass(frozen=True, slots=True)
class FilterKeys:
    sensitive: Regex

    def __call__(self, event: Event, deadline: Deadline = UNLIMITED) -> Event:
        filtered: Event = _filter_keys(event, self.sensitive)
        return filtered


def _collect(node: Any, out: list[str]) -> None:
    if isinstance(node, str):
        out.append(node.replace(_JOINT, "\ufffd") if _JOINT in node else node)
    elif isinstance(node, dict):
        for key, value in node.items():
            out.append(key.replace(_JOINT, "\ufffd") if _JOINT in key else key)
            _collect(value, out)
    elif isinstance(node, list):
        for value in node:
            _collect(value, out)


def _rebuild(node: Any, texts: Iterator[str]) -> Any:
    if isinstance(node, str):
        return next(texts)
    if isinstance(node, dict):
        # A dict display evaluates each key before its value: the order of _collect.
        return {next(texts): _rebuild(value, texts) for value in node.values()}
    if isinstance(node, list):
        return [_rebuild(value, texts) for value in node]
    return node


@dataclass(frozen=True, slots=True)
class ScrubValues:
    """One regex pass over every string of the event, joined (C speed, not per string)."""

    patterns: ValuePatterns

    def __call__(self, event: Event, deadline: Deadline = UNLIMITED) -> Event:
        texts: list[str] = []
        _collect(event, texts)
        scrubbed = self.patterns.sub(_JOINT.join(texts), deadline).split(_JOINT)
        assert len(scrubbed) == len(texts)  # no rule matches the joint
        rebuilt: Event = _rebuild(event, iter(scrubbed))
        return rebuilt


_KEY = object()  # marks a dict key in `_Walk.slots`


class _Walk:
    """One event's walk: the tree rebuilt with depth and key rules applied, and where
    each of its strings (keys included) sits, so that only the changed ones are put back.

    A string that the value rules found clean in an earlier event (`clean`, which holds
    no NUL) is neither recorded nor scanned: most strings of a report recur in the next
    one, and a set lookup here is cheaper than three list entries and a lookup later."""

    __slots__ = ("clean", "deadline", "holders", "secret", "sensitive", "slots", "texts")

    def __init__(
        self, sensitive: Regex, deadline: Deadline, secret: dict[str, bool], clean: set[str]
    ) -> None:
        self.sensitive = sensitive
        self.deadline = deadline
        self.secret = secret  # keys tested once each (`ScrubTree.keys`)
        self.clean = clean  # texts the value rules leave unchanged (`ValuePatterns.clean`)
        self.texts: list[str] = []
        self.holders: list[Any] = []  # the dict or list holding texts[i]
        self.slots: list[object] = []  # its key or index there, or _KEY for a dict key

    def node(self, node: Any, depth: int) -> Any:
        if isinstance(node, dict):
            return FILTERED if depth <= 0 else self.mapping(node, depth - 1)
        if isinstance(node, list):
            return FILTERED if depth <= 0 else self.sequence(node, depth - 1)
        return node

    def mapping(self, node: dict[str, Any], depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        secret, clean, texts = self.secret, self.clean, self.texts
        holders, slots = self.holders, self.slots
        tick = self.deadline.tick
        for key, value in node.items():
            tick()
            hidden = secret.get(key)
            if hidden is None:
                hidden = _is_secret(key, self.sensitive)
                if len(key) <= KEY_CHARS:
                    secret[key] = hidden
            if key not in clean:
                if _JOINT in key:
                    key = key.replace(_JOINT, "\ufffd")
                texts.append(key)
                holders.append(out)
                slots.append(_KEY)
            if hidden and value is not None and value != "":
                out[key] = FILTERED
            elif isinstance(value, str):
                if value not in clean:
                    if _JOINT in value:
                        value = value.replace(_JOINT, "\ufffd")
                    texts.append(value)
                    holders.append(out)
                    slots.append(key)
                out[key] = value
            else:
                out[key] = self.node(value, depth)
        return out

    def sequence(self, node: list[Any], depth: int) -> list[Any]:
        out: list[Any] = []
        clean, texts, holders, slots = self.clean, self.texts, self.holders, self.slots
        tick = self.deadline.tick
        for value in node:
            tick()
            if isinstance(value, str):
                if value not in clean:
                    if _JOINT in value:
                        value = value.replace(_JOINT, "\ufffd")
                    texts.append(value)
                    holders.append(out)
                    slots.append(len(out))
                out.append(value)
            else:
                out.append(self.node(value, depth))
        return out


@dataclass(frozen=True, slots=True)
class ScrubTree:
    """`LimitDepth`, `FilterKeys` and `ScrubValues` in one walk, with the same result."""

    sensitive: Regex
    patterns: ValuePatterns
    depth: int = MAX_DEPTH
    # Whether a key is secret, across events: reports of an app repeat their keys.
    keys: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def __call__(self, event: Event, deadline: Deadline = UNLIMITED) -> Event:
        if len(self.keys) > KEY_ENTRIES:
            self.keys.clear()
        walk = _Walk(self.sensitive, deadline, self.keys, self.patterns.clean)
        out = walk.node(event, self.depth)
        if not isinstance(out, dict):
            return {}
        renamed: dict[int, tuple[dict[str, Any], dict[str, str]]] = {}
        holders, slots, texts = walk.holders, walk.slots, walk.texts
        for i, text in self.patterns.sub_each(texts, deadline).items():
            slot = slots[i]
            if slot is _KEY:
                holder = holders[i]
                renamed.setdefault(id(holder), (holder, {}))[1][texts[i]] = text
            else:
                holders[i][slot] = text
        # Keys last: the values above were put back under the old keys. A key renamed
        # onto another keeps the first one's place and the last one's value, as a dict
        # display would.
        for holder, names in renamed.values():
            items = list(holder.items())
            holder.clear()
            for key, value in items:
                holder[names.get(key, key)] = value
        return out


@dataclass(frozen=True, slots=True)
class FilterLogParams:
    """`logentry.params` checked against the scrubbed `logentry.formatted`."""

    patterns: ValuePatterns

    def __call__(self, event: Event, deadline: Deadline = UNLIMITED) -> Event:
        entry = event.get("logentry")
        if not isinstance(entry, dict) or not isinstance(entry.get("params"), list):
            return event
        params: list[Any] = entry["params"]
        formatted = entry.get("formatted")
        if not isinstance(formatted, str):
            template = entry.get("message")
            if not isinstance(template, str):
                return event
            try:
                formatted = self.patterns.sub(template % tuple(params), deadline)
            except (TypeError, ValueError, KeyError):
                return event
        for i, param in enumerate(params):
            deadline.tick()
            shown = param if isinstance(param, str) else repr(param)
            if param not in (None, "") and shown not in formatted:
                params[i] = FILTERED
        return event


@dataclass(frozen=True, slots=True)
class Chain:
    """The steps in order, within `budget` seconds of CPU time per event (0: none).

    `clock` reads the CPU time of the thread that scrubs (injected by tests)."""

    steps: tuple[Step, ...]
    budget: float = 0.0
    clock: Clock = field(default=time.thread_time, compare=False)

    def __call__(self, event: Event, deadline: Deadline | None = None) -> Event:
        if deadline is None:
            deadline = Deadline.start(self.budget, self.clock) if self.budget else UNLIMITED
        try:
            for step in self.steps:
                event = step(event, deadline)
                deadline.check()
        except OverBudget:
            raise DropEvent("over_budget") from None
        return event

    def with_budget(self, seconds: float, clock: Clock = time.thread_time) -> Chain:
        return Chain(self.steps, seconds, clock)


def sensitive_keys(extra: tuple[str, ...] = ()) -> Regex:
    """Key substrings as one RE2 alternation (a key may be as long as the body)."""
    words = [
        re.escape(w.lower().replace("_", "").replace("-", "").replace(" ", ""))
        for w in (*SENSITIVE_KEYS, *PERSON_KEYS, *extra)
    ]
    return compile_re2("|".join(words))


def compile_chain(
    *,
    opt_in: RequireOptIn | None,
    extra_keys: tuple[str, ...] = (),
    extra_patterns: tuple[str, ...] = (),
    budget: float = 0.0,
    clock: Clock = time.thread_time,
) -> Chain:
    """The chain of a project: its opt-in check (if by tag), then the scrubbing steps.

    `extra_patterns` are RE2 patterns (checked by the settings); `budget` is CPU seconds
    per event (0: none)."""
    steps: list[Step] = [] if opt_in is None else [opt_in]
    steps += [
        KeepTopLevel(),
        RemoveIdentifying(),
    ]
    patterns = ValuePatterns(extra_patterns)
    steps += [ScrubTree(sensitive_keys(extra_keys), patterns), FilterLogParams(patterns)]
    return Chain(tuple(steps), budget, clock)


__all__ = [
    "PERSON_KEYS",
    "SENSITIVE_KEYS",
    "Chain",
    "DropEvent",
    "Event",
    "FilterKeys",
    "FilterLogParams",
    "KeepTopLevel",
    "LimitDepth",
    "RemoveIdentifying",
    "RequireOptIn",
    "ScrubTree",
    "ScrubValues",
    "compile_chain",
    "sensitive_keys",
]
