"""Worker: claims jobs, runs their handlers, renews claims and records outcomes.

All queue semantics live in the database. One loop makes one call per
cycle, ``complete_and_claim_jobs``: it records every outcome that arrived
since the last call (the database says which claims were lost) and claims as
many jobs as there are free slots, in one round trip and one commit, so that
under load one commit stands for many jobs. Besides, the worker keeps its
claims alive (``renew_claims``), gives back the claims of dead workers
(``reap_claims``), and on shutdown gives back its own (``release_claims``).

Observers (``Queue.observe``) see each job it runs as events: JobStarted,
then exactly one of JobFinished (its outcome is stored), JobLostClaim (its
outcome was discarded) or JobAbandoned (it stopped without an outcome and
will run again), each with the handler's duration, for metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import json
import logging
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import psycopg

from ._connection import Backoff, is_transient

logger = logging.getLogger(__name__)

Handler = Callable[[Any], Any]

# Seconds shutdown waits, past the grace period, for outcomes being recorded.
COMPLETE_GRACE = 5.0
# Loop turns a cycle waits at most for handlers about to finish (see
# Worker._let_handlers_finish), so that a steady stream of outcomes cannot
# hold a cycle back.
GATHER_TURNS = 8
# Seconds a worker must have filled every free slot at each claim before it
# stops hearing of claimable jobs (see Worker._note_claim).
FULL_BEFORE_DEAF = 0.1
Call = Callable[..., Awaitable[list[tuple[Any, ...]]]]


@dataclass(frozen=True)
class JobStarted:
    """The worker claimed a job and is calling its handler."""

    job_id: int
    category: str
    queue: str
    worker_id: str
    attempt: int
    """1 on the first run; more when a job runs again (a worker died, a
    claim was lost, or an operator set it back to unfulfilled)."""


@dataclass(frozen=True)
class JobFinished:
    """A job's outcome is stored: it is resolved or rejected."""

    job_id: int
    category: str
    queue: str
    worker_id: str
    status: Literal["resolved", "rejected"]
    duration: float
    """Seconds the handler ran (wall clock, from its call to its outcome)."""
    error_type: str | None
    """For a rejected job, the class name of the handler's exception."""


@dataclass(frozen=True)
class JobLostClaim:
    """The worker no longer held the job's claim when its handler finished
    (the claim expired, or an operator edited the row): the outcome was
    discarded; the job is, or was, run elsewhere."""

    job_id: int
    category: str
    queue: str
    worker_id: str
    duration: float


@dataclass(frozen=True)
class JobAbandoned:
    """The handler stopped without a stored outcome (shutdown past its grace
    period, or an outcome the database cannot store): the job runs again."""

    job_id: int
    category: str
    queue: str
    worker_id: str
    duration: float


