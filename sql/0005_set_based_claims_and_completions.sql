-- 0005 set_based_claims_and_completions: a worker's batch of completions, and
-- its batch of claims, each become one UPDATE of jobs instead of one per job.
--
-- Why: PostgreSQL prepares the CHECK constraints and the trigger WHEN clauses
-- of jobs afresh for every UPDATE statement (it reads them back from their
-- stored text), and starts an executor for each. With one statement per job
-- that setup was a quarter of the server's time per job (perf, W1 of `make
-- bench`); with one statement per batch it is paid once. For the same reason
-- the completing functions send their notifications themselves, one
-- statement per batch, instead of two row triggers per job: they mute those
-- triggers for their own UPDATE (see "Muted triggers" below).
--
-- Same semantics, locking protocol (0002's header) and notifications as the
-- functions it replaces: claim_next_job, complete_job and
-- complete_and_claim_jobs keep their signatures. The per-job helpers
-- _claim_in_queue, _advance_queue_head, _set_queue_head and _announce_queue
-- are dropped.
BEGIN;

-- Pin this file's objects to the session's first schema, pg_temp last, as
-- `pyqueue migrate` does; a plain psql session would otherwise record
-- "$user", public in every function (and search pg_temp first).
SELECT pg_catalog.set_config(
    'search_path',
    pg_catalog.quote_ident(pg_catalog.current_schema()) || ', pg_temp',
    TRUE
);

-- _announce_queues: NOTIFY jobs for each of `queues` in which a worker could
-- claim a job now: it has a waiting job and no running job whose claim holds.
CREATE FUNCTION _announce_queues(queues text[])
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM pg_notify(_channel('jobs'), json_build_object('queue', q.queue)::text)
    FROM (SELECT DISTINCT u.queue FROM unnest(queues) AS u (queue)) AS q
    WHERE EXISTS (
        SELECT FROM jobs AS j
        WHERE j.queue = q.queue AND j.status = 'unfulfilled'
    ) AND NOT EXISTS (
        SELECT FROM jobs AS r
        WHERE r.queue = q.queue
            AND r.status = 'unfulfilled'
            AND r.worker IS NOT NULL
            AND r.claim_expires_at > now()
    );
END
$$;

-- Muted triggers. The two notifying row triggers of an UPDATE (0003's
-- jobs_30_after_update, jobs_finished; jobs_35_queue_changed, jobs at commit)
-- stay quiet while the setting pyqueue.notify_by_caller is 'on' in the
-- transaction. Only _complete_jobs sets it, around its own UPDATE, and its
-- callers send the same notifications for the whole batch. A session that
-- sets it by hand silences its own edits: do not.

CREATE OR REPLACE FUNCTION tg_jobs_queue_changed()
RETURNS trigger
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM _announce_queues(ARRAY[OLD.queue, NEW.queue]);
    RETURN NULL;
END
$$;

DROP FUNCTION _announce_queue(text);

DROP TRIGGER jobs_30_after_update ON jobs;
CREATE TRIGGER jobs_30_after_update
AFTER UPDATE OF status ON jobs
FOR EACH ROW
WHEN (
    old.status IS DISTINCT FROM new.status
    AND new.status <> 'unfulfilled'
    AND current_setting('pyqueue.notify_by_caller', TRUE) IS DISTINCT FROM 'on'
)
EXECUTE FUNCTION tg_jobs_after_update();

DROP TRIGGER jobs_35_queue_changed ON jobs;
CREATE CONSTRAINT TRIGGER jobs_35_queue_changed
AFTER UPDATE OF status, queue, worker ON jobs
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW
WHEN (
    (
        old.status IS DISTINCT FROM new.status
        OR old.queue IS DISTINCT FROM new.queue
        OR (old.worker IS NOT NULL AND new.worker IS NULL)
    )
    AND current_setting('pyqueue.notify_by_caller', TRUE) IS DISTINCT FROM 'on'
)
EXECUTE FUNCTION tg_jobs_queue_changed();

-- _refresh_queue_heads: give each of `queues` its true head in queue_heads,
-- or no row when it has no waiting job, and return the heads (NULL: none).
-- The caller holds the exclusive locks of all of them: no publisher of
-- theirs is in flight.
CREATE FUNCTION _refresh_queue_heads(queues text[])
RETURNS TABLE (queue text, head_id bigint)
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN QUERY
    WITH heads AS (
        SELECT
            q.queue,
            (
                SELECT j.id
                FROM jobs AS j
                WHERE j.queue = q.queue AND j.status = 'unfulfilled'
                ORDER BY j.id
                LIMIT 1
            ) AS head_id
        FROM unnest(queues) AS q (queue)
    ),

    moved AS (
        UPDATE queue_heads AS h SET head_id = s.head_id
        FROM heads AS s
        WHERE h.queue = ANY (queues)
            AND h.queue = s.queue
            AND h.head_id <> s.head_id
    ),

    gone AS (
        DELETE FROM queue_heads AS h
        USING heads AS s
        WHERE h.queue = ANY (queues) AND h.queue = s.queue AND s.head_id IS NULL
    )

    SELECT s.queue, s.head_id FROM heads AS s;
END
$$;

-- _complete_jobs: record the outcomes of the jobs `job_ids` that `worker`
-- still holds (element i: `statuses[i]`, `results[i]`), send jobs_finished
-- for each, and move the heads of the queues they free. Returns the ids it
-- refused (claim gone, nothing written) and the freed queues, which the
-- caller announces (_announce_queues) once it has claimed what it will.
-- complete_job's rules; PQ002 for a status other than 'resolved' or
-- 'rejected', before anything is written.
CREATE FUNCTION _complete_jobs(
    worker text,
    job_ids bigint[],
    statuses text[],
    results jsonb[],
    OUT refused bigint[],
    OUT freed text[]
)
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_bad text;
    v_ids bigint[];
    v_statuses text[];
    v_locked text[] := '{}';
    v_queue text;
BEGIN
    SELECT coalesce(quote_literal(s.status), 'NULL') INTO v_bad
    FROM unnest(statuses) AS s (status)
    WHERE s.status IS NULL OR s.status NOT IN ('resolved', 'rejected')
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'a job completes as resolved or rejected, not %', v_bad
            USING ERRCODE = 'PQ002';
    END IF;

    -- Lock: the jobs' rows. Waits only for a claimer re-claiming an expired
    -- claim (it never waits itself); afterwards the worker check fails.
    PERFORM set_config('pyqueue.notify_by_caller', 'on', TRUE);
    WITH done AS (
        UPDATE jobs AS j
        SET status = o.status, result = o.result
        FROM unnest(job_ids, statuses, results) AS o (id, status, result)
        WHERE j.id = ANY (job_ids)
            AND j.id = o.id
            AND j.worker = _complete_jobs.worker
            AND j.status = 'unfulfilled'
        RETURNING j.id, j.status, j.queue
    )

    SELECT array_agg(d.id), array_agg(d.status), array_agg(DISTINCT d.queue)
    INTO v_ids, v_statuses, freed
    FROM done AS d;
    PERFORM set_config('pyqueue.notify_by_caller', '', TRUE);

    -- What the muted jobs_30_after_update would have sent, row by row.
    PERFORM pg_notify(
        _channel('jobs_finished'),
        json_build_object('id', d.id, 'status', d.status)::text
    )
    FROM unnest(v_ids, v_statuses) AS d (id, status);

    -- Lock: each freed queue's exclusive lock, try only (we hold row locks of
    -- jobs). A queue whose lock a publisher holds keeps its old head, still a
    -- valid lower bound, for the next claimer to correct.
    FOREACH v_queue IN ARRAY coalesce(freed, '{}') LOOP
        IF _try_lock_queue(v_queue) THEN
            v_locked := v_locked || v_queue;
        END IF;
    END LOOP;
    IF cardinality(v_locked) > 0 THEN
        PERFORM FROM _refresh_queue_heads(v_locked);
    END IF;

    refused := ARRAY(
        SELECT i.id
        FROM unnest(job_ids) AS i (id)
        WHERE i.id IS NULL OR NOT i.id = ANY (coalesce(v_ids, '{}'))
    );
    freed := coalesce(freed, '{}');
END
$$;

-- _claim_in_queues: for `worker`, claim in each of `queues` the job that must
-- run next there, if it may run now and its category is in `categories`
-- (NULL: any); return the claimed jobs. The caller holds the exclusive locks
-- of all of them, so this statement's snapshot, taken after the locks, sees
-- every job of theirs that can ever be older than the one it picks. Their
-- queue_heads rows are made exact on the way.
CREATE FUNCTION _claim_in_queues(
    queues text[],
    worker text,
    categories text[],
    claim_timeout interval
)
RETURNS SETOF jobs
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    -- A queue's next job is the one a worker holds or held (its claim may
    -- have expired), else its oldest waiting job.
    RETURN QUERY
    WITH next AS (
        SELECT coalesce(r.id, h.head_id) AS id
        FROM _refresh_queue_heads(queues) AS h
        LEFT JOIN jobs AS r
            ON
                r.queue = ANY (queues)
                AND r.queue = h.queue
                AND r.status = 'unfulfilled'
                AND r.worker IS NOT NULL
    )

    -- Lock: the jobs' rows, skipped rather than waited for. Their holder (a
    -- completing worker, an operator) may be waiting for one of our locks.
    UPDATE jobs AS j
    SET
        worker = _claim_in_queues.worker,
        claimed_at = now(),
        claim_expires_at = now() + _claim_in_queues.claim_timeout,
        attempts = j.attempts + 1
    WHERE j.id = ANY (ARRAY(
        SELECT l.id
        FROM jobs AS l
        WHERE l.id = ANY (ARRAY(SELECT n.id FROM next AS n))
            AND l.status = 'unfulfilled'
            AND (l.worker IS NULL OR l.claim_expires_at <= now())
            AND (
                _claim_in_queues.categories IS NULL
                OR l.category = ANY (_claim_in_queues.categories)
            )
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING j.*;
END
$$;

-- _claim_jobs: claim up to `claim_count` jobs for `worker`, oldest first,
-- with one walk over queue_heads; claim_next_job's rules and checks. Locks
-- as many free queues as it still needs jobs, then claims in all of them
-- with one statement, and walks on only when some yielded nothing.
CREATE OR REPLACE FUNCTION _claim_jobs(
    worker text,
    claim_count integer,
    categories text[],
    claim_timeout interval
)
RETURNS SETOF jobs
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_queue text;
    v_seen text[] := '{}';
    v_locked text[] := '{}';
    v_claimed integer := 0;
    v_job jobs;
BEGIN
    IF coalesce(_claim_jobs.worker, '') = '' THEN
        RAISE EXCEPTION 'worker must not be empty'
            USING ERRCODE = 'PQ004', HINT = 'pass a name unique to this worker';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'claiming jobs needs read committed, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'PQ003',
                HINT = 'call it outside an explicit transaction';
    END IF;
    IF coalesce(claim_count, 0) < 1 THEN
        RETURN;
    END IF;

    -- Queues by their head, oldest first, skipping those running a job whose
    -- claim holds.
    FOR v_queue IN
        SELECT h.queue
        FROM queue_heads AS h
        WHERE NOT EXISTS (
            SELECT
            FROM jobs AS r
            WHERE r.queue = h.queue
                AND r.status = 'unfulfilled'
                AND r.worker IS NOT NULL
                AND r.claim_expires_at > now()
        )
        ORDER BY h.head_id
    LOOP
        IF v_queue = ANY (v_seen) THEN
            PERFORM _fold_queue_heads(v_queue);
            CONTINUE;
        END IF;
        v_seen := v_seen || v_queue;

        -- Lock: exclusive queue lock, try only. Held, no publisher of this
        -- queue is in flight and no other claimer reads it until we commit.
        CONTINUE WHEN NOT _try_lock_queue(v_queue);
        v_locked := v_locked || v_queue;

        IF cardinality(v_locked) >= claim_count - v_claimed THEN
            FOR v_job IN
                SELECT * FROM _claim_in_queues(
                    v_locked, _claim_jobs.worker, categories, claim_timeout
                )
            LOOP
                RETURN NEXT v_job;
                v_claimed := v_claimed + 1;
            END LOOP;
            v_locked := '{}';
            EXIT WHEN v_claimed >= claim_count;
        END IF;
    END LOOP;

    IF cardinality(v_locked) > 0 THEN
        RETURN QUERY
        SELECT * FROM _claim_in_queues(
            v_locked, _claim_jobs.worker, categories, claim_timeout
        );
    END IF;
END
$$;

-- complete_job: record the outcome of a job its caller still holds: status
-- 'resolved' or 'rejected' (PQ002 otherwise) with `result`. Returns false,
-- changing nothing, once the claim is gone (it expired and another worker
-- claimed the job, or an operator edited the row). The status triggers set
-- finished_at and send the NOTIFYs (jobs_finished, and jobs for the freed
-- queue).
CREATE OR REPLACE FUNCTION complete_job(
    job_id bigint,
    worker text,
    status text,
    result jsonb DEFAULT NULL
)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_refused bigint[];
    v_freed text[];
BEGIN
    SELECT c.refused, c.freed INTO v_refused, v_freed
    FROM _complete_jobs(
        complete_job.worker,
        ARRAY[complete_job.job_id],
        ARRAY[complete_job.status],
        ARRAY[complete_job.result]
    ) AS c;
    PERFORM _announce_queues(v_freed);
    RETURN cardinality(v_refused) = 0;
END
$$;

-- complete_and_claim_jobs: a worker's round trip: record the outcomes of the
-- jobs `job_ids` (element i: `statuses[i]`, `results[i]`, as complete_job
-- does), then claim up to `claim_count` jobs as claim_next_job does, all in
-- one transaction. One commit then stands for many jobs, and the worker that
-- finishes a queue's job can take that queue's next job without waiting for
-- a notification. Returns one row per refused completion (event 'refused':
-- the claim was gone, nothing was written) and per claimed job (event
-- 'claimed'). Same concurrency rules and notifications as the two functions.
-- A call that only claims commits without waiting for its WAL flush: a claim
-- lost to a server crash only means the job runs again (at-least-once), and
-- a worker that is idle picks up work one disk flush sooner. Outcomes are
-- always flushed before the call returns.
CREATE OR REPLACE FUNCTION complete_and_claim_jobs(
    worker text,
    job_ids bigint[],
    statuses text[],
    results jsonb[],
    claim_count integer,
    categories text[] DEFAULT NULL,
    claim_timeout interval DEFAULT interval '60 seconds'
)
RETURNS TABLE (
    event text,
    id bigint,
    category text,
    args jsonb,
    queue text,
    attempts integer
)
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_refused bigint[] := '{}';
    v_freed text[] := '{}';
    v_claimed text[] := '{}';
    v_job jobs;
BEGIN
    IF cardinality(job_ids) IS DISTINCT FROM cardinality(statuses)
        OR cardinality(job_ids) IS DISTINCT FROM cardinality(results) THEN
        RAISE EXCEPTION 'complete_and_claim_jobs needs arrays of one length, got % % %',
            cardinality(job_ids), cardinality(statuses), cardinality(results)
            USING ERRCODE = 'PQ005';
    END IF;

    IF coalesce(cardinality(job_ids), 0) = 0 THEN
        PERFORM set_config('synchronous_commit', 'off', TRUE);
    ELSE
        SELECT c.refused, c.freed INTO v_refused, v_freed
        FROM _complete_jobs(
            complete_and_claim_jobs.worker, job_ids, statuses, results
        ) AS c;
    END IF;

    RETURN QUERY
    SELECT 'refused', r.id, NULL::text, NULL::jsonb, NULL::text, NULL::integer
    FROM unnest(v_refused) AS r (id);

    FOR v_job IN
        SELECT * FROM _claim_jobs(
            complete_and_claim_jobs.worker, claim_count, categories, claim_timeout
        )
    LOOP
        v_claimed := v_claimed || v_job.queue;
        event := 'claimed';
        id := v_job.id;
        category := v_job.category;
        args := v_job.args;
        queue := v_job.queue;
        attempts := v_job.attempts;
        RETURN NEXT;
    END LOOP;

    -- A freed queue whose next job we just claimed has nothing to announce.
    PERFORM _announce_queues(ARRAY(
        SELECT f.queue FROM unnest(v_freed) AS f (queue)
        WHERE NOT f.queue = ANY (v_claimed)
    ));
END
$$;

DROP FUNCTION _claim_in_queue(text, bigint, text, text[], interval);
DROP FUNCTION _advance_queue_head(text);
DROP FUNCTION _set_queue_head(text, bigint);

-- pyqueue:ledger
INSERT INTO pyqueue_migrations (version, name, checksum)
VALUES (
    5,
    'set_based_claims_and_completions',
    'sha256:5d7288144a22322cf51b3fe97e4a4edd480e1578b8019f4fbd0d1871f251faff'
);

COMMIT;
