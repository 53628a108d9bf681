-- 0006 heads_bound_every_lookup: every search for a queue's oldest waiting
-- job starts at the queue's recorded head instead of at the queue's first
-- index entry.
--
-- Why: a job that finishes leaves a dead entry in jobs_unfulfilled_by_queue
-- until VACUUM removes it, and in a queue run in id order those entries lie
-- in front of the live ones. A search from the start of the queue read all
-- of them: with 20,000 jobs finished since the last vacuum, some 80 index
-- pages per search, several searches per claim (tests/db/test_claim_plan.py).
-- Autovacuum comes by only after a fifth of the table has changed, so on a
-- large table a busy queue could pile up hundreds of thousands of them.
-- Starting at the head (`id >= head_id`) skips them all.
--
-- That needs queue_heads.head_id to be a true lower bound of its queue's
-- waiting ids, always. 0005 let a completer move a head without the queue's
-- lock, which could move it past a job whose publisher had not committed yet
-- (its claimer then corrected it, as it searched from the start). From here
-- on, the rule of 0002 holds again, with one addition:
-- - a head moves up only under its queue's exclusive lock, to what a
--   statement whose snapshot was taken after the lock finds: completers take
--   the lock (try only) after recording their outcomes, then move the head
--   with a statement of its own;
-- - a transaction that makes a job of the queue runnable lowers the head to
--   it if needed, holding the queue's shared lock: the addition is that a
--   plain INSERT does so too (its id is drawn before its lock, so it can be
--   older than a head set meanwhile).
-- This file first lowers every head to its queue's oldest waiting job,
-- holding off every writer of jobs while it does: a server running 0005 may
-- have a head past a waiting job.
BEGIN;

-- Lock: SHARE on jobs waits for every transaction that wrote jobs and is
-- still open (publishers, completers, operators) and keeps new writers out
-- until this file commits; readers go on. Held for as long as the scan of
-- waiting jobs below takes. First in the file, before any snapshot is taken,
-- so that the lowering sees every job committed before the lock, whatever
-- the session's isolation level.
LOCK TABLE jobs IN SHARE MODE;

-- Pin this file's objects to the session's first schema, pg_temp last, as
-- `pyqueue migrate` does; a plain psql session would otherwise record
-- "$user", public in every function (and search pg_temp first).
SELECT pg_catalog.set_config(
    'search_path',
    pg_catalog.quote_ident(pg_catalog.current_schema()) || ', pg_temp',
    TRUE
);

UPDATE queue_heads AS h SET head_id = w.head_id
FROM (
    SELECT
        j.queue,
        min(j.id) AS head_id
    FROM jobs AS j
    WHERE j.status = 'unfulfilled'
    GROUP BY j.queue
) AS w
WHERE h.queue = w.queue AND h.head_id > w.head_id;

INSERT INTO queue_heads (queue, head_id)
SELECT
    j.queue,
    min(j.id) AS head_id
FROM jobs AS j
WHERE
    j.status = 'unfulfilled'
    AND NOT EXISTS (
        SELECT FROM queue_heads AS h
        WHERE h.queue = j.queue
    )
GROUP BY j.queue;

-- A queue's lowest head, read at the start of every search below, comes
-- from one index probe: (queue) alone left the planner to walk
-- queue_heads_by_head_id, past the rows of every queue with a lower head.
CREATE INDEX queue_heads_by_queue_and_head ON queue_heads (queue, head_id);

DROP INDEX queue_heads_by_queue;

-- Every search below reads the queue's head in the same statement:
--     w.id >= (SELECT min(x.head_id) FROM queue_heads AS x
--              WHERE x.queue = <the queue>)
-- (min: a queue may rarely have two rows, see 0001). It is written out in
-- each, as a SQL function holding a subquery would not be inlined.

-- tg_jobs_after_insert: as in 0003, and a head above an inserted waiting job
-- comes down to it.
CREATE OR REPLACE FUNCTION tg_jobs_after_insert()
RETURNS trigger
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_queues text[];
    v_heads bigint[];
