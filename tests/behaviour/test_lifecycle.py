"""Opening, closing and opening again, the same from Queue and MemoryQueue."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pyqueue import QueueNotOpen

WAIT = 30.0


async def test_job_cut_short_by_close_runs_again_after_reopen(
    make_any_queue: Any,
) -> None:
    queue = make_any_queue()
    calls = 0
    first_started = asyncio.Event()

    @queue.handler("stubborn")
    async def stubborn(args: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            first_started.set()
            await asyncio.Event().wait()  # only close() ends the first run
        return calls

    await queue.open()
    job = await queue.publish("stubborn")
    waiting = job.done
    await asyncio.wait_for(first_started.wait(), WAIT)
    await queue.close(grace=0.1)
    with pytest.raises(asyncio.CancelledError):
        await waiting

    await queue.open()
    result = await asyncio.wait_for(queue.job(job.id).done, WAIT)
    await queue.close()

    assert result == 2


async def test_close_lets_a_running_job_finish_within_grace(
    make_any_queue: Any,
) -> None:
    queue = make_any_queue()
    started = asyncio.Event()
    finish = asyncio.Event()
    finished: list[int] = []

    @queue.handler("work")
    async def work(args: int) -> int:
        started.set()
        await finish.wait()
        finished.append(args)
        return args

    await queue.open()
    await queue.publish("work", 7)
    await asyncio.wait_for(started.wait(), WAIT)
    closing = asyncio.ensure_future(queue.close(grace=WAIT))
    await asyncio.sleep(0)
    finish.set()
    await asyncio.wait_for(closing, WAIT)

    assert finished == [7]


async def test_done_of_a_closed_queue_raises_queue_not_open(
    make_any_queue: Any,
) -> None:
    queue = make_any_queue()

    async with queue:
        job = await queue.publish("nobody")

    with pytest.raises(QueueNotOpen):
        job.done  # noqa: B018


async def test_closing_twice_and_unopened_is_harmless(make_any_queue: Any) -> None:
    queue = make_any_queue()
    queue.register("echo", lambda args: args)

    await queue.close()
    async with queue as opened:
        result = await (await opened.publish("echo", 1)).done
    await queue.close()

    assert opened is queue
    assert result == 1


async def test_done_still_resolves_after_a_timed_out_wait(make_any_queue: Any) -> None:
    queue = make_any_queue()
    gate = asyncio.Event()

    @queue.handler("gated")
    async def gated(args: int) -> int:
        await gate.wait()
        return args

    async with queue:
        job = await queue.publish("gated", 5)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(job.done, 0.1)
        gate.set()
        result = await asyncio.wait_for(queue.job(job.id).done, WAIT)

    assert result == 5
