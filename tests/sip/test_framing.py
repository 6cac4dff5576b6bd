"""Stream framing by Content-Length, CRLF keep-alives, and its limits."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sip.framing import (
    FramingError,
    Item,
    Keepalive,
    StreamFramer,
    datagram_keepalive,
)
from proxy.sip.parser import parse

PING = Keepalive.PING
PONG = Keepalive.PONG
CORPUS = Path(__file__).parent / "torture" / "valid"


def message(n: int, body: bytes = b"") -> bytes:
    return (
        f"OPTIONS sip:u{n}@example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP h.example;branch=z9hG4bK{n}\r\n"
        "To: <sip:u@example.com>\r\nFrom: <sip:v@example.com>;tag=1\r\n"
        f"Call-ID: c{n}\r\nCSeq: {n} OPTIONS\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def stream_messages() -> list[bytes]:
    """Corpus messages that are exactly one framed message each."""
    found = [message(1), message(2, b"v=0\r\n"), message(3, b"\r\n\r\n")]
    for path in sorted(CORPUS.glob("*.dat")):
        data = path.read_bytes()
        try:
            framed = StreamFramer().feed(data)
        except FramingError:  # dblreq: the datagram noise after its message
            continue
        if framed == [data]:
            found.append(data)
    return found


MESSAGES = stream_messages()


def feed_all(chunks: list[bytes]) -> tuple[list[Item], str | None]:
    """Feed chunks in turn; return every item and the framing error, if any."""
    framer = StreamFramer()
    items: list[Item] = []
    for chunk in chunks:
        try:
            items += framer.feed(chunk)
        except FramingError as exc:
            return items + exc.items, exc.reason
    return items, None


def test_corpus_supplies_stream_messages() -> None:
    assert len(MESSAGES) >= 12  # the framed RFC 4475 messages plus our own


def test_back_to_back_messages_are_split_by_content_length() -> None:
    a, b = message(1, b"abc"), message(2, b"\r\n\r\nINVITE x")
    framer = StreamFramer()
    assert framer.feed(a + b[:10]) == [a]
    assert framer.buffered == 10
    assert framer.feed(b[10:]) == [b]
    assert framer.buffered == 0
    assert parse(b).body == b"\r\n\r\nINVITE x"


def test_ping_and_pong_between_messages() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r\n") == [PING]
    assert framer.feed(b"\r\n\r\n\r\n\r\n" + message(1)) == [PING, PING, message(1)]
    assert framer.feed(b"\r\n" + message(2)) == [PONG, message(2)]


def test_a_trailing_crlf_waits_to_see_whether_it_is_a_ping() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n") == []
    assert framer.feed(b"\r") == []
    assert framer.feed(b"\n") == [PING]
    assert framer.feed(b"\r\n") == []
    assert framer.feed(b"O") == [PONG]
    assert framer.buffered == 1


def test_missing_content_length_is_a_framing_error() -> None:
    data = message(1).replace(b"Content-Length: 0\r\n", b"")
    with pytest.raises(FramingError, match="Missing Content-Length"):
        StreamFramer().feed(data)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"Content-Length: -1", "Bad Content-Length"),
        (b"Content-Length: ", "Bad Content-Length"),
        (b"Content-Length: 1\r\nl: 2", "Conflicting Content-Length"),
        (b"content-length : 70000", "Message too large"),
    ],
)
def test_bad_content_length_is_a_framing_error(header: bytes, reason: str) -> None:
    data = message(1).replace(b"Content-Length: 0", header)
    with pytest.raises(FramingError, match=reason):
        StreamFramer().feed(data)


def test_compact_content_length_frames_too() -> None:
    data = message(1, b"xyz").replace(b"Content-Length:", b"L :")
    assert StreamFramer().feed(data + data) == [data, data]


def test_a_peer_that_never_ends_its_headers_is_cut_off() -> None:
    framer = StreamFramer(max_message_size=1000)
    assert framer.feed(message(1)) == [message(1)]
    framer.feed(b"INVITE sip:x SIP/2.0\r\n" + b"X: y\r\n" * 100)
    with pytest.raises(FramingError, match="Message too large") as err:
        framer.feed(b"X: y\r\n" * 100)
    assert err.value.items == []
    with pytest.raises(FramingError):
        framer.feed(message(2))  # a failed framer stays failed


def test_messages_framed_before_an_error_are_handed_over() -> None:
    bad = message(2).replace(b"Content-Length: 0\r\n", b"")
    with pytest.raises(FramingError) as err:
        StreamFramer().feed(message(1) + b"\r\n\r\n" + bad)
    assert err.value.items == [message(1), PING]


def test_a_body_larger_than_the_limit_is_refused_before_it_arrives() -> None:
    head = message(1).replace(b"Content-Length: 0", b"Content-Length: 2000")
    with pytest.raises(FramingError, match="Message too large"):
        StreamFramer(max_message_size=1000).feed(head)


def test_datagram_keepalives() -> None:
    assert datagram_keepalive(b"\r\n\r\n") is PING
    assert datagram_keepalive(b"\r\n") is PONG
    assert datagram_keepalive(message(1)) is None


stream_items = st.lists(
    st.one_of(st.sampled_from(MESSAGES), st.just(b"\r\n\r\n"), st.just(b"\r\n")),
    max_size=8,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(items=stream_items, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_byte_by_byte_and_any_chunking_frame_like_the_whole(
    items: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(items)
    whole = feed_all([stream])
    assert feed_all([stream[i : i + 1] for i in range(len(stream))]) == whole
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    assert feed_all([stream[a:b] for a, b in pairwise(points)]) == whole


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(items=st.lists(st.one_of(st.sampled_from(MESSAGES), st.just(b"\r\n\r\n")), max_size=8))
def test_messages_and_pings_come_out_as_they_went_in(items: list[bytes]) -> None:
    expected = [PING if item == b"\r\n\r\n" else item for item in items]
    assert feed_all([b"".join(items)]) == (expected, None)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(stream=st.binary(max_size=3000), cut=st.integers(min_value=0, max_value=3000))
def test_random_octets_never_break_the_framer(stream: bytes, cut: int) -> None:
    whole = feed_all([stream])
    assert feed_all([stream[:cut], stream[cut:]]) == whole
    assert feed_all([stream[i : i + 1] for i in range(len(stream))]) == whole
