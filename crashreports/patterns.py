"""Personal data found by its shape in any string of a crash report, in linear time.

The engine is RE2 (google-re2), chosen over Hyperscan by measuring both on events the
stock sentry-sdk makes (bench/crashreports.py, 200 events of ~8 KiB, 2 shared cores):

- Hyperscan's scan of all rules over an event's joined text (start of match on, one
  Python callback per report) ran at ~4,500 events/s, faster than our whole chain on RE2
  (~1,250-1,450 events/s), but the scan is not what costs: RE2's searches are ~15% of
  the chain's time (cProfile); the walk over the event and the replacements are the
  rest, and Hyperscan would not remove them. What it would take away: it reports every
  end offset of every pattern (75-195 reports per SDK event, 233,000 for 1 MiB of
  `x=1&token`), not the leftmost-first, greedy or lazy match `re.sub` picks, so a Python
  pass over all reports would have to pick them; it has no capture groups (to replace
  the value of `key=value` and keep the key); with start of match it refused 3 of the
  23 rules ("Pattern is too large") and `\b` with Unicode classes.
- RE2 keeps Python's leftmost-first semantics (first alternative wins at a position,
  greedy and lazy repetition, groups), so every rule kept its meaning and only its
  lookarounds were rewritten (below): on 18,500 fuzzed strings and the SDK events'
  strings the rules of old give the same output on RE2 as on `re`.
- The chain: ~1,450 SDK events/s of ~8 KiB and ~1,235 of ~16 KiB (CPU time; `re`:
  ~1,325 and ~1,155). Point 1's events: ~1 ms at 100 KB, 6-12 ms at 1 MiB (`re`: 28 s
  for 100 KB of `x=1&token...`). 1 MiB built for one rule takes 4-60 ms when it matches
  rarely, up to ~3 s when it matches every few bytes (10-20 µs per match, mostly
  Python): such an event meets the CPU budget and is dropped at ~50 ms. Since then the
  scrubber remembers strings and keys it found clean (scrubber.py): ~815 µs per event
  never seen before, ~650 µs for repeated ones (was ~1,140 µs). Then: each distinct
  text of a report scanned once, one RE2 call per match (`Program.search`), the walk
  recording only texts not yet found clean, the CPU clock read only once the wall
  clock could be past the budget: ~480-550 µs per ~8 KiB event with its JSON parsed
  and dumped, in one process or in a worker process fed 3,300 SDK envelopes (~840 and
  ~900 µs before); against Relay in the same runs (bench --mode scrub, load 1.1-1.5)
  1.66-1.67x on ~8 KiB events and 1.70-1.71x on ~16 KiB (the tree before: 1.02-1.06x),
  0 planted values left: short of the 2x of issue 14.

Every search is linear in the text (RE2 has no backtracking) and each rule is shaped
so that a repeated scan cannot go quadratic: a run that can hold a rule's start again
and again (`sip:sip:sip:`, `&token&token`) ends each thread at a delimiter the rule
does not cross, or the rule is bounded. PEM blocks are found by two literal scans
that never re-read the text (`_pem`). A per-event CPU budget (`Deadline`) bounds what
is left: many matches cost Python time per match.

Lookarounds become context: every rule is compiled as `lead (?P<rule>body) trail`,
where `lead` is exactly three characters (what a lookbehind tested) and `trail` what a
lookahead tested; the text gets three NULs in front (they stand for "start of text":
no lead class excludes NUL), and after each match the next search starts three
characters before the end of its body. So every rule still sees the text before and
after its body, and a match's start is always its body's start minus three: RE2's
leftmost-first choice is the one Python's `re` made with the lookarounds.

One pass runs the rules that can match plain words (credentials in free text, SIP
digest credentials, display names, JWTs, bearer tokens) over all the strings of an
event joined by NUL (no rule matches NUL, so a match never spans two strings); then
one scan finds candidate spans (runs of words holding a digit, '@', ':', '/', '\\',
'=', '+', or 64 hex digits), and each distinct span gets only the rules it can match:
a rule that needs an '@', a '+', seven digits or seven characters is left out for a
span without them (`NEEDS`, one alternation per combination, compiled at load). Each
rule names the typed placeholder that replaces what it matched; rules whose shape is
too loose (cards, IBANs, IMEIs, IPv6) are checked (Luhn, mod 97, `ipaddress`) first.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from crashreports.budget import UNLIMITED, Deadline
from crashreports.regex import Program, Span

# Joins the texts of an event for one scan; no rule matches it.
JOINT = "\x00"
_NUL = b"\x00"
# Python's `\s` for str (RE2's `\s` is ASCII only), for use inside a class.
_SPACE = r"\t-\r\x1c-\x1f\x85\p{Z}"
# Characters that end a value inside free text: whitespace, quotes, NUL (the joint).
_END = rf"{_SPACE}\x00\"'<>"
_W = r"\pL\pN_"  # Python's `\w` for str
_D = r"\p{Nd}"  # Python's `\d` for str
CONTEXT = 3  # characters of lead every rule has
_SENTINEL = _NUL * CONTEXT
_ANY = "(?s:...)"


def _lead(excluded: str) -> str:
    """The character before the body is none of `excluded` (a negative lookbehind)."""
    return rf"(?s:..)[^{excluded}]"


@dataclass(frozen=True, slots=True)
class Rule:
    """`body` replaced by `placeholder` (or by `compute`'s result), seen with context.

    With `value`, the body holds a group `<name>_v` and only that part is replaced."""

    name: str
    body: str
    placeholder: bytes = b"[filtered]"
    lead: str = _ANY
    trail: str = ""
    value: bool = False


# Free-text credentials and SIP headers: run over the whole joined text.
_KEY_CHARS = r"[A-Za-z0-9_.\-]{0,32}"
_CREDENTIAL_WORDS = r"passw|passphrase|pwd|secret|token|api[_\-]?key|credential|private[_\-]?key"
_PERSON_WORDS = (
    r"(?:display|first|last|full|given|family|middle|nick|real|caller|callee|sender|user|sur)"
    r"[_\-. ]?name|callee|caller|contact"
)


def _value_groups(rule: str) -> str:
    """A value: quoted (either quote) or a bare word, as groups `<rule>_v...`."""
    bare = rf"[^{_SPACE}\x00\"'<>,;&}}\]]{{1,256}}"
    return rf"\"(?P<{rule}_v>[^\"\x00]*)\"|'(?P<{rule}_vq>[^'\x00]*)'|(?P<{rule}_vb>{bare})"


_NAME_CHARS = r"[\pL\pN._'\-]"
WORD_RULES: tuple[Rule, ...] = (
    # Authorization: Digest username="bob", realm=..., nonce=..., response=... : all of it.
    Rule(
        "digest",
        r"(?i:\bdigest)[ \t]+(?P<digest_v>[A-Za-z][A-Za-z0-9_\-]*[ \t]*=[ \t]*"
        r"(?:\"[^\"\x00]*\"|[^\s,\"\x00]*)(?:[ \t]*,[ \t]*[A-Za-z][A-Za-z0-9_\-]*[ \t]*=[ \t]*"
        r"(?:\"[^\"\x00]*\"|[^\s,\"\x00]*))*)",
        value=True,
    ),
    # key = value, key: value, 'key': 'value', "key": "value" (repr'd dicts, JSON).
    Rule(
        "cred",
        rf"[\"']?\b(?i:{_KEY_CHARS}(?:{_CREDENTIAL_WORDS}|{_PERSON_WORDS}){_KEY_CHARS}|pw|pin|ha1)\b"
        rf"[\"']?[ \t]{{0,8}}[:=][ \t]{{0,8}}(?:{_value_groups('cred')})",
        value=True,
    ),
    # "password hunter2xyz": a password word, blanks, a word (unless a plain English one).
    Rule(
        "credword",
        rf"\b(?i:{_KEY_CHARS}(?:passw|passphrase|pwd)[A-Za-z0-9_.\-]{{0,32}}|pw)[ \t]{{1,8}}"
        rf"(?P<credword_v>[^{_END},;&\]}}]{{1,256}})",
        value=True,
    ),
    # "Alice Smith" <sip:...> and Alice Smith <sip:...>: the display name of a name-addr.
    Rule("nameq", r"\"(?P<nameq_v>[^\"\x00\r\n]+)\"[ \t]*<(?i:sips?|tel):", b"[name]", value=True),
    Rule(
        "name",
        rf"(?P<name_v>(?:\p{{Lu}}{_NAME_CHARS}*[ \t]+){{0,3}}\p{{Lu}}{_NAME_CHARS}*"
        rf"|{_NAME_CHARS}+)[ \t]*<(?i:sips?|tel):",
        b"[name]",
        lead=_lead(r"\pL\pN._'\-"),
        value=True,
    ),
    Rule("jwt", r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*", b"[jwt]"),
    Rule("bearer", r"(?i:\bbearer[ \t]+)[A-Za-z0-9\-._~+/]{8,}=*", b"Bearer [token]"),
)
# Words that follow "password" in a message without being one.
_NOT_A_PASSWORD = frozenset(
    b"a an and are as at be been by can changed did does expired for from has have in"
    b" incorrect invalid is it mismatch missing must not of on or policy required reset"
    b" should the to too was were will with wrong".split()
)

# Rules run on candidate spans.
SPAN_RULES: tuple[Rule, ...] = (
    # Unbounded, unlike the 256 of old: a "://" ends the last thread, so threads never
    # overlap, and a counted repetition of 256 would take RE2's DFA out of memory.
    Rule("userinfo", rf"[^/{_END}@]+@", b"[userinfo]@", lead="://"),
    Rule(
        "query",
        r"(?i:[a-z0-9_.\-]*(?:token|secret|passw|pwd|auth|key|sig|session|code|credential|ha1)"
        rf"[a-z0-9_.\-]*)=(?P<query_v>[^&#{_END}]*)",
        lead=r"(?s:..)[?&;\x00]",
        value=True,
    ),
    Rule("sip", rf"(?i:\bsips?:)[^@;:/,{_END}]+(?::[^@;/,{_END}]*)?@"),
    Rule("tel", r"(?i:\btel:)\+?[0-9][0-9\-.() ]{2,30}[0-9]", b"tel:[phone]"),
    Rule(
        "email",
        r"[A-Za-z0-9._%+\-]{1,64}@(?:[A-Za-z0-9\-]{1,63}\.)+[A-Za-z][A-Za-z0-9\-]{1,62}",
        b"[email]",
    ),
    Rule("fcm", r"\b[A-Za-z0-9_\-]{11,}:[A-Za-z0-9_\-]{100,}", b"[fcm-token]"),
    Rule(
        "apns",
        r"[0-9A-Fa-f]{64}",
        b"[apns-token]",
        lead=_lead("0-9A-Fa-f"),
        trail=r"(?:$|[^0-9A-Fa-f])",
    ),
    Rule("iban", r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b"),
    Rule(
        "mac",
        r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}|[0-9A-Fa-f]{2}(?:-[0-9A-Fa-f]{2}){5}",
        b"[mac]",
        lead=_lead(r"0-9A-Fa-f:\-"),
        trail=r"(?:$|[^0-9A-Fa-f:\-])",
    ),
    Rule(
        "ipv6",
        rf"[0-9A-Fa-f]{{0,4}}(?::[0-9A-Fa-f]{{0,4}}){{2,7}}(?:%[{_W}.]+)?",
        lead=_lead(rf"{_W}:."),
        trail=rf"(?:$|[^{_W}:.])",
    ),
    Rule(
        "card",
        r"(?:[0-9][ \-]?){12,18}[0-9]",
        lead=_lead(rf"{_D}."),
        trail=rf"(?:$|[^{_D}.])",
    ),
    Rule(
        "ipv4",
        r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
        r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
        b"[ip]",
        lead=_lead(rf"{_D}."),
        trail=rf"(?:$|[^{_D}.]|\.$|\.[^{_D}])",
    ),
    Rule(
        "e164",
        r"\+[1-9](?:[ \-.]?\(?[0-9]\)?){6,14}",
        b"[phone]",
        lead=_lead(rf"{_W}+"),
        trail=rf"(?:$|[^{_D}])",
    ),
    Rule(
        "us_phone",
        r"(?:\([0-9]{3}\) ?|[0-9]{3}[\-.])[0-9]{3}[\-.][0-9]{4}",
        b"[phone]",
        lead=_lead(rf"{_W}("),
        trail=rf"(?:$|[^{_D}])",
    ),
    # Not after "<digit>:": the seconds of a time ("09:09:07.737849") are no number.
    Rule(
        "national",
        r"(?:\(0[0-9]{1,5}\)|0[0-9]{1,5})[ \-/.]?[0-9](?:[ \-.]?[0-9]){4,11}",
        b"[phone]",
        lead=rf"(?s:.)(?:(?s:.)[^{_W}.:]|[^{_D}]:)",
        trail=rf"(?:$|[^{_D}])",
    ),
    Rule("home", rf"(?:/home/|/Users/|(?i:\b[A-Z]:\\Users\\))[^/\\:\x00{_SPACE}\"']+"),
)
_PHONES = ("e164", "us_phone", "national")

# Runs of words (split by single spaces or tabs) that hold a character every other rule
# needs (or 64 hex digits: an APNs token); a placeholder such as "[ip]" holds none.
_TRIGGER = r"0-9@:/\\=+"
_WORD = rf"[^{_SPACE}\x00{_TRIGGER}]*[{_TRIGGER}][^{_SPACE}\x00]*"
# A span starts at a word (after a blank, a NUL or at the start: that character is part
# of the match, see `_span_start`) or at 64 hex digits anywhere. Without the lead a
# search could start in any word and read on to its end each time: quadratic.
_CANDIDATES = Program(rf"(?:(?:^|[{_SPACE}\x00]){_WORD}|[0-9A-Fa-f]{{64}})(?:[ \t]{_WORD})*")
_BLANK_BYTES = frozenset(b" \t\n\v\f\r\x1c\x1d\x1e\x1f\x00")
_PEM_BEGIN = Program(r"-----BEGIN [A-Z0-9 ]{1,40}-----")
_PEM_END = Program(r"-----END [A-Z0-9 ]{1,40}-----")
_PEM_MAX = 20000  # bytes between the two lines of one block
# Bounds of `ValuePatterns._clean` (emptied when full): at most ~4 MiB of text.
CLEAN_ENTRIES = 8192
CLEAN_CHARS = 512


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    compact = text.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    number = "".join(str(int(ch, 36)) for ch in moved)
    return int(number) % 97 == 1


def _back(data: bytes, pos: int, chars: int) -> int:
    """`pos` moved back by `chars` UTF-8 characters."""
    for _ in range(chars):
        pos -= 1
        while pos > 0 and data[pos] & 0xC0 == 0x80:
            pos -= 1
    return pos


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


def _sip(body: bytes) -> bytes:
    return body.split(b":", 1)[0] + b":[sip-user]@"


def _iban(body: bytes) -> bytes:
    return b"[iban]" if iban_ok(_text(body)) else body


def _ipv6(body: bytes) -> bytes:
    try:
        ipaddress.IPv6Address(_text(body).split("%", 1)[0])
    except ValueError:
        return body
    return b"[ip]"


def _home(body: bytes) -> bytes:
    cut = max(body.rfind(b"/", 0, len(body) - 1), body.rfind(b"\\", 0, len(body) - 1))
    return body[: cut + 1] + b"[user]"


Compute = Callable[[bytes], bytes]


class Rules:
    """Rules in one RE2 alternation, in order, each seeing its context (see above)."""

    def __init__(self, rules: Iterable[Rule], compute: dict[str, Compute]) -> None:
        chosen = tuple(rules)
        self.names = tuple(r.name for r in chosen)
        self.program = Program("|".join(f"{r.lead}(?P<{r.name}>{r.body}){r.trail}" for r in chosen))
        index = self.program.groupindex
        # (group of the body, groups of its value parts, placeholder, computed replacement)
        self._groups = tuple(
            (
                index[r.name],
                tuple(i for g, i in index.items() if g.startswith(f"{r.name}_v")),
                r.placeholder,
                compute.get(r.name),
            )
            for r in chosen
        )

    def sub(self, data: bytes, deadline: Deadline = UNLIMITED) -> bytes:
        """`data` (which starts with the NUL sentinel) with every match replaced."""
        out: list[bytes] = []
        last = pos = 0
        search = self.program.search
        size = len(data)
        while pos < size:
            groups = search(data, pos)
            if groups[0][0] < 0:
                break
            deadline.tick()
            rule = next(r for r in self._groups if groups[r[0]][0] >= 0)
            group, values, placeholder, compute = rule
            start, end = groups[group]
            if end == start:  # a deployment's pattern that matched nothing: step over
                nxt = start + 1
                while nxt < size and data[nxt] & 0xC0 == 0x80:
                    nxt += 1
                pos = _back(data, nxt, CONTEXT)
                continue
            out.append(data[last:start])
            body = data[start:end]
            if values:
                out.append(self._value(body, start, groups, values, placeholder, compute))
            elif compute is not None:
                out.append(compute(body))
            else:
                out.append(placeholder)
            last = end
            if end >= size:  # a body after this one would start at the end: empty
                break
            pos = _back(data, end, CONTEXT)
        if not out:
            return data
        out.append(data[last:])
        return b"".join(out)

    @staticmethod
    def _value(
        body: bytes,
        start: int,
        groups: list[Span],
        values: tuple[int, ...],
        placeholder: bytes,
        compute: Compute | None,
    ) -> bytes:
        for group in values:
            v_start, v_end = groups[group]
            if v_start >= 0:
                value = body[v_start - start : v_end - start]
                new = placeholder if compute is None else compute(value)
                return body[: v_start - start] + new + body[v_end - start :]
        return body


def _password_word(value: bytes) -> bytes:
    return value if value.lower() in _NOT_A_PASSWORD else b"[filtered]"


def _pem(data: bytes, deadline: Deadline) -> bytes:
    """Each BEGIN line, up to the first END line after it within `_PEM_MAX` bytes of the
    same string, replaced by "[pem]". The next END and the next NUL after a point are
    remembered, so no byte is scanned twice however many BEGIN lines there are."""
    out: list[bytes] = []
    last = pos = 0
    end: tuple[int, int] | None = (-1, -1)  # first END at or after a point; None: no more
    nul = -1  # first NUL at or after a point (len(data) if none)
    while True:
        begin_at, head_end = _PEM_BEGIN.find(data, pos)
        if begin_at < 0:
            break
        deadline.tick()
        if end is not None and end[0] < head_end:
            end = _PEM_END.find(data, head_end)
            end = None if end[0] < 0 else end
        if end is None:
            break
        if nul < head_end:
            nul = data.find(_NUL, head_end)
            nul = len(data) if nul < 0 else nul
        if end[0] - head_end <= _PEM_MAX and nul > end[0]:
            out += (data[last:begin_at], b"[pem]")
            last = pos = end[1]
        else:
            pos = begin_at + 1
    if not out:
        return data
    out.append(data[last:])
    return b"".join(out)


# What a candidate span holds, each one cheap to test (`in`, `len`): a rule is tried on a
# span only when the span has every feature the rule cannot match without. Dropping a rule
# that cannot match anywhere in a span changes nothing, so the result is that of all rules.
_AT, _EQ, _COLON, _HOME, _PLUS, _LONG, _DIGITS7 = 1, 2, 4, 8, 16, 32, 64
_SHORTEST = 7  # the shortest match of a rule marked _LONG ("1.2.3.4", "tel:1234")
NEEDS = {
    "userinfo": _AT | _COLON,
    "query": _EQ,
    "sip": _AT | _COLON,
    "tel": _COLON | _LONG,
    "email": _AT,
    "fcm": _COLON | _LONG,
    "apns": _LONG,
    "iban": _LONG,
    "mac": _LONG,
    "ipv6": _COLON,
    "card": _LONG | _DIGITS7,
    "ipv4": _LONG,
    "e164": _PLUS | _LONG | _DIGITS7,
    "us_phone": _LONG | _DIGITS7,
    "national": _LONG | _DIGITS7,
    "home": _HOME | _LONG,
}
_DIGITS = b"0123456789"


# Single bytes are looked for as ints: `64 in text` is a memchr (~35 ns), `b"@" in text`
# takes the argument's buffer first (~190 ns), and there are ~30 spans per SDK event.
_AT_BYTE, _EQ_BYTE, _COLON_BYTE, _PLUS_BYTE, _SLASH_BYTE, _BACKSLASH_BYTE = b"@=:+/\\"


def _features(text: bytes) -> int:
    found = 0
    if _AT_BYTE in text:
        found |= _AT
    if _EQ_BYTE in text:
        found |= _EQ
    if _COLON_BYTE in text:
        found |= _COLON
    if _PLUS_BYTE in text:
        found |= _PLUS
    # Bytes, not characters: a span may count as long when it is not, which only means
    # that a rule is tried that cannot match.
    if len(text) < _SHORTEST:
        return found
    found |= _LONG
    if len(text) - len(text.translate(None, _DIGITS)) >= 7:
        found |= _DIGITS7
    if (_SLASH_BYTE in text and (b"/home/" in text or b"/Users/" in text)) or (
        _BACKSLASH_BYTE in text and b":\\" in text and b":\\users\\" in text.lower()
    ):
        found |= _HOME
    return found


class ValuePatterns:
    """The compiled rules (and a deployment's own, RE2 syntax, replaced by `[filtered]`)."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        self.extra = tuple(extra)
        own = [Rule(f"extra{i}", f"(?:{p})") for i, p in enumerate(self.extra)]
        compute: dict[str, Compute] = {
            "sip": _sip,
            "iban": _iban,
            "ipv6": _ipv6,
            "card": self._card,
            "home": _home,
            "credword": _password_word,
        }
        self._words = Rules(WORD_RULES, compute)
        # One alternation per combination of features, of the rules that can match in a
        # span with them (a deployment's own rules always), in the order of SPAN_RULES.
        by_names: dict[tuple[str, ...], Rules | None] = {}
        self._by_features: list[Rules | None] = []
        for features in range(128):
            names = tuple(r.name for r in SPAN_RULES if NEEDS[r.name] & features == NEEDS[r.name])
            if names not in by_names:
                chosen = [r for r in SPAN_RULES if r.name in names] + own
                by_names[names] = Rules(chosen, compute) if chosen else None
            self._by_features.append(by_names[names])
        self._all = Rules(list(SPAN_RULES) + own, compute)
        # Texts the rules left unchanged, across events: most strings of crash reports
        # (modules, functions, files, SDK and context names, keys) recur from report to
        # report, and one set lookup replaces their share of every scan. The result of
        # a text does not depend on its neighbours (no match crosses the NUL joint).
        self._clean: set[str] = set()
        # Likewise the candidate spans the span rules left unchanged (a time, a version,
        # a path without a user), for the texts that are not clean as a whole.
        self._clean_spans: set[bytes] = set()
        # Digits that failed the card check may still be a phone number.
        self._phone = Rules((r for r in SPAN_RULES if r.name in _PHONES), {})

    @property
    def clean(self) -> set[str]:
        """The texts found clean so far (for `sub_each`'s callers to skip; not to change)."""
        return self._clean

    def __reduce__(self) -> tuple[type[ValuePatterns], tuple[tuple[str, ...]]]:
        # Compiled programs do not cross into worker processes: the rules compile there.
        return (ValuePatterns, (self.extra,))

    def _card(self, body: bytes) -> bytes:
        digits = body.replace(b" ", b"").replace(b"-", b"").decode()
        if luhn_ok(digits):
            # 15 Luhn-valid digits are an IMEI unless they look like an Amex number.
            if len(digits) == 15 and not digits.startswith(("34", "37")):
                return b"[imei]"
            return b"[card]"
        return self._phone.sub(_SENTINEL + body)[CONTEXT:]

    def _span(self, span: bytes, deadline: Deadline, every_rule: bool) -> bytes:
        rules = self._all if every_rule else self._by_features[_features(span)]
        if rules is None:
            return span
        return rules.sub(_SENTINEL + span, deadline)[CONTEXT:]

    def _scrub(
        self, data: bytes, deadline: Deadline, changed_at: list[int] | None, every_rule: bool
    ) -> tuple[bytes, bytes]:
        """(text after the word rules, text after all rules); where spans changed, if asked."""
        if b"-----BEGIN " in data:
            data = _pem(data, deadline)
        framed = _SENTINEL + data
        words = self._words.sub(framed, deadline)
        text = data if words is framed else words[CONTEXT:]
        seen: dict[bytes, bytes] = {}
        # `every_rule` (tests) runs the rules on every span: it neither reads nor fills it.
        clean: set[bytes] = set() if every_rule else self._clean_spans
        if len(clean) >= CLEAN_ENTRIES:
            clean.clear()
        out: list[bytes] = []
        last = 0
        for start, end in _iter(_CANDIDATES, text):
            deadline.tick()
            start = _span_start(text, start)
            found = text[start:end]
            new = seen.get(found)
            if new is None:
                if found in clean:
                    new = seen[found] = found
                else:
                    new = seen[found] = self._span(found, deadline, every_rule)
                    if new == found and len(found) <= CLEAN_CHARS and len(clean) < CLEAN_ENTRIES:
                        clean.add(found)
            if new != found:
                out += (text[last:start], new)
                last = end
                if changed_at is not None:
                    changed_at.append(start)
        if not out:
            return text, text
        out.append(text[last:])
        return text, b"".join(out)

    def sub(self, text: str, deadline: Deadline = UNLIMITED) -> str:
        """`text` scrubbed: the word rules, then the span rules over the candidate spans."""
        data = text.encode("utf-8", "surrogatepass")
        _, scrubbed = self._scrub(data, deadline, None, every_rule=False)
        return text if scrubbed == data else _text(scrubbed)

    def sub_all_rules(self, text: str) -> str:
        """`sub` without skipping rules by the features of a span or by spans found
        clean before (for tests)."""
        data = text.encode("utf-8", "surrogatepass")
        return _text(self._scrub(data, UNLIMITED, None, every_rule=True)[1])

    def sub_each(self, texts: list[str], deadline: Deadline = UNLIMITED) -> dict[int, str]:
        """The texts that scrubbing changes, by index, each as `sub` would return it.

        A text that an earlier event showed to be clean (`_clean`) is skipped; the rest
        go in one pass, joined by NUL (which no rule matches and no text may hold), each
        distinct text once (a breadcrumb's message recurs in one report: the result of a
        text does not depend on its neighbours); a span that repeats in them (the same
        phone number in every breadcrumb) is scrubbed once.
        """
        clean = self._clean
        todo = [i for i, text in enumerate(texts) if text not in clean]
        if not todo:
            return {}
        first: dict[str, int] = {}
        for i in todo:
            first.setdefault(texts[i], i)
        unique = list(first)
        found = self._sub_joined(unique, deadline)
        by_text = {unique[j]: text for j, text in found.items()}
        changed = {i: by_text[texts[i]] for i in todo if texts[i] in by_text} if found else {}
        # Only what came out unchanged is remembered: text the rules found nothing in,
        # which is kept as it is anyway (nothing a rule matched stays in memory).
        if len(clean) + len(unique) > CLEAN_ENTRIES:
            clean.clear()
        for text in unique:
            if text not in by_text and len(text) <= CLEAN_CHARS:
                clean.add(text)
        return changed

    def _sub_joined(self, texts: list[str], deadline: Deadline) -> dict[int, str]:
        joined = JOINT.join(texts).encode("utf-8", "surrogatepass")
        changed_at: list[int] = []
        text, scrubbed = self._scrub(joined, deadline, changed_at, every_rule=False)
        words_changed = text is not joined and text != joined
        if not (changed_at or words_changed):
            return {}
        parts = scrubbed.split(_NUL)
        assert len(parts) == len(texts)  # no rule matches the joint
        if words_changed:  # a word rule matched: compare them all (rare)
            return {
                i: _text(new)
                for i, (old, new) in enumerate(zip(joined.split(_NUL), parts, strict=True))
                if new != old
            }
        changed: dict[int, str] = {}
        index, start = 0, 0
        for at in changed_at:
            index += text.count(_NUL, start, at)
            start = at
            changed[index] = _text(parts[index])
        return changed


def _span_start(data: bytes, start: int) -> int:
    """Past the blank a candidate's match begins with, if any (no span starts blank)."""
    first = data[start]
    if first < 0x80:
        return start + 1 if first in _BLANK_BYTES else start
    size = 2 if first < 0xE0 else 3 if first < 0xF0 else 4
    char = data[start : start + size].decode("utf-8", "surrogatepass")
    return start + size if char.isspace() else start


def _iter(program: Program, data: bytes) -> Iterable[Span]:
    """Non-overlapping matches, left to right (each search starts where the last ended)."""
    pos, size = 0, len(data)
    while pos < size:
        start, end = program.find(data, pos)
        if start < 0:
            return
        yield start, end
        pos = end if end > pos else pos + 1
