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
-- Statements that take an array run with generic plans (plan_cache_mode):
-- with custom plans PostgreSQL planned them again on every call. Each is
-- written so that its generic plan looks rows up by key, whatever the
-- statistics say (see complete_and_claim_jobs).
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
-- One probe per queue, each with the queue's name as a constant, so that
-- the plan is an index lookup whatever the statistics say.
CREATE FUNCTION _announce_queues(queues text[])
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_queue text;
BEGIN
    FOREACH v_queue IN ARRAY coalesce(queues, '{}') LOOP
        IF EXISTS (
            SELECT FROM jobs AS j
            WHERE j.queue = v_queue AND j.status = 'unfulfilled'
        ) AND NOT EXISTS (
            SELECT FROM jobs AS r
            WHERE r.queue = v_queue
                AND r.status = 'unfulfilled'
                AND r.worker IS NOT NULL
                AND r.claim_expires_at > now()
        ) THEN
            PERFORM pg_notify(
                _channel('jobs'), json_build_object('queue', v_queue)::text
            );
        END IF;
    END LOOP;
END
$$;

-- Muted triggers. The two notifying row triggers of an UPDATE (0003's
-- jobs_30_after_update, jobs_finished; jobs_35_queue_changed, jobs at commit)
-- stay quiet while the setting pyqueue.notify_by_caller is 'on'. Only
-- complete_and_claim_jobs sets it, for its own run (a SET clause: PostgreSQL
-- restores the setting when it returns, or fails), and sends the same
-- notifications itself, once for the whole batch. A session that sets it by hand
-- silences its own edits: do not.

CREATE OR REPLACE FUNCTION tg_jobs_queue_changed()
RETURNS trigger
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    IF NEW.queue IS DISTINCT FROM OLD.queue THEN
        PERFORM _announce_queues(ARRAY[OLD.queue, NEW.queue]);
    ELSE
        PERFORM _announce_queues(ARRAY[OLD.queue]);
    END IF;
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
-- or no row when it has no waiting job. The caller holds the exclusive locks
-- of all of them: no publisher of theirs is in flight.
CREATE FUNCTION _refresh_queue_heads(queues text[])
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    WITH heads AS (
        SELECT
            q.queue,
            (
                SELECT w.id
                FROM jobs AS w
                WHERE w.queue = q.queue AND w.status = 'unfulfilled'
                ORDER BY w.id
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
    )

    DELETE FROM queue_heads AS h
    USING heads AS s
    WHERE h.queue = ANY (queues) AND h.queue = s.queue AND s.head_id IS NULL;
END
$$;

-- _claim_in_queues: for `worker`, claim in each of `queues` the job that must
-- run next there, if it may run now and its category is in `categories`
-- (NULL: any); return the claimed jobs. `heads[i]` is the head queue_heads
-- gave for `queues[i]`. The caller holds the exclusive locks of all of them,
-- so this statement's snapshot, taken after the locks, sees every job of
-- theirs that can ever be older than the one it picks.
CREATE FUNCTION _claim_in_queues(
    queues text[],
    heads bigint[],
    worker text,
    categories text[],
    claim_timeout interval
)
RETURNS SETOF jobs
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_job jobs;
    v_confirmed text[] := '{}';
BEGIN
    -- A queue's next job is the one a worker holds or held (its claim may
    -- have expired), else its oldest waiting job, its head.
    --
    -- Lock: the jobs' rows, skipped rather than waited for. Their holder (a
    -- completing worker, an operator) may be waiting for one of our locks.
    -- "finished_at IS NULL" means unfulfilled (CHECK constraint) without
    -- naming status, so that only the primary key serves the id list (see
    -- complete_and_claim_jobs).
    FOR v_job IN
        WITH next AS (
            SELECT coalesce(r.id, h.id) AS id
            FROM unnest(queues) AS q (queue)
            LEFT JOIN LATERAL (
                SELECT w.id
                FROM jobs AS w
                WHERE w.queue = q.queue AND w.status = 'unfulfilled'
                ORDER BY w.id
                LIMIT 1
            ) AS h ON TRUE
            LEFT JOIN jobs AS r
                ON
                    r.queue = ANY (queues)
                    AND r.queue = q.queue
                    AND r.status = 'unfulfilled'
                    AND r.worker IS NOT NULL
        )

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
                AND l.finished_at IS NULL
                AND (l.worker IS NULL OR l.claim_expires_at <= now())
                AND (
                    _claim_in_queues.categories IS NULL
                    OR l.category = ANY (_claim_in_queues.categories)
                )
            FOR UPDATE SKIP LOCKED
        ))
        RETURNING j.*
    LOOP
        IF v_job.id = heads[array_position(queues, v_job.queue)] THEN
            v_confirmed := v_confirmed || v_job.queue;
        END IF;
        RETURN NEXT v_job;
    END LOOP;

    -- A queue whose claim did not find the recorded head (no claim, a stale
    -- head, no job left) gets its row made exact, or deleted.
    IF cardinality(v_confirmed) < cardinality(queues) THEN
        PERFORM _refresh_queue_heads(ARRAY(
            SELECT q.queue FROM unnest(queues) AS q (queue)
            WHERE NOT q.queue = ANY (v_confirmed)
        ));
    END IF;
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
    v_head bigint;
    v_seen text[] := '{}';
    v_locked text[] := '{}';
    v_heads bigint[] := '{}';
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
    FOR v_queue, v_head IN
        SELECT h.queue, h.head_id
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
        v_heads := v_heads || v_head;

        IF cardinality(v_locked) >= claim_count - v_claimed THEN
            FOR v_job IN
                SELECT * FROM _claim_in_queues(
                    v_locked, v_heads, _claim_jobs.worker, categories,
                    claim_timeout
                )
            LOOP
                RETURN NEXT v_job;
                v_claimed := v_claimed + 1;
            END LOOP;
            v_locked := '{}';
            v_heads := '{}';
            EXIT WHEN v_claimed >= claim_count;
        END IF;
    END LOOP;

    IF cardinality(v_locked) > 0 THEN
        RETURN QUERY
        SELECT * FROM _claim_in_queues(
            v_locked, v_heads, _claim_jobs.worker, categories, claim_timeout
        );
    END IF;
