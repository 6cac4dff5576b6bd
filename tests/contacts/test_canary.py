"""Against a real `softrelay serve` with contacts on: two devices of one account upload and
read back a book of contacts with canary names and numbers (in chunks, and in one PUT);
discovery asks about canary numbers that match nobody; then `softrelay simulate` with
the contacts mix plays against the same server and reports no fault. Stopped, `softrelay
audit --canary` (which decrypts the at-rest layer of every encrypted field too) finds
none of the canaries on disk, in the log files or in the service's captured stdout and
stderr; the same audit does find the owner's own number, which the store keeps
(encrypted): the scan can see what it looks for."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from contacts.numbers import e164
from mockphone.book import Contact
from mockphone.contacts import BookClient, DiscoveryClient, prove_device
from mockphone.pbx import MockPbx
from mockphone.sip import RelayAddress
from tests import peers
from tests.limits import LONGEST_WAIT

OWNER = "+4930901820"  # the SIP user name: a phone number, proved by the PBX
PASSWORD = "sip-password-9d2c"
PASSPHRASE = "sync passphrase of the canary test"
NAMES = ["Canaryname Quokkabert", "Zanderine Canarywitz", "Ölfried Kanarienvogel"]
# As the address book has them, each in another form; discovery normalises them (DE).
NUMBERS = ["0221 5550 9876", "+33 1 45 55 17 42", "0711/5551-2345", "+41 44 555 12 34"]
E164 = [e164(n, "DE") for n in NUMBERS]
CONFIG = """
[contacts]
max_chunk_bytes = 8192
rate_per_minute = 0
"""


def _canaries() -> list[str]:
    """Every name, every number as written, in E.164 and as bare digits."""
    forms = [*NAMES, *NUMBERS]
    for number in E164:
        assert number is not None
        forms += [number, number.removeprefix("+")]
    return forms


def _book() -> list[Contact]:
    """The canaries, and enough noise that the envelope needs chunks of 8 KiB."""
    book = [Contact(name, (number,)) for name, number in zip(NAMES, NUMBERS, strict=False)]
    book.append(Contact("Plain Person", (NUMBERS[-1],)))
    book += [
        Contact(f"filler {i:04d} {'x' * (i % 7)}", (f"+4989{4000000 + i}",)) for i in range(600)
    ]
    return book


async def test_no_canary_of_a_book_or_a_discovery_reaches_disk_logs_or_output(
    tmp_path: Path,
) -> None:
    server = await peers.start_server(tmp_path, CONFIG)
    try:
        async with asyncio.timeout(LONGEST_WAIT):
            base = f"http://127.0.0.1:{server.http_port()}"
            relay = RelayAddress("127.0.0.1", server.ports["tcp"], base)
            pbx = await MockPbx.connect(
                relay,
                serial=peers.SERIAL,
                secret=server.secret,
                domain=peers.DOMAIN,
                users={OWNER: PASSWORD},
            )
            try:
                async with aiohttp.ClientSession() as session:
                    await _book_and_discovery(session, base)
            finally:
                await pbx.close()
            summary = await _simulate(server, base, tmp_path)
        assert await server.stop() == 0, server.log()
    except BaseException:
        await server.kill()
        raise

    contacts = summary["contacts"]
    assert contacts["ok"] is True, contacts
    users, events = contacts["users"], summary["events"].get("contacts", 0)
    assert (users, contacts["devices"], contacts["discoverable"]) == (4, 8, 4)
    assert events > 0
    books = contacts["books"]
    assert books == {
        "written": 3 * users + events,
        "conflicts_merged": users,
        "read_back": 2 * users + events,
        "mismatches": 0,
    }
    assert contacts["discovery"]["runs"] == 2 * users + events

    output = "".join(server.output)
    for canary in _canaries():
        assert canary not in output
    (tmp_path / "serve-output.txt").write_text(output, encoding="utf-8")
    status, report = await peers.audit(server, *_canaries())
    assert status == 0, report
    assert "no canary found" in report
    assert not re.search(r"\b[1-9]\d* canary hit", report)
    also = ["--also", str(tmp_path / "serve-output.txt")]
    status, report = await peers.run_cli(
        "audit",
        "--config",
        str(server.config),
        "--data-dir",
        str(server.data_dir),
        *[arg for canary in _canaries() for arg in ("--canary", canary)],
        *also,
    )
    assert status == 0, report
    # The control: the owner's number is kept (encrypted, as the policy says); the same
    # audit finds it by decrypting.
    status, report = await peers.audit(server, OWNER)
    assert status == 1, report
    assert "(encrypted" in report


async def _book_and_discovery(session: aiohttp.ClientSession, base: str) -> None:
    phone_token = await prove_device(
        session, base, sip_username=OWNER, pbx_serial=peers.SERIAL, password=PASSWORD
    )
    web_token = await prove_device(
        session, base, sip_username=OWNER, pbx_serial=peers.SERIAL, password=PASSWORD
    )
    phone = BookClient(session, base, phone_token, PASSPHRASE, max_chunk_bytes=8192)
    web_app = BookClient(session, base, web_token, PASSPHRASE)
    book = _book()
    await phone.save(book)
    assert phone.counters.chunked == 1, "the book went up in chunks"
    assert await web_app.read() == book
    # The web app trims the book to the canaries: small enough for one PUT.
    trimmed = [c for c in book if not c.name.startswith("filler")]
    await web_app.save(trimmed)
    assert web_app.counters.chunked == 0
    assert await phone.read() == trimmed

    discovery = DiscoveryClient(session, base, phone_token, region="DE")
    assert await discovery.opt_in() == OWNER
    found = await discovery.discover(n for c in trimmed for n in c.numbers)
    assert (found.matched, found.checked, found.sent) == (set(), len(E164), len(E164))
    # Its own number matches: the set holds the owner's tag, so the check above could fail.
    assert (await discovery.discover([OWNER])).matched == {OWNER}


async def _simulate(server: peers.Server, base: str, tmp_path: Path) -> dict[str, Any]:
    """`softrelay simulate` with the contacts mix against the running serve."""
    summary = tmp_path / "summary.json"
    status, output = await peers.run_cli(
        "simulate",
        "--config",
        str(server.config),
        "--target",
        f"{base}?sip={server.ports['tcp']}",
        "--phones",
        "4",
        "--contacts",
        "1",
        "--contacts-rate",
        "1",
        "--call-rate",
        "0",
        "--sleep-rate",
        "0",
        "--duration",
        "5",
        "--speed",
        "inf",
        "--seed",
        "19",
        "--no-live",
        "--json",
        str(summary),
    )
    assert status == 0, output
    answer = orjson.loads(summary.read_bytes())
    assert isinstance(answer, dict)
    return answer
