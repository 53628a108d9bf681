"""The claim protocol at the SQL level, with real connections and explicit
interleaving: one job at a time per queue, in id order, fenced claims."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

Conn = psycopg.Connection[Any]


@pytest.fixture
def other(dsn: str) -> Iterator[Conn]:
    """A second autocommit connection: another worker or publisher."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


def publish(conn: Conn, queue: str, args: Any = None, category: str = "c") -> int:
    row = conn.execute(
        "SELECT publish_job(%s, %s::jsonb, %s)",
        (category, None if args is None else str(args), queue),
    ).fetchone()
    assert row is not None
    return int(row[0])


def claim(conn: Conn, worker: str, categories: list[str] | None = None) -> int | None:
    row = conn.execute(
        "SELECT id FROM claim_next_job(%s, %s)", (worker, categories)
    ).fetchone()
    return None if row is None else int(row[0])


def complete(conn: Conn, job_id: int, worker: str, result: Any = 1) -> bool:
    row = conn.execute(
        "SELECT complete_job(%s, %s, 'resolved', %s::jsonb)",
        (job_id, worker, str(result)),
    ).fetchone()
    assert row is not None
    return bool(row[0])


def test_claim_takes_oldest_job_first(db: Conn) -> None:
    first = publish(db, "q")
    publish(db, "r")

    assert claim(db, "w1") == first


def test_claim_skips_queue_with_running_job(db: Conn, other: Conn) -> None:
    q1 = publish(db, "q")
    q2 = publish(db, "q")
    r1 = publish(db, "r")

    assert claim(db, "w1") == q1
    assert claim(other, "w2") == r1
    assert claim(other, "w2") is None

    assert complete(db, q1, "w1")
    assert claim(other, "w2") == q2


def test_uncommitted_claim_hides_its_queue_from_other_claimers(
    db: Conn, other: Conn
) -> None:
    q1 = publish(db, "q")
    publish(db, "q")
    r1 = publish(db, "r")

    with db.transaction():
        assert claim(db, "w1") == q1
        # The claim is not committed yet: the queue's lock holds the others off.
        assert claim(other, "w2") == r1
        assert claim(other, "w2") is None

    assert claim(other, "w2") is None


def test_job_of_open_publishing_transaction_runs_before_younger_ones(
    db: Conn, other: Conn
) -> None:
    with db.transaction():
        older = publish(db, "q")
        younger = publish(other, "q")  # commits at once, but is younger
        assert younger > older

        assert claim(other, "w2") is None

    assert claim(other, "w2") == older


def test_a_completion_does_not_let_a_younger_job_pass_one_being_published(
    db: Conn, other: Conn, dsn: str
) -> None:
    first = publish(db, "q")
    assert claim(db, "w1") == first
    with psycopg.connect(dsn, autocommit=True) as third:
        with other.transaction():
            older = publish(other, "q")
            younger = publish(third, "q")
            # The completion cannot take q's lock while `older` is being
            # published, so q's head stays where it was, below `older`.
            assert complete(db, first, "w1")
            assert claim(third, "w3") is None

        assert claim(third, "w3") == older
        assert db.execute("SELECT head_id FROM queue_heads").fetchall() == [(older,)]
        assert complete(third, older, "w3")
        assert claim(third, "w3") == younger


def test_a_plain_insert_older_than_its_queue_head_still_runs(
    db: Conn, other: Conn, dsn: str
) -> None:
    """A plain INSERT draws its id before it takes its queue's lock: a
    completer can move the head past it meanwhile. Its insert trigger then
    lowers the head again, or claims, which search from the head, would
    never see it."""
    first = publish(db, "q")
    assert claim(db, "w1") == first
    inserted: list[int] = []

    def insert_slowly() -> None:
        # Two rows: the first draws its id, the second waits a while, and
        # the trigger (which takes the lock) runs after both.
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute(
                "INSERT INTO jobs (category, queue)"
                " SELECT 'c', 'q' FROM generate_series(1, 2) AS g"
                " WHERE CASE WHEN g = 1 THEN TRUE"
                " ELSE (SELECT TRUE FROM pg_sleep(1)) END"
                " RETURNING id"
            ).fetchall()
            inserted.extend(row[0] for row in rows)

    slow = threading.Thread(target=insert_slowly)
    slow.start()
    try:
        wait_for_session(other, "wait_event = 'PgSleep'")
        younger = publish(other, "q")  # drawn after the slow INSERT's first id
        assert complete(db, first, "w1")  # moves q's head to `younger`
        assert db.execute("SELECT head_id FROM queue_heads").fetchall() == [(younger,)]
    finally:
        slow.join()

    older, youngest = sorted(inserted)
    assert older < younger < youngest
    for job in (older, younger, youngest):
        assert claim(other, "w2") == job
        assert complete(other, job, "w2")
    assert claim(other, "w2") is None


