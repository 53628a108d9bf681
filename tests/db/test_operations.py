"""Operating from psql: the monitoring views and the operator functions of 0004.

Each function must leave the same rows and send the same notifications as the
plain UPDATE or DELETE its header documents.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from pyqueue import JobRejected, migrations


def publish(db: psycopg.Connection[Any], category: str, queue: str = "q") -> int:
    row = db.execute("SELECT publish_job(%s, '1', %s)", (category, queue)).fetchone()
    assert row is not None
    return int(row[0])


def claim(db: psycopg.Connection[Any], worker: str = "w1") -> int:
    row = db.execute("SELECT id FROM claim_next_job(%s)", (worker,)).fetchone()
    assert row is not None
    return int(row[0])


def complete(db: psycopg.Connection[Any], job_id: int, status: str, worker="w1"):
    db.execute(
        'SELECT complete_job(%s, %s, %s, \'{"message": "m"}\')',
        (job_id, worker, status),
    )


def row(db: psycopg.Connection[Any], job_id: int) -> dict[str, Any]:
    cursor = db.execute(
        "SELECT status, result, queue, worker, finished_at IS NOT NULL AS finished"
        " FROM jobs WHERE id = %s",
        (job_id,),
    )
    names = [c.name for c in cursor.description or []]
    found = cursor.fetchone()
    assert found is not None
    return dict(zip(names, found, strict=True))


def notifications_of(dsn: str, statement: str, params: tuple = ()) -> list[tuple]:
    """Run `statement` on its own connection; the notifications it caused."""
    with (
        psycopg.connect(dsn, autocommit=True) as listener,
        psycopg.connect(dsn, autocommit=True) as actor,
    ):
        listener.execute("LISTEN jobs")
        listener.execute("LISTEN jobs_finished")
        actor.execute(statement, params)
        actor.execute("NOTIFY jobs, 'end'")
        seen = []
        for note in listener.notifies(timeout=30):
            if note.payload == "end":
                break
            seen.append((note.channel, note.payload))
        return seen


def test_queue_stats_counts_each_state_per_queue(db: psycopg.Connection[Any]) -> None:
    done, failed, running = (publish(db, "c", "a") for _ in range(3))
    publish(db, "c", "a")
    publish(db, "c", "b")
    for job_id in (done, failed):
        assert claim(db) == job_id
        complete(db, job_id, "resolved" if job_id == done else "rejected")
    assert claim(db, "w7") == running

    stats = db.execute(
        "SELECT queue, waiting, running, worker, running_since IS NOT NULL,"
        " resolved, rejected, oldest_waiting_age >= interval '0'"
        " FROM queue_stats"
    ).fetchall()

    assert stats == [
        ("a", 1, 1, "w7", True, 1, 1, True),
        ("b", 1, 0, None, False, 0, 0, True),
    ]


def test_running_jobs_shows_worker_and_claim_expiry(
    db: psycopg.Connection[Any],
) -> None:
    job_id = publish(db, "c")
    publish(db, "c", "other")
    claim(db, "w1")

    rows = db.execute(
        "SELECT id, worker, claim_expires_at > claimed_at, claim_expired"
        " FROM running_jobs"
    ).fetchall()

    assert rows == [(job_id, "w1", True, False)]


def test_rerun_job_equals_the_plain_update(
    dsn: str, db: psycopg.Connection[Any]
) -> None:
    by_function, by_update = publish(db, "c"), publish(db, "c")
    for job_id in (by_function, by_update):
        claim(db)
        complete(db, job_id, "rejected")

    function_notes = notifications_of(dsn, "SELECT rerun_job(%s)", (by_function,))
    update_notes = notifications_of(
        dsn,
        "UPDATE jobs SET status = 'unfulfilled' WHERE id = %s AND status = 'rejected'",
        (by_update,),
    )

    assert row(db, by_function) == row(db, by_update)
    assert row(db, by_function)["status"] == "unfulfilled"
    assert row(db, by_function)["result"] is None
    assert function_notes == update_notes == [("jobs", '{"queue" : "q"}')]
    assert claim(db) == by_function  # runs again, first in its queue


def test_rerun_job_refuses_resolved_and_missing_jobs(
    db: psycopg.Connection[Any],
) -> None:
    job_id = publish(db, "c")
    waiting = publish(db, "c", "other")
    claim(db)
    complete(db, job_id, "resolved")

    with pytest.raises(psycopg.Error) as resolved:
        db.execute("SELECT rerun_job(%s)", (job_id,))
    with pytest.raises(psycopg.Error) as missing:
        db.execute("SELECT rerun_job(12345)")
    nothing = db.execute("SELECT rerun_job(%s)", (waiting,)).fetchone()

    assert resolved.value.sqlstate == "PQ008"
    assert "UPDATE jobs SET status" in (resolved.value.diag.message_hint or "")
    assert missing.value.sqlstate == "PQ007"
    assert nothing == (False,)
    assert row(db, job_id)["status"] == "resolved"


def test_cancel_job_equals_the_plain_update(
    dsn: str, db: psycopg.Connection[Any]
) -> None:
    by_function, by_update = publish(db, "c", "a"), publish(db, "c", "b")

    function_notes = notifications_of(dsn, "SELECT cancel_job(%s)", (by_function,))
    update_notes = notifications_of(
        dsn,
        "UPDATE jobs SET status = 'rejected', result = jsonb_build_object("
        " 'type', 'Cancelled', 'message', 'cancelled by an operator',"
        " 'cancelled_by', current_user)"
        " WHERE id = %s AND status = 'unfulfilled' AND worker IS NULL",
        (by_update,),
    )

    assert row(db, by_function) | {"queue": "b"} == row(db, by_update)
    assert row(db, by_function)["result"]["type"] == "Cancelled"
    # Nothing is left to claim in either queue, so no jobs NOTIFY.
    assert [channel for channel, _ in function_notes] == ["jobs_finished"]
    assert [channel for channel, _ in update_notes] == ["jobs_finished"]
    assert db.execute("SELECT * FROM claim_next_job('w1')").fetchall() == []


def test_cancel_job_refuses_a_running_job(db: psycopg.Connection[Any]) -> None:
    job_id = publish(db, "c")
    claim(db)

    with pytest.raises(psycopg.Error) as caught:
        db.execute("SELECT cancel_job(%s)", (job_id,))

    assert caught.value.sqlstate == "PQ009"
    assert row(db, job_id)["worker"] == "w1"


async def test_cancelled_job_fails_its_waiter_with_the_reason(
    make_queue: Any, db: psycopg.Connection[Any]
) -> None:
    queue = make_queue()
    async with queue:
        job = await queue.publish("nobody-handles-this", 1)

        db.execute("SELECT cancel_job(%s, 'duplicate of 7')", (job.id,))

        with pytest.raises(JobRejected) as caught:
            await asyncio.wait_for(job.done, 30)
    assert caught.value.error["type"] == "Cancelled"
    assert caught.value.error["message"] == "duplicate of 7"


def test_move_jobs_moves_waiting_jobs_and_leaves_the_running_one(
    dsn: str, db: psycopg.Connection[Any]
) -> None:
    running = publish(db, "c", "slow")
    waiting = [publish(db, "c", "slow") for _ in range(2)]
    claim(db)

    notes = notifications_of(dsn, "SELECT move_jobs('slow', 'fast')")

    assert row(db, running)["queue"] == "slow"
    assert [row(db, job_id)["queue"] for job_id in waiting] == ["fast", "fast"]
    assert ("jobs", '{"queue" : "fast"}') in notes
    assert claim(db, "w2") == waiting[0]  # no longer behind the running job


def test_move_jobs_equals_the_plain_update(
    dsn: str, db: psycopg.Connection[Any]
) -> None:
    moved_by_function = publish(db, "c", "a")
    moved_by_update = publish(db, "c", "b")

    function_notes = notifications_of(dsn, "SELECT move_jobs('a', 'x')")
    update_notes = notifications_of(
        dsn,
        "UPDATE jobs SET queue = 'y'"
        " WHERE queue = 'b' AND status = 'unfulfilled' AND worker IS NULL",
    )

    assert row(db, moved_by_function) | {"queue": "y"} == row(db, moved_by_update)
    # Only the queue the job moved into has something to claim now.
    assert function_notes == [("jobs", '{"queue" : "x"}')]
    assert update_notes == [("jobs", '{"queue" : "y"}')]


def test_move_jobs_with_ids_moves_only_those(db: psycopg.Connection[Any]) -> None:
    first, second = publish(db, "c"), publish(db, "c")

    moved = db.execute("SELECT move_jobs('q', 'z', ARRAY[%s]::bigint[])", (second,))

    assert moved.fetchone() == (1,)
    assert (row(db, first)["queue"], row(db, second)["queue"]) == ("q", "z")


def test_prune_jobs_deletes_old_finished_jobs_in_batches(
    dsn: str, db: psycopg.Connection[Any]
) -> None:
    old = [publish(db, "c", f"q{i}") for i in range(5)]
    for job_id in old:
        claim(db)
        complete(db, job_id, "resolved")
    db.execute("UPDATE jobs SET finished_at = now() - interval '40 days'")
    recent = publish(db, "c", "r")
    claim(db)
    complete(db, recent, "rejected")
    waiting = publish(db, "c", "w")

    first = db.execute("SELECT prune_jobs(interval '30 days', 2)").fetchone()
    # The documented loop: one short transaction per batch.
    notes = notifications_of(
        dsn,
        "DO $$ BEGIN"
        " WHILE prune_jobs(interval '30 days', 2) > 0 LOOP COMMIT; END LOOP;"
        " END $$",
    )

    assert first == (2,)
    left = [r[0] for r in db.execute("SELECT id FROM jobs ORDER BY id").fetchall()]
    assert left == [recent, waiting]
    assert notes == []


def test_prune_jobs_refuses_a_negative_interval(db: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.Error) as caught:
        db.execute("SELECT prune_jobs(interval '-1 day')")

    assert caught.value.sqlstate == "PQ011"


async def test_operations_work_schema_qualified_from_a_path_without_it(
    empty_dsn: str,
) -> None:
    async with await psycopg.AsyncConnection.connect(
        empty_dsn, autocommit=True
    ) as conn:
        await migrations.migrate(conn, schema="ops")

    with psycopg.connect(empty_dsn, autocommit=True) as db:
        db.execute("SET search_path TO pg_catalog")
        first = db.execute("SELECT ops.publish_job('c', '1', 'a')").fetchone()
        second = db.execute("SELECT ops.publish_job('c', '2', 'a')").fetchone()
        assert first and second
        db.execute("SELECT ops.cancel_job(%s)", (first[0],))
        db.execute("SELECT ops.rerun_job(%s)", (first[0],))
        db.execute("SELECT ops.move_jobs('a', 'b')")
        stats = db.execute("SELECT queue, waiting FROM ops.queue_stats").fetchall()
        db.execute("UPDATE ops.jobs SET status = 'resolved', result = '1'")
        db.execute("UPDATE ops.jobs SET finished_at = now() - interval '2 days'")
        pruned = db.execute("SELECT ops.prune_jobs(interval '1 day')").fetchone()

    assert stats == [("b", 2)]
    assert pruned == (2,)
