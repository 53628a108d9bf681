"""MemoryQueue: the queue without a database, for applications' unit tests.

``MemoryQueue`` meets the same ``QueueLike`` protocol as ``Queue`` and behaves
the same way: jobs of one queue run one at a time in publish order, jobs of
different queues run at once up to ``concurrency``, handlers may be async or
plain def (run in threads), per-category timeouts, ``JobRejected`` with the
same error dict, ``JobDeleted`` for an id that has no job. It does so by
running pyqueue's own Worker and outcome tracking against a small in-memory
table that answers the calls the Worker makes of the stored functions; one
behaviour suite (tests/behaviour/) runs against both implementations.

What it does not have: other processes, transactions (``connection=``),
NOTIFY, claims that expire, SQL hand edits, and persistence beyond the
object's life.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar, overload

from . import _payloads
from ._outcomes import Outcomes
from ._registry import HandlerRegistry
from .errors import QueueNotOpen
from .interface import Handler, category_of
from .job import Job
from .worker import Worker

if TYPE_CHECKING:
    from .interface import QueueLike
    from .queue import Queue

logger = logging.getLogger(__name__)

R = TypeVar("R")

__all__ = ["JobRecord", "MemoryQueue"]


@dataclass(frozen=True)
class JobRecord:
    """A snapshot of one job, with the columns of the ``jobs`` table."""

    id: int
    category: str
    args: Any
    status: str
    created_at: datetime
    finished_at: datetime | None
    queue: str
    result: Any
    attempts: int


@dataclass
class _Row:
    id: int
    category: str
    args: str | None  # JSON text, decoded afresh for every reader
    queue: str
    created_at: datetime
    status: str = "unfulfilled"
    result: str | None = None
    finished_at: datetime | None = None
    worker: str | None = None
    attempts: int = 0


class _Table:
    """The jobs table, and the stored functions the Worker and Outcomes call.

    Mirrors sql/0002: a job may run when it is the oldest unfinished job of
    its queue and nothing else of its queue is running; queues are tried by
    the id of their oldest waiting job. Claims never expire here, as there is
    only this process.
    """

    def __init__(self, on_finished: Callable[[int], None]) -> None:
        self.rows: dict[int, _Row] = {}
        self._next_id = 1
        self._on_finished = on_finished

    def insert(self, category: str, args: str | None, queue: str | None) -> int:
        job_id = self._next_id
        self._next_id += 1
        self.rows[job_id] = _Row(
            job_id, category, args, queue or "default", datetime.now(UTC)
        )
        return job_id

    async def call(self, name: str, *params: Any) -> list[tuple[Any, ...]]:
        """Answer the Worker's call of the stored function behind `name`."""
        if name == "CLAIM_NEXT_JOB":
            return self._claim_next_job(params[0], params[1])
        if name == "COMPLETE_JOB":
            return [(self._complete_job(*params),)]
        if name == "COMPLETE_AND_CLAIM_JOBS":
            return self._complete_and_claim_jobs(*params)
        if name == "RENEW_CLAIMS":
            worker, job_ids = params[0], set(params[1])
            return [(row.id,) for row in self._held(worker) if row.id in job_ids]
        if name == "RELEASE_CLAIMS":
            worker, job_ids, keep = params[0], params[1], set(params[2] or ())
            released = [
                row
                for row in self._held(worker)
                if (job_ids is None or row.id in job_ids) and row.id not in keep
            ]
            for row in released:
                row.worker = None
            return [(len(released),)]
        if name == "REAP_CLAIMS":
            return [(None,)]
        raise NotImplementedError(
            f"MemoryQueue has no stand-in for {name!r}; "
            "pyqueue.testing must learn the new call"
        )

    def _complete_and_claim_jobs(
        self,
        worker: str,
        job_ids: list[int],
        statuses: list[str],
        results: list[str],
        claim_count: int,
        categories: list[str] | None,
        claim_timeout: object,
    ) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = [
            ("refused", job_id, None, None, None, None)
            for job_id, status, result in zip(job_ids, statuses, results, strict=True)
            if not self._complete_job(job_id, worker, status, result)
        ]
        for _ in range(claim_count):
            claimed = self._claim_next_job(worker, categories)
            if not claimed:
                break
            rows.append(("claimed", *claimed[0]))
        return rows

    async def outcomes(self, job_ids: list[int]) -> list[tuple[int, str, Any]]:
        """``job_outcomes()``: (id, status, result) of the ids that exist."""
        return [
            (row.id, row.status, _decode(row.result))
            for row in (self.rows.get(job_id) for job_id in job_ids)
            if row is not None
        ]

    def _held(self, worker: str) -> list[_Row]:
        return [
            row
            for row in self.rows.values()
            if row.worker == worker and row.status == "unfulfilled"
        ]

    def _claim_next_job(
        self, worker: str, categories: list[str] | None
    ) -> list[tuple[Any, ...]]:
        heads: dict[str, _Row] = {}
        running: set[str] = set()
        for row in self.rows.values():  # in id order: dicts keep insertion order
            if row.status != "unfulfilled":
                continue
            if row.worker is not None:
                running.add(row.queue)
            heads.setdefault(row.queue, row)
        for head in sorted(heads.values(), key=lambda row: row.id):
            if head.queue in running:
                continue
            if categories is not None and head.category not in categories:
                continue
            head.worker = worker
            head.attempts += 1
            return [
                (head.id, head.category, _decode(head.args), head.queue, head.attempts)
            ]
        return []

    def _complete_job(
        self, job_id: int, worker: str, status: str, result: str | None
    ) -> bool:
        if status not in ("resolved", "rejected"):
            raise ValueError(f"a job completes as resolved or rejected, not {status!r}")
        row = self.rows.get(job_id)
        if row is None or row.worker != worker or row.status != "unfulfilled":
            return False
        row.status = status
        row.result = result
        row.worker = None
        row.finished_at = datetime.now(UTC)
        self._on_finished(job_id)
        return True


