"""Observers of job events (``queue.observe``): what they hear from real jobs,
on Queue and MemoryQueue, and the Prometheus example fed by them."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry

from pyqueue import (
    JobAbandoned,
    JobEvent,
    JobFinished,
    JobLostClaim,
    JobRejected,
    JobStarted,
    Queue,
)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from examples import prometheus_metrics, tasks  # noqa: E402

WAIT = 60.0


def fail(message: str) -> None:
    raise KeyError(message)


async def test_observer_hears_start_then_finish_with_status_and_duration(
    make_any_queue: Callable[..., Any],
) -> None:
    queue = make_any_queue()
    events: list[JobEvent] = []
    queue.register("increment", lambda n: n + 1)
    queue.register("fail", fail)
    queue.observe(events.append)

    async with queue:
        good = await queue.publish("increment", 1, queue_name="q")
        bad = await queue.publish("fail", "boom", queue_name="q")
        await asyncio.wait_for(good.done, WAIT)
        with pytest.raises(JobRejected):
            await asyncio.wait_for(bad.done, WAIT)

    # Closing waits for the worker's jobs to settle, events included.
    worker = queue.worker_name
    assert [type(event) for event in events] == [
        JobStarted,
        JobFinished,
        JobStarted,
        JobFinished,
    ]
    assert events[0] == JobStarted(good.id, "increment", "q", worker, 1)
    assert events[2] == JobStarted(bad.id, "fail", "q", worker, 1)
    finished = [event for event in events if isinstance(event, JobFinished)]
    assert [(e.job_id, e.status, e.error_type) for e in finished] == [
        (good.id, "resolved", None),
        (bad.id, "rejected", "KeyError"),
    ]
    assert all(
        e.duration >= 0 and e.category in ("increment", "fail") for e in finished
    )


async def test_observer_that_raises_is_logged_and_work_goes_on(
    make_any_queue: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    queue = make_any_queue()
    heard: list[JobEvent] = []

    def broken(event: JobEvent) -> None:
        raise RuntimeError("observer bug")

    queue.register("increment", lambda n: n + 1)
    queue.observe(broken)
    queue.observe(heard.append)

    with caplog.at_level(logging.ERROR, logger="pyqueue"):
        async with queue:
            jobs = [await queue.publish("increment", n) for n in range(3)]
            results = await asyncio.wait_for(
                asyncio.gather(*(job.done for job in jobs)), WAIT
            )

    assert results == [1, 2, 3]
    assert any(isinstance(event, JobStarted) for event in heard)
    assert any("observer" in record.getMessage() for record in caplog.records)


async def test_operator_finishing_a_running_job_gives_lost_claim(
    make_queue: Callable[..., Queue], db: psycopg.Connection[Any]
) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    events: list[JobEvent] = []

    async def slow(_: Any) -> str:
        started.set()
        await release.wait()
        return "late"

    queue = make_queue()
    queue.register("slow", slow)
    queue.observe(events.append)

    async with queue:
        job = await queue.publish("slow")
        await asyncio.wait_for(started.wait(), WAIT)
        db.execute(
            "UPDATE jobs SET status = 'resolved', result = '\"by hand\"' WHERE id = %s",
            (job.id,),
        )
        release.set()
        assert await asyncio.wait_for(job.done, WAIT) == "by hand"

    assert [type(event) for event in events] == [JobStarted, JobLostClaim]
    assert events[1].job_id == job.id


async def test_shutdown_past_grace_gives_abandoned(
    make_any_queue: Callable[..., Any],
) -> None:
    started = asyncio.Event()
    events: list[JobEvent] = []

    async def forever(_: Any) -> None:
        started.set()
        await asyncio.Event().wait()

    queue = make_any_queue()
    queue.register("forever", forever)
    queue.observe(events.append)

    await queue.open()
    try:
        await queue.publish("forever")
        await asyncio.wait_for(started.wait(), WAIT)
    finally:
        await queue.close(grace=0.1)

    assert [type(event) for event in events] == [JobStarted, JobAbandoned]


async def test_prometheus_example_counts_real_jobs(
    make_queue: Callable[..., Queue],
) -> None:
    registry = CollectorRegistry()
    queue = tasks.register(make_queue())

    text = await prometheus_metrics.main(queue, registry)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("pyqueue_jobs_started_total", category="increment") == 3
    assert value("pyqueue_jobs_started_total", category="word-count") == 2
    assert (
        value("pyqueue_jobs_finished_total", category="increment", status="resolved")
        == 3
    )
    assert (
        value("pyqueue_jobs_finished_total", category="word-count", status="rejected")
        == 1
    )
    assert (
        value(
            "pyqueue_job_duration_seconds_count",
            category="word-count",
            status="resolved",
        )
        == 1
    )
    assert value("pyqueue_jobs_running") == 0
    assert "pyqueue_jobs_finished_total" in text
