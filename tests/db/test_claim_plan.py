"""The claim path stays cheap at depth: no statement on it scans jobs.

auto_explain, loaded in the test's session, reports the plan of every
statement run inside the stored functions as a NOTICE; none may be a
sequential scan of jobs, with a long finished history and deep backlogs.
"""

from __future__ import annotations

import re
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


def heavy_scans_of_jobs(plans: list[str], *, pages: int) -> list[str]:
    """The scan nodes on jobs in `plans` (EXPLAIN ANALYZE with BUFFERS) that
    touched more than `pages` buffers, plus ten for each row they returned:
    a lookup by key reads a few pages per key (PostgreSQL 15 descends the
    index once per element of an id array), a scan of the backlog reads
    them all whatever it returns. A node's Buffers line follows its
    conditions, before the next node."""
    heavy = []
    for plan in plans:
        node, allowed = None, 0.0
        for line in plan.splitlines():
            if "Scan" in line and " on " in line:
                node = line.strip() if " on jobs" in line else None
                actual = re.search(r"actual .*rows=([\d.]+) loops=(\d+)", line)
                returned = float(actual[1]) * int(actual[2]) if actual else 0.0
                allowed = pages + 10 * returned
            elif node and (hits := re.search(r"Buffers: shared hit=(\d+)", line)):
                if int(hits[1]) > allowed:
                    heavy.append(node)
                node = None
    return heavy


@pytest.fixture
def plans(db: psycopg.Connection[Any]) -> Iterator[list[str]]:
    """Plans of the statements the next calls run, nested ones included."""
    try:
        db.execute("LOAD 'auto_explain'")
    except psycopg.errors.InsufficientPrivilege:
        pytest.skip("LOAD needs a superuser; the test server's user is not")
    for setting, value in {
        "auto_explain.log_min_duration": "0",
        "auto_explain.log_nested_statements": "on",
        "auto_explain.log_level": "notice",
        "client_min_messages": "notice",
    }.items():
        db.execute("SELECT set_config(%s, %s, false)", (setting, value))
    seen: list[str] = []
    db.add_notice_handler(lambda diag: seen.append(diag.message_primary or ""))
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


@pytest.fixture
def stale(db: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """Statistics taken while the queue was empty, then a deep backlog: what
    a server sees after a burst, until autovacuum analyzes jobs again."""
    db.execute("VACUUM ANALYZE jobs")
    db.execute("VACUUM ANALYZE queue_heads")
    db.execute(
        "INSERT INTO jobs (category, args, queue)"
        " SELECT 'c', to_jsonb(i),"
        " CASE WHEN i %% 2 = 0 THEN 'deep' ELSE 'q' || (i %% 99) END"
        " FROM generate_series(1, %s) AS i",
        (2 * QUEUES * DEPTH,),
    )
    return db


def test_batch_calls_read_a_few_pages_whatever_the_statistics(
    stale: psycopg.Connection[Any], plans: list[str]
) -> None:
    stale.execute("SELECT set_config('auto_explain.log_analyze', 'on', false)")
    stale.execute("SELECT set_config('auto_explain.log_buffers', 'on', false)")
    held: list[int] = []
    for _ in range(8):  # past the plan cache's first executions
        rows = stale.execute(
            "SELECT event, id FROM complete_and_claim_jobs('w1', %s, %s, %s, 5)",
            (held, ["resolved"] * len(held), ["1"] * len(held)),
        ).fetchall()
        held = [job_id for event, job_id in rows if event == "claimed"]
        assert len(held) == 5

    # A scan that reads the backlog (20,000 waiting jobs) touches a hundred
    # pages or more; lookups by key touch a handful.
    assert heavy_scans_of_jobs(plans, pages=40) == []


@pytest.fixture
def churned(db: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """One busy queue between two vacuums: 20,000 of its jobs finished since
    the last one, each leaving a dead entry in the index of waiting jobs in
    front of the queue's live ones. Autovacuum is kept off for the test."""
    db.execute("ALTER TABLE jobs SET (autovacuum_enabled = off)")
    db.execute(
        "SELECT count(*) FROM publish_jobs("
        " array_fill('c'::text, ARRAY[%(n)s]),"
        " array_fill('1'::jsonb, ARRAY[%(n)s]),"
        " array_fill('busy'::text, ARRAY[%(n)s]))",
        {"n": CHURNED + 20},
    )
    db.execute("VACUUM ANALYZE jobs")
    db.execute(
        "UPDATE jobs SET status = 'resolved', result = '1' WHERE id <= %s",
        (CHURNED,),
    )
    # Finished by hand, not by a worker: the head stays at the first job
    # until a claimer moves it, reading the queue once from its start.
    db.execute("SELECT id FROM claim_next_job('w1')")
    return db


CHURNED = 20_000


def test_busy_queue_reads_a_few_pages_however_many_jobs_finished_since_vacuum(
    churned: psycopg.Connection[Any], plans: list[str]
) -> None:
    churned.execute("SELECT set_config('auto_explain.log_analyze', 'on', false)")
    churned.execute("SELECT set_config('auto_explain.log_buffers', 'on', false)")
    held = [CHURNED + 1]
    for _ in range(8):
        rows = churned.execute(
            "SELECT event, id FROM complete_and_claim_jobs('w1', %s, %s, %s, 5)",
            (held, ["resolved"] * len(held), ["1"] * len(held)),
        ).fetchall()
        held = [job_id for event, job_id in rows if event == "claimed"]
        assert len(held) == 1
    assert held == [CHURNED + 9]

    # The queue's 20,000 dead entries fill some eighty index pages.
    assert heavy_scans_of_jobs(plans, pages=20) == []


def test_finishing_a_queue_by_hand_reads_a_few_pages_per_row(
    db: psycopg.Connection[Any], plans: list[str]
) -> None:
    """Each finished row announces its queue at commit; each announcement
    starts where the first one moved the queue's head, past the rows the
    statement finished, instead of reading past all of them again."""
    rows = 1_000
    db.execute(
        "SELECT count(*) FROM publish_jobs("
        " array_fill('c'::text, ARRAY[%(n)s]),"
        " array_fill(to_jsonb(repeat('x', 500)), ARRAY[%(n)s]),"
        " array_fill('busy'::text, ARRAY[%(n)s]))",
        {"n": rows + 1},
    )
    db.execute("VACUUM ANALYZE jobs")
    db.execute("SELECT set_config('auto_explain.log_analyze', 'on', false)")
    db.execute("SELECT set_config('auto_explain.log_buffers', 'on', false)")

    db.execute(
        "UPDATE jobs SET status = 'resolved', result = '1' WHERE id <= %s", (rows,)
    )

    # The finished rows fill some seventy pages of jobs: the first row's
    # look for the head reads past them, once; no other statement does.
    assert len(heavy_scans_of_jobs(plans, pages=20)) == 1
    assert db.execute("SELECT head_id FROM queue_heads").fetchall() == [(rows + 1,)]
