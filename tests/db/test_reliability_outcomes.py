"""Outcomes that must not get stuck: waiters that give up, and results the
database refuses to store."""

from __future__ import annotations

import asyncio
from typing import Any

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
