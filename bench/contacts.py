"""Smart Contacts (RFC 9497 OPRF) against OpenMined's ECDH PSI, and the address book.

    .venv/bin/python bench/contacts.py [--quick] [--rounds 15] [--requests 5]
        [--users 100000,1000000] [--http-requests 40] [--book-rounds 5]
        [--out bench/results/contacts.json]

1. evaluate   The server's CPU per discovery request of 1,000 numbers, ours against
              the peer, `--rounds` rounds interleaved (the order alternating), each of
              `--requests` requests per side, timed with time.process_time (this
              process, all its threads). Ours: the request's JSON decoded, each
              base64 element decoded, `oprf.blind_evaluate_many` (1,000 ristretto255
              scalar multiplications in libsodium, each checking its point), the answer
              encoded; also the multiplications alone. The peer: openmined-psi 2.0.6
              (`private_set_intersection.python`, the `bench` extra; without it the
              bench runs ours alone and says so), `Request.FromString` of a client's
              1,000-item request, `ProcessRequest` (reveal_intersection=True), the
              answer serialised. Ratio ours/peer per round; median, min and max.
              Beside it, the app's CPU for the same 1,000 numbers (blind, unblind and
              tag; the peer's CreateRequest and GetIntersection against its setup).
2. setup      What an app downloads to hold the discoverable set, for each `--users`
              count: ours is the SRD1 body (contacts/tagset.py TagSet.full: 17 bytes
              and 8 per user), built from that many stored points (random 32-byte
              stand-ins for k*H(number): the tag hashes the stored point, never a
              number), with the CPU to build it; the delta an app downloads when 100
              users join (TagSet.delta). The peer: its GCS setup message at fpr 1e-9 for
              1,000 client items, built from 100,000 numbers in the same run (its CPU
              too); it has no delta: a join means a new setup, downloaded whole. Also the
              server's CPU per user to opt in (`oprf.element`) and to move a stored point
              to a new epoch's key (`oprf.rekey_many`), and what a re-key of every user costs.
3. http       p50/p99 of POST /contacts/v1/discovery/evaluate (1,000 elements) at 10
              concurrent clients against `softrelay serve` on loopback, with serve's
              CPU per request (/proc), `--http-requests` per client.
4. book       Upload and download of a 5,000-contact book through mockphone/contacts.py
              (the app's envelope: scrypt, AES-256-GCM chunks) against `softrelay serve`.

`--quick`: 5 rounds of 3 requests, users 100,000 and 1,000,000, 10 requests per client,
3 book rounds: about a minute. `os.getloadavg()` is recorded: the machine may be shared.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import importlib.metadata
import os
import platform
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Run as `python bench/contacts.py`, this file's folder comes first on sys.path and its
# name would hide the `contacts` package: the repository root goes first instead.
_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import aiohttp  # noqa: E402 - after the sys.path fix above
import orjson  # noqa: E402
import uvloop  # noqa: E402

from bench.harness import (  # noqa: E402
    Processes,
    Softrelay,
    cpu_seconds,
    nearest_rank,
    process_tree,
    spread,
    start_softrelay,
    write_result,
)
from contacts import oprf  # noqa: E402
from contacts.tagset import TagSet  # noqa: E402
from mockphone.book import Contact  # noqa: E402
from mockphone.contacts import (  # noqa: E402
    EVALUATE,
    BookClient,
    ContactsRefused,
    DiscoveryClient,
    prove_device,
)
from mockphone.pbx import MockPbx  # noqa: E402
from mockphone.sip import RelayAddress  # noqa: E402

DEFAULT_OUT = _HERE / "results" / "contacts.json"
ELEMENTS = 1000  # numbers per request: an address book's worth, the server's maximum
PEER_FPR = 1e-9
PEER_USERS = 100_000
JOINS = 100
CLIENTS = 10  # concurrent apps in the HTTP section
BOOK_CONTACTS = 5000
CHUNK = 64 * 1024  # the chunked upload's part size (serve's max_chunk_bytes is 512 KiB)
DOMAIN = "relay.bench"
SERIAL = "0019001"


def _cpu() -> float:
    return time.process_time()


def _numbers(count: int, start: int = 0) -> list[str]:
    """Distinct German mobile numbers in E.164 (what contacts/numbers.py gives)."""
    return [f"+49151{start + i:08d}" for i in range(count)]


class Peer:
    """openmined-psi through `private_set_intersection.python` (the `bench` extra).

    Imported by name, so the bench and mypy run without it: it ships no types, so its
    objects are held as Any."""

    def __init__(self) -> None:
        self.psi: Any = importlib.import_module("private_set_intersection.python")
        self.version = importlib.metadata.version("openmined-psi")
        self.server: Any = self.psi.server.CreateWithNewKey(True)
        self.client: Any = self.psi.client.CreateWithNewKey(True)

    def setup(self, numbers: Sequence[str]) -> bytes:
        gcs = self.psi.DataStructure.GCS
        message = self.server.CreateSetupMessage(PEER_FPR, ELEMENTS, list(numbers), gcs)
        out: bytes = message.SerializeToString()
        return out

    def request(self, numbers: Sequence[str]) -> bytes:
        out: bytes = self.client.CreateRequest(list(numbers)).SerializeToString()
        return out

    def process(self, request: bytes) -> bytes:
        """What the server does per request: parse it, evaluate, serialise the answer."""
        parsed = self.psi.Request.FromString(request)
        out: bytes = self.server.ProcessRequest(parsed).SerializeToString()
        return out

    def intersect(self, setup: bytes, response: bytes) -> list[int]:
        parsed_setup = self.psi.ServerSetup.FromString(setup)
        parsed = self.psi.Response.FromString(response)
        out: list[int] = self.client.GetIntersection(parsed_setup, parsed)
        return out


def load_peer() -> tuple[Peer | None, str]:
    try:
        return Peer(), ""
    except ImportError as exc:
        return None, f"openmined-psi is not installed (pip install -e '.[bench]'): {exc}"


# --- 1. the server's CPU per evaluate request -------------------------------------------


def _ours_request(key: bytes, body: bytes) -> bytes:
    """What the evaluate route does with a request's body, short of HTTP and the store."""
    request = orjson.loads(body)
    blinded = [base64.b64decode(e, validate=True) for e in request["blinded"]]
    evaluated = oprf.blind_evaluate_many(key, blinded)
    return orjson.dumps(
        {"epoch": request["epoch"], "evaluated": [base64.b64encode(e).decode() for e in evaluated]}
    )


