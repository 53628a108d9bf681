"""Outcomes that must not get stuck: waiters that give up, results the
database refuses to store, and jobs that finished before anyone waited; and
the read a publisher can do without."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from pyqueue import JobRejected, Queue


async def test_done_resolves_for_later_waiters_after_one_gave_up(
    make_queue: Any,
) -> None:
    publisher: Queue = make_queue()
    worker: Queue = make_queue()
    worker.register("increment", lambda n: n + 1)

    async with publisher:
        job = await publisher.publish("increment", 1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(job.done, 0.1)  # nobody works it yet
        async with worker:
            assert await asyncio.wait_for(job.done, 30) == 2
            assert await publisher.job(job.id).done == 2


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
async def test_outcome_jsonb_cannot_hold_rejects_the_job_and_worker_goes_on(
    make_queue: Any, raises: bool
) -> None:
    queue: Queue = make_queue()

    def nul(args: Any) -> str:
        if raises:
            raise ValueError("bad\x00byte")
        return "bad\x00byte"

    queue.register("nul", nul)
    queue.register("increment", lambda n: n + 1)
    async with queue:
        bad = await queue.publish("nul", queue_name="q")
        good = await queue.publish("increment", 1, queue_name="q")

        with pytest.raises(JobRejected) as rejected:
            await asyncio.wait_for(bad.done, 30)
        assert await asyncio.wait_for(good.done, 30) == 2

    assert rejected.value.error["type"] == "ValueError"
    assert "cannot be stored" in rejected.value.error["message"]


class ReadCountingQueue(Queue):
    """A Queue that counts its reads of job_outcomes()."""

    reads = 0

    async def _fetch_outcomes(self, job_ids: list[int]) -> list[tuple[int, str, Any]]:
        self.reads += 1
        return await super()._fetch_outcomes(job_ids)


async def _listening(make_queue: Any, dsn: str) -> tuple[ReadCountingQueue, Queue]:
    """An open publisher whose results listener LISTENs, and an open worker."""
    publisher = ReadCountingQueue(dsn, poll_interval=30.0)
    worker: Queue = make_queue()
    worker.register("increment", lambda n: n + 1)
    await publisher.open()
    await worker.open()
    # The first wait starts the results listener; a job published after it
    # LISTENs is one whose finish it hears.
    assert await asyncio.wait_for((await publisher.publish("increment", 0)).done, 30)
    deadline = time.monotonic() + 10
    while publisher._outcomes is None or publisher._outcomes.hearing() is None:
        assert time.monotonic() < deadline, "the results listener never connected"
        await asyncio.sleep(0.01)
    return publisher, worker


async def test_waiting_for_a_job_published_here_reads_its_outcome_once(
    make_queue: Any, dsn: str
) -> None:
    publisher, worker = await _listening(make_queue, dsn)
    try:
        before = publisher.reads
        for n in range(1, 11):
            job = await publisher.publish("increment", n)
            assert await asyncio.wait_for(job.done, 30) == n + 1
        reads = publisher.reads - before
    finally:
        await worker.close()
        await publisher.close()

    # One read per job, when its notification comes; reading it also as the
    # wait began (two per job) found it unfinished every time.
    assert reads < 2 * 10


async def test_job_that_finished_before_its_wait_began_resolves_at_once(
    make_queue: Any, dsn: str, db: psycopg.Connection[Any]
) -> None:
    publisher, worker = await _listening(make_queue, dsn)
    try:
        job = await publisher.publish("increment", 1)
        deadline = time.monotonic() + 30
        while db.execute(
            "SELECT status = 'unfulfilled' FROM jobs WHERE id = %s", (job.id,)
        ).fetchone() != (False,):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # its notification came while nobody waited
        # Read at once, not at the next poll, 30 s away.
        assert await asyncio.wait_for(job.done, 5) == 2
    finally:
        await worker.close()
        await publisher.close()


async def test_finished_job_awaited_again_or_through_another_job_resolves_at_once(
    make_queue: Any, dsn: str
) -> None:
    publisher, worker = await _listening(make_queue, dsn)
    try:
        job = await publisher.publish("increment", 1)
        assert await asyncio.wait_for(job.done, 30) == 2
        # Read at once, not at the next poll, 30 s away.
        assert await asyncio.wait_for(job.done, 5) == 2

        other = await publisher.publish("increment", 2)
        assert await asyncio.wait_for(publisher.job(other.id).done, 30) == 3
        assert await asyncio.wait_for(other.done, 5) == 3
    finally:
        await worker.close()
        await publisher.close()
