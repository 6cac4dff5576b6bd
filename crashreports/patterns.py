"""Personal data found by its shape in any string of a crash report.

One compiled alternation of named rules, run once over all the strings of an event
(joined by NUL, which no rule matches, so a match never spans two strings). Each rule
names the typed placeholder that replaces what it matched, so a developer still sees
what kind of value was there. Rules whose shape alone is too loose (payment cards,
IBANs, IMEIs, IPv6) are checked (Luhn, mod 97, `ipaddress`) before they replace
anything. Order matters: at one position the first rule that matches wins, so the
specific shapes (PEM, JWT, URIs) come before the generic ones (digits, IPs).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable

Replace = Callable[[re.Match[str]], str]

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
    ("national", r"(?<![\w.])(?:\(0\d{1,5}\)|0\d{1,5})[ \-/.]?\d(?:[ \-.]?\d){4,11}(?![\d])"),
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
_WORD = r"[^\s\x00]*[0-9@:/\\=+][^\s\x00]*"
_CANDIDATES = re.compile(rf"(?:{_WORD}|[0-9A-Fa-f]{{64}})(?:[ \t]{_WORD})*")


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


class ValuePatterns:
    """The compiled rules (and a deployment's own, replaced by `[filtered]`)."""

    def __init__(self, extra: Iterable[re.Pattern[str]] = ()) -> None:
        parts = [f"(?P<{name}>{pattern})" for name, pattern in RULES]
        parts += [f"(?P<extra{i}>{p.pattern})" for i, p in enumerate(extra)]
        self.regex = re.compile("|".join(parts))
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

    def _candidate(self, match: re.Match[str]) -> str:
        return self.regex.sub(self._replace, match.group(0))

    def sub(self, text: str) -> str:
        # Rules that can match plain words are run over the whole text, and only when
        # their literal is there (a fast substring test); the others only over the
        # candidates: runs of tokens holding a digit, '@', ':', '/', '\\', '=' or '+'.
        if "-----BEGIN" in text or "eyJ" in text or "earer" in text:
            text = self._words.sub(self._replace_words, text)
        return _CANDIDATES.sub(self._candidate, text)
