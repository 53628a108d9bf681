"""Every SQL statement pyqueue sends at run time: calls of the stored functions.

Each is a template with ``{schema}``, composed once per Queue with the schema
as a ``psycopg.sql.Identifier``; values always travel as query parameters.
"""

from __future__ import annotations

from psycopg import sql

PUBLISH_JOB = "SELECT {schema}.publish_job(%s, %s::jsonb, %s)"
PUBLISH_JOBS = "SELECT {schema}.publish_jobs(%s::text[], %s::jsonb[], %s::text[])"
CLAIM_NEXT_JOB = (
    "SELECT id, category, args, queue, attempts"
    " FROM {schema}.claim_next_job(%s, %s, %s)"
)
COMPLETE_JOB = "SELECT {schema}.complete_job(%s, %s, %s, %s::jsonb)"
COMPLETE_AND_CLAIM_JOBS = (
    "SELECT event, id, category, args, queue, attempts"
    " FROM {schema}.complete_and_claim_jobs(%s, %s, %s, %s::jsonb[], %s, %s, %s)"
)
RENEW_CLAIMS = "SELECT {schema}.renew_claims(%s, %s, %s)"
RELEASE_CLAIMS = "SELECT {schema}.release_claims(%s, %s, %s)"
REGISTER_WORKER = "SELECT {schema}.register_worker(%s)"
REAP_CLAIMS = "SELECT {schema}.reap_claims()"
JOB_OUTCOMES = "SELECT id, status, result FROM {schema}.job_outcomes(%s)"
LISTEN = "LISTEN {channel}"

# Migrations: the ledger, and the per-schema lock that serializes migrators.
LEDGER_EXISTS = "SELECT to_regclass(%s) IS NOT NULL"
LEDGER_ROWS = (
    "SELECT version, name, checksum, applied_at"
    " FROM {schema}.pyqueue_migrations ORDER BY version"
)
MIGRATION_LOCK = "SELECT pg_advisory_lock(hashtext('pyqueue:migrate'), hashtext(%s))"
MIGRATION_UNLOCK = (
    "SELECT pg_advisory_unlock(hashtext('pyqueue:migrate'), hashtext(%s))"
)
SET_SEARCH_PATH = "SET search_path TO {schema}, pg_temp"
RESET_SEARCH_PATH = "RESET search_path"
CREATE_SCHEMA = "CREATE SCHEMA IF NOT EXISTS {schema}"


def compose(template: str, schema: str) -> sql.Composed:
    """Bind ``{schema}`` in `template` to `schema`, quoted as an identifier."""
    return sql.SQL(template).format(schema=sql.Identifier(schema))


def channel(name: str, schema: str) -> str:
    """The NOTIFY channel `name` of the installation in `schema` (see 0003)."""
    return name if schema == "public" else f"{schema}.{name}"


# Operations (the pyqueue command): the monitoring view of 0004, and the jobs
# table as the demo shows it.
QUEUE_STATS = (
    "SELECT queue, waiting, running, worker, running_since, resolved, rejected,"
    " extract(epoch FROM oldest_waiting_age)::float8"
    " FROM {schema}.queue_stats ORDER BY queue"
)
JOBS_TABLE = "SELECT * FROM {schema}.jobs ORDER BY id"

# Stop listening: a worker that stays full (Queue._want_work_news), and
# synchronous waiting (pyqueue.sync) on a caller's connection.
UNLISTEN = "UNLISTEN {channel}"
