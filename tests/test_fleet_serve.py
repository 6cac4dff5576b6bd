"""Two `softrelay serve` processes on one PostgreSQL database, as a fleet runs: the same
[store] (its DSN from the environment), the same keyring file, data directories of their
own. Exact monthly counts under concurrent pings to both; one month close and one sweep
between them, the other saying it skipped; a restriction set through a third process
(the `dsr` CLI) refuses the next REGISTER at the other server once its notification has
arrived. Every wait is for a line of output or an answer, never for time to pass."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from privacy.clock import ManualClock
from privacy.database import StoreSettings
from privacy.keys import Keyring, write_keyring
from privacy.policy import load_policy
from privacy.store import Store
from tests.limits import LONGEST_WAIT
from tests.peers import (
    PHONE_DOMAIN,
    SERIAL,
    STEP_TIMEOUT,
    Pbx,
    Server,
    StreamPeer,
    run_cli,
    start_server,
)
from tests.rawdb import RawDatabase
from usage.closing import MonthCloser
from usage.endpoint import PING_PATH
from usage.ledger import Ledger
from usage.period import period_of, previous_period, start_of
from usage.settings import Tenant, UsageSettings

pytestmark = pytest.mark.parametrize("store_backend", ["postgresql"], indirect=True)

KEY = "fleet-tenant-key-0123456789"
INSTALLS = 30
SEEDED = 7  # installs of the month before, which the servers close at their start

Fleet = Callable[[], Awaitable[tuple[Server, Server]]]


@pytest.fixture
def keyring() -> Keyring:
    """The fleet's keyring: every process (and the test's own store) has it."""
    return Keyring.generate()


@pytest.fixture
async def fleet(
    tmp_path: Path, store_toml: str, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Fleet]:
    """Starts two servers at once on the test's database; stops them after the test."""
    keyring_file = tmp_path / "keyring.json"
    write_keyring(keyring, keyring_file)
    monkeypatch.setenv("FLEET_USAGE_KEY", KEY)
    more = (
        f'[secrets]\nkeyring = "file:{keyring_file}"\n\n{store_toml}\n'
        '[usage]\ngrace = "0s"\nip_burst = 1000\n'
        "[[usage.tenant]]\nid = 'acme'\nkey = 'env:FLEET_USAGE_KEY'\n"
    )
    started: list[Server] = []

    async def start() -> tuple[Server, Server]:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
        a, b = await asyncio.gather(
            start_server(tmp_path / "a", more), start_server(tmp_path / "b", more)
        )
        started.extend((a, b))
        return a, b

    try:
        yield start
        # Both at once: the teardown stays within pytest's timeout with the test's own
        # bound, so a failure is reported by the test and the servers are always killed.
        statuses = await asyncio.gather(*(srv.stop() for srv in started))
        assert statuses == [0] * len(started), "".join(srv.log() for srv in started)
    finally:
        for srv in started:
            await srv.kill()


async def lines(server: Server, pattern: str, count: int = 1) -> list[str]:
    """The lines of output matching `pattern`, once there are `count` of them."""
    async with asyncio.timeout(STEP_TIMEOUT):
        while True:
            found = [line for line in server.output if re.search(pattern, line)]
            if len(found) >= count:
                return found
            server.grew.clear()
            await server.grew.wait()


