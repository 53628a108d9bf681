"""The queue's interface as typed protocols, met by Queue and testing.MemoryQueue.

Application code that only registers handlers, publishes and awaits results
can be written against ``QueueLike`` and be handed the PostgreSQL ``Queue`` in
production and ``pyqueue.testing.MemoryQueue`` in unit tests::

    async def signup(queue: QueueLike, email: str) -> int:
        job = await queue.publish("welcome-mail", {"to": email})
        return job.id

Publishing inside a caller's transaction (``connection=``) is PostgreSQL-only
and is therefore not part of the protocol.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar, overload

from .errors import InvalidJob

if TYPE_CHECKING:
    from .worker import JobEvent

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
F = TypeVar("F", bound=Callable[..., Any])

Handler = Callable[[Any], Any]
"""A handler: called with the job's args decoded from JSON; async or plain def."""


class JobLike(Protocol[R_co]):
    """A published job: its ``id``, and ``done``, which gives its result.

    ``await job.done`` returns the result, raises JobRejected when the job was
    rejected, or JobDeleted when it disappeared before it finished.
    """

    @property
    def id(self) -> int:
        """The job's id: its position in publish order."""
        ...

    @property
    def done(self) -> Awaitable[R_co]:
        """An awaitable of the job's result, awaitable any number of times."""
        ...


class QueueLike(Protocol):
    """What a job queue offers application code; see the module docstring."""

    def register(
        self, category: str, handler: Handler, *, timeout: float | None = None
    ) -> None:
        """Run `handler` for jobs of `category`; register before ``open()``."""
        ...

    def handler(
        self, category: str, *, timeout: float | None = None
    ) -> Callable[[F], F]:
        """Decorator form of ``register``; returns the function unchanged."""
        ...

    @property
    def categories(self) -> list[str]:
        """The categories this queue has handlers for."""
        ...

    def observe(
        self, observer: Callable[[JobEvent], object]
    ) -> Callable[[JobEvent], object]:
        """Call `observer` with each JobEvent of this queue's worker, on the
        event loop; returns it (a decorator too). One that raises is logged."""
        ...

    async def open(self) -> None:
        """Start: from now on, publish works and registered handlers run."""
        ...

    async def close(self, *, grace: float | None = None) -> None:
        """Stop claiming, let running jobs finish within `grace` seconds."""
        ...

    async def __aenter__(self) -> Self:
        """``open()``; returns the queue."""
        ...

    async def __aexit__(self, *exc_info: object) -> None:
        """``close()``."""
        ...

    @overload
    async def publish(
        self,
        category: Callable[[Any], Awaitable[R]],
        args: Any = None,
        *,
        queue_name: str | None = "default",
    ) -> JobLike[R]: ...

    @overload
    async def publish(
        self,
        category: Callable[[Any], R],
        args: Any = None,
        *,
        queue_name: str | None = "default",
    ) -> JobLike[R]: ...

    @overload
    async def publish(
        self,
        category: str,
        args: Any = None,
        *,
        queue_name: str | None = "default",
    ) -> JobLike[Any]: ...

    async def publish(
        self,
        category: str | Handler,
        args: Any = None,
        *,
        queue_name: str | None = "default",
    ) -> JobLike[Any]:
        """Publish a job of `category` (a name, or a registered handler, which
        types the result) into queue `queue_name`; raises InvalidJob, before
        anything is stored, for args that are not JSON-serializable."""
        ...

    async def publish_many(
        self,
        jobs: Iterable[tuple[str, Any]],
        *,
        queue_name: str | Iterable[str] | None = "default",
    ) -> Sequence[JobLike[Any]]:
        """Publish (category, args) pairs in order; the jobs in input order."""
        ...

    def job(self, job_id: int) -> JobLike[Any]:
        """The job with `job_id`, published by anyone."""
        ...


def category_of(handlers: Mapping[str, Handler], handler: Handler) -> str:
    """The category `handler` is registered for in `handlers`.

    Raises InvalidJob when it is registered for none, or for several (then
    the category is ambiguous and must be given by name).
    """
    # == rather than `is`: each access of a bound method makes a new object.
    found = [category for category, fn in handlers.items() if fn == handler]
    name = getattr(handler, "__qualname__", repr(handler))
    if not found:
        raise InvalidJob(
            f"handler {name!r} is not registered; register it before publishing "
            "with it, or publish by category name"
        )
    if len(found) > 1:
        raise InvalidJob(
            f"handler {name!r} is registered for several categories {found!r}; "
            "publish by category name"
        )
    return found[0]
