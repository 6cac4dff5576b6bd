"""`serve` pins glibc's mmap threshold (softrelay/allocator.py): a 256 KiB block, the
size of uvloop's TLS read buffer, stays a fresh mmap after one like it was freed, and
nothing is called where the C library is not glibc."""

from __future__ import annotations

import ctypes
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import softrelay.cli
from softrelay.allocator import M_MMAP_THRESHOLD, MMAP_THRESHOLD, pin_mmap_threshold
from softrelay.cli import main
from tests.limits import LONGEST_WAIT

GLIBC = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")

# In a process of its own (the threshold is the process's): free one mmapped 256 KiB
# block, pin or not, then print whether the next 256 KiB block is mmapped (mallinfo2's
# count of mmapped blocks grows by it) or taken from the heap (it does not).
_PROBE = """
import ctypes, sys
from softrelay.allocator import pin_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
SIZE = 256 * 1024
libc.free(libc.malloc(SIZE))  # glibc's dynamic threshold now lies above SIZE
if sys.argv[1] == "pin":
    assert pin_mmap_threshold()
before = libc.mallinfo2().hblks
block = libc.malloc(SIZE)
print(libc.mallinfo2().hblks - before)
libc.free(block)
"""


def _mmapped_after_a_free(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        capture_output=True,
        text=True,
        timeout=LONGEST_WAIT,
        cwd=Path(__file__).resolve().parent.parent,
        check=True,
    )
    return int(done.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_pinned_threshold_keeps_a_256_kib_block_out_of_the_heap_after_a_free() -> None:
    assert _mmapped_after_a_free("default") == 0  # glibc's dynamic threshold: the heap
    assert _mmapped_after_a_free("pin") == 1


class _Glibc:
    def __init__(self, answer: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

    def gnu_get_libc_version(self) -> bytes:
        return b"2.36"

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


class _OtherLibc:
    """A C library without glibc's marker (musl, macOS), with a `mallopt` of its own."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


def test_pins_glibcs_mmap_threshold_at_128_kib() -> None:
    libc = _Glibc()
    assert pin_mmap_threshold(libc)
    assert libc.calls == [(M_MMAP_THRESHOLD, MMAP_THRESHOLD)] == [(-3, 131072)]


def test_says_so_when_glibc_refuses() -> None:
    libc = _Glibc(answer=0)
    assert not pin_mmap_threshold(libc)
    assert libc.calls == [(-3, 131072)]


def test_calls_nothing_without_glibc() -> None:
    libc = _OtherLibc()
    assert not pin_mmap_threshold(libc)
    assert libc.calls == []


def test_serve_pins_the_threshold_before_it_listens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every worker runs serve's start-up too (workers.worker_command: `serve --worker`).
    pinned: list[bool] = []
    monkeypatch.setattr(softrelay.cli, "pin_mmap_threshold", lambda: pinned.append(True))
    with socket.socket() as busy:  # serve stops at its first listening socket
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(
            ["serve", "--data-dir", str(tmp_path), "--http-port", str(port), "--sip-port", "0"]
        )
    assert code == 2
    assert "cannot start" in capsys.readouterr().err
    assert pinned == [True]
