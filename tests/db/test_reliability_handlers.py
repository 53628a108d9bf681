"""Long jobs, blocking and misbehaving handlers, per-category timeouts, and
work that proceeds with no notifications at all."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from workers.procs import WorkerProcess

from pyqueue import JobRejected, Queue


@pytest.fixture
def thief(dsn: str, tmp_path: Path) -> Iterator[Any]:
    """Start a worker subprocess that would take any claim that runs out."""
    started: list[WorkerProcess] = []

    def start(**options: Any) -> WorkerProcess:
        worker = WorkerProcess(dsn, tmp_path, "thief", max_sleep=0, **options)
        started.append(worker)
        return worker.wait_ready()

    yield start
    for worker in started:
        worker.stop()


def attempts(db: psycopg.Connection[Any], job_id: int) -> int:
    row = db.execute("SELECT attempts FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return int(row[0])


async def test_job_running_past_claim_timeout_keeps_its_claim_while_renewed(
    make_queue: Any, db: psycopg.Connection[Any], thief: Any
) -> None:
    queue: Queue = make_queue(claim_timeout=0.5)
    started = asyncio.Event()

    @queue.handler("sleep")
    async def long(args: dict[str, Any]) -> str:
        started.set()
        await asyncio.sleep(2.5)
        return "mine"

    async with queue:
        job = await queue.publish("sleep", {"n": 1})
        await started.wait()
        await asyncio.to_thread(thief, claim_timeout=0.5)

        assert await asyncio.wait_for(job.done, 60) == "mine"
    assert attempts(db, job.id) == 1


async def test_blocking_plain_handler_does_not_stop_claim_renewal(
    make_queue: Any, db: psycopg.Connection[Any], thief: Any
) -> None:
    queue: Queue = make_queue(claim_timeout=0.5)
    started = threading.Event()

    @queue.handler("block")
    def blocking(args: dict[str, Any]) -> str:
        started.set()
        time.sleep(2.5)
        return "mine"

    async with queue:
        job = await queue.publish("block", {"n": 1})
        await asyncio.to_thread(started.wait, 30)
        await asyncio.to_thread(thief, claim_timeout=0.5)

        assert await asyncio.wait_for(job.done, 60) == "mine"
    assert attempts(db, job.id) == 1


@pytest.mark.parametrize("plain", [False, True], ids=["async", "plain"])
async def test_category_timeout_rejects_a_job_that_runs_past_it(
    make_queue: Any, plain: bool
) -> None:
    queue: Queue = make_queue()

    async def slow_async(args: Any) -> None:
        await asyncio.sleep(3600)

    def slow_plain(args: Any) -> None:
        time.sleep(3)

    queue.register("slow", slow_plain if plain else slow_async, timeout=0.2)
    queue.register("quick", lambda args: args)
    async with queue:
        slow = await queue.publish("slow", queue_name="a")
        quick = await queue.publish("quick", 7, queue_name="a")

        with pytest.raises(JobRejected) as rejected:
            await asyncio.wait_for(slow.done, 60)
        assert await asyncio.wait_for(quick.done, 60) == 7

    assert rejected.value.error["type"] == "TimeoutError"
    assert "'slow' timeout of 0.2s" in rejected.value.error["message"]


@pytest.mark.parametrize("timeout", [None, 60.0])
async def test_handler_raising_timeout_error_is_rejected_with_its_own_error(
    make_queue: Any, timeout: float | None
) -> None:
    queue: Queue = make_queue()

    async def upstream(args: Any) -> None:
        raise TimeoutError("upstream did not answer")

    queue.register("call", upstream, timeout=timeout)
    async with queue:
        job = await queue.publish("call")
        with pytest.raises(JobRejected) as rejected:
            await asyncio.wait_for(job.done, 60)

    assert rejected.value.error["type"] == "TimeoutError"
    assert rejected.value.error["message"] == "upstream did not answer"


@pytest.mark.parametrize(
    "error",
    [SystemExit(3), KeyboardInterrupt(), GeneratorExit(), asyncio.CancelledError()],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.parametrize("plain", [False, True], ids=["async", "plain"])
async def test_handler_raising_base_exception_is_rejected_and_worker_goes_on(
    make_queue: Any, error: BaseException, plain: bool
) -> None:
    queue: Queue = make_queue(claim_timeout=3600)

    async def raise_async(args: Any) -> None:
        raise error

    def raise_plain(args: Any) -> None:
        raise error

    queue.register("bad", raise_plain if plain else raise_async)
    queue.register("good", lambda args: args)
    async with queue:
        bad = await queue.publish("bad", queue_name="q")
        good = await queue.publish("good", 5, queue_name="q")

        with pytest.raises(JobRejected) as rejected:
            await asyncio.wait_for(bad.done, 60)
        assert await asyncio.wait_for(good.done, 60) == 5

    assert rejected.value.error["type"] == type(error).__name__


class DeafQueue(Queue):
    """A Queue whose listener never LISTENs, as behind a pooling proxy."""

    async def _setup_listener(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(self._statement("REGISTER_WORKER"), (self.worker_name,))

    async def _setup_results_listener(self, conn: psycopg.AsyncConnection[Any]) -> None:
        pass


async def test_work_and_results_proceed_by_polling_without_notifications(
    dsn: str,
) -> None:
    worker = DeafQueue(dsn, poll_interval=0.2)
    publisher = DeafQueue(dsn, poll_interval=0.2)
    worker.register("increment", lambda n: n + 1)
    async with worker, publisher:
        await asyncio.sleep(0.5)  # let the worker go idle, waiting for news
        jobs = [
            await publisher.publish("increment", n, queue_name="q") for n in range(5)
        ]

        results = await asyncio.wait_for(
            asyncio.gather(*(job.done for job in jobs)), 60
        )

    assert results == [1, 2, 3, 4, 5]