async def test_two_servers_count_each_install_once_and_close_and_sweep_once(
    fleet: Fleet,
    tmp_path: Path,
    keyring: Keyring,
    store_settings: StoreSettings,
    raw_db: RawDatabase,
) -> None:
    # Its own bound, below pytest's timeout: a slow step fails here, and the
    # fleet fixture's teardown still runs in time to stop both servers.
    async with asyncio.timeout(LONGEST_WAIT):
        # The month before, pinged before the fleet starts: due to close (grace 0).
        current = period_of(time.time())
        before = previous_period(current)
        seed_clock = ManualClock(start_of(current) - 86400.0)
        usage = UsageSettings(tenants=(Tenant("acme", KEY),), grace=0)
        seed = await Store.create(
            load_policy("auerproxy"), keyring, tmp_path, seed_clock, store_settings
        )
        try:
            ledger = Ledger(seed)
            for _ in range(SEEDED):
                await ledger.record("acme", before, secrets.token_bytes(16))
            await ledger.drain()
            expected = await MonthCloser(seed, usage).tally(before)
        finally:
            await seed.close()

        a, b = await fleet()
        # Both ran their start-up turns of the close job and of the sweeper.
        for server in (a, b):
            await lines(server, r"usage month close (ran|skipped)")
            await lines(server, r"retention sweep (ran|skipped)")
        output = a.output + b.output
        assert len([line for line in output if "usage month closed" in line]) == 1, "".join(output)
        assert len([line for line in output if "retention sweep ran" in line]) == 1
        assert len([line for line in output if "retention sweep skipped" in line]) == 1
        assert raw_db.count("c_usage_close") == 1
        assert raw_db.text(
            f"SELECT digest FROM c_usage_close WHERE period = '{before}'"
        ).strip() == (expected.digest)
        assert raw_db.text(
            f"SELECT active FROM c_usage_count WHERE period = '{before}'"
        ).strip() == (str(SEEDED))
        runs = raw_db.text("SELECT count(*) || ' ' || count(DISTINCT category) FROM retention_runs")
        total, categories = runs.split()
        assert total == categories, "one run per category"

        # Every install pings both servers at once, some twice.
        pids = [secrets.token_hex(16) for _ in range(INSTALLS)]
        headers = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STEP_TIMEOUT)) as http:

            async def ping(server: Server, pid: str) -> int:
                body = {
                    "tenant": "acme",
                    "period": current,
                    "pid": pid,
                    "platform": "ios",
                    "app_version": "1.0",
                }
                url = f"http://127.0.0.1:{server.http_port()}{PING_PATH}"
                async with http.post(url, json=body, headers=headers) as response:
                    return response.status

            pings = [ping(server, pid) for pid in pids for server in (a, b)]
            pings += [ping(b, pid) for pid in pids[:5]]
            assert set(await asyncio.gather(*pings)) == {202}
        assert raw_db.text(f"SELECT count(*) FROM c_usage WHERE period = '{current}'").strip() == (
            str(INSTALLS)
        )
        assert raw_db.text(
            f"SELECT count(*) FROM c_usage_key WHERE period = '{current}'"
        ).strip() == ("1")


class Phone(StreamPeer):
    """alice's softphone on TCP."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        host, port = writer.get_extra_info("sockname")[:2]
        self.sent_by = f"{host}:{port}"
        self.contact = f"<sip:alice@{host}:{port};transport=tcp>"

    @classmethod
    async def connect(cls, port: int) -> Phone:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), STEP_TIMEOUT
        )
        return cls(reader, writer)

    def via(self) -> str:
        return f"Via: SIP/2.0/TCP {self.sent_by};branch=z9hG4bK-ph-{secrets.token_hex(6)}"


async def register(phone: Phone, pbx: Pbx | None) -> int:
    """alice's REGISTER through the server; the PBX, if given, accepts it."""

    async def pbx_side() -> None:
        assert pbx is not None
        request = await pbx.request("REGISTER")
        (contact,) = request.contacts
        await pbx.accept(request, contact)

    async with asyncio.TaskGroup() as group:
        sent = group.create_task(phone.digest_register("alice", PHONE_DOMAIN, None, tag="a"))
        if pbx is not None:
            group.create_task(pbx_side())
    return sent.result()[1].status


async def test_a_restriction_set_elsewhere_refuses_the_next_register_at_the_other_server(
    fleet: Fleet,
) -> None:
    # Its own bound, below pytest's timeout: a slow step fails here, and the
    # fleet fixture's teardown still runs in time to stop both servers.
    async with asyncio.timeout(LONGEST_WAIT):
        a, b = await fleet()
        pbx = await Pbx.connect(b.ports["tcp"])
        phone = await Phone.connect(b.ports["tcp"])
        try:
            assert await pbx.link(b.secret) == 200, b.log()
            assert await register(phone, pbx) == 200, b.log()
            # B reads the marks and listens for their changes.
            await lines(b, "store.restrictions_watched")

            async def dsr(action: str, changes: int) -> None:
                status, out = await run_cli(
                    "dsr", action, "--user", "alice", "--serial", SERIAL,
                    "--config", str(a.config), "--data-dir", str(a.data_dir),
                )  # fmt: skip
                assert status == 0, out
                await lines(b, "store.restrictions_changed", changes)  # B heard of it

            await dsr("restrict", 1)
            assert await register(phone, None) == 403, phone.last()
            await dsr("unrestrict", 2)
            assert await register(phone, pbx) == 200, phone.last()
        finally:
            await phone.close()
            await pbx.close()