BEGIN
    -- Lock: shared queue locks, already held when publish_job inserted; taken
    -- here for a plain INSERT, so that no claimer forgets its queue.
    PERFORM _lock_queue_shared(n.queue)
    FROM (
        SELECT DISTINCT i.queue
        FROM inserted_jobs AS i
        WHERE i.status = 'unfulfilled'
        ORDER BY i.queue
    ) AS n;

    -- Publishers only read queue_heads unless their queue has no row, so
    -- they never wait for each other: publish_job draws its ids after its
    -- lock, above any head. A plain INSERT drew them before, so a claimer
    -- may have set a head above one of them meanwhile: only then is a head
    -- lowered, by a statement of its own, so that a publisher's role needs
    -- UPDATE on queue_heads only for that (sql/extras/roles.sql grants it).
    -- The statement that finds those heads also enters a queue with no row;
    -- under REPEATABLE READ our snapshot may still show a row a claimer has
    -- deleted since: add one anyway. A row added here is never lowered (both
    -- parts read the snapshot from before the statement).
    WITH entered AS (
        SELECT
            i.queue,
            min(i.id) AS head_id
        FROM inserted_jobs AS i
        WHERE i.status = 'unfulfilled'
        GROUP BY i.queue
    ),

    added AS (
        INSERT INTO queue_heads (queue, head_id)
        SELECT e.queue, e.head_id
        FROM entered AS e
        WHERE current_setting('transaction_isolation') <> 'read committed'
            OR NOT EXISTS (
                SELECT FROM queue_heads AS h WHERE h.queue = e.queue
            )
    )

    SELECT
        array_agg(e.queue),
        array_agg(e.head_id)
    INTO v_queues, v_heads
    FROM entered AS e
    WHERE EXISTS (
        SELECT FROM queue_heads AS h
        WHERE h.queue = e.queue AND h.head_id > e.head_id
    );
    IF v_queues IS NOT NULL THEN
        UPDATE queue_heads AS h SET head_id = l.head_id
        FROM unnest(v_queues, v_heads) AS l (queue, head_id)
        WHERE h.queue = l.queue AND h.head_id > l.head_id;
    END IF;

    PERFORM pg_notify(_channel('jobs'), json_build_object('queue', n.queue)::text)
    FROM (
        SELECT DISTINCT i.queue FROM inserted_jobs AS i
        WHERE i.status = 'unfulfilled'
    ) AS n;

    RETURN NULL;
END
$$;

-- _announce_queues: as in 0005. A queue without a row in queue_heads has no
-- waiting job that is committed (a publisher in flight announces its own).
CREATE OR REPLACE FUNCTION _announce_queues(queues text[])
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_queue text;
BEGIN
    FOREACH v_queue IN ARRAY coalesce(queues, '{}') LOOP
        IF (
            SELECT j.id
            FROM jobs AS j
            WHERE j.queue = v_queue
                AND j.status = 'unfulfilled'
                AND j.id >= (
                    SELECT min(x.head_id) FROM queue_heads AS x
                    WHERE x.queue = v_queue
                )
            ORDER BY j.id
            LIMIT 1
        ) IS NOT NULL AND NOT EXISTS (
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

-- _refresh_queue_heads: as in 0005. A queue with no row would search from
-- its start (coalesce): that cannot happen under its lock, but costs
-- nothing to allow.
CREATE OR REPLACE FUNCTION _refresh_queue_heads(queues text[])
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
                WHERE w.queue = q.queue
                    AND w.status = 'unfulfilled'
                    AND w.id >= coalesce((
                        SELECT min(x.head_id) FROM queue_heads AS x
                        WHERE x.queue = q.queue
                    ), 0)
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

-- tg_jobs_queue_changed: as in 0005, and under READ COMMITTED each queue
-- whose lock is free gets its head made exact before it is announced. An
-- edit that finished many of a queue's jobs at once (UPDATE ... WHERE
-- queue = 'q') leaves the head at the first of them, and every row's
-- announcement at commit searched past all of them: 20,000 rows took 5 s,
-- growing with the square of the rows. The first row now moves the head
-- past them, and the rest start there. Under REPEATABLE READ the snapshot
-- may predate a job committed since, so the head stays.
CREATE OR REPLACE FUNCTION tg_jobs_queue_changed()
RETURNS trigger
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_queues text[] := ARRAY[OLD.queue];
BEGIN
    IF NEW.queue IS DISTINCT FROM OLD.queue THEN
        v_queues := v_queues || NEW.queue;
    END IF;
    -- Lock: exclusive queue locks, try only; this runs at commit.
    IF current_setting('transaction_isolation') = 'read committed' THEN
        PERFORM _refresh_queue_heads(ARRAY(
            SELECT q.queue FROM unnest(v_queues) AS q (queue)
            WHERE _try_lock_queue(q.queue)
        ));
    END IF;
    PERFORM _announce_queues(v_queues);
    RETURN NULL;
