"""Invariants under random interleavings, checked against the real database.

A hypothesis state machine publishes, claims, completes, renews, releases,
expires claims, reaps, and edits rows by hand (status, queue, delete) over
several connections, and after every step compares the table with a model:
at most one running job per queue, each claim takes the job its queue must
run next, finished jobs (and only they) have finished_at, completions of a
lost claim are refused, and nothing published goes missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psycopg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

QUEUES = ["a", "b", "c"]
CATEGORIES = ["x", "y"]
# Worker name -> categories it runs (None: any). "dead" never registers, so
# reap_claims gives its claims back.
WORKERS: dict[str, list[str] | None] = {
    "w0": None,
    "w1": None,
    "w2": ["x"],
    "dead": None,
}


@dataclass
class Model:
    """What the table should hold for one job."""

    queue: str
    category: str
    status: str = "unfulfilled"
    worker: str | None = None
    expired: bool = False


class Jobs(RuleBasedStateMachine):
    conns: dict[str, psycopg.Connection[Any]]

    def __init__(self) -> None:
        super().__init__()
        self.db = self.conns["operator"]
        self.db.execute("TRUNCATE jobs, queue_heads")
        self.jobs: dict[int, Model] = {}

    # -- helpers --------------------------------------------------------------

    def one(self, conn: psycopg.Connection[Any], query: str, *params: Any) -> Any:
        row = conn.execute(query, params).fetchone()
        return row[0] if row else None

    def pick(self, index: int, **where: Any) -> int | None:
        ids = sorted(
            job_id
            for job_id, job in self.jobs.items()
            if all(getattr(job, key) == value for key, value in where.items())
        )
        return ids[index % len(ids)] if ids else None

    def candidates(self, worker: str) -> set[int]:
        """The jobs `worker` may claim now: per queue, a job whose claim
        expired goes first, else the oldest unfinished one."""
        found = set()
        for queue in QUEUES:
            mine = {i: j for i, j in self.jobs.items() if j.queue == queue}
            waiting = sorted(i for i, j in mine.items() if j.status == "unfulfilled")
            held = [i for i in waiting if mine[i].worker is not None]
            if held:
                job_id = held[0]
                if not mine[job_id].expired:
                    continue
            elif waiting:
                job_id = waiting[0]
            else:
                continue
            allowed = WORKERS[worker]
            if allowed is None or mine[job_id].category in allowed:
                found.add(job_id)
        return found

    # -- rules ----------------------------------------------------------------

    @rule(queue=st.sampled_from(QUEUES), category=st.sampled_from(CATEGORIES))
    def publish(self, queue: str, category: str) -> None:
        job_id = self.one(
            self.conns["publisher"], "SELECT publish_job(%s, NULL, %s)", category, queue
        )
        self.jobs[job_id] = Model(queue, category)

    @rule(queues=st.lists(st.sampled_from(QUEUES), min_size=1, max_size=4))
    def publish_many(self, queues: list[str]) -> None:
        ids = self.conns["publisher"].execute(
            "SELECT publish_jobs(%s::text[], %s::jsonb[], %s::text[])",
            (["x"] * len(queues), [None] * len(queues), queues),
        )
        for (job_id,), queue in zip(ids.fetchall(), queues, strict=True):
            self.jobs[job_id] = Model(queue, "x")

    @rule(queue=st.sampled_from(QUEUES))
    def publish_rolled_back(self, queue: str) -> None:
        conn = self.conns["publisher"]
        with conn.transaction(force_rollback=True):
            conn.execute("SELECT publish_job('x', NULL, %s)", (queue,))

    @rule(worker=st.sampled_from(sorted(WORKERS)))
    def claim(self, worker: str) -> None:
        expected = self.candidates(worker)
        conn = self.conns.get(worker, self.db)
        row = conn.execute(
            "SELECT id FROM claim_next_job(%s, %s, interval '1 hour')",
            (worker, WORKERS[worker]),
        ).fetchone()
        if not expected:
            assert row is None, f"{worker} claimed {row} with nothing runnable"
            return
        assert row is not None, f"{worker} claimed nothing; runnable: {expected}"
        assert row[0] in expected, f"{worker} claimed {row[0]}, not one of {expected}"
        self.jobs[row[0]].worker = worker
        self.jobs[row[0]].expired = False

    @rule(
        worker=st.sampled_from(sorted(WORKERS)),
        index=st.integers(0, 50),
        status=st.sampled_from(["resolved", "rejected"]),
        stale=st.booleans(),
    )
    def complete(self, worker: str, index: int, status: str, stale: bool) -> None:
        # Mostly a job the worker holds; sometimes any job (a late completion).
        job_id = self.pick(index) if stale else self.pick(index, worker=worker)
        if job_id is None:
            return
        job = self.jobs[job_id]
        held = job.worker == worker and job.status == "unfulfilled"
        done = self.one(
            self.db,
            "SELECT complete_job(%s, %s, %s, %s::jsonb)",
            job_id,
            worker,
            status,
            json.dumps(job_id),
        )
        assert done is held, f"complete_job({job_id}, {worker}) gave {done}"
        if held:
            job.status, job.worker, job.expired = status, None, False

    @rule(index=st.integers(0, 50))
    def expire(self, index: int) -> None:
        job_id = self.pick(index, status="unfulfilled")
        if job_id is None or self.jobs[job_id].worker is None:
            return
        self.db.execute(
            "UPDATE jobs SET claim_expires_at = now() - interval '1 second'"
            " WHERE id = %s",
            (job_id,),
        )
        self.jobs[job_id].expired = True

    @rule(worker=st.sampled_from(sorted(WORKERS)))
    def renew(self, worker: str) -> None:
        held = sorted(i for i, j in self.jobs.items() if j.worker == worker)
        rows = self.db.execute(
            "SELECT renew_claims(%s, %s, interval '1 hour')", (worker, held)
        ).fetchall()
        assert sorted(row[0] for row in rows) == held
        for job_id in held:
            self.jobs[job_id].expired = False

    @rule(worker=st.sampled_from(sorted(WORKERS)))
    def release(self, worker: str) -> None:
        held = [j for j in self.jobs.values() if j.worker == worker]
        count = self.one(self.db, "SELECT release_claims(%s)", worker)
        assert count == len(held)
        for job in held:
            job.worker, job.expired = None, False

    @rule()
    def reap(self) -> None:
        self.db.execute("SELECT reap_claims()")
        for job in self.jobs.values():
            if job.worker == "dead":
                job.worker, job.expired = None, False

    @rule(index=st.integers(0, 50), status=st.sampled_from(["resolved", "rejected"]))
    def finish_by_hand(self, index: int, status: str) -> None:
        job_id = self.pick(index, status="unfulfilled")
        if job_id is None:
            return
        self.db.execute(
            "UPDATE jobs SET status = %s, result = '\"by hand\"' WHERE id = %s",
            (status, job_id),
        )
        job = self.jobs[job_id]
        job.status, job.worker, job.expired = status, None, False

    @rule(index=st.integers(0, 50))
    def reopen_by_hand(self, index: int) -> None:
        job_id = self.pick(index)
        if job_id is None or self.jobs[job_id].status == "unfulfilled":
            return
        self.db.execute(
            "UPDATE jobs SET status = 'unfulfilled' WHERE id = %s", (job_id,)
        )
        self.jobs[job_id].status = "unfulfilled"

    @rule(index=st.integers(0, 50), queue=st.sampled_from(QUEUES))
    def move_by_hand(self, index: int, queue: str) -> None:
        job_id = self.pick(index, status="unfulfilled")
        if job_id is None:
            return
        job = self.jobs[job_id]
        # A running job moved into a queue that runs another would break the
        # one-at-a-time rule: the unique index refuses it.
        clash = job.worker is not None and any(
            other.queue == queue and other.worker is not None and i != job_id
            for i, other in self.jobs.items()
        )
        try:
            self.db.execute("UPDATE jobs SET queue = %s WHERE id = %s", (queue, job_id))
        except psycopg.errors.UniqueViolation:
            assert clash, f"moving job {job_id} to {queue!r} was refused"
            return
        assert not clash, f"moving running job {job_id} to {queue!r} was allowed"
        job.queue = queue

    @rule(index=st.integers(0, 50))
    def delete_by_hand(self, index: int) -> None:
        job_id = self.pick(index)
        if job_id is None:
            return
        self.db.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
        del self.jobs[job_id]

    # -- invariants -----------------------------------------------------------

    @invariant()
    def table_matches_model(self) -> None:
        rows = self.db.execute(
            "SELECT id, queue, status, worker, finished_at IS NOT NULL FROM jobs"
        ).fetchall()
        assert {row[0] for row in rows} == set(self.jobs), "a job was lost or added"
        running: set[str] = set()
        for job_id, queue, status, worker, has_finished_at in rows:
            job = self.jobs[job_id]
            assert (queue, status, worker) == (job.queue, job.status, job.worker)
            assert has_finished_at == (status != "unfulfilled")
            if status == "unfulfilled" and worker is not None:
                assert queue not in running, f"two running jobs in {queue!r}"
                running.add(queue)

    @precondition(lambda self: bool(self.jobs))
    @invariant()
    def finished_jobs_are_not_claimable(self) -> None:
        claimed = self.db.execute(
            "SELECT count(*) FROM jobs WHERE status <> 'unfulfilled'"
            " AND (worker IS NOT NULL OR claim_expires_at IS NOT NULL)"
        ).fetchone()
        assert claimed == (0,)


def test_queue_invariants_hold_under_random_interleavings(dsn: str) -> None:
    conns = {
        name: psycopg.connect(dsn, autocommit=True)
        for name in ["operator", "publisher", "w0", "w1", "w2"]
    }
    try:
        for name in ["w0", "w1", "w2"]:
            conns[name].execute("SELECT register_worker(%s)", (name,))
        Jobs.conns = conns
        Jobs.TestCase.settings = settings(
            max_examples=50,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        Jobs.TestCase().runTest()
    finally:
        for conn in conns.values():
            conn.close()
