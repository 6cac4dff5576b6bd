"""Sentry envelopes: a JSON header line, then items, each a JSON header line and a payload.

    {"event_id": "...", "dsn": "...", "sent_at": "..."}\n
    {"type": "event", "length": 1234}\n
    <1234 bytes of payload>\n
    {"type": "session"}\n
    <payload up to the next newline>\n

An item's payload is `length` bytes when its header says so, else the bytes up to the
next newline. Anything else is an `EnvelopeError`, answered 400 with its message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

MAX_ITEMS = 100


class EnvelopeError(ValueError):
    """A body that is not a valid envelope; the message says why (no payload bytes)."""


@dataclass(frozen=True, slots=True)
class Item:
    type: str
    headers: dict[str, Any]
    payload: bytes


@dataclass(frozen=True, slots=True)
class Envelope:
    headers: dict[str, Any]
    items: tuple[Item, ...]


def _json_line(body: bytes, start: int, what: str) -> tuple[dict[str, Any], int]:
    end = body.find(b"\n", start)
    if end < 0:
        end = len(body)
    try:
        value = orjson.loads(body[start:end])
    except orjson.JSONDecodeError:
        raise EnvelopeError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise EnvelopeError(f"{what} is not a JSON object")
    return value, end + 1


def parse_envelope(body: bytes, max_items: int = MAX_ITEMS) -> Envelope:
    if not body.strip():
        raise EnvelopeError("empty envelope")
    headers, pos = _json_line(body, 0, "envelope header")
    items: list[Item] = []
    while pos < len(body):
        if body[pos : pos + 1] == b"\n":  # blank line between items (or at the end)
            pos += 1
            continue
        if len(items) >= max_items:
            raise EnvelopeError(f"more than {max_items} items")
        where = f"item {len(items) + 1} header"
        item_headers, pos = _json_line(body, pos, where)
        kind = item_headers.get("type")
        if not isinstance(kind, str) or not kind:
            raise EnvelopeError(f"{where} has no type")
        length = item_headers.get("length")
        if length is None:
            end = body.find(b"\n", pos)
            end = len(body) if end < 0 else end
            payload, pos = body[pos:end], end + 1
        elif isinstance(length, int) and not isinstance(length, bool) and length >= 0:
            if pos + length > len(body):
                raise EnvelopeError(f"{where}: length {length} runs past the end")
            payload, pos = body[pos : pos + length], pos + length
        else:
            raise EnvelopeError(f"{where}: length must be a non-negative integer")
        items.append(Item(kind, item_headers, payload))
    return Envelope(headers, tuple(items))


def build_event_envelope(event: dict[str, Any], sent_at: str) -> bytes:
    """An envelope holding one event (what the forwarder sends upstream)."""
    payload = orjson.dumps(event)
    header = {"event_id": event.get("event_id"), "sent_at": sent_at}
    item = {"type": "event", "length": len(payload), "content_type": "application/json"}
    return b"\n".join((orjson.dumps(header), orjson.dumps(item), payload)) + b"\n"
