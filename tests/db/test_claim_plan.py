"""The claim path stays cheap at depth: no statement on it scans jobs.

auto_explain, loaded in the test's session, reports the plan of every
statement run inside the stored functions as a NOTICE; none may be a
sequential scan of jobs, with a long finished history and deep backlogs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

FINISHED = 200_000
QUEUES = 100
DEPTH = 100


@pytest.fixture
def deep(db: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    db.execute(
        "INSERT INTO jobs (category, args, status, finished_at, queue, result)"
        " SELECT 'old', to_jsonb(i), 'resolved', now(), 'q' || (i %% %s), '1'"
        " FROM generate_series(1, %s) AS i",
        (QUEUES, FINISHED),
    )
    db.execute(
        "INSERT INTO jobs (category, args, queue)"
        " SELECT 'c', to_jsonb(i), 'q' || (i %% %s)"
        " FROM generate_series(1, %s) AS i",
        (QUEUES, QUEUES * DEPTH),
    )
    db.execute("VACUUM ANALYZE jobs")
    db.execute("ANALYZE queue_heads")
    return db


@pytest.fixture
def plans(deep: psycopg.Connection[Any]) -> Iterator[list[str]]:
    """Plans of the statements the next calls run, nested ones included."""
    try:
        deep.execute("LOAD 'auto_explain'")
    except psycopg.errors.InsufficientPrivilege:
        pytest.skip("LOAD needs a superuser; the test server's user is not")
    for setting, value in {
        "auto_explain.log_min_duration": "0",
        "auto_explain.log_nested_statements": "on",
        "auto_explain.log_level": "notice",
        "client_min_messages": "notice",
    }.items():
        deep.execute("SELECT set_config(%s, %s, false)", (setting, value))
    seen: list[str] = []
    deep.add_notice_handler(lambda diag: seen.append(diag.message_primary or ""))
    yield seen


def test_claim_complete_and_publish_never_scan_jobs(
    deep: psycopg.Connection[Any], plans: list[str]
) -> None:
    claimed = deep.execute("SELECT id FROM claim_next_job('w1')").fetchone()
    assert claimed is not None
    deep.execute("SELECT renew_claims('w1', %s)", ([claimed[0]],))
    deep.execute("SELECT complete_job(%s, 'w1', 'resolved', '1')", claimed)
    deep.execute("SELECT id FROM claim_next_job('w1', ARRAY['c'])")
    deep.execute("SELECT publish_job('c', '1', 'q1')")
    deep.execute("SELECT reap_claims()")
    deep.execute("SELECT * FROM job_outcomes(ARRAY[1, 2, 3]::bigint[])")

    nested = [plan for plan in plans if "Query Text" in plan]
    assert any("claim_next_job" in plan or "queue_heads" in plan for plan in nested)
    scans = [plan for plan in nested if "Seq Scan on jobs" in plan]
    assert scans == []
