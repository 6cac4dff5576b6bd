"""A scrubbing worker process: `python -m crashreports.worker`, started by `Scrubbers`.

On stdin: first the pickled chains (project id -> `Chain`), then one frame per event;
on stdout: one frame per event, in the order they came. A frame is a 4-byte big-endian
length and its bytes. An event frame is `<project id> NUL <envelope's event id> NUL
<event JSON as the client sent it>`; an answer is one of

    + <event id, 32 hex digits> <the scrubbed event's JSON, its event_id set>
    - <event id> <the reason it was dropped: no_opt_in, over_budget, scrub_error>
    ! <why the JSON is no event: "not JSON", "not a JSON object">   (answered 400)

The event is parsed here, not on the server's loop, and its scrubbed JSON goes to the
store as these bytes (`privacy.store.JsonText`): the loop's cost per event is a pipe
write and read of bytes, with no Python objects of the event on its heap (parsing an
8 KiB event there, and again its answer, cost the loop ~100 µs with the collections of
the garbage collector that its objects brought about). `answer` is also what the
"thread" mode runs.
"""

from __future__ import annotations

import copy
import itertools
import os
import pickle
import re
import signal
import struct
import sys
import uuid
from collections.abc import Iterator
from typing import BinaryIO

import orjson

from crashreports.scrubber import Chain, DropEvent, Event, ScrubTree

_LENGTH = struct.Struct(">I")
_EVENT_ID = re.compile(r"^[0-9a-f]{32}$")


def read_frame(stream: BinaryIO) -> bytes | None:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(head)
    data = stream.read(size)
    return data if len(data) == size else None


def read_frames(fd: int, chunk: int = 1 << 20) -> Iterator[list[bytes]]:
    """The whole frames on `fd` as they come, those of one read together, until its
    end (a frame cut short there is dropped, as `read_frame` does)."""
    buffer = bytearray()
    while data := os.read(fd, chunk):
        buffer += data
        frames: list[bytes] = []
        start, size = 0, len(buffer)
        while size - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, start)
            end = start + _LENGTH.size + length
            if end > size:
                break
            frames.append(bytes(buffer[start + _LENGTH.size : end]))
            start = end
        del buffer[:start]
        if frames:
            yield frames


def frame(data: bytes) -> bytes:
    return _LENGTH.pack(len(data)) + data


def event_id(value: object) -> str:
    """`value` as 32 lower-case hex digits if it is an event id (dashes allowed), else a
    new random one."""
    if isinstance(value, str):
        compact = value.replace("-", "").lower()
        if _EVENT_ID.match(compact):
            return compact
    return uuid.uuid4().hex


def answer(chains: dict[str, Chain], request: bytes) -> bytes:
    """The answer frame's bytes to an event frame's (see above)."""
    project, _, rest = request.partition(b"\x00")
    header_id, _, payload = rest.partition(b"\x00")
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return b"!not JSON"
    if not isinstance(event, dict):
        return b"!not a JSON object"
    # The event's own id first, else the envelope's (the server sends it only when it is
    # one: an empty one stands for none), else a new one.
    kept_id = event_id(event.get("event_id", header_id.decode() or None))
    try:
        scrubbed = chains[project.decode()](event)
    except DropEvent as exc:
        return b"-" + kept_id.encode() + exc.reason.encode()
    except Exception:  # a fault of ours: the event is dropped, never kept unscrubbed
        return b"-" + kept_id.encode() + b"scrub_error"
    scrubbed["event_id"] = kept_id
    return b"+" + kept_id.encode() + orjson.dumps(scrubbed)


# Text of every shape the rules look for: scrubbed once per chain before the first event,
# so that RE2 builds the DFA states of common text then, not on a report's CPU budget
# (a cold chain took ~20 ms for its first SDK event, a warm one ~1.5 ms).
_WARM_UP: Event = {
    "message": "REGISTER sip:user@pbx.example.com from 192.0.2.1:5060 and [2001:db8::1]; "
    "mail user@example.com, call +49 151 23456789, 0151 98765432 or (555) 123-4567; "
    "card 4111 1111 1111 1111, iban DE89 3704 0044 0532 0130 00, mac 00:1a:2b:3c:4d:5e; "
    "https://u:p@host/x?token=abc&x=1 /home/user/x C:\\\\Users\\\\user\\\\x tel:+4930123456 "
    'Authorization: Digest username="u", response="0" password hunter2 "A B" <sip:u@h> '
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc Bearer abcdefghijk " + "ab" * 32,
    "extra": {"ha1": "0" * 32, "display_name": "A", "version": "2.4.1 at 12:30:45"},
    "breadcrumbs": {"values": [{"message": "tapped 7", "timestamp": "2026-03-01T12:00:00Z"}]},
}


def warm_up(chain: Chain) -> None:
    """Run the rules of `chain` (its `ScrubTree` steps, no other) over `_WARM_UP`."""
    for step in chain.steps:
        if isinstance(step, ScrubTree):
            step(copy.deepcopy(_WARM_UP))


def main() -> int:
    # The server stops its workers by closing their input, after its requests in flight
    # are answered; a Ctrl-C or SIGTERM to the whole process group must not cut them
    # short. If the server dies, the end of the input ends the worker too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stdout = sys.stdout.buffer
    batches = read_frames(sys.stdin.buffer.fileno())
    first = next(batches, None)
    if first is None:
        return 1
    # The parent started this process and wrote these bytes itself: they are trusted.
    chains: dict[str, Chain] = pickle.loads(first[0])  # noqa: S301
    for chain in {id(c): c for c in chains.values()}.values():
        warm_up(chain)
    stdout.write(frame(b"ready"))
    stdout.flush()
    for requests in itertools.chain([first[1:]] if first[1:] else [], batches):
        # The frames that came in one read are answered in one write: with many reports
        # in flight, one read and one write per several events instead of two reads and
        # a write each, and the server's reader woken once for them.
        stdout.write(b"".join(frame(answer(chains, request)) for request in requests))
        stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