def _timed(work: Callable[[], object], times: int) -> float:
    """CPU seconds per call of `work`, over `times` calls."""
    started = _cpu()
    for _ in range(times):
        work()
    return (_cpu() - started) / times


def evaluate_cpu(peer: Peer | None, rounds: int, requests: int) -> dict[str, Any]:
    key = oprf.new_key()
    numbers = _numbers(ELEMENTS, 50_000)  # half of them in the set of section 2's peer
    blinds, blinded = zip(*(oprf.blind(n.encode()) for n in numbers), strict=True)
    body = orjson.dumps({"epoch": 1, "blinded": [base64.b64encode(b).decode() for b in blinded]})
    answer = _ours_request(key, body)
    ours: list[float] = []
    crypto: list[float] = []
    theirs: list[float] = []
    ratios: list[float] = []
    peer_request = peer.request(numbers) if peer else b""
    peer_answer = peer.process(peer_request) if peer else b""
    for i in range(rounds):
        sides: list[tuple[str, Callable[[], object]]] = [
            ("ours", lambda: _ours_request(key, body)),
            ("crypto", lambda: oprf.blind_evaluate_many(key, blinded)),
        ]
        if peer is not None:
            sides.append(("peer", lambda: peer.process(peer_request)))
        if i % 2:
            sides.reverse()
        got = {name: _timed(work, requests) for name, work in sides}
        ours.append(got["ours"] * 1000)
        crypto.append(got["crypto"] * 1000)
        if peer is not None:
            theirs.append(got["peer"] * 1000)
            ratios.append(got["ours"] / got["peer"])
    # The app's side, once: blind, unblind and tag 1,000 numbers (ours); the peer's
    # CreateRequest and, after the answer, GetIntersection against its setup (section 2).
    evaluated = oprf.blind_evaluate_many(key, blinded)  # the server's part: not timed here
    started = _cpu()
    for number in numbers:
        oprf.blind(number.encode())
    unblinded = [oprf.unblind(b, e) for b, e in zip(blinds, evaluated, strict=True)]
    tags = [oprf.tag(point) for point in unblinded]
    app_ours = (_cpu() - started) * 1000
    result: dict[str, Any] = {
        "elements": ELEMENTS,
        "rounds": rounds,
        "requests_per_round": requests,
        "ours_cpu_ms": spread(ours),
        "ours_crypto_only_cpu_ms": spread(crypto),
        "ours_request_bytes": len(body),
        "ours_answer_bytes": len(answer),
        "ours_app_cpu_ms": round(app_ours, 1),
        "tags_checked": len(tags),
    }
    if peer is not None:
        result |= {
            "peer_cpu_ms": spread(theirs),
            "ratio_ours_to_peer": spread(ratios, 3),
            "peer_request_bytes": len(peer_request),
            "peer_answer_bytes": len(peer_answer),
        }
        started = _cpu()
        peer.request(numbers)
        result["peer_app_request_cpu_ms"] = round((_cpu() - started) * 1000, 1)
    return result


