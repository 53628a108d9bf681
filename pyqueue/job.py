"""Job: a published job's id and its awaitable outcome."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .errors import QueueNotOpen

if TYPE_CHECKING:
    from ._outcomes import Hearing, Outcomes

R = TypeVar("R")


class Job(Generic[R]):
    """A job in the table: ``id``, and ``done``, which resolves with its result.

    ``await job.done`` returns the result, raises JobRejected when the job was
    rejected, or JobDeleted when its row was deleted first; it may be awaited
    any number of times, by any number of Job objects for one id.
    """

    __slots__ = ("_hearing", "_outcomes", "id")

    def __init__(
        self,
        job_id: int,
        outcomes: Outcomes | None,
        hearing: Hearing | None = None,
    ) -> None:
        self.id = job_id
        self._outcomes = outcomes
        # Set by Queue.publish (see Outcomes.watch): the listener would hear
        # this job finish, so its first wait may need no read.
        self._hearing = hearing

    @property
    def done(self) -> asyncio.Future[R]:
        """A future of the job's result; see the class docstring."""
        if self._outcomes is None:
            raise QueueNotOpen(
                f"cannot wait for job {self.id}: the queue is not open; "
                "use `async with queue` or `await queue.open()`"
            )
        future: asyncio.Future[Any] = self._outcomes.watch(self.id, self._hearing)
        self._hearing = None  # it speaks of the time of the publish only
        return future

    def __repr__(self) -> str:
        return f"<Job {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)
