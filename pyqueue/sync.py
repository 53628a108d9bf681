"""Publishing from synchronous code (Flask, Django, scripts) and waiting there.

A WSGI application holds a synchronous psycopg connection and no event loop.
``publish`` and ``publish_many`` call the same stored functions as
``Queue.publish`` inside the caller's current transaction, so the job exists,
and runs, only if the caller commits; ``wait`` blocks the calling thread until
a job finishes, LISTENing on the schema's ``jobs_finished`` channel and
reading ``job_outcomes()`` at least every ``poll_interval`` seconds::

    with psycopg.connect(dsn) as conn:          # a transaction, as in a view
        order_id = insert_order(conn)
        job_id = pyqueue.sync.publish(conn, "invoice", {"order": order_id})
    # committed: the job runs now, on whichever worker has the category
    pdf = pyqueue.sync.wait(job_id, dsn=dsn, timeout=10.0)

The handlers run in workers elsewhere (``pyqueue worker``, or an open Queue).
All queue semantics live in the stored functions; this module only calls them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg import pq

from . import _connection, _payloads, _sql
from ._connection import Backoff
from .errors import ConnectionFailed, InvalidJob, JobDeleted, JobRejected
from .queue import _SQLSTATE_INVALID, ENV_DSN

logger = logging.getLogger(__name__)

__all__ = ["publish", "publish_many", "wait"]


def publish(
    connection: psycopg.Connection[Any],
    category: str,
    args: Any = None,
    *,
    queue_name: str | None = "default",
    schema: str = "public",
) -> int:
    """Publish a job in `connection`'s current transaction; return its id.

    The job exists, and workers hear of it, only once the caller commits; a
    rollback leaves no trace. Raises InvalidJob, before anything is sent, for
    an empty category or args that are not JSON-serializable; ConnectionFailed
    when the connection is lost. Any number of publishers may run at once.
    """
    payload = _payloads.to_json(args, what="args")
    _payloads.check_category(category)
    rows = _execute(connection, "PUBLISH_JOB", (category, payload, queue_name), schema)
    return int(rows[0][0])


def publish_many(
    connection: psycopg.Connection[Any],
    jobs: Iterable[tuple[str, Any]],
    *,
    queue_name: str | Iterable[str] | None = "default",
    schema: str = "public",
) -> list[int]:
    """Publish (category, args) pairs with one statement, in `connection`'s
    current transaction; return their ids in input order.

    `queue_name` is one name for all, or one per job. The same transaction
    rules and errors as ``publish``.
    """
    categories, payloads, queues = _payloads.batch(jobs, queue_name)
    rows = _execute(connection, "PUBLISH_JOBS", (categories, payloads, queues), schema)
    return [int(row[0]) for row in rows]


def wait(
    job_id: int,
    *,
    timeout: float | None,
    dsn: str | None = None,
    connection: psycopg.Connection[Any] | None = None,
    schema: str = "public",
    poll_interval: float = 5.0,
) -> Any:
    """Block until job `job_id` finishes; return its result.

    Listens on its own connection to `dsn` (default ``$PYQUEUE_DSN``), which it
    reopens with backoff when it is lost, or on `connection`, which must not
    be inside a transaction (a job published in an uncommitted transaction
    never runs) and is left as it was found. `timeout` (seconds, None for no
    limit) is required so that a request cannot hang by accident.

    Raises JobRejected (``.error`` is the serialized error), JobDeleted when
    the row is gone, or TimeoutError when the job has not finished in time;
    the job itself carries on. Any number of waiters may wait for one job.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    if connection is not None:
        if dsn is not None:
            raise ValueError("pass dsn or connection, not both")
        status = connection.info.transaction_status
        if status != pq.TransactionStatus.IDLE:
            raise ValueError(
                f"cannot wait for job {job_id} inside a transaction "
                f"(status {status.name}); commit first, or pass dsn="
            )
        return _Waiter(connection, schema, poll_interval).wait(job_id, deadline)

    # TODO: no wait_many; each wait with dsn= opens a connection of its own, so
    # a thread waiting for N jobs in turn connects N times.
    dsn = dsn or os.environ.get(ENV_DSN)
    if not dsn:
        raise ValueError(
            f"no DSN to wait on; pass dsn= or connection=, or set {ENV_DSN}"
        )
    backoff = Backoff()
    while True:
        try:
            with _connect(dsn) as conn:
                backoff.reset()
                return _Waiter(conn, schema, poll_interval).wait(job_id, deadline)
        except ConnectionFailed as exc:
            delay = backoff.next_delay()
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise
            logger.info(
                "waiting for job %d: %s; reconnecting",
                job_id,
                str(exc).splitlines()[0],
                extra={"job_id": job_id},
            )
            time.sleep(delay)


