-- 0002 create_job_functions: publish, claim, renew, complete and read jobs.
--
-- The locking protocol every function here keeps (README, "How it works"):
-- a transaction that makes a job of queue Q runnable holds the shared
-- advisory lock of Q until it commits; a claimer takes the exclusive lock of Q
-- with a try, never a wait, and then reads Q with a fresh snapshot. Holding
-- it, the claimer sees every job of Q that can ever be older than the one it
-- picks, so the oldest waiting job of Q is really the oldest.
BEGIN;

-- Pin this file's objects to the session's first schema, pg_temp last, as
-- `pyqueue migrate` does; a plain psql session would otherwise record
-- "$user", public in every function (and search pg_temp first).
SELECT pg_catalog.set_config(
    'search_path',
    pg_catalog.quote_ident(pg_catalog.current_schema()) || ', pg_temp',
    TRUE
);

-- The next four helpers are SQL-standard bodies without a SET clause, so
-- that the planner inlines them into their callers (all of which pin the
-- search_path): they sit on every claim, completion and notification.
-- Their references are bound when they are created, not when they run.

-- _advisory_key_space: the first half of this installation's advisory lock
-- keys for one purpose ('queue', 'worker'); differs between schemas so that
-- two installations in one database never share a lock.
CREATE FUNCTION _advisory_key_space(purpose text)
RETURNS integer
LANGUAGE sql
STABLE
RETURN hashtext('pyqueue:' || current_schema() || ':' || purpose);

-- _channel: the NOTIFY channel called `name` for this installation: the bare
-- name in public, '<schema>.<name>' elsewhere.
CREATE FUNCTION _channel(name text)
RETURNS text
LANGUAGE sql
STABLE
RETURN CASE current_schema()
    WHEN 'public' THEN name
    ELSE current_schema() || '.' || name
END;

-- _lock_queue_shared: fence queue `queue` against claimers until this
-- transaction ends. Taken before a job of the queue becomes runnable, so
-- that no claimer can start a younger job while this one is uncommitted.
-- Waits only for claim transactions, which never wait themselves.
CREATE FUNCTION _lock_queue_shared(queue text)
RETURNS void
LANGUAGE sql
VOLATILE
RETURN pg_advisory_xact_lock_shared(_advisory_key_space('queue'), hashtext(queue));

-- _try_lock_queue: take the exclusive lock of `queue` until this transaction
-- ends, or return false at once when a publisher or another claimer holds it.
CREATE FUNCTION _try_lock_queue(queue text)
RETURNS boolean
LANGUAGE sql
VOLATILE
RETURN pg_try_advisory_xact_lock(_advisory_key_space('queue'), hashtext(queue));

-- publish_job: add one job to queue `queue` (NULL means 'default') and return
-- its id. Runs inside the caller's transaction: the job exists, and workers
-- hear of it (NOTIFY on channel jobs, from the insert trigger), only if that
-- transaction commits. Raises PQ001 for an empty or NULL category.
CREATE FUNCTION publish_job(
    category text,
    args jsonb DEFAULT NULL,
    queue text DEFAULT 'default'
)
RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_queue text := coalesce(publish_job.queue, 'default');
    v_id bigint;
BEGIN
    IF publish_job.category IS NULL OR publish_job.category = '' THEN
        RAISE EXCEPTION 'job category must not be empty, got %',
            coalesce(quote_literal(publish_job.category), 'NULL')
            USING ERRCODE = 'PQ001',
                HINT = 'pass the category of a registered handler';
    END IF;

    -- Lock: shared queue lock before the id is drawn (see the file header).
    PERFORM _lock_queue_shared(v_queue);

    INSERT INTO jobs (category, args, queue)
    VALUES (publish_job.category, publish_job.args, v_queue)
    RETURNING id INTO v_id;

    RETURN v_id;
END
$$;

-- publish_jobs: publish many jobs with one statement; element i of each array
-- describes job i (arrays of equal length; a NULL queue means 'default').
-- Returns the ids in input order. Same transaction rules as publish_job; one
-- NOTIFY per distinct queue.
CREATE FUNCTION publish_jobs(
    categories text[],
    args jsonb[],
    queues text[]
)
RETURNS SETOF bigint
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    IF cardinality(categories) IS DISTINCT FROM cardinality(args)
        OR cardinality(categories) IS DISTINCT FROM cardinality(queues) THEN
        RAISE EXCEPTION 'publish_jobs needs arrays of one length, got % % %',
            cardinality(categories), cardinality(args), cardinality(queues)
            USING ERRCODE = 'PQ005';
    END IF;
    IF EXISTS (SELECT FROM unnest(categories) AS c WHERE coalesce(c, '') = '') THEN
        RAISE EXCEPTION 'job category must not be empty, got an empty one in the batch'
            USING ERRCODE = 'PQ001',
                HINT = 'pass the category of a registered handler';
    END IF;

    -- Lock: shared queue locks before any id is drawn, in name order.
    PERFORM _lock_queue_shared(q.queue)
    FROM (
        SELECT DISTINCT coalesce(u.queue, 'default') AS queue
        FROM unnest(queues) AS u (queue)
        ORDER BY 1
    ) AS q;

    RETURN QUERY
    INSERT INTO jobs (category, args, queue)
    SELECT b.category, b.args, coalesce(b.queue, 'default')
    FROM unnest(categories, args, queues)
        WITH ORDINALITY AS b (category, args, queue, n)
    ORDER BY b.n
    RETURNING id;
