"""Migrations a DBA can own: psql equivalence, racing migrators, checksums."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from catalog_dump import SNAPSHOT, dump

from pyqueue import Queue, SchemaNotReady, migrations

ROOT = Path(__file__).parent.parent.parent
SQL_FILES = sorted((ROOT / "sql").glob("*.sql"))
ALL_VERSIONS = [m.version for m in migrations.shipped()]


def psql_binary() -> str:
    found = shutil.which("psql") or "/usr/bin/psql"
    if not Path(found).exists():
        pytest.skip("psql is not installed")
    return found


def psql(
    dsn: str,
    *args: str,
    stdin: str | None = None,
    schema: str | None = None,
    options: str | None = None,
):
    env = dict(os.environ)
    if schema is not None:
        # As the DBA procedure documents it: the install schema, pg_temp last.
        env["PGOPTIONS"] = f"-c search_path={schema},\\ pg_temp"
    if options is not None:
        env["PGOPTIONS"] = options
    return subprocess.run(
        [psql_binary(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )


def pyqueue(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyqueue", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


async def migrate(dsn: str, schema: str = "public") -> list[int]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return [m.version for m in await migrations.migrate(conn, schema=schema)]


def ledger(db: psycopg.Connection[Any], schema: str = "public") -> list[tuple]:
    return db.execute(
        f'SELECT version, name, checksum FROM "{schema}".pyqueue_migrations'
        " ORDER BY version"
    ).fetchall()


def shipped_ledger() -> list[tuple]:
    return [(m.version, m.name, m.checksum) for m in migrations.shipped()]


def test_every_file_declares_its_own_checksum() -> None:
    for migration in migrations.shipped():
        assert migration.declared_checksum == migration.checksum, migration.name


async def test_migrate_on_empty_database_applies_all_then_nothing(
    empty_dsn: str,
) -> None:
    first = await migrate(empty_dsn)
    second = await migrate(empty_dsn)

    assert first == ALL_VERSIONS
    assert second == []


def test_catalog_matches_the_checked_in_snapshot(empty_dsn: str) -> None:
    asyncio.run(migrate(empty_dsn))

    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        actual = dump(conn, "public")

    assert actual == SNAPSHOT.read_text(), (
        "the migrated catalog differs from tests/db/catalog_snapshot.txt; "
        "if the change is intended, run `make snapshot` and review the diff"
    )


def test_psql_files_in_name_order_equal_pyqueue_migrate(
    empty_dsn: str, dsn: str
) -> None:
    for path in SQL_FILES:
        psql(empty_dsn, "-f", str(path))

    with (
        psycopg.connect(empty_dsn, autocommit=True) as by_psql,
        psycopg.connect(dsn, autocommit=True) as by_pyqueue,
    ):
        assert dump(by_psql, "public") == dump(by_pyqueue, "public")


def test_psql_files_with_the_documented_path_equal_pyqueue_migrate(
    empty_dsn: str, dsn: str
) -> None:
    for path in SQL_FILES:
        psql(empty_dsn, "-f", str(path), schema="public")

    with (
        psycopg.connect(empty_dsn, autocommit=True) as by_psql,
        psycopg.connect(dsn, autocommit=True) as by_pyqueue,
    ):
        assert dump(by_psql, "public") == dump(by_pyqueue, "public")
        assert ledger(by_psql) == shipped_ledger()
    assert asyncio.run(migrate(empty_dsn)) == []


def test_psql_with_pgoptions_installs_into_another_schema(
    empty_dsn: str, dsn: str
) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA ops")
    for path in SQL_FILES:
        psql(empty_dsn, "-f", str(path), schema="ops")

    result = pyqueue("migrate", "--dsn", empty_dsn, "--schema", "ops")

    assert result.returncode == 0, result.stderr
    assert "nothing to apply" in result.stdout
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        with psycopg.connect(dsn, autocommit=True) as reference:
            assert dump(conn, "ops") == dump(reference, "public")
        assert conn.execute("SELECT to_regclass('public.jobs')").fetchone() == (None,)


def test_dry_run_output_piped_into_psql_equals_migrate(empty_dsn: str) -> None:
    psql(empty_dsn, "-f", str(SQL_FILES[0]))

    dry = pyqueue("migrate", "--dry-run", "--dsn", empty_dsn)
    assert dry.returncode == 0, dry.stderr
    assert "0001_create_jobs" not in dry.stdout
    assert "-- file 0002_create_job_functions.sql" in dry.stdout
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert len(ledger(conn)) == 1  # a dry run changes nothing
    psql(empty_dsn, stdin=dry.stdout)

    again = pyqueue("migrate", "--dry-run", "--dsn", empty_dsn)
    assert again.stdout.strip() == "-- schema 'public' is up to date: nothing to apply"
    assert asyncio.run(migrate(empty_dsn)) == []
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert ledger(conn) == shipped_ledger()


def test_dry_run_for_another_schema_creates_and_targets_it(empty_dsn: str) -> None:
    dry = pyqueue("migrate", "--dry-run", "--dsn", empty_dsn, "--schema", "Odd One")

    psql(empty_dsn, stdin=dry.stdout)

    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert ledger(conn, "Odd One") == shipped_ledger()
        assert conn.execute("SELECT to_regclass('public.jobs')").fetchone() == (None,)


async def test_two_migrators_at_once_apply_each_file_once(empty_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(
        empty_dsn, autocommit=True
    ) as holder:
        # Hold the migration lock, so both migrators queue up behind it.
        await holder.execute(
            "SELECT pg_advisory_lock(hashtext('pyqueue:migrate'), hashtext('public'))"
        )
        racers = [asyncio.create_task(migrate(empty_dsn)) for _ in range(2)]
        await _until_waiting_for_advisory_lock(holder, 2)
        await holder.execute(
            "SELECT pg_advisory_unlock(hashtext('pyqueue:migrate'), hashtext('public'))"
        )
        applied = await asyncio.gather(*racers)

    assert sorted(applied, key=len) == [[], ALL_VERSIONS]
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert ledger(conn) == shipped_ledger()


async def _until_waiting_for_advisory_lock(
    conn: psycopg.AsyncConnection[Any], count: int
) -> None:
    async with asyncio.timeout(30):
        while True:
            cursor = await conn.execute(
                "SELECT count(*) FROM pg_locks"
                " WHERE locktype = 'advisory' AND NOT granted"
            )
            row = await cursor.fetchone()
            if row and row[0] >= count:
                return
            await asyncio.sleep(0.02)


async def test_migrate_refuses_a_database_whose_applied_file_differs(
    dsn: str, db: psycopg.Connection[Any]
) -> None:
    db.execute(
        "UPDATE pyqueue_migrations SET checksum = 'sha256:edited' WHERE version = 2"
    )

    with pytest.raises(SchemaNotReady, match=r"migration 2 .* differs") as caught:
        await migrate(dsn)
    cli = pyqueue("migrate", "--dsn", dsn)

    assert "restore the shipped file" in str(caught.value)
    assert cli.returncode == 1
    assert cli.stderr.count("\n") == 1
    assert cli.stderr.startswith("pyqueue: error: migration 2 (create_job_functions)")


def test_status_lists_applied_pending_and_differing_versions(
    empty_dsn: str,
) -> None:
    psql(empty_dsn, "-f", str(SQL_FILES[0]))
    psql(empty_dsn, "-f", str(SQL_FILES[1]))
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE pyqueue_migrations SET checksum = 'sha256:x' WHERE version = 2"
        )

    result = pyqueue("migrate", "--status", "--dsn", empty_dsn)

    assert result.returncode == 0, result.stderr
    states = {
        line.split("|")[0].strip(): line.split("|")[2].strip()
        for line in result.stdout.splitlines()[2:-1]
        if "|" in line
    }
    assert states == {
        "0001": "applied",
        "0002": "differs",
        **{f"{v:04d}": "pending" for v in ALL_VERSIONS[2:]},
    }


async def test_queue_refuses_an_unmigrated_database_naming_the_command(
    empty_dsn: str,
) -> None:
    queue = Queue(empty_dsn)

    with pytest.raises(SchemaNotReady, match="run: pyqueue migrate") as caught:
        await queue.open()

    assert "not installed in schema 'public'" in str(caught.value)
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute("SELECT to_regclass('jobs')").fetchone() == (None,)


async def test_queue_refuses_a_database_that_is_behind_and_does_not_migrate_it(
    empty_dsn: str,
) -> None:
    for path in SQL_FILES[:-1]:
        psql(empty_dsn, "-f", str(path))
    queue = Queue(empty_dsn)

    with pytest.raises(SchemaNotReady) as caught:
        await queue.open()

    last = migrations.shipped()[-1]
    assert f"{last.version:04d}_{last.name} not applied" in str(caught.value)
    assert "run: pyqueue migrate" in str(caught.value)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert len(ledger(conn)) == len(SQL_FILES) - 1


def test_0006_lowers_heads_a_completer_of_0005_left_past_a_waiting_job(
    empty_dsn: str,
) -> None:
    lowering = next(path for path in SQL_FILES if path.name.startswith("0006_"))
    for path in SQL_FILES:
        if path.name < lowering.name:
            psql(empty_dsn, "-f", str(path))
    with psycopg.connect(empty_dsn, autocommit=True) as db:
        published = db.execute(
            "SELECT publish_jobs(array_fill('c'::text, ARRAY[4]),"
            " array_fill(NULL::jsonb, ARRAY[4]), ARRAY['q', 'q', 'q', 'r'])"
        )
        ids = [row[0] for row in published.fetchall()]
        # What 0005 could leave behind: q's head past its oldest waiting
        # job (moved while that job's publisher was in flight); and, for
        # good measure, r with no row at all.
        db.execute("UPDATE queue_heads SET head_id = %s WHERE queue = 'q'", (ids[2],))
        db.execute("DELETE FROM queue_heads WHERE queue = 'r'")

    # Whatever isolation the DBA's session defaults to.
    psql(
        empty_dsn,
        "-f",
        str(lowering),
        options="-c default_transaction_isolation=repeatable\\ read",
    )

    with psycopg.connect(empty_dsn, autocommit=True) as db:
        heads = db.execute("SELECT queue, head_id FROM queue_heads ORDER BY queue")
        assert heads.fetchall() == [("q", ids[0]), ("r", ids[3])]
        claimed = db.execute("SELECT id FROM claim_next_job('w1')").fetchone()
        assert claimed == (ids[0],)
