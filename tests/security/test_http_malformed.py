"""Nothing personal on stdout or stderr, and no request makes a 500 (issue 14, point 6).

A real `softrelay serve` (console log on, as shipped) gets malformed requests over raw
sockets from several 127.x.y.z sources, each carrying canary values in Authorization
and Cookie: a bad request line, an oversized header, broken chunked encoding, JSON
nested 10,000 deep, a lone surrogate (raw \\xed\\xa0\\x80) in a header, a body that is
not the gzip it claims. Each gets a 4xx (a JSON reason wherever a handler was
reached), and afterwards the process's stdout and stderr hold no canary and no
client address."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.peers import STEP_TIMEOUT, http_base, spawn_serve

CANARY = "CANARYf3a9"
SURROGATE = b"\xed\xa0\x80"
DEEP = b"[" * 10_000 + b"]" * 10_000
DSR_BODY = b'{"sip_username": "alice", "pbx_serial": "0042137"}'
PING_BODY = (
    b'{"tenant": "acme", "period": "2026-03", "pid": "00000000000000000000000000000000",'
    b' "platform": "ios", "app_version": "1.0"}'
)


def canaries(n: int) -> bytes:
    auth = f"Authorization: Bearer {CANARY}-auth-{n}\r\n"
    return (auth + f"Cookie: session={CANARY}-cookie-{n}\r\n").encode()


def post(path: str, n: int, body: bytes, *headers: bytes) -> bytes:
    head = b"".join(h + b"\r\n" for h in headers)
    return (
        f"POST {path} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n".encode()
        + canaries(n)
        + head
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )


# (request, whether a handler answers it: then the reason is JSON)
REQUESTS: list[tuple[bytes, bool]] = [
    (b"GARBAGE " + CANARY.encode() + b" HTTP/1.1\r\n" + canaries(0) + b"\r\n", False),
    (
        b"GET /healthz HTTP/1.1\r\nHost: relay\r\n"
        + canaries(1)
        + b"X-Big: "
        + b"A" * 20_000
        + b"\r\n\r\n",
        False,
    ),
    (
        b"POST /usage/v1/ping HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        + canaries(2)
        + b"Transfer-Encoding: chunked\r\n\r\nzz"
        + CANARY.encode()
        + b"\r\n",
        False,
    ),
    (post("/dsr/v1/challenge", 3, DEEP), True),
    (post("/dsr/v1/export", 4, DSR_BODY, b"X-Proof: " + CANARY.encode() + SURROGATE), True),
    (
        b"POST /usage/v1/ping HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer "
        + CANARY.encode()
        + SURROGATE
        + b"\r\n"
        + f"Content-Length: {len(PING_BODY)}\r\nConnection: close\r\n\r\n".encode()
        + PING_BODY,
        True,
    ),
    (post("/usage/v1/ping", 6, b"not gzip " + CANARY.encode(), b"Content-Encoding: gzip"), True),
    (post("/dsr/v1/challenge", 7, b"not gzip " + CANARY.encode(), b"Content-Encoding: gzip"), True),
    (post("/dsr/v1/challenge", 8, b'"\\ud800' + CANARY.encode() + b'"'), True),
]
SOURCES = [f"127.{20 + i}.{7 * i + 3}.{200 - i}" for i in range(len(REQUESTS))]


async def answer(port: int, source: str, raw: bytes) -> bytes:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), STEP_TIMEOUT
    )
    try:
        writer.write(raw)
        return await asyncio.wait_for(reader.read(), STEP_TIMEOUT)
    finally:
        writer.close()


async def test_malformed_requests_get_4xx_and_leave_nothing_on_stdout_or_stderr(
    tmp_path: Path,
) -> None:
    proc = await spawn_serve(tmp_path / "var")
    try:
        port = int((await http_base(proc)).rsplit(":", 1)[1])
        for (raw, handled), source in zip(REQUESTS, SOURCES, strict=True):
            reply = await answer(port, source, raw)
            status_line, _, rest = reply.partition(b"\r\n")
            status = int(status_line.split()[1])
            assert 400 <= status < 500, (source, reply[:300])
            if handled:
                head, _, body = rest.partition(b"\r\n\r\n")
                assert b"application/json" in head, reply[:300]
                assert "error" in json.loads(body), body
        proc.terminate()
        out, err = await asyncio.wait_for(proc.communicate(), STEP_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = out + err
    # aiohttp did log its errors (a marker with the exception's class), and nothing else.
    assert b'"logger":"aiohttp.server","event":"log.library_record"' in err
    assert CANARY.encode() not in output, output.decode(errors="replace")[-3000:]
    for source in SOURCES:
        assert source.encode() not in output, source
    assert b"Traceback" not in output
