"""Server restarts and terminated connections while jobs are published and
worked: every committed job finishes exactly once, every ``done`` resolves,
and the same Queue objects carry on after reconnecting."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from workers import audit

from pyqueue import ConnectionFailed, Job, Queue

JOBS = 150
QUEUES = 6


def named(dsn: str, name: str) -> str:
    """`dsn` with an application_name, to find a Queue's sessions."""
    return make_conninfo(dsn, application_name=name)


def terminate(db: psycopg.Connection[Any], where: str, *params: Any) -> int:
    """pg_terminate_backend every session of this database matching `where`."""
    rows = db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        f" AND {where}",
        params,
    ).fetchall()
    return len(rows)


async def publish_all(publisher: Queue, fault: asyncio.Event) -> list[Job[Any]]:
    """Publish JOBS jobs, retrying those that fail to connect; set `fault`
    a third of the way through."""
    jobs = []
    for n in range(JOBS):
        if n == JOBS // 3:
            fault.set()
        while True:
            try:
                job = await publisher.publish("work", {"n": n}, queue_name=f"q{n % 6}")
                break
            except ConnectionFailed:
                await asyncio.sleep(0.05)
        jobs.append(job)
        await asyncio.sleep(0.005)
    return jobs


async def injure(kind: str, server: Any, dsn: str) -> int:
    """Inject the fault `kind`, in a thread (restarts block); return how many
    sessions it ended (-1 for a restart)."""

    def run() -> int:
        if kind.startswith("restart"):
            server.restart(kind.removeprefix("restart-"))
            return -1
        with psycopg.connect(dsn, autocommit=True) as db:
            if kind == "terminate-worker-pools":
                return terminate(
                    db,
                    "application_name LIKE 'worker-%%'"
                    " AND query NOT LIKE '%%register_worker%%'",
                )
            if kind == "terminate-listeners":
                # The workers' listeners, and the publisher's results listener.
                return terminate(
                    db,
                    "query LIKE '%%register_worker%%'"
                    " OR query LIKE 'LISTEN %%jobs_finished%%'",
                )
            return terminate(db, "application_name = 'publisher'")

    return await asyncio.to_thread(run)


@pytest.mark.parametrize(
    "kind",
    [
        "restart-fast",
        "restart-immediate",
        "terminate-worker-pools",
        "terminate-listeners",
        "terminate-publisher",
    ],
)
async def test_every_committed_job_finishes_once_through_the_fault(
    kind: str,
    own_server: Any,
    dsn: str,
    db: psycopg.Connection[Any],
    make_queue: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pyqueue")
    audit.install(db)
    runs: Counter[int] = Counter()
    workers = []
    for i in range(3):
        worker: Queue = make_queue(
            dsn=named(dsn, f"worker-{i}"), concurrency=4, poll_interval=0.5
        )

        @worker.handler("work")
        async def work(args: dict[str, int]) -> int:
            runs[args["n"]] += 1
            await asyncio.sleep(0.05)
            return args["n"] * 2

        workers.append(worker)
    publisher: Queue = make_queue(dsn=named(dsn, "publisher"), poll_interval=0.5)
    for queue in [*workers, publisher]:
        await queue.open()

    fault = asyncio.Event()
    publishing = asyncio.create_task(publish_all(publisher, fault))
    await fault.wait()
    # The publisher waits on a result already, so its results listener lives
    # through the fault too.
    first = db.execute("SELECT min(id) FROM jobs").fetchone()[0]  # type: ignore[index]
    early = asyncio.ensure_future(publisher.job(first).done)
    for _ in range(200):
        if publisher._results_heard:
            break
        await asyncio.sleep(0.025)
    assert await injure(kind, own_server, dsn) != 0
    jobs = await publishing
    results = await asyncio.wait_for(
        asyncio.gather(*(job.done for job in jobs)), timeout=120
    )

    assert results == [n * 2 for n in range(JOBS)]
    assert await early == 0
    # A fresh connection: a restart ended the fixture's.
    with psycopg.connect(dsn, autocommit=True) as check:
        rows = check.execute("SELECT id, status FROM jobs ORDER BY id").fetchall()
        report = audit.read(check)
    assert {job.id for job in jobs} <= {job_id for job_id, _ in rows}
    assert all(status == "resolved" for _, status in rows)
    assert report.finished_twice == []
    assert report.fifo_violations == []
    assert set(report.finishes.values()) == {1}
    assert len(report.finishes) == len(rows)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    if kind.startswith("restart") or kind == "terminate-listeners":
        reconnects = [
            r for r in caplog.records if r.getMessage() == "listener reconnected"
        ]
        assert all(r.levelno == logging.INFO for r in reconnects)
        assert len(reconnects) >= (4 if kind.startswith("restart") else 3)
