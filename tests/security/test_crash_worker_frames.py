"""Issue 14, ingest throughput: the scrubbing worker reads its input frames in chunks
(`crashreports.worker.read_frames`) and answers those of one read in one write. Frames
must come out whole and in order however the reads cut them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from crashreports.worker import frame, read_frames


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    os.close(read_end)
    with contextlib.suppress(OSError):  # the test closed it to mark the end of the input
        os.close(write_end)


def test_frames_of_one_read_come_together_in_order(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    os.write(write_end, frame(b"one") + frame(b"") + frame(b"three"))
    os.close(write_end)
    assert list(read_frames(read_end)) == [[b"one", b"", b"three"]]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7])
def test_frames_cut_by_reads_come_whole(pipe: tuple[int, int], chunk: int) -> None:
    read_end, write_end = pipe
    sent = [b"a" * 10, b"bc", b"\x00" * 300, b"d"]
    os.write(write_end, b"".join(frame(data) for data in sent))
    os.close(write_end)
    received = [data for batch in read_frames(read_end, chunk) for data in batch]
    assert received == sent


def test_a_frame_cut_short_by_the_end_is_dropped(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    os.write(write_end, frame(b"whole") + frame(b"cut short")[:-2])
    os.close(write_end)
    assert list(read_frames(read_end)) == [[b"whole"]]


def test_no_input_gives_no_frames(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    os.close(write_end)
    assert list(read_frames(read_end)) == []
