-- 0001 create_jobs: the jobs table, the queue-head index table and the ledger.
--
-- Apply with `pyqueue migrate`, or by hand in name order:
--     psql -v ON_ERROR_STOP=1 -f sql/0001_create_jobs.sql ...
-- Objects are created unqualified, in the first schema of the session's
-- search_path (set it first to install elsewhere than public).
BEGIN;

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

-- One row per queue that may have waiting jobs, ordered by its head: the
-- claim path reads this small table instead of scanning jobs. head_id is a
-- lower bound of the queue's waiting ids (exact after each claim and
-- completion); see "How it works" in the README for who writes it when.
CREATE TABLE queue_heads (
    queue text PRIMARY KEY,
    head_id bigint NOT NULL
);

CREATE INDEX queue_heads_by_head_id ON queue_heads (head_id);

-- pyqueue:ledger
INSERT INTO pyqueue_migrations (version, name, checksum)
VALUES (
    1,
    'create_jobs',
    'sha256:5c9e10adeba84aee61fdb4a65a3ebd8e8fdd53ec1cc1d2dec3ffc7414b8fe248'
);

COMMIT;
