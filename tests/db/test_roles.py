"""sql/extras/roles.sql: a publisher that can only publish and read."""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pyqueue import Queue

ROLES_SQL = Path(__file__).parent.parent.parent / "sql" / "extras" / "roles.sql"
_names = itertools.count()


@pytest.fixture
def login_as(dsn: str, db: psycopg.Connection[Any]):
    """Apply roles.sql; login_as(group) gives the DSN of a new member of it."""
    subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", str(ROLES_SQL)],
        check=True,
        capture_output=True,
    )

    def login(group: str) -> str:
        name = f"pq_{group}_{os.getpid()}_{next(_names)}"
        db.execute(f"CREATE ROLE {name} LOGIN IN ROLE {group}")
        return make_conninfo(dsn, user=name)

    return login


def test_publisher_publishes_and_reads_its_jobs(login_as: Any) -> None:
    with psycopg.connect(login_as("pyqueue_publisher"), autocommit=True) as pub:
        published = pub.execute("SELECT publish_job('c', '1', 'q')").fetchone()
        assert published is not None
        row = pub.execute("SELECT status FROM jobs WHERE id = %s", published).fetchone()
        outcome = pub.execute("SELECT status FROM job_outcomes(ARRAY[%s])", published)

        assert row == ("unfulfilled",)
        assert outcome.fetchone() == ("unfulfilled",)


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM claim_next_job('thief')",
        "SELECT complete_job(1, 'thief', 'resolved', '1')",
        "UPDATE jobs SET status = 'resolved', result = '1'",
        "DELETE FROM jobs",
        "INSERT INTO jobs (category, status) VALUES ('c', 'resolved')",
        "SELECT cancel_job(1)",
    ],
)
def test_publisher_cannot_claim_complete_or_edit_jobs(
    login_as: Any, db: psycopg.Connection[Any], statement: str
) -> None:
    db.execute("SELECT publish_job('c', '1', 'q')")

    with (
        psycopg.connect(login_as("pyqueue_publisher"), autocommit=True) as pub,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        pub.execute(statement)

    assert db.execute("SELECT status, worker FROM jobs").fetchall() == [
        ("unfulfilled", None)
    ]


async def test_worker_role_runs_jobs_a_publisher_role_published(
    login_as: Any,
) -> None:
    publisher = Queue(login_as("pyqueue_publisher"))
    worker = Queue(login_as("pyqueue_worker"), poll_interval=1.0)

    @worker.handler("increment")
    async def increment(a: int) -> int:
        return a + 1

    async with publisher, worker:
        job = await publisher.publish("increment", 41, queue_name="roles")
        assert await job.done == 42
