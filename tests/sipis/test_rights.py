"""Data-subject rights reach SIPIS mode (issue 18), through the whole app with the real
registrar engine and a real Kamailio, on SQLite and PostgreSQL, the operator acting
(`[dsr] admin_token`):

- export lists the account (registrar, user, its registration's state now) but never
  an HA1, the push token or the device secret's hash (the policy's `export = false`),
  and pending messages by count only (`export = "count"`): no sender, no text;
- restriction (Art. 18) un-REGISTERs at once (a caller through Kamailio gets 480) and
  holds the account, also against the app's own resume; lifting it registers again;
- erasure un-REGISTERs at once (not at the next sweep) and deletes the account and
  its messages; the device secret then opens nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsr.service import DsrSettings
from privacy.database import StoreSettings
from privacy.keys import Keyring
from privacy.store import Subject
from sipis.account import State, Status
from sipis.accounts import CATEGORY, MESSAGES, forget_removed
from sipis.api import ACCOUNTS
from softrelay.app import STORE
from tests.kamailio import DOMAIN, Kamailio
from tests.sipis.provider import running_kamailio
from tests.sipis.test_e2e import TOKEN, Running, body_for, running, settings
from tests.sipis.test_registrar_kamailio import ALICE, ask, registers_logged

pytestmark = pytest.mark.both_backends

ADMIN = "admin-token-for-sipis-rights-0123"
SENDER = "sip:sender-canary-a41f@other.test"
TEXT = "message-body-canary-77d0"
SUBJECT = {"sip_username": ALICE.user, "pbx_serial": DOMAIN}


@pytest.fixture
def kamailio() -> Iterator[Kamailio]:
    with running_kamailio([ALICE]) as server:
        yield server


async def dsr(node: Running, action: str) -> dict[str, Any]:
    url = f"{node.base}dsr/v1/{action}"
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with node.session.post(url, json=SUBJECT, headers=headers) as answer:
        assert answer.status == 200, await answer.text()
        data: dict[str, Any] = await answer.json()
        return data


async def test_export_restrict_and_erase_reach_the_registration(
    kamailio: Kamailio,
    tmp_path: Path,
    store_settings: StoreSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SOFTRELAY_TEST_SIPIS_ADMIN", ADMIN)
    operator = DsrSettings(admin_token="env:SOFTRELAY_TEST_SIPIS_ADMIN")
    keyring = Keyring.generate()
    async with running(tmp_path, keyring, store_settings, settings(), dsr=operator) as node:
        _, created = await node.call("POST", body=body_for(kamailio, display_name="Alice"))
        account_id, secret = created["account_id"], created["device_secret"]
        await node.until(account_id, State.REGISTERED)
        store = node.app[STORE]
        await store.put(
            MESSAGES,
            {
                "account_id": account_id,
                "sip_username": ALICE.user,
                "pbx_serial": DOMAIN,
                "sender": SENDER,
                "content_type": "text/plain",
                "body": TEXT,
            },
        )

        export = await dsr(node, "export")
        by_name = {c["category"]: c for c in export["categories"]}
        account = by_name[CATEGORY]
        assert account["included"] is True
        [record] = account["records"]
        fields = record["fields"]
        assert fields["account_id"] == account_id
        assert (fields["sip_username"], fields["pbx_serial"]) == (ALICE.user, DOMAIN)
        assert (fields["registrar_host"], fields["registrar_port"]) == ("127.0.0.1", kamailio.port)
        assert fields["display_name"] == "Alice"
        assert fields["registration"] == "registered"
        hidden = {"ha1_md5", "ha1_sha256", "push_token", "push_alert_token", "secret_hash"}
        assert not hidden & set(fields)
        assert account["withheld"]["fields"] == sorted(hidden)
        messages = by_name[MESSAGES]
        assert messages["included"] is True
        assert messages["count"] == 1
        assert "records" not in messages
        text = json.dumps(export)
        secret_hash = (await store.find(CATEGORY))[0].fields["secret_hash"]
        assert isinstance(secret_hash, str)
        for canary in (ALICE.ha1(), TOKEN, secret, secret_hash, SENDER, TEXT, ALICE.password):
            assert canary not in text, canary

        # Restriction: un-REGISTERed at once, held even against the app's resume.
        receipt = await dsr(node, "restrict")
        assert receipt["restricted"] is True
        assert node.engine.status(account_id).state is State.PAUSED  # type: ignore[union-attr]
        assert await ask(kamailio, "OPTIONS", ALICE.user) == 480
        status, view = await node.call("PATCH", f"/{account_id}", secret, {"paused": False})
        assert status == 200
        assert view["status"]["state"] == "paused"
        assert await ask(kamailio, "OPTIONS", ALICE.user) == 480
        export = await dsr(node, "export")
        assert export["restricted"] is True
        [record] = next(c for c in export["categories"] if c["category"] == CATEGORY)["records"]
        assert record["fields"]["registration"] == "paused"

        await dsr(node, "unrestrict")
        await node.until(account_id, State.REGISTERED)
        assert await ask(kamailio, "OPTIONS", ALICE.user) == 200

        # Erasure: deleted, and the provider's binding removed at once.
        receipt = await dsr(node, "erase")
        assert receipt["counts"][CATEGORY] == 1
        assert receipt["counts"][MESSAGES] == 1
        assert node.engine.status(account_id) is None
        assert await ask(kamailio, "OPTIONS", ALICE.user) == 480
        left = await store.find_subject(Subject(ALICE.user, DOMAIN))
        assert (left[CATEGORY], left[MESSAGES]) == ([], [])
        status, _ = await node.call("GET", f"/{account_id}", secret)
        assert status == 401


async def test_a_mark_set_by_another_process_holds_the_account_here_and_at_a_start(
    kamailio: Kamailio, tmp_path: Path, store_settings: StoreSettings
) -> None:
    keyring = Keyring.generate()
    alice = Subject(ALICE.user, DOMAIN)
    async with running(tmp_path, keyring, store_settings, settings()) as node:
        _, created = await node.call("POST", body=body_for(kamailio))
        account_id, secret = created["account_id"], created["device_secret"]
        await node.until(account_id, State.REGISTERED)
        # `softrelay dsr restrict` in another process: the store's mark only; the
        # sweeper-cadence turn (forget_removed) applies it.
        await node.app[STORE].restrict(alice, True)
        await forget_removed(node.app[ACCOUNTS], node.engine)
        assert node.engine.status(account_id) == Status(State.PAUSED)
        assert await ask(kamailio, "OPTIONS", ALICE.user) == 480
    before = len(registers_logged(kamailio))
    async with running(tmp_path, keyring, store_settings, settings()) as node:
        # Loaded held, not registered; a new account of the subject is held too.
        _, view = await node.call("GET", f"/{account_id}", secret)
        assert view["status"]["state"] == "paused"
        status, other = await node.call("POST", body=body_for(kamailio))
        assert status == 201
        assert other["status"]["state"] == "paused"
        assert len(registers_logged(kamailio)) == before
        assert await ask(kamailio, "OPTIONS", ALICE.user) == 480
        # Lifted elsewhere: the next turn registers both.
        await node.app[STORE].restrict(alice, False)
        await forget_removed(node.app[ACCOUNTS], node.engine)
        await node.until(account_id, State.REGISTERED)
        await node.until(other["account_id"], State.REGISTERED)
        assert await ask(kamailio, "OPTIONS", ALICE.user) == 200
