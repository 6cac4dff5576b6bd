"""`webapi.body.read_capped`: the whole body up to its cap, whether it had all arrived
when the read began (taken at once) or arrives while it is read, and never more."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import StreamReader
from aiohttp.base_protocol import BaseProtocol
from aiohttp.web_protocol import RequestPayloadError

from webapi.body import BadBody, BodyTooLarge, read_capped

LIMIT = 16


def _stream(*chunks: bytes, eof: bool = True) -> StreamReader:
    loop = asyncio.get_running_loop()
    protocol = BaseProtocol(loop)
    protocol.connection_made(asyncio.Transport())  # connected: a read may wait for data
    stream = StreamReader(protocol, 2**16, loop=loop)
    for chunk in chunks:
        stream.feed_data(chunk)
    if eof:
        stream.feed_eof()
    return stream


@pytest.mark.parametrize("chunks", [(), (b"a" * LIMIT,), (b"ab", b"", b"cd" * 7)])
async def test_a_body_that_has_arrived_is_read_whole_up_to_the_cap(
    chunks: tuple[bytes, ...],
) -> None:
    stream = _stream(*chunks)
    assert await read_capped(stream, LIMIT) == b"".join(chunks)
    assert stream.at_eof()


async def test_a_body_that_has_arrived_over_the_cap_is_refused_taking_one_byte_more() -> None:
    stream = _stream(b"a" * 10, b"b" * 10)
    with pytest.raises(BodyTooLarge) as refused:
        await read_capped(stream, LIMIT)
    assert not refused.value.declared
    assert await stream.read() == b"b" * 3, "only limit + 1 bytes were taken"


async def test_a_declared_length_over_the_cap_is_refused_before_a_read() -> None:
    stream = _stream(b"a")
    with pytest.raises(BodyTooLarge) as refused:
        await read_capped(stream, LIMIT, declared=LIMIT + 1)
    assert refused.value.declared
    assert await stream.read() == b"a"


async def test_a_body_still_arriving_is_read_as_it_comes_and_capped() -> None:
    stream = _stream(b"ab", eof=False)
    reading = asyncio.create_task(read_capped(stream, LIMIT))
    await asyncio.sleep(0)  # one step of the task: it has read "ab" and waits for more
    assert not reading.done()
    stream.feed_data(b"cd")
    stream.feed_eof()
    assert await reading == b"abcd"

    stream = _stream(b"a" * LIMIT, eof=False)
    reading = asyncio.create_task(read_capped(stream, LIMIT))
    stream.feed_data(b"b")
    with pytest.raises(BodyTooLarge):
        await reading


@pytest.mark.parametrize("eof", [True, False])
async def test_a_body_aiohttp_could_not_decode_is_a_bad_body(eof: bool) -> None:
    stream = _stream(b"ab", eof=eof)
    stream.set_exception(RequestPayloadError("Not enough data for satisfy content length"))
    with pytest.raises(BadBody):
        await read_capped(stream, LIMIT)
