"""One at a time per queue in publish order, queues in parallel, the same from
Queue and MemoryQueue."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from typing import Any

import pytest

from pyqueue import InvalidJob, JobRejected

WAIT = 30.0  # generous bound on waits for events that must come


async def test_job_waits_for_older_job_of_its_queue(make_any_queue: Any) -> None:
    queue = make_any_queue()
    release = asyncio.Event()
    started: list[str] = []

    @queue.handler("step")
    async def step(name: str) -> str:
        started.append(name)
        if name == "first":
            await release.wait()
        return name

    async with queue:
        first = await queue.publish("step", "first", queue_name="q")
        second = await queue.publish("step", "second", queue_name="q")
        marker = await queue.publish("step", "marker", queue_name="other")

        # The marker was published after `second` and has run, so the worker
        # has had its chance at `second` and must have passed it over.
        await asyncio.wait_for(marker.done, WAIT)
        started_while_first_ran = list(started)
        release.set()
        results = [await first.done, await second.done]

    assert started_while_first_ran == ["first", "marker"]
    assert results == ["first", "second"]
    assert started == ["first", "marker", "second"]


async def test_rejected_job_frees_its_queue_for_the_next(make_any_queue: Any) -> None:
    queue = make_any_queue()

    @queue.handler("maybe")
    def maybe(args: str) -> str:
        if args == "fail":
            raise RuntimeError("no")
        return args

    async with queue:
        failing = await queue.publish("maybe", "fail", queue_name="q")
        after = await queue.publish("maybe", "after", queue_name="q")
        result = await asyncio.wait_for(after.done, WAIT)
        with pytest.raises(JobRejected):
            await failing.done

    assert result == "after"


async def test_jobs_of_different_queues_run_at_the_same_time(
    make_any_queue: Any,
) -> None:
    queue = make_any_queue(concurrency=2)
    arrived = {"a": asyncio.Event(), "b": asyncio.Event()}

    # Each job waits until the other has started: only parallel runs finish.
    @queue.handler("meet")
    async def meet(me: str) -> str:
        arrived[me].set()
        other = "b" if me == "a" else "a"
        await arrived[other].wait()
        return me

    async with queue:
        a = await queue.publish("meet", "a", queue_name="qa")
        b = await queue.publish("meet", "b", queue_name="qb")
        results = await asyncio.wait_for(asyncio.gather(a.done, b.done), WAIT)

    assert results == ["a", "b"]


async def test_blocking_plain_handler_does_not_stall_other_queues(
    make_any_queue: Any,
) -> None:
    queue = make_any_queue(concurrency=2)
    gate = threading.Event()

    queue.register("block", lambda args: gate.wait(WAIT))
    queue.register("quick", lambda args: "quick")

    async with queue:
        blocked = await queue.publish("block", queue_name="slow")
        quick = await queue.publish("quick", queue_name="fast")
        quick_result = await asyncio.wait_for(quick.done, WAIT)
        gate.set()
        blocked_result = await asyncio.wait_for(blocked.done, WAIT)

    assert quick_result == "quick"
    assert blocked_result is True


async def test_concurrency_bounds_jobs_running_at_once(make_any_queue: Any) -> None:
    queue = make_any_queue(concurrency=2)
    running = 0
    most = 0
    two_running = asyncio.Event()

    @queue.handler("count")
    async def count(args: Any) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        if running == 2:
            two_running.set()
        await two_running.wait()
        if not args:
            # The first job holds its slot a while, the window in which a third
            # job would start if the bound were not kept: no event can show
            # that something does not happen.
            await asyncio.sleep(0.3)
        running -= 1

    async with queue:
        jobs = [await queue.publish("count", n, queue_name=f"q{n}") for n in range(4)]
        await asyncio.wait_for(asyncio.gather(*(job.done for job in jobs)), WAIT)

    assert most == 2


async def test_many_queues_drain_each_in_publish_order(make_any_queue: Any) -> None:
    queue = make_any_queue(concurrency=3)
    seen: dict[str, list[int]] = defaultdict(list)

    @queue.handler("record")
    async def record(args: list[Any]) -> int:
        name, n = args
        seen[name].append(n)
        await asyncio.sleep(0)
        return int(n)

    async with queue:
        pairs = [("record", [f"q{n % 4}", n]) for n in range(40)]
        jobs = await queue.publish_many(
            pairs, queue_name=[f"q{n % 4}" for n in range(40)]
        )
        results = await asyncio.wait_for(
            asyncio.gather(*(job.done for job in jobs)), WAIT
        )

    assert results == list(range(40))
    assert [job.id for job in jobs] == sorted(job.id for job in jobs)
    for name, ns in seen.items():
        assert ns == sorted(ns), name
        assert len(ns) == 10


async def test_publish_many_with_one_queue_name_keeps_input_order(
    make_any_queue: Any,
) -> None:
    queue = make_any_queue()
    order: list[str] = []
    queue.register("note", order.append)

    async with queue:
        jobs = await queue.publish_many(
            [("note", "x"), ("note", "y"), ("note", "z")], queue_name="one"
        )
        await asyncio.wait_for(asyncio.gather(*(job.done for job in jobs)), WAIT)

    assert order == ["x", "y", "z"]


async def test_publish_many_refuses_queue_names_of_other_length(
    make_any_queue: Any,
) -> None:
    queue = make_any_queue()

    async with queue:
        before = await queue.publish("a", 0)
        with pytest.raises(InvalidJob, match="got 2 jobs but 1 queue names"):
            await queue.publish_many([("a", 1), ("a", 2)], queue_name=["x"])
        after = await queue.publish("a", 3)

    assert after.id == before.id + 1


async def test_no_queue_name_means_the_default_queue(make_any_queue: Any) -> None:
    queue = make_any_queue()
    release = asyncio.Event()
    started: list[str] = []

    @queue.handler("step")
    async def step(name: str) -> str:
        started.append(name)
        if name == "first":
            await release.wait()
        return name

    async with queue:
        first = await queue.publish("step", "first")
        second = await queue.publish("step", "second", queue_name=None)
        marker = await queue.publish("step", "marker", queue_name="other")
        await asyncio.wait_for(marker.done, WAIT)
        started_while_first_ran = list(started)
        release.set()
        await asyncio.wait_for(asyncio.gather(first.done, second.done), WAIT)

    assert started_while_first_ran == ["first", "marker"]
