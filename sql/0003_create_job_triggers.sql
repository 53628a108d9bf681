-- 0003 create_job_triggers: keep finished_at and claims right, and NOTIFY, on
-- every change to jobs, whether it comes from a function or a hand edit.
--
-- Channels (for schema public; elsewhere '<schema>.jobs' and
-- '<schema>.jobs_finished'):
--   jobs           {"queue": ...}  work may have become runnable in that queue
--   jobs_finished  {"id": ..., "status": ...}  a job finished, or was deleted
--                  ("status": "deleted"); results never travel in a payload
-- Identical payloads in one transaction arrive once, so a bulk publish wakes
-- workers once per queue.
BEGIN;

-- Pin this file's objects to the session's first schema, pg_temp last, as
-- `pyqueue migrate` does; a plain psql session would otherwise record
-- "$user", public in every function (and search pg_temp first).
SELECT pg_catalog.set_config(
    'search_path',
    pg_catalog.quote_ident(pg_catalog.current_schema()) || ', pg_temp',
    TRUE
);

-- tg_jobs_before_update: a status change, by whatever means, ends the claim
-- (a worker still running the job will find its claim gone) and sets or
-- clears finished_at; a job made runnable by hand (set back to unfulfilled,
-- or moved to another queue) is fenced and entered like a published one.
CREATE FUNCTION tg_jobs_before_update()
RETURNS trigger
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        NEW.worker := NULL;
        NEW.claimed_at := NULL;
        NEW.claim_expires_at := NULL;
        IF NEW.status = 'unfulfilled' THEN
            NEW.finished_at := NULL;
            NEW.result := NULL;
        ELSE
            NEW.finished_at := now();
        END IF;
    END IF;

    IF NEW.status = 'unfulfilled'
        AND (OLD.status <> 'unfulfilled' OR NEW.queue <> OLD.queue) THEN
        -- Lock: shared queue lock, as a publisher takes it (0002's header).
        PERFORM _lock_queue_shared(NEW.queue);

        UPDATE queue_heads AS h SET head_id = NEW.id
        WHERE h.queue = NEW.queue AND h.head_id > NEW.id;

        -- Under REPEATABLE READ our snapshot may still show a row a claimer
        -- has deleted since: then add one anyway (a duplicate is harmless).
        IF current_setting('transaction_isolation') <> 'read committed'
            OR NOT EXISTS (
                SELECT FROM queue_heads AS h WHERE h.queue = NEW.queue
            ) THEN
            INSERT INTO queue_heads (queue, head_id) VALUES (NEW.queue, NEW.id);
        END IF;
    END IF;

    RETURN NEW;
END
$$;

CREATE TRIGGER jobs_10_before_update
BEFORE UPDATE OF status, queue ON jobs
FOR EACH ROW
WHEN (
    old.status IS DISTINCT FROM new.status
    OR old.queue IS DISTINCT FROM new.queue
)
EXECUTE FUNCTION tg_jobs_before_update();

-- tg_jobs_after_insert: enter each queue that got waiting jobs into
-- queue_heads, and NOTIFY jobs once per queue.
CREATE FUNCTION tg_jobs_after_insert()
RETURNS trigger
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
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
    -- they never wait for each other. New ids are above any head, so an
    -- existing head stays a lower bound. Under REPEATABLE READ our snapshot
    -- may still show a row a claimer has deleted since: add one anyway.
    INSERT INTO queue_heads (queue, head_id)
    SELECT i.queue, min(i.id)
    FROM inserted_jobs AS i
    WHERE i.status = 'unfulfilled'
        AND (
            current_setting('transaction_isolation') <> 'read committed'
            OR NOT EXISTS (
                SELECT FROM queue_heads AS h WHERE h.queue = i.queue
            )
        )
    GROUP BY i.queue;

    PERFORM pg_notify(_channel('jobs'), json_build_object('queue', n.queue)::text)
    FROM (
        SELECT DISTINCT i.queue FROM inserted_jobs AS i
        WHERE i.status = 'unfulfilled'
    ) AS n;

    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_20_after_insert
AFTER INSERT ON jobs
REFERENCING NEW TABLE AS inserted_jobs
FOR EACH STATEMENT
EXECUTE FUNCTION tg_jobs_after_insert();

-- tg_jobs_after_update: NOTIFY jobs_finished for a job that became resolved
-- or rejected, and jobs for each queue where work may have become runnable:
-- the queue it left (its running job finished, was released or moved) and
-- the queue it waits in.
CREATE FUNCTION tg_jobs_after_update()
RETURNS trigger
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    IF NEW.status <> 'unfulfilled' AND NEW.status IS DISTINCT FROM OLD.status THEN
        PERFORM pg_notify(
            _channel('jobs_finished'),
            json_build_object('id', NEW.id, 'status', NEW.status)::text
        );
    END IF;
    IF OLD.status = 'unfulfilled' AND NEW.queue IS DISTINCT FROM OLD.queue
        OR OLD.status = 'unfulfilled' AND NEW.status <> 'unfulfilled' THEN
        PERFORM pg_notify(_channel('jobs'), json_build_object('queue', OLD.queue)::text);
    END IF;
    IF NEW.status = 'unfulfilled' THEN
        PERFORM pg_notify(_channel('jobs'), json_build_object('queue', NEW.queue)::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_30_after_update
AFTER UPDATE OF status, queue, worker ON jobs
FOR EACH ROW
WHEN (
    old.status IS DISTINCT FROM new.status
    OR old.queue IS DISTINCT FROM new.queue
    OR (old.worker IS NOT NULL AND new.worker IS NULL)
)
EXECUTE FUNCTION tg_jobs_after_update();

-- tg_jobs_after_delete: a deleted unfinished job fails its waiters
-- (jobs_finished with "status": "deleted") and may free its queue (jobs).
CREATE FUNCTION tg_jobs_after_delete()
RETURNS trigger
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM pg_notify(
        _channel('jobs_finished'),
        json_build_object('id', d.id, 'status', 'deleted')::text
    )
    FROM deleted_jobs AS d
    WHERE d.status = 'unfulfilled';

    PERFORM pg_notify(_channel('jobs'), json_build_object('queue', n.queue)::text)
    FROM (
        SELECT DISTINCT d.queue FROM deleted_jobs AS d
        WHERE d.status = 'unfulfilled'
    ) AS n;

    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_40_after_delete
AFTER DELETE ON jobs
REFERENCING OLD TABLE AS deleted_jobs
FOR EACH STATEMENT
EXECUTE FUNCTION tg_jobs_after_delete();

-- pyqueue:ledger
INSERT INTO pyqueue_migrations (version, name, checksum)
VALUES (
    3,
    'create_job_triggers',
    'sha256:48ae824289516b3cf4d5e21bb1d79b1f35e3fbb8061524c7910389f46947683e'
);

COMMIT;
