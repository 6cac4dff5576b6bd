"""Which paths the provisioning relay passes on to a PBX.

A PBX's provisioning server is whatever HTTP server the PBX runs: it may decode a path
once more, split `;` parameters off, read `\\` as a separator, fold Unicode look-alikes
or trim trailing dots. So the relay judges a path by every meaning a server could give
it, not by its literal text: it decodes percent-escapes (and IIS's `%uXXXX`) until
nothing changes (a bounded number of rounds; invalid UTF-8, as overlong forms like
`%c0%ae` are, is refused), normalises the result (NFKC: a fullwidth full stop U+FF0E or a
two-dot leader U+2025 is dots), and refuses it if any form holds a dot segment, a
backslash, a `;`, a `?` or `#`, or a control character. The path the PBX
receives is then the server's one decoding, unchanged: judged, not rewritten.
"""

from __future__ import annotations

import re
import unicodedata
import urllib.parse

# aiohttp decoded the path once; real double encoding needs one more round, and a
# path still changing after this many more is refused rather than followed.
MAX_DECODES = 4
# C0 and C1 controls and DEL (NUL included).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# IIS's non-standard `%u002e`: one more decoding a server might apply.
_U_ESCAPE = re.compile(r"%u([0-9a-fA-F]{4})")
# `;` starts path parameters (Tomcat, Jetty: `..;/`), `\` is a separator on Windows
# servers, `?` and `#` would end the path on the PBX's side once decoded.
_SEPARATORS = re.compile(r"[\\;?#]")


class BadPath(ValueError):
    """A path the relay refuses to pass on; the message says why, without the path."""


def check_path(path: str) -> None:
    """Raise BadPath unless every reading of `path` stays below the PBX's root."""
    for form in _readings(path):
        if _CONTROL.search(form):
            raise BadPath("control characters are not allowed")
        if _SEPARATORS.search(form):
            raise BadPath("'\\', ';', '?' and '#' are not allowed in a path")
        if any(_is_dot_segment(segment) for segment in form.split("/")):
            raise BadPath("'.' and '..' segments are not allowed, in any encoding")


def _readings(path: str) -> list[str]:
    """The path, each further percent-decoding of it until stable, and their NFKC forms."""
    forms = [path]
    for _ in range(MAX_DECODES + 1):  # each round that changes it, then one that does not
        try:
            decoded = urllib.parse.unquote(forms[-1], errors="strict")
        except UnicodeDecodeError:
            raise BadPath("percent-escapes that are not UTF-8 (overlong forms)") from None
        decoded = _U_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), decoded)
        if decoded == forms[-1]:
            break
        forms.append(decoded)
    else:
        raise BadPath(f"percent-encoded more than {MAX_DECODES} times over")
    return forms + [unicodedata.normalize("NFKC", form) for form in forms]


def _is_dot_segment(segment: str) -> bool:
    # Windows servers trim trailing dots and spaces, so `...` and `.. ` read as `..`.
    return "." in segment and not segment.strip(". \t")
