"""Data-subject requests reach SIPIS mode's registrations (dsr/service.py `Processing`).

A subject's `sip_account` records are kept registered at the provider by the registrar
engine (sipis/registrar.py). The store alone cannot stop that, so the rights reach it:

- export: each account shows its registration's state now (`registration`, with
  `registration_reason` when failing), or "held by another node" (a cluster's other
  node holds its lease);
- erasure: once the store deleted the account and its messages, the engine
  un-REGISTERs it at once (the sweep's `forget_removed` would, later);
- restriction (Art. 18): the engine un-REGISTERs and holds the subject's accounts, and
  registers them again when the mark is lifted (unless the app paused them itself).
  `Accounts.list_active` leaves restricted subjects out at a start, and
  `forget_removed` applies marks set by another process (the `dsr` command).
"""

from __future__ import annotations

from collections.abc import Mapping

from privacy.store import Record, Value
from sipis.accounts import CATEGORY, Accounts, Registrar


class SipisProcessing:
    def __init__(self, accounts: Accounts, registrar: Registrar) -> None:
        self.accounts = accounts
        self.registrar = registrar

    def describe(self, category: str, record: Record) -> dict[str, Value]:
        if category != CATEGORY:
            return {}
        status = self.registrar.status(str(record.fields["account_id"]))
        if status is None:
            return {"registration": "held by another node"}
        return {"registration": status.state.value, "registration_reason": status.reason}

    async def erased(self, found: Mapping[str, list[Record]]) -> None:
        for record in found.get(CATEGORY, []):
            await self.registrar.remove(str(record.fields["account_id"]))

    async def restricted(self, found: Mapping[str, list[Record]], on: bool) -> None:
        for record in found.get(CATEGORY, []):
            account_id = str(record.fields["account_id"])
            if on:
                if self.registrar.status(account_id) is not None:
                    await self.registrar.pause(account_id)
                continue
            account = await self.accounts.get(account_id)
            if account is not None:
                await self.accounts.hold(self.registrar, account)
