"""A scrubbing worker process: `python -m crashreports.worker`, started by `Scrubbers`.

On stdin: first the pickled chains (project id -> `Chain`), then one frame per event;
on stdout: one frame per event, in the order they came. A frame is a 4-byte big-endian
length and its bytes. An event frame is `<project id> NUL <event JSON>`; an answer is
`+` and the scrubbed event's JSON, or `-` and the reason it was dropped (`no_opt_in`,
`over_budget`, `malformed`). The parent's only costs per event are a write of bytes
it holds anyway and an `orjson.loads` of the answer: no pickling, no executor threads.
"""

from __future__ import annotations

import pickle
import signal
import struct
import sys
from typing import BinaryIO

import orjson

from crashreports.scrubber import Chain, DropEvent

_LENGTH = struct.Struct(">I")


def read_frame(stream: BinaryIO) -> bytes | None:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(head)
    data = stream.read(size)
    return data if len(data) == size else None


def frame(data: bytes) -> bytes:
    return _LENGTH.pack(len(data)) + data


def answer(chains: dict[str, Chain], request: bytes) -> bytes:
    project, _, payload = request.partition(b"\x00")
    try:
        event = orjson.loads(payload)
        if not isinstance(event, dict):
            return b"-malformed"
        scrubbed = chains[project.decode()](event)
    except DropEvent as exc:
        return b"-" + exc.reason.encode()
    except orjson.JSONDecodeError:
        return b"-malformed"
    except Exception:  # a fault of ours: the event is dropped, never kept unscrubbed
        return b"-scrub_error"
    return b"+" + orjson.dumps(scrubbed)


def main() -> int:
    from crashreports.workers import warm_up

    # The server stops its workers by closing their input, after its requests in flight
    # are answered; a Ctrl-C or SIGTERM to the whole process group must not cut them
    # short. If the server dies, the end of the input ends the worker too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    setup = read_frame(stdin)
    if setup is None:
        return 1
    # The parent started this process and wrote these bytes itself: they are trusted.
    chains: dict[str, Chain] = pickle.loads(setup)  # noqa: S301
    for chain in {id(c): c for c in chains.values()}.values():
        warm_up(chain)
    stdout.write(frame(b"ready"))
    stdout.flush()
    while (request := read_frame(stdin)) is not None:
        stdout.write(frame(answer(chains, request)))
        stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
