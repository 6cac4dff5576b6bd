"""contacts/numbers.py: the same E.164 string for every way an address book or a SIP
user name writes one number; national forms only with a region; None, never an
exception, for anything libphonenumber does not call a valid number."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contacts.numbers import MAX_TEXT, e164, e164_many


@pytest.mark.parametrize(
    ("text", "region", "expected"),
    [
        # Germany: international with + or 00, national with the region, separators.
        ("+49 30 1234567", "", "+49301234567"),
        ("0049 30 1234567", "", "+49301234567"),
        # The "(0)" of German and British cards: the trunk prefix, dropped.
        ("+49 (0)30 1234567", "", "+49301234567"),
        ("+44 (0)7911 123456", "", "+447911123456"),
        ("030 1234567", "DE", "+49301234567"),
        ("(030) 123-45-67", "DE", "+49301234567"),
        ("0151 23456789", "DE", "+4915123456789"),
        ("+49-151-234.567.89", "", "+4915123456789"),
        # The United States: its own international prefix (011) needs the region.
        ("+1 (415) 555-2671", "", "+14155552671"),
        ("415 555 2671", "US", "+14155552671"),
        ("011 49 30 1234567", "US", "+49301234567"),
        # The United Kingdom, Switzerland, Japan, India.
        ("+44 7911 123456", "", "+447911123456"),
        ("07911 123456", "GB", "+447911123456"),
        ("0041 44 668 18 00", "", "+41446681800"),
        ("044 668 18 00", "CH", "+41446681800"),
        ("+81 3-1234-5678", "", "+81312345678"),
        ("+91 98765 43210", "", "+919876543210"),
        # A national form is ambiguous without a region.
        ("030 1234567", "", None),
        ("4930123456", "", None),
        # A British national form read as an American one is not a valid number.
        ("07911 123456", "US", None),
    ],
)
def test_e164_of_the_ways_people_write_numbers(text: str, region: str, expected: str) -> None:
    assert e164(text, region) == expected


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "   ",
        "+",
        "00",
        "alice",
        "alice123",
        "+1 800 FLOWERS",  # keypad letters are not read as digits
        "sip:+49301234567@example.com",
        "sip:alice@example.com",
        "tel:+49301234567;ext=5",
        "+49301234567;ext=5",
        "+49 30 1234567 ext. 5",
        "+49+301234567",
        "*31#+49301234567",
        "1" * 200,
        "+" + "4" * 200,
        "+49" + "\x00" * 10,
        "+49 30 \ud800 1234567",  # a lone surrogate
        "+999 123456789",  # no such country code
        "+49 1",  # too short for Germany
    ],
)
def test_junk_is_none_never_an_exception(junk: str) -> None:
    assert e164(junk) is None
    assert e164(junk, "DE") is None


def test_an_unknown_region_reads_no_national_form() -> None:
    assert e164("030 1234567", "XX") is None
    assert e164("+49 30 1234567", "XX") == "+49301234567"


def test_e164_many_keeps_the_order_and_marks_the_invalid() -> None:
    texts = ["030 1234567", "alice", "+1 415 555 2671", ""]
    assert e164_many(texts, "DE") == ["+49301234567", None, "+14155552671", None]
    assert e164_many([]) == []


def test_text_past_the_bound_is_refused_before_parsing() -> None:
    padded = "+49 30 1234567".ljust(MAX_TEXT + 1, " ")
    assert e164(padded.strip()) == "+49301234567"
    assert e164("+49" + " " * MAX_TEXT + "301234567") is None


# Derandomized and without an example database: the same examples in every run.
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.text(max_size=80), st.sampled_from(["", "DE", "US", "GB"]))
def test_any_text_gives_none_or_a_fixed_point(text: str, region: str) -> None:
    """Whatever the text: None, or an E.164 string that maps to itself (the server
    and the app agree whichever side normalised first)."""
    result = e164(text, region)
    if result is not None:
        assert result.startswith("+")
        assert result[1:].isdigit()
        assert e164(result) == result
