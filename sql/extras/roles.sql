-- roles: optional least-privilege roles for pyqueue; not a migration (pyqueue
-- migrate never runs it). Run it as the owner of pyqueue's objects, after the
-- migrations, and again after each later migration (it is idempotent):
--     psql -v ON_ERROR_STOP=1 -f sql/extras/roles.sql
-- For an installation in another schema, put that schema first on the path:
--     PGOPTIONS='-c search_path=other' psql -v ON_ERROR_STOP=1 -f ...
--
-- Two group roles (NOLOGIN); grant them to login roles:
--     CREATE ROLE billing_app LOGIN PASSWORD '...' IN ROLE pyqueue_publisher;
--   pyqueue_publisher  publish jobs (publish_job, publish_jobs), read jobs
--                      and their outcomes; cannot claim, complete or edit.
--   pyqueue_worker     what a worker process (Queue with handlers) calls:
--                      claim_next_job, complete_job,
--                      complete_and_claim_jobs, renew_claims,
--                      release_claims, register_worker, reap_claims, and
--                      job_outcomes; may update only the claim and outcome
--                      columns of jobs. A process that also publishes needs
--                      both roles.
-- The operator functions (cancel_job, rerun_job, move_jobs, prune_jobs) stay
-- with the owner. Role names are cluster-wide: two installations in one
-- cluster share these two roles, and each run of this file adds its schema.
--
-- The functions run with the caller's rights (no SECURITY DEFINER), so each
-- role gets the table rights its functions use, column by column where a
-- whole-table right would let it forge an outcome. EXECUTE on this schema's
-- functions is revoked from PUBLIC, so that nothing else can call them.
BEGIN;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pyqueue_publisher') THEN
        CREATE ROLE pyqueue_publisher NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pyqueue_worker') THEN
        CREATE ROLE pyqueue_worker NOLOGIN;
    END IF;

    EXECUTE format(
        'REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA %I FROM PUBLIC', current_schema()
    );
    EXECUTE format(
        'GRANT USAGE ON SCHEMA %I TO pyqueue_publisher, pyqueue_worker',
        current_schema()
    );
END
$$;

-- Both: check the ledger (Queue.open does), read jobs and the views, wait for
-- outcomes, and the private helpers every writer goes through.
GRANT SELECT ON pyqueue_migrations, jobs, queue_stats, running_jobs
TO pyqueue_publisher, pyqueue_worker;
GRANT EXECUTE ON FUNCTION
job_outcomes(bigint[]),
_advisory_key_space(text),
_channel(text),
_lock_queue_shared(text),
tg_jobs_after_insert(),
tg_jobs_before_update(),
tg_jobs_after_update(),
tg_jobs_queue_changed(),
_announce_queues(text[]),
tg_jobs_after_delete()
TO pyqueue_publisher, pyqueue_worker;

-- Publisher: insert new jobs, naming only category, args and queue (the
-- defaults fill in the rest), and enter their queue in queue_heads (or, for
-- a plain INSERT that raced a claimer, lower its head: migration 0006).
GRANT EXECUTE ON FUNCTION
publish_job(text, jsonb, text),
publish_jobs(text[], jsonb[], text[])
TO pyqueue_publisher;
GRANT INSERT (category, args, queue) ON jobs TO pyqueue_publisher;
GRANT SELECT, INSERT, UPDATE (head_id) ON queue_heads TO pyqueue_publisher;

-- Worker: claim, renew, complete and give back jobs; keep queue_heads.
GRANT EXECUTE ON FUNCTION
claim_next_job(text, text[], interval),
complete_job(bigint, text, text, jsonb),
complete_and_claim_jobs(text, bigint[], text[], jsonb[], integer, text[], interval),
renew_claims(text, bigint[], interval),
release_claims(text, bigint[], bigint[]),
register_worker(text),
reap_claims(),
_try_lock_queue(text),
_claim_jobs(text, integer, text[], interval),
_claim_in_queues(text[], bigint[], text, text[], interval),
_refresh_queue_heads(text[]),
_fold_queue_heads(text)
TO pyqueue_worker;
GRANT UPDATE (status, result, worker, claimed_at, claim_expires_at, attempts)
ON jobs TO pyqueue_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON queue_heads TO pyqueue_worker;

COMMIT;
