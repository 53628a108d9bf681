"""One job at a time per queue, in publish order, across worker processes.

Three worker processes (tests/workers/worker.py) drain eight queues while the
test keeps publishing into them from two connections at once. The run log
each handler appends to ("start n pid", "end n pid", in the order written)
shows whether two jobs of a queue ever overlapped or started out of order.
"""

from __future__ import annotations

import json
import random
import sys
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workers"))

from procs import WorkerProcess, runs, wait_for

QUEUES = [f"q{i}" for i in range(8)]
JOBS_PER_PUBLISHER = 48


@pytest.fixture
def workers(dsn: str, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started = [
        WorkerProcess(dsn, tmp_path, f"w{i}", concurrency=4, poll_interval=2)
        for i in range(3)
    ]
    try:
        for worker in started:
            worker.wait_ready()
        yield started
    finally:
        for worker in started:
            worker.stop()


def publish_interleaved(dsn: str, first_n: int, seed: int) -> None:
    """Publish jobs round-robin over the queues, one transaction each."""
    rng = random.Random(seed)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(JOBS_PER_PUBLISHER):
            n = first_n + i
            args = {"n": n, "seconds": rng.choice([0, 0.005, 0.02])}
            conn.execute(
                "SELECT publish_job('sleep', %s::jsonb, %s)",
                (json.dumps(args), QUEUES[i % len(QUEUES)]),
            )


def test_workers_run_each_queue_one_at_a_time_in_id_order(
    dsn: str, db: psycopg.Connection[Any], workers: list[WorkerProcess]
) -> None:
    publishers = [
        threading.Thread(target=publish_interleaved, args=(dsn, base, base))
        for base in (0, 1000)
    ]
    for thread in publishers:
        thread.start()
    for thread in publishers:
        thread.join()
    total = 2 * JOBS_PER_PUBLISHER

    wait_for(
        lambda: db.execute(
            "SELECT count(*) = %s FROM jobs WHERE status = 'resolved'", (total,)
        ).fetchone()[0],  # type: ignore[index]
        timeout=60,
        what="every job resolved",
    )

    ids = dict(db.execute("SELECT (args->>'n')::int, id FROM jobs").fetchall())
    queue_of = dict(db.execute("SELECT (args->>'n')::int, queue FROM jobs").fetchall())
    running: dict[str, int | None] = defaultdict(lambda: None)
    started: dict[str, list[int]] = defaultdict(list)
    overlapped_across_queues = False
    for event, n, _pid in runs(workers[0].runlog):
        queue = queue_of[n]
        if event == "start":
            assert running[queue] is None, f"{queue}: job {n} started during another"
            running[queue] = n
            started[queue].append(ids[n])
            others = [q for q, job in running.items() if job is not None and q != queue]
            overlapped_across_queues |= bool(others)
        else:
            assert running[queue] == n
            running[queue] = None

    assert sum(len(s) for s in started.values()) == total  # each job ran once
    for queue, job_ids in started.items():
        assert job_ids == sorted(job_ids), f"{queue} ran out of id order"
    assert overlapped_across_queues
    pids = {pid for _event, _n, pid in runs(workers[0].runlog)}
    assert len(pids) > 1  # several processes shared the work
