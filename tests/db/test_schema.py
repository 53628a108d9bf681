"""Installed into another schema: callable schema-qualified from a session
whose search_path lacks it, and isolated from an installation in public."""

from __future__ import annotations

import asyncio
import json

import psycopg
import pytest

from pyqueue import Queue, migrations


async def install(dsn: str, schema: str) -> None:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        await migrations.migrate(conn, schema=schema)
    finally:
        await conn.close()


@pytest.fixture
async def two_installs(empty_dsn: str) -> str:
    await install(empty_dsn, "public")
    await install(empty_dsn, "other")
    return empty_dsn


def test_functions_work_schema_qualified_without_schema_on_path(
    two_installs: str,
) -> None:
    with psycopg.connect(
        two_installs, autocommit=True, options="-c search_path=pg_catalog"
    ) as conn:
        job = conn.execute("SELECT other.publish_job('c', '1', 'q')").fetchone()
        claimed = conn.execute("SELECT id FROM other.claim_next_job('w')").fetchone()
        done = conn.execute(
            "SELECT other.complete_job(%s, 'w', 'resolved', '2')",
            (job[0],),  # type: ignore[index]
        ).fetchone()
        reaped = conn.execute("SELECT other.reap_claims()").fetchone()

        assert claimed == job
        assert done == (True,)
        assert reaped == (None,)
        row = conn.execute("SELECT status, result FROM other.jobs").fetchone()
        assert row == ("resolved", 2)
        assert conn.execute("SELECT count(*) FROM public.jobs").fetchone() == (0,)


def test_installations_notify_on_their_own_channels(two_installs: str) -> None:
    with (
        psycopg.connect(two_installs, autocommit=True) as listener,
        psycopg.connect(two_installs, autocommit=True) as conn,
    ):
        listener.execute('LISTEN jobs; LISTEN "other.jobs"')

        conn.execute("SELECT other.publish_job('c', NULL, 'q')")
        notes = [
            (n.channel, json.loads(n.payload)) for n in listener.notifies(timeout=0.3)
        ]

    assert notes == [("other.jobs", {"queue": "q"})]


async def test_queues_in_two_schemas_never_see_each_others_jobs(
    two_installs: str,
) -> None:
    public = Queue(two_installs, poll_interval=0.5)
    other = Queue(two_installs, schema="other", poll_interval=0.5)
    public.register("where", lambda _: "public")
    other.register("where", lambda _: "other")

    async with public, other:
        jobs = [
            await public.publish("where", None),
            await other.publish("where", None),
            await public.publish("where", None, queue_name="q"),
            await other.publish("where", None, queue_name="q"),
        ]
        results = [await asyncio.wait_for(job.done, 10) for job in jobs]

    assert results == ["public", "other", "public", "other"]


async def test_queue_on_uninstalled_schema_names_the_command(dsn: str) -> None:
    queue = Queue(dsn, schema="nowhere")

    with pytest.raises(Exception, match="pyqueue migrate --schema nowhere"):
        await queue.open()