END
$$;

-- complete_and_claim_jobs: a worker's round trip: record the outcomes of the
-- jobs `job_ids` (element i: `statuses[i]`, `results[i]`, as complete_job
-- does), then claim up to `claim_count` jobs as claim_next_job does, all in
-- one transaction. One commit then stands for many jobs, and the worker that
-- finishes a queue's job can take that queue's next job without waiting for
-- a notification. Returns one row per refused completion (event 'refused':
-- the claim was gone, nothing was written) and per claimed job (event
-- 'claimed'). Same concurrency rules and notifications as the two functions;
-- runs muted (see above) and sends them itself.
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
SET plan_cache_mode = force_generic_plan
SET "pyqueue.notify_by_caller" = 'on'
AS $$
DECLARE
    v_ids bigint[];
    v_statuses text[];
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
        -- A NULL element is not contained either.
        IF NOT statuses <@ ARRAY['resolved', 'rejected'] THEN
            RAISE EXCEPTION 'a job completes as resolved or rejected, not %', (
                SELECT coalesce(quote_literal(s.status), 'NULL')
                FROM unnest(statuses) AS s (status)
                WHERE s.status IS NULL OR s.status NOT IN ('resolved', 'rejected')
                LIMIT 1
            ) USING ERRCODE = 'PQ002';
        END IF;

        -- Lock: the jobs' rows. Waits only for a claimer re-claiming an
        -- expired claim (it never waits itself); afterwards the worker check
        -- fails. A job has a worker only while unfulfilled (CHECK
        -- constraint), so the worker check says it all; a status condition
        -- here would let the planner pick a partial index of waiting jobs
        -- over the primary key, and read the whole backlog, whenever stale
        -- statistics call it small.
        --
        -- A freed queue's head moves on to its oldest waiting job, without
        -- the queue's lock: a job whose publisher has not committed yet may
        -- be older still. Then the head overshoots, the walk (_claim_jobs)
        -- reaches the queue a little late, and its claimer, holding the
        -- lock, claims that job all the same and corrects the head. A queue
        -- left with no waiting job keeps its row until a claimer, holding
        -- the lock, finds it empty: a publisher in flight relies on that row.
        WITH done AS (
            UPDATE jobs AS j
            SET status = o.status, result = o.result
            FROM unnest(job_ids, statuses, results) AS o (id, status, result)
            WHERE j.id = ANY (job_ids)
                AND j.id = o.id
                AND j.worker = complete_and_claim_jobs.worker
            RETURNING j.id, j.status, j.queue
        ),

        heads AS (
            SELECT
                f.queue,
                (
                    SELECT w.id
                    FROM jobs AS w
                    WHERE w.queue = f.queue
                        AND w.status = 'unfulfilled'
                        AND w.id NOT IN (SELECT d.id FROM done AS d)
                    ORDER BY w.id
                    LIMIT 1
                ) AS head_id
            FROM (SELECT DISTINCT d.queue FROM done AS d) AS f
        ),

        moved AS (
            UPDATE queue_heads AS h SET head_id = s.head_id
            FROM heads AS s
            WHERE h.queue = ANY (ARRAY(SELECT s.queue FROM heads AS s))
                AND h.queue = s.queue
                AND h.head_id < s.head_id
        )

        SELECT
            coalesce(array_agg(d.id), '{}'),
            array_agg(d.status),
            coalesce(array_agg(DISTINCT d.queue), '{}')
        INTO v_ids, v_statuses, v_freed
        FROM done AS d;

        -- What the muted jobs_30_after_update would have sent, row by row.
        PERFORM pg_notify(
            _channel('jobs_finished'),
            json_build_object('id', d.id, 'status', d.status)::text
        )
        FROM unnest(v_ids, v_statuses) AS d (id, status);

        RETURN QUERY
        SELECT 'refused', i.id, NULL::text, NULL::jsonb, NULL::text, NULL::integer
        FROM unnest(job_ids) AS i (id)
        WHERE i.id IS NULL OR NOT i.id = ANY (v_ids);
    END IF;

    IF claim_count > 0 THEN
        FOR v_job IN
            SELECT * FROM _claim_jobs(
                complete_and_claim_jobs.worker, claim_count, categories,
                claim_timeout
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
    END IF;

    -- What the muted jobs_35_queue_changed would have sent at commit: a
    -- freed queue whose next job we just claimed has nothing to announce.
    PERFORM _announce_queues(ARRAY(
        SELECT f.queue FROM unnest(v_freed) AS f (queue)
        WHERE NOT f.queue = ANY (v_claimed)
    ));
END
$$;

-- complete_job: record the outcome of a job its caller still holds: status
-- 'resolved' or 'rejected' (PQ002 otherwise) with `result`. Returns false,
-- changing nothing, once the claim is gone (it expired and another worker
-- claimed the job, or an operator edited the row). It is
-- complete_and_claim_jobs for one job, claiming none: the same writes and
-- the same notifications (jobs_finished, and jobs for the freed queue).
CREATE OR REPLACE FUNCTION complete_job(
    job_id bigint,
    worker text,
    status text,
    result jsonb DEFAULT NULL
)
RETURNS boolean
LANGUAGE sql
VOLATILE
SET search_path FROM CURRENT
AS $$
    SELECT NOT EXISTS (
        SELECT
        FROM complete_and_claim_jobs(
            complete_job.worker,
            ARRAY[complete_job.job_id],
            ARRAY[complete_job.status],
            ARRAY[complete_job.result],
            0
        ) AS c
        WHERE c.event = 'refused'
    )
$$;

DROP FUNCTION _claim_in_queue(text, bigint, text, text[], interval);
DROP FUNCTION _advance_queue_head(text);
DROP FUNCTION _set_queue_head(text, bigint);

-- pyqueue:ledger
INSERT INTO pyqueue_migrations (version, name, checksum)
VALUES (
    5,
    'set_based_claims_and_completions',
    'sha256:0e0efa0418b2bb23f523838bcd7985372f0d7f34c6c9977cae2970f44c76b75a'
);

COMMIT;
