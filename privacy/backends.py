"""Opening, migrating and inspecting the backend that `StoreSettings` name: the one
place that knows every backend (privacy/database.py holds the settings, which the
backends import themselves)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from privacy.backend import Backend, TableSpec
from privacy.database import DATABASE_FILE, StoreSettings


async def open_backend(
    settings: StoreSettings, data_dir: Path, tables: Sequence[TableSpec]
) -> Backend:
    """The backend the settings name, opened, its schema checked against `tables`."""
    if settings.backend == "postgresql":
        from privacy.postgres import PostgresBackend  # the driver loads only when used

        return await PostgresBackend.create(settings, tables)
    from privacy.sqlite import SQLiteBackend

    return await SQLiteBackend.create(data_dir / DATABASE_FILE, tables)


async def migrate(
    settings: StoreSettings, data_dir: Path, tables: Sequence[TableSpec]
) -> list[str]:
    """Bring the database to this softrelay's schema and the policy's tables (`softrelay
    db migrate`); what was done, in order (nothing: it was up to date)."""
    if settings.backend == "postgresql":
        from privacy.postgres import PostgresBackend

        return await PostgresBackend.migrate(settings, tables)
    from privacy.sqlite import SQLiteBackend

    # Opening a SQLite file migrates it (privacy/migrations.py says why).
    backend = await SQLiteBackend.create(data_dir / DATABASE_FILE, tables)
    await backend.close()
    return backend.applied


async def schema_status(
    settings: StoreSettings, data_dir: Path, tables: Sequence[TableSpec]
) -> tuple[int, list[str]]:
    """The database's schema version and what the policy's tables lack there, read
    without changing anything (`softrelay db status`)."""
    if settings.backend == "postgresql":
        from privacy.postgres import PostgresBackend

        return await PostgresBackend.status(settings, tables)
    from privacy.sqlite import schema_version

    # The category tables of a SQLite file follow the policy at every open: not reported.
    return await asyncio.to_thread(schema_version, data_dir / DATABASE_FILE), []


__all__ = ["migrate", "open_backend", "schema_status"]