END
$$;

-- _set_queue_head: record `head_id` as the head of `queue`, or forget the
-- queue when `head_id` is NULL (no waiting job). The caller holds the
-- queue's exclusive lock: no publisher is in flight.
CREATE FUNCTION _set_queue_head(queue text, head_id bigint)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    IF _set_queue_head.head_id IS NULL THEN
        DELETE FROM queue_heads AS h WHERE h.queue = _set_queue_head.queue;
    ELSE
        UPDATE queue_heads AS h SET head_id = _set_queue_head.head_id
        WHERE h.queue = _set_queue_head.queue
            AND h.head_id <> _set_queue_head.head_id;
    END IF;
END
$$;

-- _fold_queue_heads: leave `queue` one row in queue_heads, with its true
-- head, or none when it has no waiting job; for a queue found twice there.
-- Only when the queue's exclusive lock is ours or free.
CREATE FUNCTION _fold_queue_heads(queue text)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_head bigint;
BEGIN
    -- Lock: exclusive queue lock, try only.
    IF NOT _try_lock_queue(_fold_queue_heads.queue) THEN
        RETURN;
    END IF;

    SELECT j.id INTO v_head
    FROM jobs AS j
    WHERE j.queue = _fold_queue_heads.queue AND j.status = 'unfulfilled'
    ORDER BY j.id
    LIMIT 1;

    DELETE FROM queue_heads AS h WHERE h.queue = _fold_queue_heads.queue;
    IF v_head IS NOT NULL THEN
        INSERT INTO queue_heads (queue, head_id)
        VALUES (_fold_queue_heads.queue, v_head);
    END IF;
END
$$;

-- _advance_queue_head: after a job of `queue` finished, record the queue's
-- new head, or forget the queue when it has no waiting job. Only when the
-- queue's lock is free: otherwise a publisher is in flight and the old head
-- stays, still a valid lower bound, for the next claimer to correct.
CREATE FUNCTION _advance_queue_head(queue text)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_head bigint;
BEGIN
    -- Lock: exclusive queue lock, try only (we hold a row lock of jobs).
    IF NOT _try_lock_queue(_advance_queue_head.queue) THEN
        RETURN;
    END IF;

    SELECT j.id INTO v_head
    FROM jobs AS j
    WHERE j.queue = _advance_queue_head.queue AND j.status = 'unfulfilled'
    ORDER BY j.id
    LIMIT 1;

    PERFORM _set_queue_head(_advance_queue_head.queue, v_head);
END
$$;

-- _claim_in_queue: claim the job of `queue` that must run next for `worker`,
-- or return NULL when the queue is empty, busy, locked, or its next job has a
-- category not in `categories` (NULL: any). `head_id` is the head that
-- queue_heads gave; it is corrected when it was only a lower bound.
CREATE FUNCTION _claim_in_queue(
    queue text,
    head_id bigint,
    worker text,
    categories text[],
    claim_timeout interval
)
RETURNS jobs
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_job jobs;
BEGIN
    -- Lock: exclusive queue lock, try only. Held, no publisher of this queue
    -- is in flight and no other claimer reads it until we commit.
    IF NOT _try_lock_queue(_claim_in_queue.queue) THEN
        RETURN NULL;
    END IF;

    -- A claimed job of the queue, running or with an expired claim, is the one
    -- that must finish before any other starts.
    SELECT j.* INTO v_job
    FROM jobs AS j
    WHERE j.queue = _claim_in_queue.queue
        AND j.status = 'unfulfilled'
        AND j.worker IS NOT NULL;

    IF FOUND THEN
        IF v_job.claim_expires_at > now() THEN
            RETURN NULL;
        END IF;
    ELSE
        SELECT j.* INTO v_job
        FROM jobs AS j
        WHERE j.queue = _claim_in_queue.queue AND j.status = 'unfulfilled'
        ORDER BY j.id
        LIMIT 1;

        IF v_job.id IS DISTINCT FROM _claim_in_queue.head_id THEN
            PERFORM _set_queue_head(_claim_in_queue.queue, v_job.id);
        END IF;
        IF v_job.id IS NULL THEN
            RETURN NULL;
        END IF;
    END IF;

    IF categories IS NOT NULL AND NOT v_job.category = ANY (categories) THEN
        RETURN NULL;
    END IF;

    -- Lock: the job's row, skipped rather than waited for. Its holder (a
    -- completing worker, an operator) may be waiting for our queue lock.
    UPDATE jobs AS j
    SET
        worker = _claim_in_queue.worker,
        claimed_at = now(),
        claim_expires_at = now() + claim_timeout,
        attempts = j.attempts + 1
    WHERE j.id = (
        SELECT l.id
        FROM jobs AS l
        WHERE l.id = v_job.id
            AND l.status = 'unfulfilled'
            AND (l.worker IS NULL OR l.claim_expires_at <= now())
        FOR UPDATE SKIP LOCKED
    )
    RETURNING j.* INTO v_job;

    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    RETURN v_job;