class _Waiter:
    """LISTEN on one connection, read outcomes, wait for notifications."""

    def __init__(
        self, conn: psycopg.Connection[Any], schema: str, poll_interval: float
    ) -> None:
        self._conn = conn
        self._schema = schema
        self._poll_interval = poll_interval
        self._channel = _sql.channel("jobs_finished", schema)

    def wait(self, job_id: int, deadline: float | None) -> Any:
        self._listen(_sql.LISTEN)
        try:
            while True:
                # Read after LISTEN took effect, so a finish in between is
                # either read here or notified below.
                found, result = self._outcome(job_id)
                if found:
                    return result
                slice_ = self._poll_interval
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(
                            f"job {job_id} did not finish in time; it carries "
                            "on, wait again or look at it later"
                        )
                    slice_ = min(slice_, remaining)
                self._sleep_until_notified(job_id, slice_)
        finally:
            self._unlisten()

    def _listen(self, template: str) -> None:
        statement = psycopg.sql.SQL(template).format(
            channel=psycopg.sql.Identifier(self._channel)
        )
        try:
            self._conn.execute(statement)
            if not self._conn.autocommit:
                self._conn.commit()  # LISTEN takes effect at commit
        except psycopg.OperationalError as exc:
            raise ConnectionFailed(f"listening failed: {exc}") from exc

    def _unlisten(self) -> None:
        # Leave a caller's connection as it was found; a lost one needs nothing.
        if self._conn.closed:
            return
        try:
            idle = self._conn.info.transaction_status == pq.TransactionStatus.IDLE
            if not self._conn.autocommit and not idle:
                self._conn.rollback()
            self._listen(_sql.UNLISTEN)
        except (ConnectionFailed, psycopg.Error) as exc:
            logger.debug("unlisten failed: %s", exc)

    def _outcome(self, job_id: int) -> tuple[bool, Any]:
        """(True, result) once finished; raises for rejected or deleted."""
        rows = _execute(self._conn, "JOB_OUTCOMES", ([job_id],), self._schema)
        if not self._conn.autocommit:
            # End the read-only transaction: notifications arrive between
            # transactions only.
            self._conn.rollback()
        if not rows:
            raise JobDeleted(job_id)
        _, status, result = rows[0]
        if status == "resolved":
            return True, result
        if status == "rejected":
            raise JobRejected(job_id, result)
        return False, None

    def _sleep_until_notified(self, job_id: int, seconds: float) -> None:
        try:
            for notify in self._conn.notifies(timeout=seconds):
                if notify.channel == self._channel and _payload_id(notify) == job_id:
                    return
        except psycopg.OperationalError as exc:
            raise ConnectionFailed(f"listening failed: {exc}") from exc


def _payload_id(notify: psycopg.Notify) -> int | None:
    try:
        return int(json.loads(notify.payload)["id"])
    except (ValueError, KeyError, TypeError):
        return None


def _connect(dsn: str) -> psycopg.Connection[Any]:
    # Never prepared server-side: the few statements of a wait gain nothing,
    # and a transaction pooler (PgBouncer < 1.21) cannot carry them.
    try:
        return psycopg.connect(
            dsn, **_connection.CONNECT_KWARGS, prepare_threshold=None
        )
    except psycopg.ProgrammingError as exc:
        raise ValueError(f"invalid DSN: {exc}; check dsn= or {ENV_DSN}") from exc
    except psycopg.OperationalError as exc:
        reason = _connection.failure_reason(exc)
        raise ConnectionFailed(
            f"cannot connect to {_connection.describe(dsn)!r}: {reason}; "
            f"check dsn= or {ENV_DSN}"
        ) from exc


def _execute(
    conn: psycopg.Connection[Any], name: str, params: tuple[Any, ...], schema: str
) -> list[tuple[Any, ...]]:
    try:
        cursor = conn.execute(_sql.compose(getattr(_sql, name), schema), params)
        return cursor.fetchall()
    except psycopg.Error as exc:
        if exc.sqlstate in _SQLSTATE_INVALID:
            raise InvalidJob(str(exc.diag.message_primary or exc)) from exc
        if isinstance(exc, psycopg.OperationalError):
            raise ConnectionFailed(f"{name.lower()} failed: {exc}") from exc
        raise
