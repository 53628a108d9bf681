"""Hand edits in SQL behave like the functions: same outcomes, same NOTIFYs."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from pyqueue import JobDeleted, JobRejected, Queue

Conn = psycopg.Connection[Any]


class Notes:
    """A LISTENing connection on both channels, read on demand."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute("LISTEN jobs")
        self.conn.execute("LISTEN jobs_finished")

    def read(self) -> list[tuple[str, Any]]:
        """Every notification delivered so far, as (channel, payload)."""
        return [
            (note.channel, json.loads(note.payload))
            for note in self.conn.notifies(timeout=0.2)
        ]


@pytest.fixture
def notes(dsn: str) -> Iterator[Notes]:
    listener = Notes(dsn)
    yield listener
    listener.conn.close()


def publish(db: Conn, queue: str = "q", category: str = "c") -> int:
    row = db.execute("SELECT publish_job(%s, '1', %s)", (category, queue)).fetchone()
    assert row is not None
    return int(row[0])


def test_finishing_by_hand_notifies_like_complete_job(db: Conn, notes: Notes) -> None:
    by_function = publish(db, "a")
    by_hand = publish(db, "b")
    publish(db, "a")
    publish(db, "b")
    db.execute("SELECT claim_next_job('w1')")
    db.execute("SELECT claim_next_job('w1')")
    notes.read()

    db.execute("SELECT complete_job(%s, 'w1', 'resolved', '5')", (by_function,))
    from_function = notes.read()
    db.execute(
        "UPDATE jobs SET status = 'resolved', result = '5' WHERE id = %s", (by_hand,)
    )
    from_hand = notes.read()

    # The queue's next job may run now: workers hear of it either way.
    assert from_function == [
        ("jobs_finished", {"id": by_function, "status": "resolved"}),
        ("jobs", {"queue": "a"}),
    ]
    assert from_hand == [
        ("jobs_finished", {"id": by_hand, "status": "resolved"}),
        ("jobs", {"queue": "b"}),
    ]
    rows = db.execute(
        "SELECT worker, finished_at IS NOT NULL FROM jobs WHERE id IN (%s, %s)",
        (by_function, by_hand),
    ).fetchall()
    assert rows == [(None, True), (None, True)]


def test_finishing_a_queues_last_job_wakes_no_worker(db: Conn, notes: Notes) -> None:
    job = publish(db, "a")
    db.execute("SELECT claim_next_job('w1')")
    notes.read()

    db.execute(
        "UPDATE jobs SET status = 'resolved', result = '5' WHERE id = %s", (job,)
    )

    assert notes.read() == [("jobs_finished", {"id": job, "status": "resolved"})]


def test_claiming_a_queues_next_job_in_the_same_transaction_wakes_no_worker(
    db: Conn, notes: Notes
) -> None:
    first = publish(db, "a")
    publish(db, "a")
    db.execute("SELECT claim_next_job('w1')")
    notes.read()

    db.execute(
        "SELECT * FROM complete_and_claim_jobs('w1', %s, %s, %s, 1)",
        ([first], ["resolved"], ["1"]),
    )

    assert notes.read() == [("jobs_finished", {"id": first, "status": "resolved"})]


def test_a_batch_of_completions_notifies_like_one_completion_each(
    db: Conn, notes: Notes
) -> None:
    a1, b1, c1, d1 = (publish(db, queue) for queue in "abcd")
    a2, b2, d2 = (publish(db, queue) for queue in "abd")
    for _ in range(4):
        db.execute("SELECT claim_next_job('w1')")
    db.execute("UPDATE jobs SET status = 'resolved', result = '0' WHERE id = %s", (c1,))
    notes.read()

    # One claim for four freed queues: a's next job is the oldest.
    rows = db.execute(
        "SELECT event, id FROM complete_and_claim_jobs('w1', %s, %s, %s, 1)",
        (
            [a1, b1, c1, d1],
            ["resolved", "rejected", "resolved", "resolved"],
            ["1", "{}", "1", "1"],
        ),
    ).fetchall()

    assert rows == [("refused", c1), ("claimed", a2)]
    # Each stored outcome is told; of the freed queues, b and d have a job
    # that another worker may claim now; the refused c1 sends nothing.
    assert sorted(notes.read(), key=str) == [
        ("jobs", {"queue": "b"}),
        ("jobs", {"queue": "d"}),
        ("jobs_finished", {"id": a1, "status": "resolved"}),
        ("jobs_finished", {"id": b1, "status": "rejected"}),
        ("jobs_finished", {"id": d1, "status": "resolved"}),
    ]
    waiting = db.execute(
        "SELECT id FROM jobs WHERE status = 'unfulfilled' AND worker IS NULL"
        " ORDER BY id"
    )
    assert waiting.fetchall() == [(b2,), (d2,)]