END
$$;

-- _claim_jobs: claim up to `claim_count` jobs for `worker`, oldest first,
-- with one walk over queue_heads; claim_next_job's rules and checks.
CREATE FUNCTION _claim_jobs(
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
    -- claim holds: at most one probe per running job before a free queue.
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

        v_job := _claim_in_queue(
            v_queue, v_head, _claim_jobs.worker, categories, claim_timeout
        );
        IF v_job.id IS NOT NULL THEN
            RETURN NEXT v_job;
            v_claimed := v_claimed + 1;
            EXIT WHEN v_claimed >= claim_count;
        END IF;
    END LOOP;
END
$$;

-- claim_next_job: claim the oldest job that may run now, for `worker`, and
-- return it (no row when there is none). A job may run when it is the oldest
-- unfinished job of its queue and nothing else of its queue is running; a job
-- whose claim expired may be claimed again. `categories` limits the claim to
-- the categories the worker handles (NULL: any); the claim lasts
-- `claim_timeout` unless renewed with renew_claims.
-- Concurrency: any number of callers, on any hosts; never waits for a lock.
-- Must run in READ COMMITTED (PQ003 otherwise), as each step needs a fresh
-- snapshot. Sends no notification.
CREATE FUNCTION claim_next_job(
    worker text,
    categories text[] DEFAULT NULL,
    claim_timeout interval DEFAULT interval '60 seconds'
)
RETURNS SETOF jobs
LANGUAGE sql
VOLATILE
SET search_path FROM CURRENT
AS $$
    SELECT *
    FROM _claim_jobs(
        claim_next_job.worker, 1, claim_next_job.categories,
        claim_next_job.claim_timeout
    )
$$;

-- complete_job: record the outcome of a job its caller still holds: status
-- 'resolved' or 'rejected' (PQ002 otherwise) with `result`. Returns false,
-- changing nothing, once the claim is gone (it expired and another worker
-- claimed the job, or an operator edited the row). The status triggers set
-- finished_at and send the NOTIFYs (jobs_finished, and jobs for the freed
-- queue).
CREATE FUNCTION complete_job(
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
    v_queue text;
BEGIN
    IF complete_job.status IS NULL
        OR complete_job.status NOT IN ('resolved', 'rejected') THEN
        RAISE EXCEPTION 'a job completes as resolved or rejected, not %',
            coalesce(quote_literal(complete_job.status), 'NULL')
            USING ERRCODE = 'PQ002';
    END IF;

    -- Lock: the job's row. Waits only for a claimer re-claiming an expired
    -- claim (it never waits itself); afterwards the worker check fails.
    UPDATE jobs AS j
    SET status = complete_job.status, result = complete_job.result
    WHERE j.id = complete_job.job_id
        AND j.worker = complete_job.worker
        AND j.status = 'unfulfilled'
    RETURNING j.queue INTO v_queue;

    IF NOT FOUND THEN
        RETURN false;
    END IF;

    PERFORM _advance_queue_head(v_queue);
    RETURN true;
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
CREATE FUNCTION complete_and_claim_jobs(
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
BEGIN
    IF cardinality(job_ids) IS DISTINCT FROM cardinality(statuses)
        OR cardinality(job_ids) IS DISTINCT FROM cardinality(results) THEN
        RAISE EXCEPTION 'complete_and_claim_jobs needs arrays of one length, got % % %',
            cardinality(job_ids), cardinality(statuses), cardinality(results)
            USING ERRCODE = 'PQ005';
    END IF;

    IF coalesce(cardinality(job_ids), 0) = 0 THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;

    FOR i IN 1..coalesce(cardinality(job_ids), 0) LOOP
        IF NOT complete_job(
            job_ids[i], complete_and_claim_jobs.worker, statuses[i], results[i]
        ) THEN
            RETURN QUERY SELECT 'refused', job_ids[i], NULL::text, NULL::jsonb,
                NULL::text, NULL::integer;
        END IF;
    END LOOP;

    RETURN QUERY
    SELECT 'claimed', c.id, c.category, c.args, c.queue, c.attempts
    FROM _claim_jobs(
        complete_and_claim_jobs.worker, claim_count, categories, claim_timeout
    ) AS c;
END
$$;

-- renew_claims: extend `worker`'s claims on `job_ids` to now() +
-- `claim_timeout`, and return the ids it still holds; a missing id is a lost
-- claim. A claim that expired but was not claimed again is still held.
CREATE FUNCTION renew_claims(
    worker text,
    job_ids bigint[],
    claim_timeout interval DEFAULT interval '60 seconds'
)
RETURNS SETOF bigint
LANGUAGE sql
VOLATILE
SET search_path FROM CURRENT
AS $$
    UPDATE jobs AS j
    SET claim_expires_at = now() + renew_claims.claim_timeout
    WHERE j.id = ANY (renew_claims.job_ids)
        AND j.worker = renew_claims.worker
        AND j.status = 'unfulfilled'
    RETURNING j.id
$$;

-- release_claims: give back `worker`'s claims on `job_ids` (NULL: all of
-- them) except those in `keep_ids`, without an outcome, so the jobs run again
-- at once, elsewhere: on shutdown, or for a claim whose reply was lost.
-- Returns how many it gave back. NOTIFY jobs comes from the status trigger.
CREATE FUNCTION release_claims(
    worker text,
    job_ids bigint[] DEFAULT NULL,
    keep_ids bigint[] DEFAULT NULL
)
RETURNS integer
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_count integer;
BEGIN
    UPDATE jobs AS j
    SET worker = NULL, claimed_at = NULL, claim_expires_at = NULL
    WHERE j.worker = release_claims.worker
        AND j.status = 'unfulfilled'
        AND (release_claims.job_ids IS NULL OR j.id = ANY (release_claims.job_ids))
        AND NOT j.id = ANY (coalesce(release_claims.keep_ids, '{}'));
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

-- register_worker: declare `worker` alive for as long as this session lasts,
-- by holding a session advisory lock. reap_claims releases the claims of any
-- worker whose lock is gone (its process died or its connection closed).
-- Raises PQ006 when another session already holds the name.
CREATE FUNCTION register_worker(worker text)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    IF NOT pg_try_advisory_lock(
        _advisory_key_space('worker'), hashtext(register_worker.worker)
    ) THEN
        RAISE EXCEPTION 'worker name % is in use by another session',
            quote_literal(register_worker.worker)
            USING ERRCODE = 'PQ006', HINT = 'give each worker a unique name';
    END IF;
END
$$;

-- reap_claims: give back the claims of workers that are not registered (see
-- register_worker) in any live session, so that a dead worker's jobs run
-- again within seconds instead of at claim expiry. Returns the earliest
-- expiry among the remaining claims (NULL when none), so that callers can
-- look again when an unrenewed claim runs out. Cheap: reads only running
-- jobs and the lock table. NOTIFY jobs comes from the status trigger.
CREATE FUNCTION reap_claims()
RETURNS timestamptz
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_space oid := _advisory_key_space('worker')::oid;
    v_next timestamptz;
BEGIN
    WITH live AS MATERIALIZED (
        SELECT l.objid
        FROM pg_locks AS l
        WHERE l.locktype = 'advisory'
            AND l.granted
            AND l.objsubid = 2
            AND l.classid = v_space
            AND l.database = (
                SELECT d.oid FROM pg_database AS d
                WHERE d.datname = current_database()
            )
    )
    UPDATE jobs AS j
    SET worker = NULL, claimed_at = NULL, claim_expires_at = NULL
    WHERE j.status = 'unfulfilled'
        AND j.worker IS NOT NULL
        AND hashtext(j.worker)::oid NOT IN (SELECT live.objid FROM live);

    SELECT min(j.claim_expires_at) INTO v_next
    FROM jobs AS j
    WHERE j.status = 'unfulfilled' AND j.worker IS NOT NULL;
    RETURN v_next;
END
$$;

-- job_outcomes: status and result of the jobs `job_ids`; an id with no row was
-- deleted (or never existed). For publishers waiting on results.
CREATE FUNCTION job_outcomes(job_ids bigint[])
RETURNS TABLE (id bigint, status text, result jsonb)
LANGUAGE sql
STABLE
SET search_path FROM CURRENT
AS $$
    SELECT j.id, j.status, j.result
    FROM jobs AS j
    WHERE j.id = ANY (job_outcomes.job_ids)
$$;

-- pyqueue:ledger
INSERT INTO pyqueue_migrations (version, name, checksum)
VALUES (
    2,
    'create_job_functions',
    'sha256:f304e38e20c4feaa43ae8111caba1db2141555af6bfa477acf9acaa01955f146'
);

COMMIT;