# --- 2. the setup an app downloads ------------------------------------------------------


def _tagset(points: Sequence[bytes], epoch: int) -> TagSet:
    counts: dict[bytes, int] = {}
    for point in points:
        tag = oprf.tag(point)
        counts[tag] = counts.get(tag, 0) + 1
    return TagSet(epoch, counts)


def setup_sizes(peer: Peer | None, users: Sequence[int], quick: bool) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for n in users:
        points = [os.urandom(32) for _ in range(n)]
        started = _cpu()
        tags = _tagset(points, 1)
        full = tags.full()
        built = _cpu() - started
        version = tags.version
        for point in (os.urandom(32) for _ in range(JOINS)):
            tags.add(oprf.tag(point))
        delta = tags.delta(version)
        assert delta is not None
        rows.append(
            {
                "users": n,
                "full_bytes": len(full),
                "bytes_per_user": round(len(full) / n, 3),
                "build_cpu_s": round(built, 2),
                "delta_after_joins": JOINS,
                "delta_bytes": len(delta),
            }
        )
        del points, tags, full
    # The server's work per user: opt-in (hash to the group, one multiplication) and the
    # move of a stored point to the next epoch's key (one multiplication, no number).
    key, nxt = oprf.new_key(), oprf.new_key()
    sample = 300 if quick else 2000
    numbers = [n.encode() for n in _numbers(sample)]
    started = _cpu()
    points = [oprf.element(key, n) for n in numbers]
    element_us = (_cpu() - started) / sample * 1e6
    started = _cpu()
    oprf.rekey_many(points, key, nxt)
    rekey_us = (_cpu() - started) / sample * 1e6
    result: dict[str, Any] = {
        "ours": rows,
        "stored_points": "random 32-byte stand-ins for k*H(number)",
        "opt_in_cpu_us_per_user": round(element_us, 1),
        "rekey_cpu_us_per_user": round(rekey_us, 1),
        "rekey_cpu_s_per_epoch": {str(n): round(n * rekey_us / 1e6, 1) for n in users},
    }
    if peer is not None:
        numbers_s = _numbers(PEER_USERS)
        started = _cpu()
        setup = peer.setup(numbers_s)
        result["peer"] = {
            "users": PEER_USERS,
            "fpr": PEER_FPR,
            "client_items": ELEMENTS,
            "data_structure": "GCS",
            "setup_bytes": len(setup),
            "bytes_per_user": round(len(setup) / PEER_USERS, 3),
            "build_cpu_s": round(_cpu() - started, 2),
            "delta": "none: a join means a new setup message, downloaded whole",
        }
        # The peer's answer checked against its setup: half of the request is in the set.
        request = peer.request(_numbers(ELEMENTS, PEER_USERS - ELEMENTS // 2))
        answer = peer.process(request)  # the server's part: not timed here
        started = _cpu()
        found = peer.intersect(setup, answer)
        result["peer"]["app_intersect_cpu_ms"] = round((_cpu() - started) * 1000, 1)
        result["peer"]["found"] = len(found)
    return result


# --- 3 and 4. over HTTP, against `softrelay serve` ----------------------------------------


async def _serve(procs: Processes, work: Path) -> tuple[Softrelay, str]:
    """`softrelay serve` with one PBX, and the limits of [contacts] out of the way: the
    quota and the rates bound what an attacker learns, not what a bench measures."""
    secret = secrets.token_urlsafe(24)
    fd = os.open(work / "pbx.secret", os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    (work / "softrelay.toml").write_text(
        "[logging]\nconsole = false\n"
        f'[sip]\ndomain = "{DOMAIN}"\n'
        "[sip.limits]\nmax_connections_per_ip = 0\n"
        f'[[sip.pbx]]\nserial = "{SERIAL}"\nsecret = "file:{work / "pbx.secret"}"\n'
        "[contacts]\nquota_per_day = 100000000\nglobal_elements_per_minute = 1000000000\n"
        "rate_per_minute = 0\n",
        encoding="utf-8",
    )
    try:
        return await start_softrelay(procs, work, work / "softrelay.toml"), secret
    except RuntimeError as exc:  # its log goes with the temporary directory: keep the end
        tail = (work / "serve.log").read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(" / ".join(tail) or str(exc)) from exc


async def _owners(
    session: aiohttp.ClientSession, serve: Softrelay, pbx: MockPbx, count: int
) -> list[tuple[str, str]]:
    """`count` owners proved by the PBX's digest (mockphone's prove_device): (number, token)."""
    owners = []
    for number in _numbers(count, 70_000_000):
        password = secrets.token_urlsafe(12)
        pbx.add_user(number, password)
        token = await prove_device(
            session, serve.http_url, sip_username=number, pbx_serial=SERIAL, password=password
        )
        owners.append((number, token))
    return owners


async def _evaluate_load(
    session: aiohttp.ClientSession, serve: Softrelay, tokens: Sequence[str], per_client: int
) -> dict[str, Any]:
    """Each client posts `per_client` evaluate requests of 1,000 elements, one after the
    other, all clients at once. The elements are blinded once (the app's CPU is not what
    is measured; the server cannot tell), so this process stays light."""
    probe = DiscoveryClient(session, serve.http_url, tokens[0])
    await probe.refresh()
    blinded = [oprf.blind(n.encode())[1] for n in _numbers(ELEMENTS, 80_000_000)]
    body = orjson.dumps(
        {"epoch": probe.epoch, "blinded": [base64.b64encode(b).decode() for b in blinded]}
    )
    url = serve.http_url + EVALUATE
    times: list[float] = []
    failed: dict[str, int] = {}

    async def client(token: str, n: int) -> None:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        for _ in range(n):
            started = time.monotonic()
            async with session.post(url, data=body, headers=headers) as response:
                answer = await response.read()
                status = response.status
            elapsed = time.monotonic() - started
            if status == 200 and len(orjson.loads(answer)["evaluated"]) == ELEMENTS:
                times.append(elapsed)
            else:
                failed[str(status)] = failed.get(str(status), 0) + 1

    await asyncio.gather(*(client(t, 1) for t in tokens))  # warm-up, not counted
    times.clear()
    pids = process_tree(serve.proc.pid)
    cpu, wall = cpu_seconds(pids), time.monotonic()
    await asyncio.gather(*(client(t, per_client) for t in tokens))
    wall = time.monotonic() - wall
    cpu = cpu_seconds(pids) - cpu
    ordered = sorted(times)
    done = len(ordered)
    return {
        "clients": len(tokens),
        "requests": done,
        "failed": failed,
        "p50_ms": round(1000 * nearest_rank(ordered, 0.5), 1),
        "p99_ms": round(1000 * nearest_rank(ordered, 0.99), 1),
        "max_ms": round(1000 * ordered[-1], 1) if ordered else None,
        "requests_per_s": round(done / wall, 1) if wall else None,
        "serve_cpu_ms_per_request": round(1000 * cpu / done, 1) if done else None,
        "request_bytes": len(body),
    }


async def _discover_check(
    session: aiohttp.ClientSession, serve: Softrelay, owners: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """One app's whole discovery (mockphone's DiscoveryClient: E.164, blind, evaluate,
    unblind, tag, look up) of the other owners among 1,000 numbers: it must find exactly
    them, so the figures above are of a service that works."""
    others = [number for number, _ in owners[1:]]
    book = others + _numbers(ELEMENTS - len(others), 90_000_000)
    random.Random(19).shuffle(book)
    client = DiscoveryClient(session, serve.http_url, owners[0][1])
    started = time.monotonic()
    found = await client.discover(book)
    wall = time.monotonic() - started
    return {
        "numbers": len(book),
        "discoverable_among_them": len(others),
        "matched": len(found.matched),
        "exact": found.matched == set(others),
        "wall_ms": round(1000 * wall, 1),
    }


def _book(rng: random.Random) -> list[Contact]:
    first = ["Anna", "Ben", "Chloé", "Dmitri", "Elif", "Farid", "Greta", "Hiro", "Inés", "Jonas"]
    last = ["Müller", "Schmidt", "Nguyen", "Kowalski", "Öztürk", "García", "Rossi", "Smith"]
    contacts = []
    for i in range(BOOK_CONTACTS):
        numbers = tuple(f"+49 151 {rng.randrange(10**7, 10**8)}" for _ in range(1 + (i % 3 == 0)))
        name = f"{rng.choice(first)} {rng.choice(last)} {i}"
        contacts.append(Contact(name, numbers))
    return contacts


async def _book_rounds(
    session: aiohttp.ClientSession, serve: Softrelay, token: str, rounds: int
) -> dict[str, Any]:
    """Upload and download of a 5,000-contact book, `rounds` times, interleaved: one
    device writes (seal + PUT with If-Match), another reads it whole (GET + unseal; its
    key already opened, as an app keeps it), then the same upload in 64 KiB chunks."""
    contacts = _book(random.Random(5000))
    passphrase = "correct horse battery staple " + secrets.token_hex(4)
    writer = BookClient(session, serve.http_url, token, passphrase)
    chunked = BookClient(session, serve.http_url, token, passphrase, max_chunk_bytes=CHUNK)
    reader = BookClient(session, serve.http_url, token, passphrase)
    await writer.save(contacts)  # creates it; the key's scrypt is not timed
    started = time.monotonic()
    first = await reader.read()  # a new device: the passphrase opens the key (scrypt)
    first_open = time.monotonic() - started
    if first is None or len(first) != BOOK_CONTACTS:
        raise RuntimeError("the second device did not read the book back whole")
    await chunked.read()
    assert writer.key is not None
    envelope = writer.key.seal(contacts)
    up: list[float] = []
    down: list[float] = []
    up_chunked: list[float] = []
    seal: list[float] = []
    for i in range(rounds):
        edited = [*contacts[:-1], Contact(f"Edited {i}", ("+49 151 12345678",), contacts[-1].id)]
        started = _cpu()
        writer.key.seal(edited)
        seal.append(1000 * (_cpu() - started))
        started = time.monotonic()
        await writer.save(edited)
        up.append(1000 * (time.monotonic() - started))
        reader.version = None  # read it whole, not a 304
        started = time.monotonic()
        got = await reader.read()
        down.append(1000 * (time.monotonic() - started))
        if got is None or len(got) != BOOK_CONTACTS:
            raise RuntimeError("the book read back is not the one written")
        await chunked.read()  # its If-Match names the version just written
        started = time.monotonic()
        await chunked.save([*edited[:-1], Contact(f"Chunked {i}", ("+49 151 1234567",))])
        up_chunked.append(1000 * (time.monotonic() - started))
        await writer.read()
    return {
        "contacts": BOOK_CONTACTS,
        "envelope_bytes": len(envelope),
        "rounds": rounds,
        "upload_ms": spread(up, 1),
        "download_ms": spread(down, 1),
        "upload_chunked_ms": spread(up_chunked, 1),
        "chunk_bytes": CHUNK,
        "chunked_uploads": chunked.counters.chunked,
        "app_seal_cpu_ms": spread(seal, 1),
        "first_open_new_device_ms": round(1000 * first_open, 1),
    }


async def over_http(per_client: int, book_rounds: int) -> dict[str, Any]:
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="bench-contacts-") as tmp:
        try:
            serve, secret = await _serve(procs, Path(tmp))
            address = RelayAddress(
                "127.0.0.1", serve.ports["tcp"], serve.http_url, udp_port=serve.ports["udp"]
            )
            pbx = await MockPbx.connect(
                address, serial=SERIAL, secret=secret, domain=DOMAIN, users={}
            )
            connector = aiohttp.TCPConnector(limit=0)
            try:
                async with aiohttp.ClientSession(connector=connector) as session:
                    owners = await _owners(session, serve, pbx, CLIENTS)
                    for _, token in owners:
                        await DiscoveryClient(session, serve.http_url, token).opt_in()
                    check = await _discover_check(session, serve, owners)
                    tokens = [token for _, token in owners]
                    load = await _evaluate_load(session, serve, tokens, per_client)
                    book = await _book_rounds(session, serve, tokens[0], book_rounds)
            finally:
                await pbx.close()
                await serve.stop(procs)
        finally:
            await procs.close()
    return {"discover_check": check, "evaluate": load, "book": book}


# --- the run ----------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> dict[str, Any]:
    peer, missing = load_peer()
    rounds, requests = (5, 3) if args.quick else (args.rounds, args.requests)
    users = [int(n) for n in args.users.split(",")]
    result: dict[str, Any] = {
        "bench": "contacts",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count() or 0,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        },
        "quick": args.quick,
        "peer": {"name": "openmined-psi", "version": peer.version} if peer else missing,
    }
    if missing:
        print(f"peer: {missing}; ours alone", flush=True)
    result["evaluate"] = evaluate_cpu(peer, rounds, requests)
    print(_evaluate_line(result["evaluate"]), flush=True)
    result["setup"] = setup_sizes(peer, users, args.quick)
    for line in _setup_lines(result["setup"]):
        print(line, flush=True)
    per_client, book_rounds = (10, 3) if args.quick else (args.http_requests, args.book_rounds)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result["http"] = runner.run(over_http(per_client, book_rounds))
    except (ContactsRefused, RuntimeError) as exc:
        # A tree without the routes (404), or a service that refused: said, not hidden.
        result["http"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"over HTTP: not measured: {result['http']['error']}", flush=True)
    else:
        for line in _http_lines(result["http"]):
            print(line, flush=True)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def _http_lines(http: dict[str, Any]) -> list[str]:
    check, load, book = http["discover_check"], http["evaluate"], http["book"]
    return [
        f"discovery over HTTP: {check['matched']} of {check['discoverable_among_them']} "
        f"discoverable found among {check['numbers']:,} numbers (exact: {check['exact']}), "
        f"{check['wall_ms']} ms",
        f"evaluate over HTTP, {load['clients']} clients: p50 {load['p50_ms']} ms, p99 "
        f"{load['p99_ms']} ms, {load['requests_per_s']} requests/s, serve "
        f"{load['serve_cpu_ms_per_request']} ms CPU per request ({load['requests']} requests, "
        f"failed {load['failed'] or 0})",
        f"book of {book['contacts']:,} ({book['envelope_bytes']:,} bytes sealed): upload "
        f"{book['upload_ms']['median']} ms ({book['upload_ms']['min']}-{book['upload_ms']['max']}"
        f"), download {book['download_ms']['median']} ms ({book['download_ms']['min']}-"
        f"{book['download_ms']['max']}), chunked upload {book['upload_chunked_ms']['median']} ms; "
        f"seal {book['app_seal_cpu_ms']['median']} ms CPU; first open on a new device "
        f"{book['first_open_new_device_ms']} ms",
    ]


def _evaluate_line(row: dict[str, Any]) -> str:
    line = (
        f"evaluate {row['elements']:,} elements: ours {row['ours_cpu_ms']['median']} ms CPU "
        f"({row['ours_crypto_only_cpu_ms']['median']} ms for libsodium's multiplications alone)"
    )
    if "peer_cpu_ms" in row:
        ratio = row["ratio_ours_to_peer"]
        line += (
            f", openmined-psi {row['peer_cpu_ms']['median']} ms; ours/peer "
            f"{ratio['median']} ({ratio['min']}-{ratio['max']}, {row['rounds']} rounds)"
        )
    return line


def _setup_lines(setup: dict[str, Any]) -> list[str]:
    lines = [
        f"set of {row['users']:,}: {row['full_bytes']:,} bytes ({row['bytes_per_user']} per user, "
        f"built in {row['build_cpu_s']} s CPU); {row['delta_after_joins']} joins: delta "
        f"{row['delta_bytes']:,} bytes"
        for row in setup["ours"]
    ]
    lines.append(
        f"per user: opt-in {setup['opt_in_cpu_us_per_user']} us, re-key "
        f"{setup['rekey_cpu_us_per_user']} us CPU"
    )
    if peer := setup.get("peer"):
        lines.append(
            f"openmined-psi GCS setup for {peer['users']:,} at fpr {peer['fpr']:g}: "
            f"{peer['setup_bytes']:,} bytes ({peer['bytes_per_user']} per user), built in "
            f"{peer['build_cpu_s']} s CPU; no delta"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=5, help="per side and round")
    parser.add_argument("--users", default="100000,1000000")
    parser.add_argument("--http-requests", type=int, default=40, help="per client")
    parser.add_argument("--book-rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    result = bench(args)
    write_result(args.out, result)
    print(f"wrote {args.out}")
    return 1 if "error" in result["http"] else 0


if __name__ == "__main__":
    sys.exit(main())