def test_a_completion_waiting_for_a_row_holds_no_queue_lock(
    db: Conn, other: Conn, dsn: str
) -> None:
    """A completion may wait for a row someone else holds; it takes the
    locks of the queues it frees only afterwards. Otherwise an operator
    holding that row who moves a job into one of those queues (which takes
    the queue's shared lock) would close a deadlock."""
    a, b, c = publish(db, "q"), publish(db, "r"), publish(db, "s")
    assert claim(db, "w1") == a
    assert claim(db, "w1") == b
    failures: list[Exception] = []

    def complete_both() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            try:
                conn.execute(
                    "SELECT * FROM complete_and_claim_jobs('w1', %s, %s, %s, 0)",
                    ([a, b], ["resolved"] * 2, ["1"] * 2),
                ).fetchall()
            except psycopg.Error as exc:
                failures.append(exc)

    completing = threading.Thread(target=complete_both)
    with other.transaction():
        other.execute("SELECT FROM jobs WHERE id = %s FOR UPDATE", (a,))
        completing.start()
        wait_for_session(db, "wait_event_type = 'Lock'")
        other.execute("UPDATE jobs SET queue = 'r' WHERE id = %s", (c,))
    completing.join()

    assert failures == []
    jobs = db.execute("SELECT id, status, queue FROM jobs ORDER BY id").fetchall()
    assert jobs == [(a, "resolved", "q"), (b, "resolved", "r"), (c, "unfulfilled", "r")]


def wait_for_session(conn: Conn, condition: str) -> None:
    """Return once another session of this database meets `condition` (on
    pg_stat_activity)."""
    for _ in range(200):
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            f" WHERE datname = current_database() AND {condition}"
        ).fetchone()
        if row and row[0]:
            return
        time.sleep(0.01)
    raise AssertionError(f"no other session came to {condition}")


def test_rolled_back_publish_leaves_nothing_to_claim(db: Conn, other: Conn) -> None:
    with pytest.raises(psycopg.errors.RaiseException), db.transaction():
        publish(db, "q")
        db.execute("DO $$ BEGIN RAISE EXCEPTION 'abort'; END $$")

    assert claim(other, "w2") is None
    assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


def test_failed_job_does_not_block_its_queue(db: Conn) -> None:
    q1 = publish(db, "q")
    q2 = publish(db, "q")
    assert claim(db, "w1") == q1

    db.execute(
        "SELECT complete_job(%s, 'w1', 'rejected', '{\"message\": \"boom\"}')", (q1,)
    )

    assert claim(db, "w1") == q2


def test_claim_leaves_queue_whose_next_job_has_unhandled_category(db: Conn) -> None:
    publish(db, "q", category="other")
    publish(db, "q", category="mine")
    mine = publish(db, "r", category="mine")

    assert claim(db, "w1", ["mine"]) == mine
    assert claim(db, "w1", ["mine"]) is None


def test_expired_claim_is_claimed_again_and_old_worker_is_refused(
    db: Conn, other: Conn
) -> None:
    job = publish(db, "q")
    publish(db, "q")
    assert claim(db, "w1") == job

    db.execute(
        "UPDATE jobs SET claim_expires_at = now() - interval '1 second' WHERE id = %s",
        (job,),
    )

    assert claim(other, "w2") == job
    assert not complete(db, job, "w1", result=1)
    assert complete(other, job, "w2", result=2)
    row = db.execute("SELECT status, result, attempts FROM jobs WHERE id = %s", (job,))
    assert row.fetchone() == ("resolved", 2, 2)


def test_expired_but_unclaimed_job_is_still_completed_by_its_worker(db: Conn) -> None:
    job = publish(db, "q")
    assert claim(db, "w1") == job
    db.execute(
        "UPDATE jobs SET claim_expires_at = now() - interval '1 second' WHERE id = %s",
        (job,),
    )

    assert complete(db, job, "w1")


