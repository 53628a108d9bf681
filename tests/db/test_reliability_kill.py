"""A worker process killed or frozen mid-job: its job runs elsewhere, once.

Real subprocesses (tests/workers/worker.py) run a Queue; the test kills them
with SIGKILL, or freezes them with SIGSTOP so that their connections stay open
while nothing renews their claims.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from workers import audit
from workers.procs import WorkerProcess, runs, wait_for


@pytest.fixture
def spawn(dsn: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker subprocesses on the test database; killed after the test."""
    started: list[WorkerProcess] = []

    def start(name: str, **options: Any) -> WorkerProcess:
        worker = WorkerProcess(dsn, tmp_path, name, **options)
        started.append(worker)
        return worker.wait_ready()

    yield start
    for worker in started:
        worker.stop()


def publish(db: psycopg.Connection[Any], n: int, queue: str, seconds: float) -> int:
    row = db.execute(
        "SELECT publish_job('sleep', %s::jsonb, %s)",
        (json.dumps({"n": n, "seconds": seconds}), queue),
    ).fetchone()
    assert row is not None
    return int(row[0])


def status_of(db: psycopg.Connection[Any], job_id: int) -> tuple[str, Any]:
    row = db.execute("SELECT status, result FROM jobs WHERE id = %s", (job_id,))
    found = row.fetchone()
    assert found is not None
    return found[0], found[1]


def finished(db: psycopg.Connection[Any], *job_ids: int) -> bool:
    row = db.execute(
        "SELECT count(*) FROM jobs WHERE id = ANY(%s) AND status <> 'unfulfilled'",
        (list(job_ids),),
    ).fetchone()
    return row is not None and row[0] == len(job_ids)


def test_killed_workers_jobs_run_elsewhere_once_released_by_liveness_not_expiry(
    db: psycopg.Connection[Any], spawn: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    audit.install(db)
    # Claims that would outlive the test: only the liveness lock can free them.
    doomed = [spawn(f"doomed-{i}", claim_timeout=3600, concurrency=1) for i in range(2)]
    long_jobs = [publish(db, i, f"q{i}", seconds=3600) for i in range(2)]
    followers = [publish(db, 10 + i, f"q{i}", seconds=0) for i in range(2)]
    wait_for(
        lambda: (
            {pid for event, _, pid in runs(tmp_path / "runs.log")}
            == {w.pid for w in doomed}
        ),
        what="both doomed workers to start a job",
    )

    survivor = spawn("survivor", claim_timeout=3600, max_sleep=0)
    for worker in doomed:
        worker.signal(signal.SIGKILL)
        worker.wait_exit()
    wait_for(lambda: finished(db, *long_jobs, *followers), timeout=60)

    for job_id in [*long_jobs, *followers]:
        status, result = status_of(db, job_id)
        assert status == "resolved"
        assert result["pid"] == survivor.pid
    report = audit.read(db)
    assert report.fifo_violations == []
    assert report.finished_twice == []
    assert all(report.finishes[job_id] == 1 for job_id in long_jobs + followers)
    assert all(report.starts[job_id] == 2 for job_id in long_jobs)
    released = db.execute(
        "SELECT job_id, worker FROM pyqueue_audit WHERE event = 'release'"
    ).fetchall()
    # Given back by a reaper (the dead workers' liveness locks were gone).
    assert {job_id for job_id, _ in released} == set(long_jobs)
    assert {worker for _, worker in released} == {w.name for w in doomed}


def test_late_complete_of_a_killed_worker_is_refused(
    db: psycopg.Connection[Any], spawn: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    doomed = spawn("doomed", claim_timeout=3600, concurrency=1)
    job_id = publish(db, 1, "q", seconds=3600)
    wait_for(lambda: runs(tmp_path / "runs.log"), what="the job to start")
    doomed.signal(signal.SIGKILL)
    doomed.wait_exit()
    survivor = spawn("survivor", max_sleep=0)
    wait_for(lambda: finished(db, job_id), timeout=60)

    row = db.execute(
        "SELECT complete_job(%s, %s, 'resolved', '\"late\"')", (job_id, doomed.name)
    ).fetchone()

    assert row == (False,)
    assert status_of(db, job_id) == ("resolved", {"n": 1, "pid": survivor.pid})


def test_frozen_worker_loses_its_job_at_claim_expiry_and_its_late_result_is_discarded(
    db: psycopg.Connection[Any], spawn: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    audit.install(db)
    frozen = spawn("frozen", claim_timeout=2, concurrency=1)
    job_id = publish(db, 1, "q", seconds=3)
    wait_for(lambda: runs(tmp_path / "runs.log"), what="the job to start")

    # SIGSTOP keeps the connections (and the liveness lock) open, but nothing
    # renews the claim any more: only its expiry frees the job.
    frozen.signal(signal.SIGSTOP)
    survivor = spawn("survivor", claim_timeout=2, max_sleep=0)
    wait_for(lambda: finished(db, job_id), timeout=60)
    frozen.signal(signal.SIGCONT)
    wait_for(
        lambda: "result is discarded" in frozen.log(),
        what="the frozen worker to find its claim gone",
    )

    assert status_of(db, job_id) == ("resolved", {"n": 1, "pid": survivor.pid})
    events = db.execute(
        "SELECT event, worker FROM pyqueue_audit WHERE job_id = %s ORDER BY seq",
        (job_id,),
    ).fetchall()
    assert events == [
        ("publish", None),
        ("claim", "frozen"),
        ("claim", "survivor"),
        ("finish", "survivor"),
    ]
    assert [event for event, *_ in runs(tmp_path / "runs.log")].count("end") == 2
    frozen.signal(signal.SIGTERM)
    assert frozen.wait_exit() == 0
