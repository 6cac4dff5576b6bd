"""RFC 6455 framing of the lean SIP WebSocket path (proxy/sip/wsframes.py), without
I/O: the handshake's accept key, client frames read in every split, and each way a
client frame breaks the protocol failing with the close code RFC 6455 names."""

from __future__ import annotations

import os

import pytest

from proxy.sip.wsframes import (
    CloseCode,
    FrameError,
    Opcode,
    accept_key,
    close_code,
    close_frame,
    frame,
    read_frame,
    unmask,
)

LIMIT = 4096


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = b"\x01\x02\x03\x04"
) -> bytes:
    """A frame as a client sends it (masked unless `mask` is None)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_accept_key_is_rfc_6455s_example_and_bad_keys_are_none() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert accept_key("") is None
    assert accept_key("not base64!") is None
    assert accept_key("dGhlIHNhbXBsZQ==") is None  # base64 of 10 octets, not 16


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_a_frame_of_each_length_encoding_reads_back_only_once_complete(size: int) -> None:
    payload = os.urandom(size)
    data = client_frame(Opcode.BINARY, payload)
    limit = 1 << 20
    for cut in {0, 1, 2, 3, 5, 9, len(data) - 1} - {len(data)}:
        if 0 <= cut < len(data):
            assert read_frame(data[:cut], 0, limit) is None
    assert read_frame(data, 0, limit) == (True, Opcode.BINARY, payload, len(data))
    # At an offset, as the link reads several frames of one chunk.
    assert read_frame(b"xy" + data, 2, limit) == (True, Opcode.BINARY, payload, len(data) + 2)


def test_unmask_matches_the_per_octet_xor() -> None:
    mask = b"\xa1\xb2\xc3\xd4"
    for size in (0, 1, 3, 4, 5, 1000):
        payload = os.urandom(size)
        assert unmask(mask, payload) == bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame(Opcode.TEXT, b"x", mask=None), CloseCode.PROTOCOL_ERROR),  # unmasked
        (bytes([0xC1]) + client_frame(Opcode.TEXT, b"x")[1:], CloseCode.PROTOCOL_ERROR),  # RSV1
        (client_frame(0x3, b"x"), CloseCode.PROTOCOL_ERROR),  # reserved opcode
        (client_frame(Opcode.PING, b"p" * 126), CloseCode.PROTOCOL_ERROR),  # control > 125
        (client_frame(Opcode.PING, b"p", fin=False), CloseCode.PROTOCOL_ERROR),  # fragmented
    ],
    ids=["unmasked", "rsv", "opcode", "long-control", "fragmented-control"],
)
def test_a_broken_frame_fails_with_its_close_code(data: bytes, code: CloseCode) -> None:
    with pytest.raises(FrameError) as failed:
        read_frame(data, 0, LIMIT)
    assert failed.value.code is code


def test_a_frame_over_the_limit_fails_on_its_header_before_its_payload_arrives() -> None:
    head = client_frame(Opcode.BINARY, b"x" * (LIMIT + 1))[:8]  # 2 + 2 length + 4 mask
    with pytest.raises(FrameError) as failed:
        read_frame(head[:4], 0, LIMIT)
    assert failed.value.code is CloseCode.MESSAGE_TOO_BIG
    assert read_frame(client_frame(Opcode.BINARY, b"x" * LIMIT), 0, LIMIT) is not None


def test_server_frames_are_final_unmasked_and_sized_in_each_encoding() -> None:
    assert frame(Opcode.TEXT, b"hi") == b"\x81\x02hi"
    assert frame(Opcode.BINARY, b"x" * 126)[:4] == b"\x82\x7e\x00\x7e"
    assert frame(Opcode.BINARY, b"x" * 65536)[:10] == b"\x82\x7f" + (65536).to_bytes(8, "big")
    assert close_frame(CloseCode.GOING_AWAY) == b"\x88\x02\x03\xe9"
    assert close_frame(None) == b"\x88\x00"


def test_close_codes_a_peer_may_send_are_read_and_others_fail() -> None:
    assert close_code(b"") is None
    assert close_code((1000).to_bytes(2, "big") + b"bye") == 1000
    assert close_code((4000).to_bytes(2, "big")) == 4000
    for bad in (999, 1004, 1005, 1006, 1015, 2000, 5000):
        with pytest.raises(FrameError) as failed:
            close_code(bad.to_bytes(2, "big"))
        assert failed.value.code is CloseCode.PROTOCOL_ERROR
    with pytest.raises(FrameError):
        close_code(b"\x03")
    with pytest.raises(FrameError) as failed:
        close_code((1000).to_bytes(2, "big") + b"\xff")
    assert failed.value.code is CloseCode.INVALID_TEXT