END
$$;

-- _claim_in_queues: as in 0005, the head searched from the recorded one.
CREATE OR REPLACE FUNCTION _claim_in_queues(
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
    -- have expired), else its oldest waiting job, its head. `heads` were
    -- read before the locks: a hand edit may have lowered a head since, so
    -- the search reads it again.
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
                WHERE w.queue = q.queue
                    AND w.status = 'unfulfilled'
                    AND w.id >= coalesce((
                        SELECT min(x.head_id) FROM queue_heads AS x
                        WHERE x.queue = q.queue
                    ), 0)
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

-- complete_and_claim_jobs: as in 0005, except how heads move. After
-- recording the outcomes, the completer takes the exclusive lock of each
-- queue it freed (try only), and _refresh_queue_heads, whose snapshot comes
-- after the locks and so sees every job of theirs that can be older than
-- the head it finds, makes the heads of the queues it got exact. A queue
-- whose lock is taken (a publisher in flight) keeps its head, a lower bound
-- still, for its next claimer to move. The locks come after the recording,
-- the one statement here that may wait for a row lock: waiting while
-- holding a queue's lock could close a cycle with a hand edit that holds
-- the row and waits for that lock (moving a job into the queue).
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
    v_locked text[];
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
        -- expired claim (it never waits itself), or a hand edit; afterwards
        -- the worker check fails. A job has a worker only while unfulfilled
        -- (CHECK constraint), so the worker check says it all; a status
        -- condition here would let the planner pick a partial index of
        -- waiting jobs over the primary key, and read the whole backlog,
        -- whenever stale statistics call it small.
        WITH done AS (
            UPDATE jobs AS j
            SET status = o.status, result = o.result
            FROM unnest(job_ids, statuses, results) AS o (id, status, result)
            WHERE j.id = ANY (job_ids)
                AND j.id = o.id
                AND j.worker = complete_and_claim_jobs.worker
            RETURNING j.id, j.status, j.queue
        )

        SELECT
            coalesce(array_agg(d.id), '{}'),
            array_agg(d.status),
            coalesce(array_agg(DISTINCT d.queue), '{}')
        INTO v_ids, v_statuses, v_freed
        FROM done AS d;

        -- Lock: exclusive queue locks of the freed queues, try only.
        v_locked := ARRAY(
            SELECT f.queue FROM unnest(v_freed) AS f (queue)
            WHERE _try_lock_queue(f.queue)
        );

        -- Under their locks the freed queues' heads are made exact.
        IF cardinality(v_locked) > 0 THEN
            PERFORM _refresh_queue_heads(v_locked);
        END IF;

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

-- pyqueue:ledger
INSERT INTO pyqueue_migrations (version, name, checksum)
VALUES (
    6,
    'heads_bound_every_lookup',
    'sha256:e35f6e365afeb1fc20fb534806938cf05e3eeeafde1358de8226749064697070'
);

COMMIT;
