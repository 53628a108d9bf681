"""Outcomes: resolves the futures behind ``Job.done`` from the table.

A notification on ``jobs_finished`` says which job to look at; a poll every
``poll_interval`` looks at all of them, so a missed notification delays a
result but never loses it. Reads go through ``job_outcomes()``, many ids in
one call.

A newly watched job is read at once, in case it finished unheard, unless a
``Hearing`` taken before its publish says that it cannot have finished yet
unheard: the results listener was LISTENing before the job existed and
still is, and no job finished since, as far as this Outcomes knows (no
notification heard, no future settled).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ._connection import Backoff, is_transient
from .errors import JobDeleted, JobRejected, QueueNotOpen

logger = logging.getLogger(__name__)

Fetch = Callable[[list[int]], Awaitable[list[tuple[int, str, Any]]]]
# (listening session, finishes heard or settled so far); see Outcomes.hearing.
Hearing = tuple[int, int]


class Outcomes:
    """The futures of every watched job, and the task that settles them."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        poll_interval: float,
        on_first_watch: Callable[[], None] | None = None,
    ) -> None:
        self._fetch = fetch
        self._on_first_watch = on_first_watch
        self._poll_interval = poll_interval
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._due: set[int] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Which (re)connect of the results listener is LISTENing now (0: none),
        # and how many finishes were heard or settled: any news at all.
        self._sessions = 0
        self._listening = 0
        self._news = 0

    def start(self) -> None:
        """Start settling futures; call from the event loop that awaits them."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop, cancelling the futures of jobs still unfinished."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for future in self._futures.values():
            future.cancel("the queue was closed before the job finished")
        self._futures.clear()

    def listening(self, alive: bool) -> None:
        """The results listener (re)connected and LISTENs, or lost its
        connection: notifications sent meanwhile may be lost."""
        if alive:
            self._sessions += 1
            self._listening = self._sessions
        else:
            self._listening = 0

    def hearing(self) -> Hearing | None:
        """Taken before publishing a job (and committing it): watching it
        later with this skips the first read if nothing changed meanwhile.
        None when nothing listens."""
        return (self._listening, self._news) if self._listening else None

    def watch(self, job_id: int, since: Hearing | None = None) -> asyncio.Future[Any]:
        """A future of `job_id`'s outcome. Each call gets its own, shielding
        the shared one: a waiter that gives up (``wait_for`` timing out
        cancels what it awaits) leaves the outcome to later waiters.

        `since`, a ``hearing()`` taken before the job was committed, for
        its first watch only: if the same listening session still runs and
        no finish was heard or settled since, this job has not finished, or
        its notification is on its way, and it is not read now.
        """
        future = self._futures.get(job_id)
        if future is None:
            if self._task is None:
                raise QueueNotOpen(
                    f"cannot wait for job {job_id}: the queue is not open; "
                    "use `async with queue` or `await queue.open()`"
                )
            future = asyncio.get_running_loop().create_future()
            self._futures[job_id] = future
            if since is None or since != self.hearing():
                self._mark_due([job_id])
            if self._on_first_watch is not None:
                self._on_first_watch()
                self._on_first_watch = None
        return asyncio.shield(future)

    def notified(self, job_id: int) -> None:
        """A notification said `job_id` finished or was deleted: look now."""
        self._news += 1
        if job_id in self._futures:
            self._mark_due([job_id])

    def recheck_all(self) -> None:
        """Look at every watched job now (after a reconnect, when NOTIFYs were lost)."""
        self._mark_due(list(self._futures))

    def _mark_due(self, job_ids: list[int]) -> None:
        self._due.update(job_ids)
        self._wake.set()

    async def _run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._poll_interval)
            except TimeoutError:
                self._due.update(self._futures)
            self._wake.clear()
            due = [i for i in self._due if i in self._futures]
            self._due.clear()
            if not due:
                continue

            try:
                rows = await self._fetch(due)
            except Exception as exc:
                if not is_transient(exc):
                    logger.error("reading job outcomes failed", exc_info=True)
                self._due.update(due)
                await asyncio.sleep(backoff.next_delay())
                self._wake.set()
                continue
            backoff.reset()
            self._settle(due, rows)

    def _settle(self, due: list[int], rows: list[tuple[int, str, Any]]) -> None:
        found = {row[0]: row for row in rows}
        for job_id in due:
            future = self._futures.get(job_id)
            if future is None:
                continue
            row = found.get(job_id)
            if row is None or row[1] != "unfulfilled":
                self._news += 1  # a job finished (or went) as far as we know
            if row is None:
                settled = self._futures.pop(job_id)
                if not settled.done():
                    settled.set_exception(JobDeleted(job_id))
            elif row[1] == "resolved":
                settled = self._futures.pop(job_id)
                if not settled.done():
                    settled.set_result(row[2])
            elif row[1] == "rejected":
                settled = self._futures.pop(job_id)
                if not settled.done():
                    settled.set_exception(JobRejected(job_id, row[2]))