class MemoryQueue(HandlerRegistry):
    """A queue that lives in this process; see the module docstring.

    ``concurrency``: jobs (of different queues) it runs at once.
    ``shutdown_grace``: seconds ``close()`` lets running jobs finish.
    Jobs outlive ``close()``: the queue may be opened again and carries on.
    """

    def __init__(
        self,
        *,
        concurrency: int = 10,
        shutdown_grace: float = 30.0,
        worker_name: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency!r}")
        self.concurrency = concurrency
        self.shutdown_grace = shutdown_grace
        self.worker_name = worker_name or f"memory:{uuid.uuid4().hex[:8]}"
        super().__init__()
        self._table = _Table(self._finished)
        self._outcomes: Outcomes | None = None
        self._worker: Worker | None = None
        self._open = False
        self._closing: asyncio.Future[None] | None = None

    # -- life cycle -----------------------------------------------------------

    async def open(self) -> None:
        """Start working the registered categories; publish works from now on."""
        if self._open:
            return

        # Notifications are never missed here, so polling is only a backstop.
        self._outcomes = Outcomes(self._table.outcomes, poll_interval=1.0)
        self._outcomes.start()
        if self._handlers:
            self._worker = Worker(
                call=self._table.call,
                handlers=dict(self._handlers),
                timeouts=dict(self._timeouts),
                worker_id=self.worker_name,
                concurrency=self.concurrency,
                claim_timeout=60.0,
                poll_interval=1.0,
                reap_interval=60.0,
                observers=self._observers,
            )
            self._worker.registered(True)
            self._worker.start()
        self._open = True

    async def close(self, *, grace: float | None = None) -> None:
        """Stop claiming, let running jobs finish within `grace` seconds
        (default ``shutdown_grace``) and give the rest back, to run again on
        the next ``open()``. Futures of unfinished jobs are cancelled."""
        if self._closing is not None:
            if self._worker is not None and grace is not None:
                self._worker.hurry(grace)
            await asyncio.shield(self._closing)
            return
        if not self._open:
            return
        self._closing = asyncio.get_running_loop().create_future()
        try:
            self._open = False
            if self._worker is not None:
                await self._worker.stop(self.shutdown_grace if grace is None else grace)
                self._worker = None
            if self._outcomes is not None:
                await self._outcomes.stop()
        finally:
            self._closing.set_result(None)
            self._closing = None

    async def __aenter__(self) -> MemoryQueue:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- publishing -----------------------------------------------------------

    @overload
    async def publish(
        self,
        category: Callable[[Any], Awaitable[R]],
        args: Any = None,
        *,
        queue_name: str | None = "default",
    ) -> Job[R]: ...

    @overload
    async def publish(
        self,
        category: Callable[[Any], R],
        args: Any = None,
        *,
        queue_name: str | None = "default",
    ) -> Job[R]: ...

    @overload
    async def publish(
        self,
        category: str,
        args: Any = None,
        *,
        queue_name: str | None = "default",
    ) -> Job[Any]: ...

    async def publish(
        self,
        category: str | Handler,
        args: Any = None,
        *,
        queue_name: str | None = "default",
    ) -> Job[Any]:
        """Publish a job and return it, as ``Queue.publish`` does (without
        ``connection``: there are no transactions here). Raises InvalidJob,
        before anything is stored, for an empty category, an unregistered
        handler or args that are not JSON-serializable."""
        if not isinstance(category, str):
            category = category_of(self._handlers, category)
        payload = _payloads.to_json(args, what="args")
        _payloads.check_category(category)
        self._check_open()
        job_id = self._table.insert(category, payload, queue_name)
        self._wake()
        return self.job(job_id)

    async def publish_many(
        self,
        jobs: Iterable[tuple[str, Any]],
        *,
        queue_name: str | Iterable[str] | None = "default",
    ) -> list[Job[Any]]:
        """Publish (category, args) pairs in order, all or none; returns the
        jobs in input order. `queue_name` is one name for all, or one per job."""
        categories, payloads, queues = _payloads.batch(jobs, queue_name)
        self._check_open()
        ids = [
            self._table.insert(category, payload, queue)
            for category, payload, queue in zip(
                categories, payloads, queues, strict=True
            )
        ]
        self._wake()
        return [self.job(job_id) for job_id in ids]

    def job(self, job_id: int) -> Job[Any]:
        """The Job with `job_id`; its ``done`` needs the queue open, and raises
        JobDeleted when there is no such job."""
        return Job(int(job_id), self._outcomes)

    # -- for tests ------------------------------------------------------------

    def jobs(self) -> list[JobRecord]:
        """Every job published so far, in id order, as it is now: for asserting
        what application code published without running any handler."""
        return [
            JobRecord(
                id=row.id,
                category=row.category,
                args=_decode(row.args),
                status=row.status,
                created_at=row.created_at,
                finished_at=row.finished_at,
                queue=row.queue,
                result=_decode(row.result),
                attempts=row.attempts,
            )
            for row in self._table.rows.values()
        ]

    def delete(self, job_id: int) -> None:
        """Delete a job, as an operator's ``DELETE FROM jobs`` would: its
        waiters get JobDeleted unless it finished. A running job's late
        outcome is discarded."""
        if self._table.rows.pop(job_id, None) is not None:
            self._finished(job_id)

    # -- plumbing -------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._open:
            raise QueueNotOpen(
                "the queue is not open; use `async with queue` or `await queue.open()`"
            )

    def _wake(self) -> None:
        if self._worker is not None:
            self._worker.wake()

    def _finished(self, job_id: int) -> None:
        if self._outcomes is not None:
            self._outcomes.notified(job_id)
        self._wake()


def _decode(text: str | None) -> Any:
    return None if text is None else json.loads(text)


if TYPE_CHECKING:
    # Both implementations meet the protocol; mypy checks these lines.
    _real: QueueLike = Queue()
    _memory: QueueLike = MemoryQueue()
