-- 0001 create_jobs: the jobs table, the queue-head index table and the ledger.
--
-- Apply with `pyqueue migrate`, or by hand in name order:
--     psql -v ON_ERROR_STOP=1 -f sql/0001_create_jobs.sql ...
-- Objects are created unqualified, in the first schema of the session's
-- search_path (set it first to install elsewhere than public).
BEGIN;

-- Pin this file's objects to the session's first schema, pg_temp last, as
-- `pyqueue migrate` does; a plain psql session would otherwise record
-- "$user", public in every function (and search pg_temp first).
SELECT pg_catalog.set_config(
    'search_path',
    pg_catalog.quote_ident(pg_catalog.current_schema()) || ', pg_temp',
    TRUE
);

-- The ledger: one row per applied migration. Every file records itself as its
-- last statement, so a file applied twice collides on the primary key instead
-- of applying twice, whoever runs it.
CREATE TABLE pyqueue_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- The queue itself: one row per job. The first eight columns are the public
-- contract; the claim columns after them belong to the worker protocol.
CREATE TABLE jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    category text NOT NULL,
    args jsonb,
    status text NOT NULL DEFAULT 'unfulfilled',
    created_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    queue text NOT NULL DEFAULT 'default',
    result jsonb,
    -- Who runs the job now (NULL while it waits), and until when the claim
    -- holds unless renewed. A job is running iff it is unfulfilled and claimed.
    worker text,
    claimed_at timestamptz,
    claim_expires_at timestamptz,
    -- How many times a worker claimed it: above 1 means a handler ran again.
    attempts integer NOT NULL DEFAULT 0,
    CONSTRAINT jobs_category_not_empty CHECK (category <> ''),
    CONSTRAINT jobs_queue_not_empty CHECK (queue <> ''),
    CONSTRAINT jobs_status_valid CHECK (
        status IN ('unfulfilled', 'resolved', 'rejected')
    ),
    CONSTRAINT jobs_finished_at_iff_finished CHECK (
        (status = 'unfulfilled') = (finished_at IS NULL)
    ),
    CONSTRAINT jobs_claimed_only_while_unfulfilled CHECK (
        (worker IS NULL OR status = 'unfulfilled')
        AND (worker IS NULL) = (claim_expires_at IS NULL)
    )
);

COMMENT ON TABLE jobs IS
'pyqueue jobs: publish with publish_job(), steer with UPDATE status/result/queue';

-- The waiting jobs of each queue in publish order: the head of a queue is its
-- first entry. Partial, so finished history (millions of rows) costs nothing.
CREATE INDEX jobs_unfulfilled_by_queue ON jobs (queue, id)
WHERE status = 'unfulfilled';

-- The one-at-a-time rule as a constraint: at most one claimed job per queue.
-- claim_next_job never trips it (it checks first, under a per-queue lock);
-- it stops a hand edit or a foreign worker from breaking the rule.
CREATE UNIQUE INDEX jobs_one_running_per_queue ON jobs (queue)
WHERE status = 'unfulfilled' AND worker IS NOT NULL;

-- A row for each queue that may have waiting jobs, ordered by its head: the
-- claim path reads this small table instead of scanning jobs. head_id is a
-- lower bound of the queue's waiting ids (exact after each claim and
-- completion). No unique key on purpose: two transactions publishing into an
-- empty queue would wait on each other's key until commit. A rare duplicate
-- row is harmless, and the next claimer or completer of the queue folds it.
CREATE TABLE queue_heads (
    queue text NOT NULL,
    head_id bigint NOT NULL
);

CREATE INDEX queue_heads_by_queue ON queue_heads (queue);

CREATE INDEX queue_heads_by_head_id ON queue_heads (head_id);

-- pyqueue:ledger
INSERT INTO pyqueue_migrations (version, name, checksum)
VALUES (
    1,
    'create_jobs',
    'sha256:5e1ec6e7cc1e117086bbdc9449e7de8eea8adb5d19b0ce12033a73f33e3568b6'
);

COMMIT;
