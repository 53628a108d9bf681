"""Publishing: from SQL in any language, inside the caller's transaction,
with bad input refused before anything is written."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from pyqueue import InvalidJob, Queue

Conn = psycopg.Connection[Any]


async def test_job_published_with_sql_runs_without_waiting_for_a_poll(
    make_queue: Any, db: Conn
) -> None:
    # With an hour between polls, only the NOTIFY can start the job in time.
    queue: Queue = make_queue(poll_interval=3600.0)
    queue.register("increment", lambda a: a + 1)

    async with queue:
        await asyncio.sleep(0.2)  # the worker is idle, waiting for news
        row = db.execute("SELECT publish_job('increment', '41', 'sql-queue')")
        job_id = row.fetchone()[0]  # type: ignore[index]

        assert await asyncio.wait_for(queue.job(job_id).done, 30) == 42


def test_publish_job_accepts_named_notation_and_null_queue(db: Conn) -> None:
    named = db.execute(
        "SELECT publish_job(queue => 'q', category => 'c', args => '[1]')"
    ).fetchone()
    defaulted = db.execute("SELECT publish_job('c', NULL, NULL)").fetchone()

    rows = db.execute("SELECT id, queue, args FROM jobs ORDER BY id").fetchall()
    assert rows == [(named[0], "q", [1]), (defaulted[0], "default", None)]  # type: ignore[index]


@pytest.mark.parametrize("category", ["", None])
def test_publish_job_refuses_empty_category(db: Conn, category: str | None) -> None:
    with pytest.raises(psycopg.Error, match="category must not be empty") as raised:
        db.execute("SELECT publish_job(%s, '1')", (category,))

    assert raised.value.sqlstate == "PQ001"
    assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


async def test_publish_in_a_transaction_runs_only_after_commit(
    make_queue: Any, dsn: str
) -> None:
    queue: Queue = make_queue(poll_interval=0.5)
    ran: list[int] = []
    queue.register("note", lambda n: ran.append(n) or n)

    async with queue:
        conn = await psycopg.AsyncConnection.connect(dsn)
        try:
            job = await queue.publish("note", 1, connection=conn)
            await asyncio.sleep(1.0)  # two polls: the job is not visible yet
            assert ran == []

            await conn.commit()

            assert await asyncio.wait_for(job.done, 10) == 1
        finally:
            await conn.close()


async def test_publish_in_a_rolled_back_transaction_leaves_nothing(
    make_queue: Any, dsn: str, db: Conn
) -> None:
    queue: Queue = make_queue()
    queue.register("note", lambda n: n)

    async with queue:
        conn = await psycopg.AsyncConnection.connect(dsn)
        try:
            await queue.publish("note", 1, connection=conn)
            await conn.rollback()
        finally:
            await conn.close()

    assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


async def test_unserializable_args_are_refused_before_writing(
    make_queue: Any, db: Conn
) -> None:
    queue: Queue = make_queue()
    async with queue:
        with pytest.raises(InvalidJob, match="not JSON-serializable"):
            await queue.publish("c", {"when": object()})
        with pytest.raises(InvalidJob, match="not JSON-serializable"):
            await queue.publish("c", float("nan"))

    assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