def test_a_hand_edit_after_a_completion_in_one_transaction_still_notifies(
    db: Conn, notes: Notes
) -> None:
    a1, b1 = publish(db, "a"), publish(db, "b")
    publish(db, "b")
    db.execute("SELECT claim_next_job('w1')")
    db.execute("SELECT claim_next_job('w1')")
    notes.read()

    # complete_job sends its own notifications and silences the row triggers
    # meanwhile; an edit after it must be heard as usual.
    with db.transaction():
        db.execute("SELECT complete_job(%s, 'w1', 'resolved', '1')", (a1,))
        db.execute(
            "UPDATE jobs SET status = 'rejected', result = '{}' WHERE id = %s", (b1,)
        )

    assert sorted(notes.read(), key=str) == [
        ("jobs", {"queue": "b"}),
        ("jobs_finished", {"id": a1, "status": "resolved"}),
        ("jobs_finished", {"id": b1, "status": "rejected"}),
    ]


def test_publish_notifies_once_per_queue_of_a_statement(db: Conn, notes: Notes) -> None:
    db.execute(
        "SELECT publish_jobs(ARRAY['c', 'c', 'c'], ARRAY['1', '2', '3']::jsonb[],"
        " ARRAY['a', 'b', 'a'])"
    )

    assert sorted(notes.read(), key=str) == [
        ("jobs", {"queue": "a"}),
        ("jobs", {"queue": "b"}),
    ]


def test_setting_unfulfilled_clears_finished_at_and_notifies(
    db: Conn, notes: Notes
) -> None:
    job = publish(db)
    db.execute(
        "UPDATE jobs SET status = 'rejected', result = '{}' WHERE id = %s", (job,)
    )
    notes.read()

    db.execute("UPDATE jobs SET status = 'unfulfilled' WHERE id = %s", (job,))

    assert notes.read() == [("jobs", {"queue": "q"})]
    row = db.execute("SELECT finished_at, result FROM jobs WHERE id = %s", (job,))
    assert row.fetchone() == (None, None)


def test_deleting_a_waiting_job_notifies_its_waiters(db: Conn, notes: Notes) -> None:
    job = publish(db)
    notes.read()

    db.execute("DELETE FROM jobs WHERE id = %s", (job,))

    assert notes.read() == [
        ("jobs_finished", {"id": job, "status": "deleted"}),
        ("jobs", {"queue": "q"}),
    ]


def test_invalid_status_is_refused_by_the_table(db: Conn) -> None:
    job = publish(db)

    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("UPDATE jobs SET status = 'done' WHERE id = %s", (job,))


async def test_resolving_by_hand_resolves_done(make_queue: Any, db: Conn) -> None:
    queue: Queue = make_queue()
    async with queue:
        job = await queue.publish("nobody-handles-this", 1)
        waiting = asyncio.ensure_future(job.done)
        await asyncio.sleep(0.1)

        db.execute(
            "UPDATE jobs SET status = 'resolved', result = '\"by hand\"' WHERE id = %s",
            (job.id,),
        )

        assert await asyncio.wait_for(waiting, 10) == "by hand"


