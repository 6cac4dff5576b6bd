"""Personal data found by its shape in any string of a crash report.

One compiled alternation of named rules, run once over all the strings of an event
(joined by NUL, which no rule matches, so a match never spans two strings). Each rule
names the typed placeholder that replaces what it matched, so a developer still sees
what kind of value was there. Rules whose shape alone is too loose (payment cards,
IBANs, IMEIs, IPv6) are checked (Luhn, mod 97, `ipaddress`) before they replace
anything. Order matters: at one position the first rule that matches wins, so the
specific shapes (PEM, JWT, URIs) come before the generic ones (digits, IPs).

Python's `re` tries every alternative at every position, about 1 µs per character for
all the rules, so the work is cut in three without changing what is matched:
  1. PEM, JWT and bearer run over the whole text only when their literal is there;
  2. one scan finds candidate spans (runs of words holding a digit, '@', ':', '/',
     '\\', '=', '+', or 64 hex digits); no other text can hold a match;
  3. each distinct span gets only the rules it can match: a rule that needs an '@', a
     '+', seven digits or seven characters is left out of the alternation for a span
     without them (`NEEDS`, one alternation per combination, compiled at load).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable

Replace = Callable[[re.Match[str]], str]

# Joins the texts of an event for one scan; no rule matches it.
JOINT = "\x00"
# Characters that end a value inside free text: whitespace, quotes, NUL (the joint).
_END = r"\s\x00\"'<>"

# (name, pattern, placeholder or None when the replacement is computed)
RULES: tuple[tuple[str, str], ...] = (
    ("pem", r"-----BEGIN [A-Z0-9 ]{1,40}-----[^\x00]{0,20000}?-----END [A-Z0-9 ]{1,40}-----"),
    ("jwt", r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"),
    ("bearer", r"(?i:\bbearer[ \t]+)[A-Za-z0-9\-._~+/]{8,}=*"),
    ("userinfo", rf"(?<=://)[^/{_END}@]{{1,256}}@"),
    (
        "query",
        r"(?:(?<=[?&;\x00])|^)(?i:[a-z0-9_.\-]*(?:token|secret|passw|pwd|auth|key|sig|session|code"
        rf"|credential)[a-z0-9_.\-]*)=[^&#{_END}]*",
    ),
    ("sip", rf"(?i:\bsips?:)[^@;:/,{_END}]+(?::[^@;/,{_END}]*)?@"),
    ("tel", r"(?i:\btel:)\+?[0-9][0-9\-.() ]{2,30}[0-9]"),
    (
        "email",
        r"[A-Za-z0-9._%+\-]{1,64}@(?:[A-Za-z0-9\-]{1,63}\.)+[A-Za-z][A-Za-z0-9\-]{1,62}",
    ),
    ("fcm", r"\b[A-Za-z0-9_\-]{11,}:[A-Za-z0-9_\-]{100,}"),
    ("apns", r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{64}(?![0-9A-Fa-f])"),
    ("iban", r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b"),
    (
        "mac",
        r"(?<![0-9A-Fa-f:\-])[0-9A-Fa-f]{2}(?P<macsep>[:\-])[0-9A-Fa-f]{2}"
        r"(?:(?P=macsep)[0-9A-Fa-f]{2}){4}(?![0-9A-Fa-f:\-])",
    ),
    ("ipv6", r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:%[\w.]+)?(?![\w:.])"),
    ("card", r"(?<![\d.])(?:\d[ \-]?){12,18}\d(?![\d.])"),
    (
        "ipv4",
        r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
        r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\.?\d)",
    ),
    ("e164", r"(?<![\w+])\+[1-9](?:[ \-.]?\(?\d\)?){6,14}(?![\d])"),
    ("us_phone", r"(?<![\w(])(?:\(\d{3}\) ?|\d{3}[\-.])\d{3}[\-.]\d{4}(?!\d)"),
    # Not after "<digit>:": the seconds of a time ("09:09:07.737849") are no number.
    (
        "national",
        r"(?<![\w.])(?<!\d:)(?:\(0\d{1,5}\)|0\d{1,5})[ \-/.]?\d(?:[ \-.]?\d){4,11}(?![\d])",
    ),
    ("home", r"(?:/home/|/Users/|(?i:\b[A-Z]:\\Users\\))[^/\\:\x00\s\"']+"),
)

PLACEHOLDER = {
    "pem": "[pem]",
    "jwt": "[jwt]",
    "bearer": "Bearer [token]",
    "userinfo": "[userinfo]@",
    "query": None,
    "sip": None,
    "tel": "tel:[phone]",
    "email": "[email]",
    "fcm": "[fcm-token]",
    "apns": "[apns-token]",
    "iban": None,
    "mac": "[mac]",
    "ipv6": None,
    "card": None,
    "ipv4": "[ip]",
    "e164": "[phone]",
    "us_phone": "[phone]",
    "national": "[phone]",
    "home": None,
}


# Runs of words (split by single spaces or tabs) that hold a character every other rule
# needs (or 64 hex digits: an APNs token); a placeholder such as "[ip]" holds none.
# A word starts after whitespace or NUL and runs to the first trigger (no backtracking).
_TRIGGER = r"0-9@:/\\=+"
_WORD = rf"[^\s\x00{_TRIGGER}]*+[{_TRIGGER}][^\s\x00]*+"
_CANDIDATES = re.compile(rf"(?:(?<![^\s\x00]){_WORD}|[0-9A-Fa-f]{{64}})(?:[ \t]{_WORD})*+")


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


def _sip(match: re.Match[str]) -> str:
    scheme = match.group(0).split(":", 1)[0]
    return f"{scheme}:[sip-user]@"


def _query(match: re.Match[str]) -> str:
    return match.group(0).split("=", 1)[0] + "=[filtered]"


def _iban(match: re.Match[str]) -> str:
    return "[iban]" if iban_ok(match.group(0)) else match.group(0)


def _ipv6(match: re.Match[str]) -> str:
    text = match.group(0)
    try:
        ipaddress.IPv6Address(text.split("%", 1)[0])
    except ValueError:
        return text
    return "[ip]"


def _home(match: re.Match[str]) -> str:
    text = match.group(0)
    cut = max(text.rfind("/", 0, len(text) - 1), text.rfind("\\", 0, len(text) - 1))
    return text[: cut + 1] + "[user]"


# What a candidate span holds, each one cheap to test (`in`, `len`): a rule is tried on a
# span only when the span has every feature the rule cannot match without. Dropping a rule
# that cannot match anywhere in a span changes nothing, so the result is that of all rules.
_AT, _EQ, _COLON, _HOME, _PLUS, _LONG, _WORDS, _DIGITS7 = 1, 2, 4, 8, 16, 32, 64, 128
_SHORTEST = 7  # the shortest match of a rule marked _LONG ("1.2.3.4", "tel:1234")
NEEDS = {
    "pem": _LONG | _WORDS,
    "jwt": _LONG | _WORDS,
    "bearer": _LONG | _WORDS,
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
_NO_DIGITS = str.maketrans("", "", "0123456789")


def _features(text: str) -> int:
    found = 0
    if "@" in text:
        found |= _AT
    if "=" in text:
        found |= _EQ
    if ":" in text:
        found |= _COLON
    if "+" in text:
        found |= _PLUS
    if len(text) < _SHORTEST:
        return found
    found |= _LONG
    if len(text) - len(text.translate(_NO_DIGITS)) >= 7:
        found |= _DIGITS7
    # The literal each of these rules starts with (in the case the rule accepts).
    lower = text.lower()
    if "-----BEGIN" in text or "eyJ" in text or "bearer" in lower:
        found |= _WORDS
    if "/home/" in text or "/Users/" in text or ":\\users\\" in lower:
        found |= _HOME
    return found


class ValuePatterns:
    """The compiled rules (and a deployment's own, replaced by `[filtered]`)."""

    def __init__(self, extra: Iterable[re.Pattern[str]] = ()) -> None:
        named = list(RULES)
        own = [(f"extra{i}", p.pattern) for i, p in enumerate(extra)]
        parts = [f"(?P<{name}>{pattern})" for name, pattern in named + own]
        self.regex = re.compile("|".join(parts))
        # One alternation per combination of features, of the rules that can match in a
        # span with them (a deployment's own rules always), in the order of RULES.
        by_rules: dict[tuple[str, ...], re.Pattern[str] | None] = {}
        self._by_features: list[re.Pattern[str] | None] = []
        for features in range(256):
            names = tuple(n for n, _ in named if NEEDS[n] & features == NEEDS[n])
            if names not in by_rules:
                chosen = [(n, p) for n, p in named if n in names] + own
                alternation = "|".join(f"(?P<{n}>{p})" for n, p in chosen)
                by_rules[names] = re.compile(alternation) if chosen else None
            self._by_features.append(by_rules[names])
        # Digits that failed the card check may still be a phone number.
        phone = [p for name, p in RULES if name in ("e164", "us_phone", "national")]
        self._phone = re.compile("|".join(f"(?:{p})" for p in phone))
        self._computed: dict[str, Replace] = {
            "sip": _sip,
            "query": _query,
            "iban": _iban,
            "ipv6": _ipv6,
            "card": self._card,
            "home": _home,
        }
        self._words = re.compile(
            "|".join(f"(?P<{n}>{p})" for n, p in RULES if n in ("pem", "jwt", "bearer"))
        )
        self._fixed = {name: text for name, text in PLACEHOLDER.items() if text is not None}

    def _card(self, match: re.Match[str]) -> str:
        text = match.group(0)
        digits = text.replace(" ", "").replace("-", "")
        if luhn_ok(digits):
            # 15 Luhn-valid digits are an IMEI unless they look like an Amex number.
            if len(digits) == 15 and not digits.startswith(("34", "37")):
                return "[imei]"
            return "[card]"
        return self._phone.sub("[phone]", text)

    def _replace_words(self, match: re.Match[str]) -> str:
        name = match.lastgroup
        assert name is not None
        return self._fixed[name]

    def _replace(self, match: re.Match[str]) -> str:
        name = match.lastgroup
        assert name is not None
        fixed = self._fixed.get(name)
        if fixed is not None:
            return fixed
        computed = self._computed.get(name)
        if computed is not None:
            return computed(match)
        return "[filtered]"  # a deployment's own pattern

    def _span(self, span: str) -> str:
        rules = self._by_features[_features(span)]
        return span if rules is None else rules.sub(self._replace, span)

    def _words_first(self, text: str) -> str:
        # Rules that can match plain words run over the whole text, and only when their
        # literal is there (a fast substring test).
        if "-----BEGIN" in text or "eyJ" in text or "earer" in text:
            return self._words.sub(self._replace_words, text)
        return text

    def sub(self, text: str) -> str:
        """`text` scrubbed: the word rules, then all rules over the candidate spans."""
        return _CANDIDATES.sub(lambda m: self._span(m.group(0)), self._words_first(text))

    def sub_each(self, texts: list[str]) -> dict[int, str]:
        """The texts that scrubbing changes, by index, each as `sub` would return it.

        One pass over all of them joined by NUL (which no rule matches and no text may
        hold), so the scan runs in C rather than once per text; a span that repeats in
        the texts (the same phone number in every breadcrumb) is classified once.
        """
        joined = JOINT.join(texts)
        text = self._words_first(joined)
        seen: dict[str, str] = {}
        changed_at: list[int] = []

        def span(match: re.Match[str]) -> str:
            found = match.group(0)
            out = seen.get(found)
            if out is None:
                out = seen[found] = self._span(found)
            if out != found:
                changed_at.append(match.start())
            return out

        scrubbed = _CANDIDATES.sub(span, text)
        words_changed = text != joined
        if not (changed_at or words_changed):
            return {}
        parts = scrubbed.split(JOINT)
        assert len(parts) == len(texts)  # no rule matches the joint
        if words_changed:  # a word rule matched: compare them all (rare)
            return {
                i: new for i, (old, new) in enumerate(zip(texts, parts, strict=True)) if new != old
            }
        changed: dict[int, str] = {}
        index, start = 0, 0
        for at in changed_at:
            index += text.count(JOINT, start, at)
            start = at
            changed[index] = parts[index]
        return changed
