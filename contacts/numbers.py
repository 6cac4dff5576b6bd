"""Phone numbers to E.164, the same way on the app and on the server.

Discovery only works when both sides turn one number into the same bytes: the app
hashes the E.164 form of each contact's number, the server the E.164 form of an owner's
SIP user name. `phonenumbers` (libphonenumber's metadata) decides what is a valid
number; anything it does not call valid gives None, never an exception, so one odd
entry in an address book cannot stop a discovery run.

International forms ("+49 30 123456", "0049 30 123456") parse everywhere; a national
form ("030 123456") only with a region, because without one it is ambiguous. Letters
are refused rather than read as a keypad vanity number ("+1 800 FLOWERS"): a SIP user
name "alice" is never a phone number.
"""

from __future__ import annotations

from collections.abc import Iterable

import phonenumbers

# Longer than any number with its separators: bounds the work spent on hostile input
# (libphonenumber itself allows 250 characters).
MAX_TEXT = 64
# The visual separators of RFC 3966 (tel URIs, SIP user names) and of address books.
_SEPARATORS = frozenset(" \t-.()/\u00a0")


def e164(text: str, region: str = "") -> str | None:
    """`text` as an E.164 string ("+4930123456"), or None when it is not a valid number.

    `region` (ISO 3166-1 alpha-2, e.g. "DE") reads a national form; "" reads only the
    international ones.
    """
    text = text.strip()
    if not text or len(text) > MAX_TEXT:
        return None
    plus = text.startswith("+")
    body = text[1:] if plus else text
    digits = []
    for char in body:
        if char.isdecimal():
            digits.append(char)
        elif char not in _SEPARATORS:
            return None  # letters, '+' inside, ';ext=', '@', '*', '#'...
    if not digits:
        return None
    number = "".join(digits)
    if plus:
        number = "+" + number
    elif number.startswith("00"):
        # The international prefix of most of the world; the region's own prefix (011
        # in North America) is left to libphonenumber when a region is given.
        number = "+" + number[2:]
    elif not region:
        return None
    try:
        parsed = phonenumbers.parse(number, region or None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def e164_many(texts: Iterable[str], region: str = "") -> list[str | None]:
    """e164 of each text, in order (None where a text is not a valid number)."""
    return [e164(text, region) for text in texts]
