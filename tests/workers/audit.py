"""An audit trail of jobs, for reliability tests and the soak: who claimed,
finished, released or moved which job, in commit-consistent order.

``install(conn)`` adds a table ``pyqueue_audit`` and a row trigger on ``jobs``
to a test database (never to a real installation). ``check(rows)`` replays the
trail and counts what the contract forbids.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

# A claim is an UPDATE that raises attempts. The claimer can only see a job
# after the transaction that published it, or finished its predecessor,
# committed, so the order of nextval() matches the order that matters.
AUDIT_SQL = """
CREATE TABLE IF NOT EXISTS pyqueue_audit (
    seq bigserial PRIMARY KEY,
    job_id bigint NOT NULL,
    queue text NOT NULL,
    event text NOT NULL,
    worker text,
    old_queue text
);

CREATE OR REPLACE FUNCTION pyqueue_audit_jobs()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pyqueue_audit (job_id, queue, event)
        VALUES (NEW.id, NEW.queue, 'publish');
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        INSERT INTO pyqueue_audit (job_id, queue, event, worker)
        VALUES (OLD.id, OLD.queue, 'delete', OLD.status);
        RETURN NULL;
    END IF;
    IF NEW.queue IS DISTINCT FROM OLD.queue THEN
        INSERT INTO pyqueue_audit (job_id, queue, event, old_queue)
        VALUES (NEW.id, NEW.queue, 'move', OLD.queue);
    END IF;
    IF OLD.status = 'unfulfilled' AND NEW.status <> 'unfulfilled' THEN
        INSERT INTO pyqueue_audit (job_id, queue, event, worker)
        VALUES (NEW.id, NEW.queue, 'finish', OLD.worker);
    ELSIF OLD.status <> 'unfulfilled' AND NEW.status = 'unfulfilled' THEN
        INSERT INTO pyqueue_audit (job_id, queue, event)
        VALUES (NEW.id, NEW.queue, 'reopen');
    END IF;
    IF NEW.attempts > OLD.attempts THEN
        INSERT INTO pyqueue_audit (job_id, queue, event, worker)
        VALUES (NEW.id, NEW.queue, 'claim', NEW.worker);
    ELSIF OLD.worker IS NOT NULL AND NEW.worker IS NULL
        AND NEW.status = 'unfulfilled' THEN
        INSERT INTO pyqueue_audit (job_id, queue, event, worker)
        VALUES (NEW.id, NEW.queue, 'release', OLD.worker);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS zz_pyqueue_audit ON jobs;
CREATE TRIGGER zz_pyqueue_audit
AFTER INSERT OR UPDATE OR DELETE ON jobs
FOR EACH ROW
EXECUTE FUNCTION pyqueue_audit_jobs();
"""

READ_SQL = "SELECT seq, job_id, queue, event, worker, old_queue FROM pyqueue_audit"


def install(conn: Any) -> None:
    """Add the audit table and trigger to the database of `conn` (autocommit)."""
    conn.execute(AUDIT_SQL)


@dataclass
class Report:
    """What a replay of the audit trail found."""

    published: int = 0
    claims: int = 0
    finishes: Counter[int] = field(default_factory=Counter)
    starts: Counter[int] = field(default_factory=Counter)
    fifo_violations: list[str] = field(default_factory=list)
    finished_twice: list[int] = field(default_factory=list)

    @property
    def reruns(self) -> int:
        """Claims beyond the first, per job, summed: handlers that ran again."""
        return sum(count - 1 for count in self.starts.values() if count > 1)


def check(rows: list[tuple[Any, ...]]) -> Report:
    """Replay audit rows (ordered by seq): each claim must take the oldest
    unfinished job of its queue while no other job of the queue is claimed."""
    report = Report()
    waiting: dict[str, set[int]] = defaultdict(set)
    running: dict[str, int | None] = {}
    finished: set[int] = set()
    for _seq, job_id, queue, event, _worker, old_queue in sorted(rows):
        if event == "publish":
            report.published += 1
            waiting[queue].add(job_id)
        elif event == "claim":
            report.claims += 1
            report.starts[job_id] += 1
            holder = running.get(queue)
            oldest = min(waiting[queue]) if waiting[queue] else None
            if holder == job_id:
                pass  # claimed again after its claim expired: it goes first
            elif holder is not None:
                report.fifo_violations.append(
                    f"job {job_id} of {queue!r} claimed while job {holder} ran"
                )
            elif oldest != job_id:
                report.fifo_violations.append(
                    f"job {job_id} of {queue!r} claimed before older job {oldest}"
                )
            running[queue] = job_id
        elif event == "finish":
            report.finishes[job_id] += 1
            if job_id in finished:
                report.finished_twice.append(job_id)
            finished.add(job_id)
            waiting[queue].discard(job_id)
            if running.get(queue) == job_id:
                running[queue] = None
        elif event == "release":
            if running.get(queue) == job_id:
                running[queue] = None
        elif event == "reopen":
            finished.discard(job_id)
            waiting[queue].add(job_id)
        elif event == "move":
            if job_id in waiting[old_queue]:
                waiting[old_queue].discard(job_id)
                waiting[queue].add(job_id)
            if running.get(old_queue) == job_id:
                running[old_queue] = None
                running[queue] = job_id
        elif event == "delete":
            waiting[queue].discard(job_id)
            if running.get(queue) == job_id:
                running[queue] = None
    return report


def read(conn: Any) -> Report:
    """Replay the audit trail of the database of `conn`."""
    return check(conn.execute(READ_SQL).fetchall())
