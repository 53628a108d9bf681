"""The seed scenario: publish 17 to increment-queue, get 18, see the row."""

from __future__ import annotations

from typing import Any

import psycopg

from pyqueue import Queue

CONTRACT_COLUMNS = [
    "id",
    "category",
    "args",
    "status",
    "created_at",
    "finished_at",
    "queue",
    "result",
]


async def test_increment_resolves_and_row_shows_contract_columns(
    make_queue: Any, db: psycopg.Connection[Any]
) -> None:
    queue: Queue = make_queue()

    @queue.handler("increment")
    async def increment(a: int) -> int:
        return a + 1

    async with queue:
        job = await queue.publish("increment", 17, queue_name="increment-queue")
        assert await job.done == 18

    cursor = db.execute("SELECT * FROM jobs")
    columns = [column.name for column in cursor.description or []]
    row = dict(zip(columns, cursor.fetchone() or (), strict=True))
    assert columns[:8] == CONTRACT_COLUMNS
    assert row["id"] == job.id
    assert row["category"] == "increment"
    assert row["args"] == 17
    assert row["status"] == "resolved"
    assert row["queue"] == "increment-queue"
    assert row["result"] == 18
    assert row["finished_at"] >= row["created_at"]


async def test_publish_without_queue_name_lands_in_default(
    make_queue: Any, db: psycopg.Connection[Any]
) -> None:
    queue: Queue = make_queue()

    async with queue:
        job = await queue.publish("anything", {"x": 1})

    row = db.execute(
        "SELECT queue, status FROM jobs WHERE id = %s", (job.id,)
    ).fetchone()
    assert row == ("default", "unfulfilled")


async def test_done_can_be_awaited_many_times(make_queue: Any) -> None:
    queue: Queue = make_queue()
    queue.register("echo", lambda args: args)

    async with queue:
        job = await queue.publish("echo", [1, "two", None])
        first = await job.done
        second = await job.done
        third = await queue.job(job.id).done

    assert first == second == third == [1, "two", None]