JobEvent = JobStarted | JobFinished | JobLostClaim | JobAbandoned
Observer = Callable[[JobEvent], object]


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
        observers: list[Observer] | None = None,
        want_work_news: Callable[[bool], None] | None = None,
    ) -> None:
        self._call = call
        self._want_work_news = want_work_news
        self._full_since: float | None = None
        # The caller's list itself: an observer added later is called too.
        self._observers = observers if observers is not None else []
        self._handlers = handlers
        self._timeouts = timeouts or {}
        self.worker_id = worker_id
        self._concurrency = concurrency
        self._claim_timeout = timedelta(seconds=claim_timeout)
        self._poll_interval = poll_interval
        self._reap_interval = reap_interval
        self._renew_interval = max(0.2, claim_timeout / 4)

        self._wake = asyncio.Event()
        self._registered = asyncio.Event()
        self._stopping = False
        # _running: a task per claimed job (handler, then completion);
        # _handling: the handler part alone, which shutdown may cancel.
        self._running: dict[int, asyncio.Task[None]] = {}
        self._handling: dict[int, asyncio.Task[tuple[str, str]]] = {}
        self._lost: set[int] = set()
        # Outcomes waiting for the next cycle, and those in the cycle's call:
        # neither is renewed (its claim may end any moment, and is not lost).
        self._outcomes: dict[int, _Outcome] = {}
        self._recording: dict[int, _Outcome] = {}
        self._next_expiry: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._hurry = asyncio.Event()
        # A claim call failed: its claim may have committed with the reply lost.
        self._maybe_orphaned = False

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

        if self._running:
            logger.info(
                "waiting up to %.1fs for %d running jobs",
                grace,
                len(self._running),
                extra={"worker_id": self.worker_id},
            )
            await self._wait_unless_hurried(list(self._running.values()), grace)

        # Handlers past the grace period stop without an outcome; outcomes
        # already on their way get a moment more, so that a finished job is
        # not run again for want of a round trip.
        for handling in self._handling.values():
            handling.cancel()
        await self._wait_unless_hurried(list(self._running.values()), COMPLETE_GRACE)
        for task in [*self._running.values(), *self._tasks]:
            task.cancel()
        await asyncio.gather(
            *self._running.values(), *self._tasks, return_exceptions=True
        )

        # Every claim this worker still holds, including one whose claim call
        # was cut short above, goes back now rather than at a reap or expiry.
        await self._release()

    async def _wait_unless_hurried(
        self, tasks: list[asyncio.Task[None]], timeout: float
    ) -> None:
        if not tasks or self._hurry.is_set():
            return
        everything: asyncio.Future[Any] = asyncio.gather(*tasks, return_exceptions=True)
        hurried: asyncio.Future[Any] = asyncio.ensure_future(self._hurry.wait())
        await asyncio.wait(
            [everything, hurried], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        hurried.cancel()

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
        while True:
            await self._let_handlers_finish()
            self._wake.clear()
            batch = dict(self._outcomes)
            self._outcomes.clear()
            want = 0
            if not self._stopping and self._registered.is_set():
                want = self._concurrency - len(self._running) + len(batch)
            if self._stopping and not batch and not self._running:
                return
            if self._maybe_orphaned and want and not batch:
                await self._release(keep=list(self._running))
                self._maybe_orphaned = False

            if batch or want:
                self._recording = batch
                try:
                    rows = await self._call(
                        "COMPLETE_AND_CLAIM_JOBS",
                        self.worker_id,
                        list(batch),
                        [outcome.status for outcome in batch.values()],
                        [outcome.result for outcome in batch.values()],
                        want,
                        categories,
                        self._claim_timeout,
                    )
                except Exception as exc:
                    self._recording = {}
                    await self._cycle_failed(exc, batch, claimed=bool(want))
                    await asyncio.sleep(backoff.next_delay())
                    continue
                self._recording = {}
                backoff.reset()
                if want:
                    for outcome in batch.values():
                        outcome.slot_offered = True
                claimed = self._cycle_done(batch, rows)
                if want:
                    self._note_claim(full=claimed == want)
                if want and claimed == want:
                    continue  # there may be more to claim right away

            try:
                await asyncio.wait_for(self._wake.wait(), self._idle_delay())
            except TimeoutError:
                logger.debug("poll", extra={"worker_id": self.worker_id})

    def _note_claim(self, *, full: bool) -> None:
        """A claim filled every free slot, or came back short. Notifications
        of claimable jobs are news only to a worker with a slot it could
        not fill: one that filled them all for FULL_BEFORE_DEAF seconds
        stops hearing them, as its own outcomes start its next claims; the
        first short claim turns them back on (and the Queue has it claim
        once more when they are, for what came in between)."""
        if self._want_work_news is None:
            return
        if not full:
            self._full_since = None
            self._want_work_news(True)
        elif self._full_since is None:
            self._full_since = time.monotonic()
        elif time.monotonic() - self._full_since >= FULL_BEFORE_DEAF:
            self._want_work_news(False)

    async def _let_handlers_finish(self) -> None:
        """Yield to handlers a few loop turns from their outcome, so that
        one call carries all of them rather than the first few.

        Short jobs claimed together finish a turn or two apart. Without
        this, the first outcome starts the call and the rest wait a whole
        round trip for the next one, holding their slots: in W1 of `make
        bench` a call carried five outcomes instead of ten, and two worker
        processes ran 12% fewer jobs/s. Stops at the first turn that brings
        no outcome, so a lone job waits one turn.
        """
        for _ in range(GATHER_TURNS):
            waiting = len(self._outcomes)
            if waiting >= len(self._running):
                return
            await asyncio.sleep(0)
            if len(self._outcomes) == waiting:
                return

    def _cycle_done(
        self, batch: dict[int, _Outcome], rows: list[tuple[Any, ...]]
    ) -> int:
        """Settle the recorded outcomes and start the claimed jobs; return how
        many jobs were claimed."""
        refused = {row[1] for row in rows if row[0] == "refused"}
        for job_id, outcome in batch.items():
            if job_id in refused:
                self._claim_lost_at_completion(job_id, outcome)
            else:
                self._finished(job_id, outcome)
            if not outcome.recorded.done():
                outcome.recorded.set_result(None)

        claimed = 0
        for _event, job_id, category, args, queue, attempts in (
            row for row in rows if row[0] == "claimed"
        ):
            claimed += 1
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
                self._run_job(job_id, category, args, queue, attempts)
            )
            self._running[job_id] = task
        return claimed

    async def _cycle_failed(
        self, exc: Exception, batch: dict[int, _Outcome], *, claimed: bool
    ) -> None:
        """A cycle's call failed: keep its outcomes for the next one (one by
        one when the database refused the batch's data)."""
        if claimed:
            # The call may have committed with its reply lost: its claims
            # are given back at the next cycle that claims (release_claims
            # keeping the jobs this worker runs).
            self._maybe_orphaned = True
        if is_transient(exc) or not isinstance(exc, psycopg.DataError):
            self._log_db_error("claim failed", exc)
            for job_id, outcome in batch.items():
                # The call may have committed: a refusal next time is no news.
                outcome.retried = True
                self._outcomes[job_id] = outcome
            return
        for job_id, outcome in batch.items():
            await self._complete(job_id, outcome)
            outcome.recorded.set_result(None)

    def _idle_delay(self) -> float:
        """How long to sleep without news: the poll interval, or less when an
        unrenewed claim expires sooner."""
        delay = self._poll_interval
        # An expiry already past was looked at (it may be a claim of a category
        # this worker cannot run): waiting on it again would spin.
        if self._next_expiry is not None and self._next_expiry > time.time():
            delay = min(delay, self._next_expiry - time.time() + 0.05)
        return delay

    # -- running --------------------------------------------------------------

    async def _run_job(
        self, job_id: int, category: str, args: Any, queue: str, attempt: int = 1
    ) -> None:
        started = time.monotonic()
        outcome: _Outcome | None = None
        self._emit(JobStarted(job_id, category, queue, self.worker_id, attempt))
        handling = asyncio.get_running_loop().create_task(
            self._outcome(job_id, category, args)
        )
        self._handling[job_id] = handling
        try:
            try:
                status, result = await handling
            except asyncio.CancelledError:
                if _cancelling():
                    raise
                # Shutdown cancelled the handler: no outcome; stop() gives
                # the claim back.
                return
            finally:
                self._handling.pop(job_id, None)
            duration = time.monotonic() - started
            logger.debug(
                "job %d %s in %.3fs",
                job_id,
                status,
                duration,
                extra={"job_id": job_id, "queue": queue, "status": status},
            )
            outcome = _Outcome(queue, status, result, category, duration)
            self._outcomes[job_id] = outcome
            self._wake.set()
            await outcome.recorded
        finally:
            if outcome is None or not outcome.told:
                self._emit(
                    JobAbandoned(
                        job_id,
                        category,
                        queue,
                        self.worker_id,
                        time.monotonic() - started,
                    )
                )
            self._running.pop(job_id, None)
            self._lost.discard(job_id)
            # A freed slot is news for the claim loop, unless the call that
            # recorded this outcome already claimed for it: a claim that
            # came back short says there is nothing more to take.
            if outcome is None or not outcome.slot_offered:
                self._wake.set()

    async def _outcome(self, job_id: int, category: str, args: Any) -> tuple[str, str]:
        """Run the handler; return ('resolved' | 'rejected', result as JSON)."""
        handler = self._handlers[category]
        timeout = self._timeouts.get(category)
        try:
            async with asyncio.timeout(timeout) as scope:
                value = await self._call_handler(handler, args)
        except TimeoutError as exc:
            error: BaseException = exc
            if scope.expired():
                error = TimeoutError(
                    f"job {job_id} ran longer than its {category!r} timeout"
                    f" of {timeout}s"
                )
            return "rejected", json.dumps(serialize_error(error))
        except asyncio.CancelledError as exc:
            if _cancelling():
                raise
            # The handler raised CancelledError itself: that is its outcome.
            return "rejected", json.dumps(serialize_error(exc))
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
        if inspect.iscoroutinefunction(handler):
            return await handler(args)
        value = await _in_thread(handler, args)
        if inspect.isawaitable(value):
            value = await value
        return value

    async def _complete(self, job_id: int, outcome: _Outcome) -> None:
        """Record one outcome alone (after the database refused a batch),
        retrying through lost connections until the database answers. An
        outcome the database refuses to store (a NUL character, say) rejects
        the job with an error that says so, instead of retrying forever."""
        status, result = outcome.status, outcome.result
        backoff = Backoff()
        stood_in = False
        while True:
            try:
                rows = await self._call(
                    "COMPLETE_JOB", job_id, self.worker_id, status, result
                )
                break
            except Exception as exc:
                if is_transient(exc) or not isinstance(exc, psycopg.DataError):
                    self._log_db_error("completing a job failed", exc)
                    await asyncio.sleep(backoff.next_delay())
                    continue
                if stood_in:
                    logger.error(
                        "cannot store any outcome of job %d",
                        job_id,
                        exc_info=exc,
                        extra={"job_id": job_id, "worker_id": self.worker_id},
                    )
                    return
                stood_in = True
                reason = str(exc.diag.message_primary or exc).replace("\x00", "")
                error = ValueError(
                    f"the {status} outcome of job {job_id} cannot be stored:"
                    f" {reason}; return JSON that PostgreSQL's jsonb accepts"
                )
                status, result = "rejected", json.dumps(serialize_error(error))
        if not rows[0][0]:
            self._claim_lost_at_completion(job_id, outcome)
        else:
            outcome.status, outcome.result = status, result
            self._finished(job_id, outcome)

    def _finished(self, job_id: int, outcome: _Outcome) -> None:
        """The database stored `outcome`: tell the observers."""
        status: Literal["resolved", "rejected"] = (
            "resolved" if outcome.status == "resolved" else "rejected"
        )
        error_type = None
        if status == "rejected":
            with contextlib.suppress(ValueError, TypeError, KeyError):
                error_type = str(json.loads(outcome.result)["type"])
        outcome.told = True
        self._emit(
            JobFinished(
                job_id,
                outcome.category,
                outcome.queue,
                self.worker_id,
                status,
                outcome.duration,
                error_type,
            )
        )

    def _claim_lost_at_completion(self, job_id: int, outcome: _Outcome) -> None:
        if outcome.retried:
            # An earlier call with this outcome failed after it may have
            # committed: the refusal may be our own completion.
            # FIXME: when it was not ours, observers hear JobFinished with an
            # outcome that someone else's replaced.
            logger.info(
                "job %d was finished already; a retried outcome is discarded",
                job_id,
                extra={"job_id": job_id, "queue": outcome.queue},
            )
            self._finished(job_id, outcome)
            return
        outcome.told = True
        self._emit(
            JobLostClaim(
                job_id,
                outcome.category,
                outcome.queue,
                self.worker_id,
                outcome.duration,
            )
        )
        logger.warning(
            "claim on job %d lost; its result is discarded",
            job_id,
            extra={
                "job_id": job_id,
                "queue": outcome.queue,
                "worker_id": self.worker_id,
            },
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
        held = [
            job_id
            for job_id in self._running
            if job_id not in self._lost
            and job_id not in self._outcomes
            and job_id not in self._recording
        ]
        if not held:
            return
        rows = await self._call(
            "RENEW_CLAIMS", self.worker_id, held, self._claim_timeout
        )
        kept = {row[0] for row in rows}
        for job_id in held:
            if (
                job_id not in kept
                and job_id in self._running
                and job_id not in self._outcomes
                and job_id not in self._recording
            ):
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

    async def _release(self, keep: list[int] | None = None) -> None:
        """Give back every claim this worker holds but those in `keep`."""
        try:
            rows = await self._call("RELEASE_CLAIMS", self.worker_id, None, keep)
        except Exception as exc:
            self._log_db_error("giving back claims failed; they expire instead", exc)
            return
        count = rows[0][0] if rows else 0
        if count:
            logger.info(
                "gave back %d unfinished jobs",
                count,
                extra={"worker_id": self.worker_id},
            )

    def _emit(self, event: JobEvent) -> None:
        for observer in self._observers:
            try:
                observer(event)
            except Exception:
                logger.error(
                    "observer %r failed on %s",
                    observer,
                    type(event).__name__,
                    exc_info=True,
                    extra={"job_id": event.job_id, "worker_id": self.worker_id},
                )

    def _log_db_error(self, what: str, exc: BaseException) -> None:
        if is_transient(exc):
            logger.info("%s: %s", what, exc, extra={"worker_id": self.worker_id})
        else:
            logger.error(what, exc_info=exc, extra={"worker_id": self.worker_id})


@dataclass
class _Outcome:
    """A job's outcome on its way to the database."""

    queue: str
    status: str
    result: str
    category: str = ""
    duration: float = 0.0
    retried: bool = False
    # Whether the call that recorded it also claimed a job for its slot.
    slot_offered: bool = False
    # Whether observers heard how the job ended (finished or lost).
    told: bool = False
    recorded: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _cancelling() -> bool:
    """Whether the current task is being cancelled (not merely seeing a
    CancelledError that a handler raised)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _in_thread(handler: Handler, args: Any) -> Any:
    """Run a plain handler in a daemon thread of its own and await its result.

    A daemon thread, unlike an executor's, cannot keep the process alive after
    shutdown gave its job back; a handler past its timeout runs on, unused.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[tuple[Any, BaseException | None]] = loop.create_future()
    context = contextvars.copy_context()

    def settle(value: Any, error: BaseException | None) -> None:
        if not future.done():
            future.set_result((value, error))

    def run() -> None:
        outcome: tuple[Any, BaseException | None]
        try:
            outcome = (context.run(handler, args), None)
        except BaseException as exc:  # delivered to the job, whatever it is
            outcome = (None, exc)
        # The loop may have closed meanwhile (RuntimeError): nobody waits.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="pyqueue-handler", daemon=True).start()
    value, error = await future
    if error is not None:
        raise error
    return value