async def test_rejecting_by_hand_rejects_done(make_queue: Any, db: Conn) -> None:
    queue: Queue = make_queue()
    async with queue:
        job = await queue.publish("nobody-handles-this", 1)

        db.execute(
            "UPDATE jobs SET status = 'rejected', result = '{\"message\": \"no\"}'"
            " WHERE id = %s",
            (job.id,),
        )

        with pytest.raises(JobRejected) as raised:
            await asyncio.wait_for(job.done, 10)
    assert raised.value.job_id == job.id
    assert raised.value.error == {"message": "no"}


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        (None, "no error was recorded"),  # what cancel_job's hint suggests
        ("out of stock", "out of stock"),
        ([1, 2], "[1, 2]"),
    ],
)
async def test_rejecting_by_hand_without_an_error_dict_still_gives_one(
    make_queue: Any, db: Conn, stored: Any, message: str
) -> None:
    queue: Queue = make_queue()
    async with queue:
        job = await queue.publish("nobody-handles-this", 1)

        db.execute(
            "UPDATE jobs SET status = 'rejected', result = %s WHERE id = %s",
            (None if stored is None else Jsonb(stored), job.id),
        )

        with pytest.raises(JobRejected) as raised:
            await asyncio.wait_for(job.done, 10)
    assert raised.value.error == {
        "type": None,
        "message": message,
        "traceback": None,
        "result": stored,
    }
    assert str(raised.value) == f"job {job.id} was rejected: {message}"


async def test_deleting_a_waiting_job_fails_done(make_queue: Any, db: Conn) -> None:
    queue: Queue = make_queue()
    async with queue:
        job = await queue.publish("nobody-handles-this", 1)
        waiting = asyncio.ensure_future(job.done)
        await asyncio.sleep(0.1)

        db.execute("DELETE FROM jobs WHERE id = %s", (job.id,))

        with pytest.raises(JobDeleted, match=f"job {job.id} was deleted"):
            await asyncio.wait_for(waiting, 10)


async def test_setting_unfulfilled_runs_the_job_again(
    make_queue: Any, db: Conn
) -> None:
    queue: Queue = make_queue()
    calls: list[int] = []
    queue.register("count", lambda n: calls.append(n) or len(calls))

    async with queue:
        job = await queue.publish("count", 7)
        assert await job.done == 1

        db.execute("UPDATE jobs SET status = 'unfulfilled' WHERE id = %s", (job.id,))

        assert await asyncio.wait_for(queue.job(job.id).done, 10) == 2
    assert calls == [7, 7]


async def test_moving_a_waiting_job_lets_it_run_in_its_new_queue(
    make_queue: Any, db: Conn
) -> None:
    queue: Queue = make_queue()
    release = asyncio.Event()

    @queue.handler("hold")
    async def hold(_: Any) -> str:
        await release.wait()
        return "held"

    queue.register("quick", lambda _: "quick")

    async with queue:
        blocker = await queue.publish("hold", None, queue_name="busy")
        stuck = await queue.publish("quick", None, queue_name="busy")

        db.execute("UPDATE jobs SET queue = 'free' WHERE id = %s", (stuck.id,))

        assert await asyncio.wait_for(stuck.done, 10) == "quick"
        assert not blocker.done.done()
        release.set()
        assert await asyncio.wait_for(blocker.done, 10) == "held"


async def test_worker_whose_job_was_finished_by_hand_loses_its_claim(
    make_queue: Any, db: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    queue: Queue = make_queue()
    started = asyncio.Event()
    release = asyncio.Event()

    @queue.handler("slow")
    async def slow(_: Any) -> str:
        started.set()
        await release.wait()
        return "from the worker"

    async with queue:
        job = await queue.publish("slow", None)
        await asyncio.wait_for(started.wait(), 10)

        db.execute(
            "UPDATE jobs SET status = 'resolved', result = '\"operator\"'"
            " WHERE id = %s",
            (job.id,),
        )
        assert await asyncio.wait_for(job.done, 10) == "operator"
        with caplog.at_level(logging.WARNING, logger="pyqueue"):
            release.set()
            for _ in range(100):
                if "lost" in caplog.text:
                    break
                await asyncio.sleep(0.05)

    assert f"claim on job {job.id} lost" in caplog.text
    row = db.execute("SELECT status, result FROM jobs WHERE id = %s", (job.id,))
    assert row.fetchone() == ("resolved", "operator")
