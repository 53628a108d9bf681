"""What MemoryQueue offers users' tests beyond the shared behaviour suite."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pyqueue import JobDeleted, QueueLike
from pyqueue.testing import JobRecord, MemoryQueue

WAIT = 30.0


async def publish_welcome(queue: QueueLike, email: str) -> int:
    """Application code written against the protocol."""
    job = await queue.publish("welcome-mail", {"to": email}, queue_name=email)
    return job.id


async def test_jobs_shows_what_application_code_published() -> None:
    queue = MemoryQueue()

    async with queue:
        job_id = await publish_welcome(queue, "ada@example.org")

    [record] = queue.jobs()
    assert record == JobRecord(
        id=job_id,
        category="welcome-mail",
        args={"to": "ada@example.org"},
        status="unfulfilled",
        created_at=record.created_at,
        finished_at=None,
        queue="ada@example.org",
        result=None,
        attempts=0,
    )


async def test_jobs_shows_outcomes_and_attempts() -> None:
    queue = MemoryQueue()
    queue.register("half", lambda n: n / 2)

    async with queue:
        ok = await queue.publish("half", 3)
        bad = await queue.publish("half", "x")
        await ok.done
        with pytest.raises(Exception, match="rejected"):
            await bad.done

    first, second = queue.jobs()
    assert (first.status, first.result, first.attempts) == ("resolved", 1.5, 1)
    assert first.finished_at is not None and first.finished_at >= first.created_at
    assert second.status == "rejected"
    assert second.result["type"] == "TypeError"


async def test_records_are_copies_decoded_from_json() -> None:
    queue = MemoryQueue()

    async with queue:
        await queue.publish("keep", {"items": (1, 2)})

    record = queue.jobs()[0]
    record.args["items"].append(3)
    assert queue.jobs()[0].args == {"items": [1, 2]}


async def test_delete_fails_waiters_with_job_deleted() -> None:
    queue = MemoryQueue()

    async with queue:
        job = await queue.publish("nobody-handles-this")
        waiting = asyncio.ensure_future(job.done)
        await asyncio.sleep(0)
        queue.delete(job.id)
        with pytest.raises(JobDeleted):
            await asyncio.wait_for(waiting, WAIT)

    assert queue.jobs() == []


async def test_delete_of_a_running_job_discards_its_late_result() -> None:
    queue = MemoryQueue()
    started = asyncio.Event()
    finish = asyncio.Event()

    @queue.handler("slow")
    async def slow(args: Any) -> str:
        started.set()
        await finish.wait()
        return "late"

    async with queue:
        job = await queue.publish("slow", queue_name="q")
        after = await queue.publish("slow", queue_name="q")
        await asyncio.wait_for(started.wait(), WAIT)
        queue.delete(job.id)
        with pytest.raises(JobDeleted):
            await asyncio.wait_for(job.done, WAIT)
        finish.set()
        result = await asyncio.wait_for(after.done, WAIT)

    assert result == "late"
    assert [record.id for record in queue.jobs()] == [after.id]


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        MemoryQueue(concurrency=0)
    queue = MemoryQueue()
    with pytest.raises(ValueError, match="category must not be empty"):
        queue.register("", print)
    with pytest.raises(ValueError, match="timeout must be positive"):
        queue.register("x", print, timeout=0)


async def test_publish_by_bound_method_finds_its_category() -> None:
    class Mailer:
        def __init__(self) -> None:
            self.sent: list[str] = []

        def send(self, to: str) -> str:
            self.sent.append(to)
            return f"sent to {to}"

    mailer = Mailer()
    queue = MemoryQueue()
    queue.register("mail", mailer.send)

    async with queue:
        job = await queue.publish(mailer.send, "ada@example.org")
        result = await asyncio.wait_for(job.done, WAIT)

    assert result == "sent to ada@example.org"
    assert mailer.sent == ["ada@example.org"]
