"""pyqueue.sync: publish in a caller's sync transaction, wait without a loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pyqueue import InvalidJob, JobDeleted, JobRejected, migrations, sync

WAIT = 30.0


@pytest.fixture
def tx(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain (non-autocommit) sync connection, as a WSGI app holds one."""
    with psycopg.connect(dsn) as conn:
        yield conn


def count_jobs(db: psycopg.Connection[Any]) -> int:
    row = db.execute("SELECT count(*) FROM jobs").fetchone()
    assert row is not None
    return int(row[0])


def wait_until_waiting(db: psycopg.Connection[Any]) -> None:
    """Until another session has read job_outcomes and sits idle, listening."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        row = db.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE state = 'idle' AND query LIKE '%job_outcomes%'"
        ).fetchone()
        if row and row[0]:
            return
        time.sleep(0.02)
    raise AssertionError("the waiter never started waiting")


def test_publish_is_invisible_until_commit(
    tx: psycopg.Connection[Any], db: psycopg.Connection[Any]
) -> None:
    job_id = sync.publish(tx, "increment", 1, queue_name="q")
    seen_before_commit = count_jobs(db)
    tx.commit()

    row = db.execute(
        "SELECT category, args, queue, status FROM jobs WHERE id = %s", (job_id,)
    ).fetchone()
    assert seen_before_commit == 0
    assert row == ("increment", 1, "q", "unfulfilled")


def test_rollback_leaves_no_job(
    tx: psycopg.Connection[Any], db: psycopg.Connection[Any]
) -> None:
    with pytest.raises(RuntimeError), tx.transaction():
        sync.publish(tx, "increment", 1)
        sync.publish_many(tx, [("increment", 2), ("increment", 3)])
        raise RuntimeError("the view failed after publishing")

    assert count_jobs(db) == 0


async def test_committed_job_runs_and_wait_returns_its_result(
    make_queue: Any, tx: psycopg.Connection[Any], dsn: str
) -> None:
    queue = make_queue()
    queue.register("increment", lambda a: a + 1)

    async with queue:
        job_id = sync.publish(tx, "increment", 41)
        tx.commit()
        result = await asyncio.to_thread(sync.wait, job_id, dsn=dsn, timeout=WAIT)

    assert result == 42


async def test_rolled_back_job_never_runs(
    make_queue: Any, tx: psycopg.Connection[Any], dsn: str
) -> None:
    queue = make_queue()
    ran: list[Any] = []
    queue.register("record", ran.append)

    async with queue:
        sync.publish(tx, "record", "rolled back", queue_name="q")
        tx.rollback()
        kept = sync.publish(tx, "record", "committed", queue_name="q")
        tx.commit()
        await asyncio.to_thread(sync.wait, kept, dsn=dsn, timeout=WAIT)

    assert ran == ["committed"]


async def test_publish_many_returns_ids_in_input_order(
    make_queue: Any, tx: psycopg.Connection[Any], dsn: str
) -> None:
    queue = make_queue()
    queue.register("echo", lambda args: args)

    async with queue:
        ids = sync.publish_many(
            tx,
            [("echo", "a"), ("echo", "b"), ("echo", "c")],
            queue_name=["x", "y", "x"],
        )
        tx.commit()
        results = [
            await asyncio.to_thread(sync.wait, job_id, dsn=dsn, timeout=WAIT)
            for job_id in ids
        ]

    assert ids == sorted(ids)
    assert results == ["a", "b", "c"]


def test_invalid_args_raise_before_sending_and_keep_the_transaction(
    tx: psycopg.Connection[Any], db: psycopg.Connection[Any]
) -> None:
    with pytest.raises(InvalidJob, match="not JSON-serializable"):
        sync.publish(tx, "x", {"when": object()})
    with pytest.raises(InvalidJob, match="must not be empty"):
        sync.publish(tx, "", 1)
    with pytest.raises(InvalidJob, match="got 2 jobs but 1 queue names"):
        sync.publish_many(tx, [("x", 1), ("x", 2)], queue_name=["q"])
    sync.publish(tx, "x", 1)
    tx.commit()

    assert count_jobs(db) == 1


async def test_wait_raises_job_rejected_with_the_error(
    make_queue: Any, tx: psycopg.Connection[Any], dsn: str
) -> None:
    queue = make_queue()

    def fail(args: Any) -> None:
        raise KeyError("missing")

    queue.register("fail", fail)

    async with queue:
        job_id = sync.publish(tx, "fail")
        tx.commit()
        with pytest.raises(JobRejected) as caught:
            await asyncio.to_thread(sync.wait, job_id, dsn=dsn, timeout=WAIT)

    assert caught.value.job_id == job_id
    assert caught.value.error["type"] == "KeyError"
    assert "traceback" in caught.value.error


def test_wait_times_out_when_nobody_runs_the_job(
    tx: psycopg.Connection[Any], dsn: str, db: psycopg.Connection[Any]
) -> None:
    job_id = sync.publish(tx, "nobody-handles-this")
    tx.commit()

    with pytest.raises(TimeoutError, match=f"job {job_id} did not finish"):
        sync.wait(job_id, dsn=dsn, timeout=0.3, poll_interval=0.1)

    row = db.execute("SELECT status FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert row == ("unfulfilled",)


def test_wait_for_an_id_without_a_job_raises_job_deleted(dsn: str) -> None:
    with pytest.raises(JobDeleted):
        sync.wait(123456, dsn=dsn, timeout=WAIT)


def test_wait_wakes_on_notification_of_a_hand_edit(
    tx: psycopg.Connection[Any], dsn: str, db: psycopg.Connection[Any]
) -> None:
    job_id = sync.publish(tx, "by-hand")
    tx.commit()
    outcome: dict[str, Any] = {}

    # Polls and the deadline both lie beyond the join below: only the NOTIFY
    # can end the wait in time.
    def waiter() -> None:
        outcome["result"] = sync.wait(
            job_id, dsn=dsn, timeout=2 * WAIT, poll_interval=3600
        )

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    wait_until_waiting(db)
    db.execute(
        "UPDATE jobs SET status = 'resolved', result = '\"by hand\"' WHERE id = %s",
        (job_id,),
    )
    thread.join(WAIT)

    assert outcome == {"result": "by hand"}


def test_wait_wakes_on_deletion_with_job_deleted(
    tx: psycopg.Connection[Any], dsn: str, db: psycopg.Connection[Any]
) -> None:
    job_id = sync.publish(tx, "doomed")
    tx.commit()
    outcome: dict[str, Any] = {}

    def waiter() -> None:
        try:
            sync.wait(job_id, dsn=dsn, timeout=2 * WAIT, poll_interval=3600)
        except JobDeleted as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    wait_until_waiting(db)
    db.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
    thread.join(WAIT)

    assert isinstance(outcome.get("error"), JobDeleted)


@pytest.mark.parametrize("autocommit", [True, False])
async def test_wait_on_callers_connection_leaves_it_as_found(
    make_queue: Any, dsn: str, autocommit: bool
) -> None:
    queue = make_queue()
    queue.register("echo", lambda args: args)

    with psycopg.connect(dsn, autocommit=autocommit) as conn:
        async with queue:
            job_id = sync.publish(conn, "echo", "hi")
            if not autocommit:
                conn.commit()
            result = await asyncio.to_thread(
                sync.wait, job_id, connection=conn, timeout=WAIT
            )
        status = conn.info.transaction_status
        channels = conn.execute("SELECT pg_listening_channels()").fetchall()

    assert result == "hi"
    assert status == psycopg.pq.TransactionStatus.IDLE
    assert channels == []


def test_wait_refuses_a_connection_inside_a_transaction(
    tx: psycopg.Connection[Any],
) -> None:
    job_id = sync.publish(tx, "echo", 1)

    with pytest.raises(ValueError, match="inside a transaction"):
        sync.wait(job_id, connection=tx, timeout=1.0)


async def test_publish_and_wait_in_another_schema(make_queue: Any, dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
        await migrations.migrate(aconn, schema="other")
    queue = make_queue(schema="other")
    queue.register("echo", lambda args: args)

    with psycopg.connect(dsn) as conn:
        async with queue:
            job_id = sync.publish(conn, "echo", "elsewhere", schema="other")
            conn.commit()
            result = await asyncio.to_thread(
                sync.wait, job_id, dsn=dsn, schema="other", timeout=WAIT
            )
        public_jobs = conn.execute("SELECT count(*) FROM public.jobs").fetchone()

    assert result == "elsewhere"
    assert public_jobs == (0,)


def test_wait_with_dsn_survives_its_connection_being_cut(
    tx: psycopg.Connection[Any], dsn: str, db: psycopg.Connection[Any]
) -> None:
    job_id = sync.publish(tx, "by-hand")
    tx.commit()
    outcome: dict[str, Any] = {}

    def waiter() -> None:
        outcome["result"] = sync.wait(job_id, dsn=dsn, timeout=WAIT, poll_interval=0.2)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    wait_until_waiting(db)
    cut = db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE state = 'idle' AND query LIKE '%job_outcomes%'"
    ).fetchall()
    db.execute(
        "UPDATE jobs SET status = 'resolved', result = '7' WHERE id = %s", (job_id,)
    )
    thread.join(WAIT)

    assert cut == [(True,)]
    assert outcome == {"result": 7}