def test_renew_claims_returns_only_claims_still_held(db: Conn, other: Conn) -> None:
    kept = publish(db, "q")
    lost = publish(db, "r")
    assert claim(db, "w1") == kept
    assert claim(db, "w1") == lost
    db.execute("UPDATE jobs SET status = 'resolved' WHERE id = %s", (lost,))

    rows = db.execute("SELECT renew_claims('w1', %s)", ([kept, lost],)).fetchall()

    assert rows == [(kept,)]


def test_reap_releases_claims_of_unregistered_workers_only(
    db: Conn, other: Conn
) -> None:
    alive_job = publish(db, "q")
    dead_job = publish(db, "r")
    other.execute("SELECT register_worker('alive')")
    assert claim(other, "alive") == alive_job
    assert claim(db, "dead") == dead_job

    db.execute("SELECT reap_claims()")

    rows = db.execute("SELECT id, worker FROM jobs ORDER BY id").fetchall()
    assert rows == [(alive_job, "alive"), (dead_job, None)]


def test_register_worker_refuses_a_name_held_by_another_session(
    db: Conn, other: Conn
) -> None:
    db.execute("SELECT register_worker('w1')")

    with pytest.raises(psycopg.Error) as raised:
        other.execute("SELECT register_worker('w1')")

    assert raised.value.sqlstate == "PQ006"


def test_release_claims_makes_job_claimable_at_once(db: Conn, other: Conn) -> None:
    job = publish(db, "q")
    assert claim(db, "w1") == job

    db.execute("SELECT release_claims('w1')")

    assert claim(other, "w2") == job


def test_claim_refuses_repeatable_read(db: Conn) -> None:
    publish(db, "q")

    with pytest.raises(psycopg.Error) as raised:
        db.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        claim(db, "w1")
    db.execute("ROLLBACK")

    assert raised.value.sqlstate == "PQ003"


def test_running_job_rule_is_a_constraint(db: Conn) -> None:
    first = publish(db, "q")
    second = publish(db, "q")
    assert claim(db, "w1") == first

    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute(
            "UPDATE jobs SET worker = 'rogue', claim_expires_at = now() WHERE id = %s",
            (second,),
        )


def test_publish_jobs_returns_ids_in_input_order(db: Conn) -> None:
    rows = db.execute(
        "SELECT publish_jobs(ARRAY['a', 'b', 'c'], ARRAY['1', '2', '3']::jsonb[],"
        " ARRAY['q', NULL, 'q'])"
    ).fetchall()

    ids = [row[0] for row in rows]
    assert ids == sorted(ids)
    stored = db.execute("SELECT category, args, queue FROM jobs ORDER BY id").fetchall()
    assert stored == [("a", 1, "q"), ("b", 2, "default"), ("c", 3, "q")]


def test_complete_and_claim_records_outcomes_then_claims_next_jobs(db: Conn) -> None:
    q1 = publish(db, "q")
    q2 = publish(db, "q")
    r1 = publish(db, "r")
    s1 = publish(db, "s")
    assert claim(db, "w1") == q1
    assert claim(db, "w1") == r1

    rows = db.execute(
        "SELECT event, id, queue FROM complete_and_claim_jobs('w1', %s, %s, %s, 2)",
        ([q1, r1], ["resolved", "rejected"], ["1", '{"message": "no"}']),
    ).fetchall()

    # q1 finished, so q's next job is the oldest that may run; then s.
    assert rows == [("claimed", q2, "q"), ("claimed", s1, "s")]
    finished = db.execute(
        "SELECT id, status FROM jobs WHERE finished_at IS NOT NULL ORDER BY id"
    ).fetchall()
    assert finished == [(q1, "resolved"), (r1, "rejected")]


def test_complete_and_claim_reports_refused_completions(db: Conn) -> None:
    job = publish(db, "q")
    assert claim(db, "w1") == job
    db.execute(
        "UPDATE jobs SET status = 'resolved', result = '0' WHERE id = %s", (job,)
    )

    rows = db.execute(
        "SELECT event, id FROM complete_and_claim_jobs('w1', %s, %s, %s, 1)",
        ([job], ["resolved"], ["1"]),
    ).fetchall()

    assert rows == [("refused", job)]
    assert db.execute("SELECT result FROM jobs").fetchone() == (0,)
