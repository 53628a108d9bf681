"""Graceful shutdown: close() and SIGTERM stop claiming, let running jobs
finish within the grace period, give back the claims of the rest (they run
again elsewhere at once), and a second close or signal stops at once."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from workers import audit
from workers.procs import WorkerProcess, runs, wait_for

from pyqueue import Queue


@pytest.fixture
def spawn(dsn: str, tmp_path: Path) -> Iterator[Any]:
    started: list[WorkerProcess] = []

    def start(name: str, **options: Any) -> WorkerProcess:
        worker = WorkerProcess(dsn, tmp_path, name, **options)
        started.append(worker)
        return worker.wait_ready()

    yield start
    for worker in started:
        worker.stop()


def publish(db: psycopg.Connection[Any], category: str, n: int, seconds: float) -> int:
    row = db.execute(
        "SELECT publish_job(%s, %s::jsonb, %s)",
        (category, json.dumps({"n": n, "seconds": seconds}), f"q{n}"),
    ).fetchone()
    assert row is not None
    return int(row[0])


def outcome(db: psycopg.Connection[Any], job_id: int) -> tuple[Any, ...] | None:
    return db.execute(
        "SELECT status, result, attempts FROM jobs WHERE id = %s", (job_id,)
    ).fetchone()


def stand_in(make_queue: Any) -> Queue:
    """A worker that can neither reap nor see claims expire during the test:
    it gets a job only if its claim was given back."""
    queue: Queue = make_queue(claim_timeout=3600, reap_interval=3600)
    queue.register("sleep", lambda args: "stand-in")
    queue.register("block", lambda args: "stand-in")
    return queue


def started(tmp_path: Path, *ns: int) -> bool:
    return {
        n for event, n, _ in runs(tmp_path / "runs.log") if event == "start"
    } >= set(ns)


async def test_close_lets_running_jobs_finish_and_gives_back_the_rest(
    make_queue: Any, db: psycopg.Connection[Any]
) -> None:
    audit.install(db)
    closing: Queue = make_queue(claim_timeout=3600, concurrency=2)
    both = asyncio.Event()
    running = 0

    @closing.handler("sleep")
    async def sleep(args: dict[str, Any]) -> str:
        nonlocal running
        running += 1
        if running == 2:
            both.set()
        await asyncio.sleep(args["seconds"])
        return "closing"

    await closing.open()
    quick = publish(db, "sleep", 1, seconds=0.5)
    slow = publish(db, "sleep", 2, seconds=3600)
    await asyncio.wait_for(both.wait(), 30)
    queued = publish(db, "sleep", 1, seconds=0)  # behind `quick`, same queue

    await closing.close(grace=2.0)

    assert outcome(db, quick) == ("resolved", "closing", 1)
    assert outcome(db, slow) == ("unfulfilled", None, 1)
    assert outcome(db, queued) == ("unfulfilled", None, 0)
    released = db.execute(
        "SELECT job_id FROM pyqueue_audit WHERE event = 'release'"
    ).fetchall()
    assert released == [(slow,)]

    async with stand_in(make_queue):
        await asyncio.to_thread(
            wait_for, lambda: outcome(db, slow)[0] == "resolved", what="slow job"
        )
    assert outcome(db, slow) == ("resolved", "stand-in", 2)


async def test_second_close_stops_at_once_still_giving_back_claims(
    make_queue: Any, db: psycopg.Connection[Any]
) -> None:
    closing: Queue = make_queue(claim_timeout=3600)
    begun = asyncio.Event()

    @closing.handler("sleep")
    async def sleep(args: Any) -> None:
        begun.set()
        await asyncio.sleep(3600)

    await closing.open()
    job_id = publish(db, "sleep", 1, seconds=3600)
    await asyncio.wait_for(begun.wait(), 30)

    first = asyncio.create_task(closing.close(grace=3600))
    await asyncio.sleep(0.2)
    await asyncio.wait_for(closing.close(grace=0), 30)
    await asyncio.wait_for(first, 30)

    assert outcome(db, job_id) == ("unfulfilled", None, 1)
    async with stand_in(make_queue):
        await asyncio.to_thread(
            wait_for, lambda: outcome(db, job_id)[0] == "resolved", what="the job"
        )


def test_sigterm_finishes_running_jobs_gives_back_the_rest_and_exits_0(
    db: psycopg.Connection[Any], spawn: Any, tmp_path: Path, make_queue: Any
) -> None:
    worker = spawn("terminated", claim_timeout=3600, concurrency=3, grace=1.5)
    quick = publish(db, "sleep", 1, seconds=0.5)
    slow = publish(db, "sleep", 2, seconds=3600)
    blocked = publish(db, "block", 3, seconds=3600)
    wait_for(lambda: started(tmp_path, 1, 2, 3), what="three jobs to start")

    worker.signal(signal.SIGTERM)

    assert worker.wait_exit(timeout=60) == 0
    assert outcome(db, quick) == ("resolved", {"n": 1, "pid": worker.pid}, 1)
    assert outcome(db, slow) == ("unfulfilled", None, 1)
    assert outcome(db, blocked) == ("unfulfilled", None, 1)
    assert "gave back 2 unfinished jobs" in worker.log()


def test_second_sigterm_stops_at_once_still_giving_back_claims(
    db: psycopg.Connection[Any], spawn: Any, tmp_path: Path
) -> None:
    worker = spawn("terminated", claim_timeout=3600, grace=3600)
    job_id = publish(db, "sleep", 1, seconds=3600)
    wait_for(lambda: started(tmp_path, 1), what="the job to start")

    worker.signal(signal.SIGTERM)
    wait_for(lambda: "waiting up to" in worker.log(), what="the grace period")
    worker.signal(signal.SIGTERM)

    assert worker.wait_exit(timeout=60) == 0
    assert outcome(db, job_id) == ("unfulfilled", None, 1)
    assert "gave back 1 unfinished jobs" in worker.log()
