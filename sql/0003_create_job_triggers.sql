-- 0003 create_job_triggers: keep finished_at and claims right, and NOTIFY, on
-- every change to jobs, whether it comes from a function or a hand edit.
--
-- Channels (for schema public; elsewhere '<schema>.jobs' and
-- '<schema>.jobs_finished'):
--   jobs           {"queue": ...}  a job of that queue may be claimed now
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
-- or rejected, by whatever means.
CREATE FUNCTION tg_jobs_after_update()
RETURNS trigger
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM pg_notify(
        _channel('jobs_finished'),
        json_build_object('id', NEW.id, 'status', NEW.status)::text
    );
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_30_after_update
AFTER UPDATE OF status ON jobs
FOR EACH ROW
WHEN (
    old.status IS DISTINCT FROM new.status
    AND new.status <> 'unfulfilled'
)
EXECUTE FUNCTION tg_jobs_after_update();

-- _announce_queue: NOTIFY jobs for `queue` if a worker could claim a job of
-- it now: it has a waiting job and no running job whose claim holds.
CREATE FUNCTION _announce_queue(queue text)
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    IF EXISTS (
        SELECT FROM jobs AS j
        WHERE j.queue = _announce_queue.queue AND j.status = 'unfulfilled'
    ) AND NOT EXISTS (
        SELECT FROM jobs AS r
        WHERE r.queue = _announce_queue.queue
            AND r.status = 'unfulfilled'
            AND r.worker IS NOT NULL
            AND r.claim_expires_at > now()
    ) THEN
        PERFORM pg_notify(
            _channel('jobs'), json_build_object('queue', _announce_queue.queue)::text
        );
    END IF;
END
$$;

-- tg_jobs_queue_changed: at commit, NOTIFY jobs for each queue an update
-- may have opened up (a job finished, was released, moved, or set back to
-- unfulfilled), but only if a job of it can be claimed then. Deferred to
-- commit so that a worker which finishes a queue's job and claims the next
-- one in the same transaction wakes nobody in vain.
CREATE FUNCTION tg_jobs_queue_changed()
RETURNS trigger
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM _announce_queue(OLD.queue);
    IF NEW.queue IS DISTINCT FROM OLD.queue THEN
        PERFORM _announce_queue(NEW.queue);
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER jobs_35_queue_changed
AFTER UPDATE OF status, queue, worker ON jobs
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW
WHEN (
    old.status IS DISTINCT FROM new.status
    OR old.queue IS DISTINCT FROM new.queue
    OR (old.worker IS NOT NULL AND new.worker IS NULL)
)
EXECUTE FUNCTION tg_jobs_queue_changed();

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
    'sha256:a4664dff8bbffe641437ff1c446fdc64af3d612bb0fa9eb36aac69a837618805'
);

COMMIT;
