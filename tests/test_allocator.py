"""`serve` pins glibc's mmap threshold (softrelay/allocator.py): a 256 KiB block, the
size of uvloop's TLS read buffer, stays a fresh mmap after one like it was freed, up to
half the kernel's mapping limit; nothing is called where the C library is not glibc."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

import softrelay.cli
from softrelay.allocator import M_MMAP_MAX, M_MMAP_THRESHOLD, MMAP_THRESHOLD, pin_mmap_threshold
from tests.limits import LONGEST_WAIT
from tests.test_cli import serve_on_a_busy_port

GLIBC = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")

# In a process of its own (the threshold is the process's): free one mmapped 256 KiB
# block, pin or not, then print whether the next 256 KiB block is mmapped (mallinfo2's
# count of mmapped blocks grows by it) or taken from the heap (it does not).
_PROBE = """
import ctypes, sys
from pathlib import Path
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
before = libc.mallinfo2().hblks
if sys.argv[1] == "pin":
    # A kernel limit of 2 * (what is mmapped now + 3): room for 3 more mmapped blocks.
    limit = Path(sys.argv[2])
    limit.write_text(f"{2 * (before + 3)}\\n")
    assert pin_mmap_threshold(max_map_count=limit)
blocks = [libc.malloc(SIZE) for _ in range(5)]
print(libc.mallinfo2().hblks - before)
for block in blocks:
    libc.free(block)
"""


def _mmapped_after_a_free(*args: str) -> int:
    """How many of 5 blocks of 256 KiB, allocated after one was freed, are mmapped."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        capture_output=True,
        text=True,
        timeout=LONGEST_WAIT,
        cwd=Path(__file__).resolve().parent.parent,
        check=True,
    )
    return int(done.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_pinned_threshold_keeps_256_kib_blocks_out_of_the_heap_up_to_the_cap(
    tmp_path: Path,
) -> None:
    assert _mmapped_after_a_free("default") == 0  # glibc's dynamic threshold: the heap
    # Pinned: mmapped, 3 of them, the cap's room; the other 2 from the heap.
    assert _mmapped_after_a_free("pin", str(tmp_path / "max_map_count")) == 3


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


def test_pins_the_threshold_at_128_kib_and_caps_mmaps_at_half_the_kernels_limit(
    tmp_path: Path,
) -> None:
    limit = tmp_path / "max_map_count"
    limit.write_text("65530\n")
    libc = _Glibc()
    assert pin_mmap_threshold(libc, limit)
    assert libc.calls == [(M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_MMAP_MAX, 32765)]
    assert libc.calls == [(-3, 131072), (-4, 32765)]


def test_an_unreadable_kernel_limit_leaves_glibcs_cap(tmp_path: Path) -> None:
    libc = _Glibc()
    assert pin_mmap_threshold(libc, tmp_path / "absent")
    assert libc.calls == [(-3, 131072)]


def test_says_so_when_glibc_refuses(tmp_path: Path) -> None:
    limit = tmp_path / "max_map_count"
    limit.write_text("65530\n")
    libc = _Glibc(answer=0)
    assert not pin_mmap_threshold(libc, limit)
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
    assert serve_on_a_busy_port(tmp_path) == 2
    assert "cannot start" in capsys.readouterr().err
    assert pinned == [True]
