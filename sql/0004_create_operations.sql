-- 0004 create_operations: views to watch the queues and functions to steer them
-- from psql.
--
-- Every function here is a shortcut for a plain UPDATE or DELETE on jobs (written
-- above each one); the triggers of 0003 give both the same effect and the same
-- notifications, so an operator may use whichever is at hand. The functions add
-- checks and say what they did. Call them schema-qualified when pyqueue lives
-- elsewhere than public: other.cancel_job(42).
BEGIN;

-- Pin the install schema (the first of the caller's path) with pg_temp last, as
-- pyqueue migrate does, so that a bare psql -f pins the functions alike.
SELECT pg_catalog.set_config(
    'search_path',
    pg_catalog.quote_ident(pg_catalog.current_schema()) || ', pg_temp',
    TRUE
);

-- Finished rows by age, so that prune_jobs deletes the oldest batch without
-- reading the whole history. Partial: waiting and running jobs are not in it.
CREATE INDEX jobs_finished_by_age ON jobs (finished_at)
WHERE finished_at IS NOT NULL;

-- queue_stats: one row per queue that has any job: how many wait, which worker
-- runs its job and since when, how many finished each way, and how long its
-- oldest waiting job has waited. A job is running while a worker holds its
-- claim (claim_expired says that claim ran out without being renewed).
-- Counting the finished jobs reads the whole table: prune it (prune_jobs).
CREATE VIEW queue_stats AS
SELECT
    j.queue,
    count(*) FILTER (
        WHERE j.status = 'unfulfilled' AND j.worker IS NULL
    ) AS waiting,
    count(*) FILTER (
        WHERE j.status = 'unfulfilled' AND j.worker IS NOT NULL
    ) AS running,
    min(j.worker) FILTER (
        WHERE j.status = 'unfulfilled' AND j.worker IS NOT NULL
    ) AS worker,
    min(j.claimed_at) FILTER (
        WHERE j.status = 'unfulfilled' AND j.worker IS NOT NULL
    ) AS running_since,
    coalesce(bool_or(j.claim_expires_at <= now()), FALSE) AS claim_expired,
    count(*) FILTER (WHERE j.status = 'resolved') AS resolved,
    count(*) FILTER (WHERE j.status = 'rejected') AS rejected,
    date_trunc(
        'second',
        now() - min(j.created_at) FILTER (
            WHERE j.status = 'unfulfilled' AND j.worker IS NULL
        )
    ) AS oldest_waiting_age
FROM jobs AS j
GROUP BY j.queue
ORDER BY j.queue;

COMMENT ON VIEW queue_stats IS
'pyqueue: per queue, waiting/running/finished counts and the oldest waiting age';

-- running_jobs: the jobs a worker holds now, oldest claim first, with when the
-- claim runs out unless renewed (a past expiry: the worker stopped renewing
-- and another worker may take the job over).
CREATE VIEW running_jobs AS
SELECT
    j.id,
    j.queue,
    j.category,
    j.worker,
    j.attempts,
    j.claimed_at,
    date_trunc('second', now() - j.claimed_at) AS running_for,
    j.claim_expires_at,
    j.claim_expires_at <= now() AS claim_expired
FROM jobs AS j
WHERE j.status = 'unfulfilled' AND j.worker IS NOT NULL
ORDER BY j.claimed_at, j.id;

COMMENT ON VIEW running_jobs IS
'pyqueue: jobs held by a worker now, with the claim expiry';

-- _job_state: how an operator's function names the state of job `job_id`:
-- 'waiting', 'running', 'resolved', 'rejected'. Raises PQ007 when there is no
-- such job.
CREATE FUNCTION _job_state(job_id bigint)
RETURNS text
LANGUAGE plpgsql
STABLE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_state text;
BEGIN
    SELECT
        CASE
            WHEN j.status <> 'unfulfilled' THEN j.status
            WHEN j.worker IS NULL THEN 'waiting'
            ELSE 'running'
        END
    INTO v_state
    FROM jobs AS j
    WHERE j.id = _job_state.job_id;

    IF NOT FOUND THEN
        RAISE EXCEPTION 'job % does not exist', _job_state.job_id
            USING ERRCODE = 'PQ007',
                HINT = 'it may have been deleted or pruned; see SELECT * FROM jobs';
    END IF;
    RETURN v_state;
END
$$;

-- rerun_job: run rejected job `job_id` again, in its queue and at its place in
-- publish order (it is older than the jobs waiting there, so it runs next).
-- Returns true; false with a NOTICE when the job is already waiting or running.
-- Raises PQ007 for no such job, PQ008 for a resolved one.
-- Same as: UPDATE jobs SET status = 'unfulfilled'
--          WHERE id = 42 AND status = 'rejected';
-- (the status trigger clears result and finished_at and sends NOTIFY jobs).
CREATE FUNCTION rerun_job(job_id bigint)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_state text;
BEGIN
    -- Lock: the job's row, by the UPDATE; the trigger takes the shared queue
    -- lock as a publisher would.
    UPDATE jobs AS j
    SET status = 'unfulfilled'
    WHERE j.id = rerun_job.job_id AND j.status = 'rejected';

    IF FOUND THEN
        RETURN TRUE;
    END IF;

    v_state := _job_state(rerun_job.job_id);
    IF v_state = 'resolved' THEN
        RAISE EXCEPTION 'job % is resolved, not rejected', rerun_job.job_id
            USING ERRCODE = 'PQ008',
                HINT = 'to run it again anyway: UPDATE jobs SET status = '
                || '''unfulfilled'' WHERE id = ' || rerun_job.job_id;
    END IF;
    RAISE NOTICE 'job % is % already; nothing to rerun', rerun_job.job_id, v_state;
    RETURN FALSE;
END
$$;

-- cancel_job: reject waiting job `job_id` without running it; its result says
-- it was cancelled ({"type": "Cancelled", "message": `reason`, ...}) and its
-- waiters get JobRejected. Returns true; false with a NOTICE when the job has
-- finished already. Raises PQ007 for no such job and PQ009 for a running one
-- (a worker holds it; finishing it by hand discards the worker's result).
-- Same as: UPDATE jobs SET status = 'rejected', result = jsonb_build_object(
--              'type', 'Cancelled', 'message', 'cancelled by an operator')
--          WHERE id = 42 AND status = 'unfulfilled' AND worker IS NULL;
-- (the status trigger sets finished_at and sends NOTIFY jobs_finished).
CREATE FUNCTION cancel_job(
    job_id bigint,
    reason text DEFAULT 'cancelled by an operator'
)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_state text;
BEGIN
    -- Lock: the job's row. A claimer that took it first makes the row fail
    -- the worker check when we re-read it, so a running job is never cancelled.
    UPDATE jobs AS j
    SET
        status = 'rejected',
        result = jsonb_build_object(
            'type', 'Cancelled',
            'message', coalesce(cancel_job.reason, 'cancelled by an operator'),
            'cancelled_by', current_user
        )
    WHERE j.id = cancel_job.job_id
        AND j.status = 'unfulfilled'
        AND j.worker IS NULL;

    IF FOUND THEN
        RETURN TRUE;
    END IF;

    v_state := _job_state(cancel_job.job_id);
    IF v_state = 'running' THEN
        RAISE EXCEPTION 'job % is running, so it cannot be cancelled', cancel_job.job_id
            USING ERRCODE = 'PQ009',
                DETAIL = 'a worker holds it; see SELECT * FROM running_jobs',
                HINT = 'wait for it, or reject it by hand (the worker''s result '
                || 'is then discarded): UPDATE jobs SET status = ''rejected'' '
                || 'WHERE id = ' || cancel_job.job_id;
    END IF;
    RAISE NOTICE 'job % is % already; nothing to cancel', cancel_job.job_id, v_state;
    RETURN FALSE;
END
$$;

-- move_jobs: move the waiting jobs of queue `from_queue` (only those in
-- `job_ids` when given) to queue `to_queue`, keeping their ids: in the new
-- queue they run in id order among the jobs already there. A running job is
-- never moved. Returns how many moved.
-- Same as: UPDATE jobs SET queue = 'to'
--          WHERE queue = 'from' AND status = 'unfulfilled' AND worker IS NULL;
-- (the queue trigger enters the new queue and sends NOTIFY jobs for both).
CREATE FUNCTION move_jobs(
    from_queue text,
    to_queue text,
    job_ids bigint[] DEFAULT NULL
)
RETURNS integer
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_count integer;
BEGIN
    IF coalesce(move_jobs.to_queue, '') = '' THEN
        RAISE EXCEPTION 'queue name must not be empty, got %',
            coalesce(quote_literal(move_jobs.to_queue), 'NULL')
            USING ERRCODE = 'PQ010', HINT = 'name the queue to move the jobs to';
    END IF;

    -- Lock: the rows in id order, so that two movers never deadlock; a row a
    -- claimer holds is skipped, as it is about to run in its old queue.
    UPDATE jobs AS j
    SET queue = move_jobs.to_queue
    WHERE j.id IN (
        SELECT w.id
        FROM jobs AS w
        WHERE w.queue = move_jobs.from_queue
            AND w.status = 'unfulfilled'
            AND w.worker IS NULL
            AND (move_jobs.job_ids IS NULL OR w.id = ANY (move_jobs.job_ids))
        ORDER BY w.id
        FOR UPDATE SKIP LOCKED
    )
        AND j.status = 'unfulfilled'
        AND j.worker IS NULL
        AND j.queue <> move_jobs.to_queue;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

-- prune_jobs: delete at most `batch_size` finished jobs (resolved or rejected)
-- that finished more than `older_than` ago, oldest first; return how many.
-- One batch per call keeps each transaction short: loop until it returns 0
-- (a DO block may COMMIT between batches). Waiting and running jobs are
-- never touched, so no NOTIFY is sent.
-- Same as: DELETE FROM jobs WHERE id IN (SELECT id FROM jobs
--              WHERE finished_at < now() - interval '30 days' LIMIT 10000);
CREATE FUNCTION prune_jobs(
    older_than interval,
    batch_size integer DEFAULT 10000
)
RETURNS integer
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_count integer;
BEGIN
    IF prune_jobs.older_than IS NULL OR prune_jobs.older_than < interval '0' THEN
        RAISE EXCEPTION 'older_than must be a positive interval, got %',
            coalesce(quote_literal(prune_jobs.older_than), 'NULL')
            USING ERRCODE = 'PQ011', HINT = 'for example interval ''30 days''';
    END IF;
    IF coalesce(prune_jobs.batch_size, 0) < 1 THEN
        RAISE EXCEPTION 'batch_size must be at least 1, got %',
            coalesce(prune_jobs.batch_size::text, 'NULL')
            USING ERRCODE = 'PQ011';
    END IF;

    -- Lock: finished rows only, skipping any an operator is editing now.
    DELETE FROM jobs AS j
    WHERE j.id IN (
        SELECT f.id
        FROM jobs AS f
        WHERE f.finished_at IS NOT NULL
            AND f.finished_at < now() - prune_jobs.older_than
        ORDER BY f.finished_at
        LIMIT prune_jobs.batch_size
        FOR UPDATE SKIP LOCKED
    )
        AND j.status <> 'unfulfilled';
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

-- pyqueue:ledger
INSERT INTO pyqueue_migrations (version, name, checksum)
VALUES (
    4,
    'create_operations',
    'sha256:74d8ccdf21827d9f6b15923f11617a473e906beaa9500867882ceaef03604241'
);

COMMIT;
