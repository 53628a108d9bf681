"""Versioned plain-SQL migrations: find, check, print and apply them.

Each file ``sql/NNNN_name.sql`` wraps itself in BEGIN/COMMIT and records
itself in the ledger table ``pyqueue_migrations`` as its last statement, with
the SHA-256 of everything above its ``-- pyqueue:ledger`` line. So applying
the files with ``psql -f`` in name order and running ``pyqueue migrate`` leave
the same database, and a file applied twice collides on the ledger's key.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from . import _sql
from .errors import MigrationError, SchemaNotReady

logger = logging.getLogger(__name__)

LEDGER_MARKER = "-- pyqueue:ledger"
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_DECLARED = re.compile(r"'(sha256:[0-9a-f]{64}|sha256:pending)'")


@dataclass(frozen=True)
class Migration:
    """One file of ``sql/``: its version, name, text and checksum."""

    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        """The SHA-256 of the text above the ledger line, as stored in the ledger."""
        body = self.text.split(LEDGER_MARKER, 1)[0]
        return "sha256:" + hashlib.sha256(body.encode()).hexdigest()

    @property
    def declared_checksum(self) -> str | None:
        """The checksum the file records for itself in the ledger."""
        tail = self.text.split(LEDGER_MARKER, 1)
        match = _DECLARED.search(tail[1]) if len(tail) == 2 else None
        return match.group(1) if match else None


@dataclass(frozen=True)
class Applied:
    """One row of the ledger."""

    version: int
    name: str
    checksum: str
    applied_at: datetime


def sql_dir() -> Path:
    """Where the migrations are: inside the installed package, else the checkout."""
    packaged = Path(__file__).parent / "sql"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "sql"


def shipped() -> list[Migration]:
    """Every migration this release ships, in version order."""
    found = []
    for path in sorted(sql_dir().glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"unexpected file in sql/: {path.name!r}")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    return found


def stamp(directory: Path) -> list[Path]:
    """Write each file's real checksum into its ledger line; return the changed."""
    changed = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        assert match is not None, path
        migration = Migration(int(match[1]), match[2], path.read_text())
        if migration.declared_checksum == migration.checksum:
            continue
        head, tail = migration.text.split(LEDGER_MARKER, 1)
        tail = _DECLARED.sub(f"'{migration.checksum}'", tail, count=1)
        path.write_text(head + LEDGER_MARKER + tail)
        changed.append(path)
    return changed


async def applied(conn: psycopg.AsyncConnection[Any], schema: str) -> list[Applied]:
    """The ledger of `schema`, oldest first; empty when pyqueue is not installed."""
    ledger = f"{_quote(schema)}.pyqueue_migrations"
    row = await (await conn.execute(_sql.LEDGER_EXISTS, (ledger,))).fetchone()
    if not row or not row[0]:
        return []
    cursor = await conn.execute(_sql.compose(_sql.LEDGER_ROWS, schema))
    return [Applied(*r) for r in await cursor.fetchall()]


def pending(done: list[Applied], *, schema: str) -> list[Migration]:
    """The shipped migrations not in `done`; raises when the two disagree."""
    by_version = {m.version: m for m in shipped()}
    for row in done:
        migration = by_version.get(row.version)
        if migration is None:
            raise SchemaNotReady(
                f"schema {schema!r} has migration {row.version} ({row.name}) that "
                "this pyqueue does not ship; upgrade pyqueue"
            )
        if row.checksum != migration.checksum:
            raise SchemaNotReady(
                f"migration {row.version} ({row.name}) in schema {schema!r} differs "
                f"from the shipped file (checksum {row.checksum} != "
                f"{migration.checksum}); restore the shipped file or ask your DBA"
            )
    done_versions = {row.version for row in done}
    return [m for m in shipped() if m.version not in done_versions]


def script(migrations: list[Migration], *, schema: str) -> str:
    """The SQL that migrating `schema` with `migrations` runs, ready for psql."""
    setup = []
    if schema != "public":
        setup.append(f"CREATE SCHEMA IF NOT EXISTS {_quote(schema)};")
    setup.append(f"SET search_path TO {_quote(schema)}, pg_temp;")
    parts = ["\n".join(setup) + "\n"]
    for migration in migrations:
        parts.append(f"\n-- file {migration.version:04d}_{migration.name}.sql\n")
        parts.append(migration.text)
    return "".join(parts)


async def migrate(
    conn: psycopg.AsyncConnection[Any], *, schema: str
) -> list[Migration]:
    """Apply every pending migration to `schema`; return those applied.

    Each file runs in its own transaction. A session advisory lock per schema
    makes concurrent migrators take turns: the second finds nothing to do.
    Raises SchemaNotReady when an applied file differs from the shipped one,
    and MigrationError when a file fails (earlier files stay applied).
    """
    if not conn.autocommit:
        await conn.set_autocommit(True)
    await conn.execute(_sql.MIGRATION_LOCK, (schema,))
    try:
        todo = pending(await applied(conn, schema), schema=schema)
        if todo and schema != "public":
            await conn.execute(_sql.compose(_sql.CREATE_SCHEMA, schema))
        await conn.execute(_sql.compose(_sql.SET_SEARCH_PATH, schema))
        for migration in todo:
            logger.info(
                "applying migration %04d_%s",
                migration.version,
                migration.name,
                extra={"version": migration.version, "schema": schema},
            )
            try:
                await conn.execute(migration.text.encode())
            except psycopg.Error as exc:
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} failed in "
                    f"schema {schema!r}: {exc}"
                ) from exc
        return todo
    finally:
        if not conn.broken:
            await conn.execute(_sql.RESET_SEARCH_PATH)
            await conn.execute(_sql.MIGRATION_UNLOCK, (schema,))


@dataclass(frozen=True)
class State:
    """One version as ``pyqueue migrate --status`` lists it.

    ``state`` is ``applied``, ``pending``, ``differs`` (applied, but the
    shipped file has another checksum) or ``unknown`` (applied, not shipped).
    """

    version: int
    name: str
    state: str
    applied_at: datetime | None


async def status(conn: psycopg.AsyncConnection[Any], *, schema: str) -> list[State]:
    """Every shipped or applied version of `schema` and its state, by version.

    Unlike ``pending``, never raises for a differing ledger: it reports it.
    """
    done = {row.version: row for row in await applied(conn, schema)}
    states = []
    for migration in shipped():
        row = done.pop(migration.version, None)
        if row is None:
            state = "pending"
        elif row.checksum != migration.checksum:
            state = "differs"
        else:
            state = "applied"
        states.append(
            State(
                migration.version,
                migration.name,
                state,
                row.applied_at if row else None,
            )
        )
    for row in done.values():
        states.append(State(row.version, row.name, "unknown", row.applied_at))
    return sorted(states, key=lambda s: s.version)


async def check(conn: psycopg.AsyncConnection[Any], *, schema: str) -> None:
    """Raise SchemaNotReady unless `schema` has exactly the shipped migrations."""
    done = await applied(conn, schema)
    if not done:
        raise SchemaNotReady(
            f"pyqueue is not installed in schema {schema!r}; "
            f"run: pyqueue migrate --schema {schema}"
        )
    todo = pending(done, schema=schema)
    if todo:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in todo)
        raise SchemaNotReady(
            f"schema {schema!r} is behind: {names} not applied; "
            f"run: pyqueue migrate --schema {schema}"
        )


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
