"""Queue: the Python face of pyqueue: register handlers, publish, await results.

A Queue holds a connection pool for calls of the stored functions, up to two
listening connections for notifications, the futures behind ``Job.done``
(``_outcomes.Outcomes``) and, when handlers are registered, a Worker.

Behind a transaction-pooling proxy (PgBouncer ``pool_mode = transaction``)
the pool's calls work as they are, each one statement in autocommit; what
needs a session (LISTEN, and the worker's liveness registration, a session
advisory lock) goes to ``listen_dsn``. Without one, nothing listens: work
and results are found by polling, and the worker keeps its registration in
a transaction it holds open through the proxy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar, overload

import psycopg
from psycopg_pool import AsyncConnectionPool

from . import _connection, _embedded, _payloads, _sql, migrations
from ._listener import Listener
from ._outcomes import Hearing, Outcomes
from ._registry import HandlerRegistry
from .errors import ConnectionFailed, InvalidJob, QueueNotOpen
from .interface import category_of
from .job import Job
from .worker import Handler, Worker

logger = logging.getLogger(__name__)

R = TypeVar("R")

ENV_DSN = "PYQUEUE_DSN"

_SQLSTATE_INVALID = {"PQ001", "PQ005", "22P02"}


class Queue(HandlerRegistry):
    """A job queue in one PostgreSQL schema.

    ``dsn``: a libpq connection string or URI; None means ``$PYQUEUE_DSN``,
    else the embedded server (started on demand, migrated automatically).
    ``concurrency``: jobs (of different queues) this Queue runs at once.
    ``claim_timeout``: seconds a claim outlives a worker that stopped renewing it.
    ``poll_interval``: seconds at most that a missed notification delays work.
    ``reap_interval``: how often to give back the claims of dead workers.
    ``shutdown_grace``: seconds ``close()`` lets running jobs finish.
    ``listen_dsn``: where to LISTEN and hold the worker's registration: a
    direct connection to the server (or a session-pooling proxy); None means
    ``dsn``, unless ``transaction_pooling``.
    ``transaction_pooling``: ``dsn`` leads to a proxy that pools by
    transaction. Without ``listen_dsn``, nothing LISTENs (work and results
    are found every ``poll_interval``) and a worker registers inside a
    transaction kept open through the proxy, pinning one server connection.
    ``prepare_threshold``: executions of a statement before psycopg prepares
    it on the server; None never prepares, which transaction pooling needs
    before PgBouncer 1.21 (or with its ``max_prepared_statements = 0``).
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str = "public",
        concurrency: int = 10,
        claim_timeout: float = 60.0,
        poll_interval: float = 5.0,
        reap_interval: float = 2.0,
        shutdown_grace: float = 30.0,
        worker_name: str | None = None,
        listen_dsn: str | None = None,
        transaction_pooling: bool = False,
        prepare_threshold: int | None = 5,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency!r}")
        if claim_timeout <= 0 or poll_interval <= 0 or reap_interval <= 0:
            raise ValueError(
                "claim_timeout, poll_interval and reap_interval must be > 0"
            )
        self.dsn = dsn
        self.schema = schema
        self.concurrency = concurrency
        self.claim_timeout = claim_timeout
        self.poll_interval = poll_interval
        self.reap_interval = reap_interval
        self.shutdown_grace = shutdown_grace
        self.listen_dsn = listen_dsn
        self.transaction_pooling = transaction_pooling
        self.prepare_threshold = prepare_threshold
        self.worker_name = worker_name or (
            f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        super().__init__()
        self._statements: dict[str, psycopg.sql.Composed] = {}
        self._pool: AsyncConnectionPool[Any] | None = None
        # Two listening connections, each only when needed: the worker's
        # (channel jobs, and its liveness registration) when handlers are
        # registered; the results' (channel jobs_finished) from the first
        # `done` awaited. A worker-only process never hears of results.
        self._listener: Listener | None = None
        self._results_listener: Listener | None = None
        # Whether the worker wants to hear of claimable jobs (see
        # _want_work_news), and whether its listening connection does.
        self._jobs_news_wanted = True
        self._hearing_jobs = False
        self._results_heard = False
        self._dsn_in_use = ""
        self._listen_dsn_in_use: str | None = None
        self._outcomes: Outcomes | None = None
        self._worker: Worker | None = None
        self._open = False
        self._closing: asyncio.Future[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    # -- life cycle -----------------------------------------------------------

    async def open(self) -> None:
        """Connect, check the schema, and start working registered categories.

        Raises ConnectionFailed when the server cannot be reached and
        SchemaNotReady when the schema is not migrated (except on the embedded
        server, which is migrated here).
        """
        if self._open:
            return
        dsn = self.dsn or os.environ.get(ENV_DSN)
        embedded = not dsn
        if not dsn:
            dsn = await asyncio.to_thread(_embedded.dsn)
        self._statements = {}  # composed on first use, for this schema

        conn = await _connection.connect(dsn, **self._connect_kwargs())
        try:
            if embedded:
                await migrations.migrate(conn, schema=self.schema)
            await migrations.check(conn, schema=self.schema)
        finally:
            await conn.close()

        self._pool = AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=self.concurrency + 2,
            kwargs={**_connection.CONNECT_KWARGS, **self._connect_kwargs()},
            open=False,
            name="pyqueue",
        )
        await self._pool.open()
        self._dsn_in_use = dsn
        self._listen_dsn_in_use = self.listen_dsn or (
            None if self.transaction_pooling else dsn
        )
        self._results_heard = False
        self._jobs_news_wanted = True
        self._outcomes = Outcomes(
            self._fetch_outcomes,
            poll_interval=self.poll_interval,
            on_first_watch=self._listen_for_results,
        )
        self._outcomes.start()
        if self._handlers:
            self._worker = Worker(
                call=self._call,
                handlers=dict(self._handlers),
                timeouts=dict(self._timeouts),
                worker_id=self.worker_name,
                concurrency=self.concurrency,
                claim_timeout=self.claim_timeout,
                poll_interval=self.poll_interval,
                reap_interval=self.reap_interval,
                observers=self._observers,
                want_work_news=self._want_work_news,
            )
            self._listener = self._worker_listener(dsn)
            try:
                await self._listener.start()
            except BaseException:
                await self._outcomes.stop()
                await self._pool.close()
                raise
        if self._worker is not None:
            self._worker.start()
            logger.info(
                "worker started for %s",
                ", ".join(self.categories),
                extra={"worker_id": self.worker_name, "schema": self.schema},
            )
        self._open = True

    async def close(self, *, grace: float | None = None) -> None:
        """Stop claiming, let running jobs finish within `grace` seconds
        (default ``shutdown_grace``), give back the claims of the rest, and
        disconnect. Futures of unfinished jobs are cancelled."""
        if self._closing is not None:
            # A second close (a second SIGINT): hurry the first one along.
            if self._worker is not None and grace is not None:
                self._worker.hurry(grace)
            await asyncio.shield(self._closing)
            return
        if not self._open:
            return
        self._closing = asyncio.get_running_loop().create_future()
        try:
            await self._shut_down(grace)
        finally:
            self._closing.set_result(None)
            self._closing = None

    async def _shut_down(self, grace: float | None) -> None:
        self._open = False
        if self._worker is not None:
            await self._worker.stop(self.shutdown_grace if grace is None else grace)
            logger.info("worker stopped", extra={"worker_id": self.worker_name})
            self._worker = None
        for listener in (self._listener, self._results_listener):
            if listener is not None:
                await listener.stop()
        self._listener = self._results_listener = None
        if self._outcomes is not None:
            await self._outcomes.stop()
        if self._pool is not None:
            await self._pool.close()

    async def __aenter__(self) -> Queue:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- publishing -----------------------------------------------------------

    # Publishing with a registered handler instead of its category name types
    # the result: Job[int] for `async def f(a) -> int` or `def f(a) -> int`.
    @overload
    async def publish(
        self,
        category: Callable[[Any], Awaitable[R]],
        args: Any = None,
        *,
        queue_name: str | None = "default",
        connection: psycopg.AsyncConnection[Any] | None = None,
    ) -> Job[R]: ...

    @overload
    async def publish(
        self,
        category: Callable[[Any], R],
        args: Any = None,
        *,
        queue_name: str | None = "default",
        connection: psycopg.AsyncConnection[Any] | None = None,
    ) -> Job[R]: ...

    @overload
    async def publish(
        self,
        category: str,
        args: Any = None,
        *,
        queue_name: str | None = "default",
        connection: psycopg.AsyncConnection[Any] | None = None,
    ) -> Job[Any]: ...

    async def publish(
        self,
        category: str | Handler,
        args: Any = None,
        *,
        queue_name: str | None = "default",
        connection: psycopg.AsyncConnection[Any] | None = None,
    ) -> Job[Any]:
        """Publish a job and return it; ``await job.done`` gives its result.

        `category` is a category name, or a handler registered on this Queue
        (then the Job is typed with the handler's return type).
        With `connection`, the job is published in that connection's current
        transaction: it exists, and runs, only once the caller commits.
        Raises InvalidJob, before anything is written, for an empty category,
        an unregistered handler or args that are not JSON-serializable.
        """
        if not isinstance(category, str):
            category = category_of(self._handlers, category)
        payload = _payloads.to_json(args, what="args")
        _payloads.check_category(category)
        hearing = self._hearing(connection)
        rows = await self._execute(
            "PUBLISH_JOB", (category, payload, queue_name), connection=connection
        )
        return Job(int(rows[0][0]), self._outcomes, hearing)

    async def publish_many(
        self,
        jobs: Iterable[tuple[str, Any]],
        *,
        queue_name: str | Iterable[str] | None = "default",
        connection: psycopg.AsyncConnection[Any] | None = None,
    ) -> list[Job[Any]]:
        """Publish (category, args) pairs with one statement, in order.

        `queue_name` is one name for all, or one per job. Returns the jobs in
        input order; the same transaction rules and errors as ``publish``.
        """
        categories, payloads, queues = _payloads.batch(jobs, queue_name)
        hearing = self._hearing(connection)
        rows = await self._execute(
            "PUBLISH_JOBS", (categories, payloads, queues), connection=connection
        )
        return [Job(int(row[0]), self._outcomes, hearing) for row in rows]

    def job(self, job_id: int) -> Job[Any]:
        """The Job with `job_id`, published by anyone, e.g. with SQL; its
        ``done`` needs the queue open."""
        return Job(int(job_id), self._outcomes)

    # -- plumbing -------------------------------------------------------------

    def _hearing(
        self, connection: psycopg.AsyncConnection[Any] | None
    ) -> Hearing | None:
        """Whether the finish of a job about to be published will be heard
        (see Outcomes.watch). Not for a job in the caller's transaction: it
        may commit much later, or roll back."""
        if connection is not None or self._outcomes is None:
            return None
        return self._outcomes.hearing()

    async def _execute(
        self,
        name: str,
        params: tuple[Any, ...],
        *,
        connection: psycopg.AsyncConnection[Any] | None = None,
    ) -> list[tuple[Any, ...]]:
        try:
            if connection is not None:
                cursor = await connection.execute(self._statement(name), params)
                return await cursor.fetchall()
            return await self._call(name, *params)
        except psycopg.Error as exc:
            if exc.sqlstate in _SQLSTATE_INVALID:
                raise InvalidJob(str(exc.diag.message_primary or exc)) from exc
            if isinstance(exc, psycopg.OperationalError):
                raise ConnectionFailed(f"publishing failed: {exc}") from exc
            raise

    def _statement(self, name: str) -> psycopg.sql.Composed:
        statement = self._statements.get(name)
        if statement is None:
            statement = _sql.compose(getattr(_sql, name), self.schema)
            self._statements[name] = statement
        return statement

    async def _call(self, name: str, *params: Any) -> list[tuple[Any, ...]]:
        """Call the stored function behind statement `name` on a pooled connection."""
        if self._pool is None:
            raise QueueNotOpen(
                "the queue is not open; use `async with queue` or `await queue.open()`"
            )
        async with self._pool.connection() as conn:
            cursor = await conn.execute(self._statement(name), params)
            rows: list[tuple[Any, ...]] = await cursor.fetchall()
            return rows

    async def _fetch_outcomes(self, job_ids: list[int]) -> list[tuple[int, str, Any]]:
        rows = await self._call("JOB_OUTCOMES", job_ids)
        return [(row[0], row[1], row[2]) for row in rows]

    async def _listen(self, conn: psycopg.AsyncConnection[Any], name: str) -> None:
        channel = psycopg.sql.Identifier(_sql.channel(name, self.schema))
        await conn.execute(psycopg.sql.SQL(_sql.LISTEN).format(channel=channel))

    async def _setup_listener(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The worker's listening connection: channel jobs, and liveness."""
        self._hearing_jobs = False
        await self._listen_for_work(conn)
        await conn.execute(self._statement("REGISTER_WORKER"), (self.worker_name,))

    def _want_work_news(self, wanted: bool) -> None:
        """The worker has free slots its last claim could not fill (True),
        or has been full for a while (False): LISTEN on jobs only then, so
        that a full worker's process and its listening backend are not woken
        by every job others announce (a full worker claims again itself,
        whenever an outcome frees a slot)."""
        if wanted != self._jobs_news_wanted:
            self._jobs_news_wanted = wanted
            if self._listener is not None:
                self._listener.poke()

    async def _listen_for_work(self, conn: psycopg.AsyncConnection[Any]) -> None:
        wanted = self._jobs_news_wanted
        if wanted == self._hearing_jobs:
            return
        channel = psycopg.sql.Identifier(_sql.channel("jobs", self.schema))
        statement = _sql.LISTEN if wanted else _sql.UNLISTEN
        await conn.execute(psycopg.sql.SQL(statement).format(channel=channel))
        self._hearing_jobs = wanted
        if wanted and self._worker is not None:
            # A job committed before LISTEN took effect was announced to
            # nobody here: claim once more now.
            self._worker.wake()

    async def _setup_results_listener(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await self._listen(conn, "jobs_finished")

    def _connect_kwargs(self) -> dict[str, Any]:
        return {"prepare_threshold": self.prepare_threshold}

    def _worker_listener(self, dsn: str) -> Listener:
        """The worker's session: LISTEN and registration on the listening
        DSN, or, with none behind a transaction pooler, registration alone in
        a transaction held open through it."""
        if self._listen_dsn_in_use is not None:
            return Listener(
                self._listen_dsn_in_use,
                setup=self._setup_listener,
                on_notify=self._on_notify,
                on_connected=self._on_connected,
                on_disconnected=self._on_disconnected,
                expect_direct=self.listen_dsn is None,
                reconfigure=self._listen_for_work,
            )
        # A session advisory lock taken through transaction pooling would stay
        # on a server connection that the proxy lends to others and may close
        # at any time (the reapers would then give back our running claims).
        # Inside an open transaction the proxy keeps that server connection
        # ours, and closes it when we go: the lock lives exactly as long as
        # this worker's connection, as on a direct session. It writes nothing;
        # between statements it keeps the last one's catalog snapshot, so it
        # holds vacuum's horizon back by at most the keepalive interval.
        # TODO: it pins one server connection per worker (PgBouncer's
        # default_pool_size must exceed the number of such workers) and makes
        # PgBouncer's PAUSE wait until the worker stops; listen_dsn avoids both.
        return Listener(
            dsn,
            setup=self._register_in_transaction,
            on_notify=self._on_notify,
            on_connected=self._on_connected,
            on_disconnected=self._on_disconnected,
            connect_kwargs={"autocommit": False, "prepare_threshold": None},
            keepalive=self._register_in_transaction,
            keepalive_interval=min(5.0, self.claim_timeout / 4),
        )

    async def _register_in_transaction(
        self, conn: psycopg.AsyncConnection[Any]
    ) -> None:
        # Registering again in the same session succeeds (the lock is
        # re-entrant); every call keeps the transaction from looking idle to
        # idle_in_transaction_session_timeout.
        await conn.execute(self._statement("REGISTER_WORKER"), (self.worker_name,))

    def _listen_for_results(self) -> None:
        """Open the results' listening connection (the first `done` awaited);
        with no listening DSN, results are found by polling alone."""
        if self._listen_dsn_in_use is None:
            return
        self._results_listener = Listener(
            self._listen_dsn_in_use,
            setup=self._setup_results_listener,
            on_notify=self._on_result_notify,
            on_connected=self._on_results_connected,
            on_disconnected=self._on_results_disconnected,
            expect_direct=self.listen_dsn is None,
        )
        self._results_listener.start_soon()

    def _on_notify(self, channel: str, payload: str) -> None:
        if self._worker is not None:
            self._worker.wake()

    def _on_result_notify(self, channel: str, payload: str) -> None:
        try:
            job_id = int(json.loads(payload)["id"])
        except (ValueError, KeyError, TypeError):
            logger.debug("ignored notification %r on %s", payload, channel)
            return
        if self._outcomes is not None:
            self._outcomes.notified(job_id)

    def _on_connected(self) -> None:
        if self._worker is not None:
            self._worker.registered(True)
        self._check_pool()

    def _on_results_connected(self) -> None:
        # Whatever finished before we listened, or while we were away.
        if self._outcomes is not None:
            self._outcomes.listening(True)
            self._outcomes.recheck_all()
        if self._results_heard:
            self._check_pool()
        self._results_heard = True

    def _check_pool(self) -> None:
        if self._pool is not None and self._open:
            # A reconnect: the pool's idle connections may have died too.
            task = asyncio.get_running_loop().create_task(self._pool.check())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _on_results_disconnected(self) -> None:
        if self._outcomes is not None:
            self._outcomes.listening(False)

    def _on_disconnected(self) -> None:
        if self._worker is not None:
            self._worker.registered(False)
