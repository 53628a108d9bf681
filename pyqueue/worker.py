"""Worker: claims jobs, runs their handlers, renews claims and records outcomes.

All queue semantics live in the database: the worker asks ``claim_next_job``
for whatever may run now, and ``complete_job`` tells it whether it still held
the claim. Besides, it keeps its claims alive (``renew_claims``), gives back
the claims of dead workers (``reap_claims``), and on shutdown gives back its
own (``release_claims``).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

from ._connection import Backoff, is_transient

logger = logging.getLogger(__name__)

Handler = Callable[[Any], Any]
Call = Callable[..., Awaitable[list[tuple[Any, ...]]]]


def serialize_error(exc: BaseException) -> dict[str, str]:
    """The JSON form of a handler's exception, as stored in ``jobs.result``."""
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


class Worker:
    """Runs the handlers of one Queue; see the module docstring."""

    def __init__(
        self,
        *,
        call: Call,
        handlers: dict[str, Handler],
        timeouts: dict[str, float] | None = None,
        worker_id: str,
        concurrency: int,
        claim_timeout: float,
        poll_interval: float,
        reap_interval: float,
    ) -> None:
        self._call = call
        self._handlers = handlers
        self._timeouts = timeouts or {}
        self.worker_id = worker_id
        self._concurrency = concurrency
        self._claim_timeout = timedelta(seconds=claim_timeout)
        self._poll_interval = poll_interval
        self._reap_interval = reap_interval
        self._renew_interval = max(0.2, claim_timeout / 4)

        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._registered = asyncio.Event()
        self._stopping = False
        self._running: dict[int, asyncio.Task[None]] = {}
        self._lost: set[int] = set()
        self._next_expiry: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._hurry = asyncio.Event()
        self._threads = ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="pyqueue-handler"
        )

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        """Start claiming, renewing and reaping in the background."""
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._claim_loop()),
            loop.create_task(self._every(self._renew_interval, self._renew)),
            loop.create_task(self._every(self._reap_interval, self._reap)),
        ]

    async def stop(self, grace: float) -> None:
        """Stop claiming; let running jobs finish for `grace` seconds; give back
        the claims of the rest, so they run again elsewhere at once."""
        self._stopping = True
        self._wake.set()
        claim_loop = self._tasks[0] if self._tasks else None
        if claim_loop is not None:
            claim_loop.cancel()
            await asyncio.gather(claim_loop, return_exceptions=True)

        running = list(self._running.values())
        if running:
            logger.info(
                "waiting up to %.1fs for %d running jobs",
                grace,
                len(running),
                extra={"worker_id": self.worker_id},
            )
            everything: asyncio.Future[Any] = asyncio.gather(
                *running, return_exceptions=True
            )
            hurried: asyncio.Future[Any] = asyncio.ensure_future(self._hurry.wait())
            await asyncio.wait(
                [everything, hurried],
                timeout=grace,
                return_when=asyncio.FIRST_COMPLETED,
            )
            hurried.cancel()

        unfinished = [
            job_id for job_id, task in self._running.items() if not task.done()
        ]
        for task in self._running.values():
            task.cancel()
        if unfinished:
            await self._release(unfinished)
        await asyncio.gather(*self._running.values(), return_exceptions=True)

        for task in self._tasks[1:]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._threads.shutdown(wait=False, cancel_futures=True)

    def hurry(self, grace: float) -> None:
        """Cut the grace period of a stop in progress short (a second signal)."""
        if grace <= 0:
            self._hurry.set()
        else:
            asyncio.get_running_loop().call_later(grace, self._hurry.set)

    def wake(self) -> None:
        """Look for work now (a notification came, or a slot freed up)."""
        self._wake.set()

    def registered(self, alive: bool) -> None:
        """The listener holds (or lost) this worker's registration: claim only
        while registered, or reapers elsewhere would take the claims back."""
        if alive:
            self._registered.set()
            self._wake.set()
        else:
            self._registered.clear()

    # -- claiming -------------------------------------------------------------

    async def _claim_loop(self) -> None:
        backoff = Backoff()
        categories = sorted(self._handlers)
        while not self._stopping:
            await self._slots.acquire()
            job = None
            while job is None and not self._stopping:
                await self._registered.wait()
                self._wake.clear()
                try:
                    rows = await self._call(
                        "CLAIM_NEXT_JOB",
                        self.worker_id,
                        categories,
                        self._claim_timeout,
                    )
                except Exception as exc:
                    self._log_db_error("claim failed", exc)
                    await asyncio.sleep(backoff.next_delay())
                    continue
                backoff.reset()
                if rows:
                    job = rows[0]
                    break
                try:
                    await asyncio.wait_for(self._wake.wait(), self._idle_delay())
                except TimeoutError:
                    logger.debug("poll", extra={"worker_id": self.worker_id})

            if job is None:
                self._slots.release()
                break
            job_id, category, args, queue, attempts = job
            logger.debug(
                "claimed job %d",
                job_id,
                extra={"job_id": job_id, "queue": queue, "worker_id": self.worker_id},
            )
            if attempts > 1:
                logger.info(
                    "running job %d again (attempt %d)",
                    job_id,
                    attempts,
                    extra={"job_id": job_id, "queue": queue},
                )
            task = asyncio.get_running_loop().create_task(
                self._run_job(job_id, category, args, queue)
            )
            self._running[job_id] = task

    def _idle_delay(self) -> float:
        """How long to sleep without news: the poll interval, or less when an
        unrenewed claim expires sooner."""
        delay = self._poll_interval
        if self._next_expiry is not None:
            delay = min(delay, max(0.0, self._next_expiry - time.time()) + 0.05)
        return delay

    # -- running --------------------------------------------------------------

    async def _run_job(self, job_id: int, category: str, args: Any, queue: str) -> None:
        started = time.monotonic()
        try:
            status, result = await self._outcome(job_id, category, args)
            elapsed = time.monotonic() - started
            logger.debug(
                "job %d %s in %.3fs",
                job_id,
                status,
                elapsed,
                extra={"job_id": job_id, "queue": queue, "status": status},
            )
            await self._complete(job_id, queue, status, result)
        finally:
            self._running.pop(job_id, None)
            self._lost.discard(job_id)
            self._slots.release()
            self._wake.set()

    async def _outcome(self, job_id: int, category: str, args: Any) -> tuple[str, str]:
        """Run the handler; return ('resolved' | 'rejected', result as JSON)."""
        handler = self._handlers[category]
        timeout = self._timeouts.get(category)
        try:
            async with asyncio.timeout(timeout):
                value = await self._call_handler(handler, args)
        except TimeoutError:
            late = TimeoutError(
                f"job {job_id} ran longer than its {category!r} timeout of {timeout}s"
            )
            return "rejected", json.dumps(serialize_error(late))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a handler's failure is the job's outcome
            return "rejected", json.dumps(serialize_error(exc))
        try:
            return "resolved", json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            error = TypeError(
                f"the result of job {job_id} is not JSON-serializable: {exc}"
            )
            return "rejected", json.dumps(serialize_error(error))

    async def _call_handler(self, handler: Handler, args: Any) -> Any:
        # Plain functions run in threads so that blocking code cannot stall
        # claim renewal; a thread past its timeout runs on, its result unused.
        if inspect.iscoroutinefunction(handler):
            return await handler(args)
        loop = asyncio.get_running_loop()
        value = await loop.run_in_executor(self._threads, handler, args)
        if inspect.isawaitable(value):
            value = await value
        return value

    async def _complete(
        self, job_id: int, queue: str, status: str, result: str
    ) -> None:
        """Record the outcome, retrying through lost connections until the
        database answers; a refused completion means the claim was lost."""
        backoff = Backoff()
        while True:
            try:
                rows = await self._call(
                    "COMPLETE_JOB", job_id, self.worker_id, status, result
                )
                break
            except Exception as exc:
                self._log_db_error("completing a job failed", exc)
                await asyncio.sleep(backoff.next_delay())
        if not rows[0][0]:
            logger.warning(
                "claim on job %d lost; its result is discarded",
                job_id,
                extra={"job_id": job_id, "queue": queue, "worker_id": self.worker_id},
            )

    # -- keeping claims -------------------------------------------------------

    async def _every(
        self, interval: float, step: Callable[[], Awaitable[None]]
    ) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._log_db_error("background step failed", exc)

    async def _renew(self) -> None:
        held = [job_id for job_id in self._running if job_id not in self._lost]
        if not held:
            return
        rows = await self._call(
            "RENEW_CLAIMS", self.worker_id, held, self._claim_timeout
        )
        kept = {row[0] for row in rows}
        for job_id in held:
            if job_id not in kept and job_id in self._running:
                self._lost.add(job_id)
                logger.warning(
                    "claim on job %d lost while running",
                    job_id,
                    extra={"job_id": job_id, "worker_id": self.worker_id},
                )

    async def _reap(self) -> None:
        rows = await self._call("REAP_CLAIMS")
        next_expiry: datetime | None = rows[0][0] if rows else None
        self._next_expiry = next_expiry.timestamp() if next_expiry else None

    async def _release(self, job_ids: list[int]) -> None:
        try:
            await self._call("RELEASE_CLAIMS", self.worker_id, job_ids)
            logger.info(
                "gave back %d unfinished jobs",
                len(job_ids),
                extra={"worker_id": self.worker_id},
            )
        except Exception as exc:
            self._log_db_error("giving back claims failed; they expire instead", exc)

    def _log_db_error(self, what: str, exc: BaseException) -> None:
        if is_transient(exc):
            logger.info("%s: %s", what, exc, extra={"worker_id": self.worker_id})
        else:
            logger.error(what, exc_info=exc, extra={"worker_id": self.worker_id})
