"""PostgreSQL backend (being written; issue 16): the store for several processes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from privacy.backend import StorageError, TableSpec

if TYPE_CHECKING:
    from privacy.backend import Backend
    from privacy.database import StoreSettings


class PostgresBackend:
    @classmethod
    async def create(cls, settings: StoreSettings, tables: Sequence[TableSpec]) -> Backend:
        raise StorageError("the PostgreSQL backend is not there yet")
