"""HandlerRegistry: the handlers and observers a queue knows before it opens.

Shared by ``Queue`` and ``testing.MemoryQueue``, so that registering means
the same on both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .worker import Handler, Observer

F = TypeVar("F", bound=Callable[..., Any])


class HandlerRegistry:
    """Handlers by category, their timeouts, and the job-event observers."""

    _open: bool

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._timeouts: dict[str, float] = {}
        self._observers: list[Observer] = []

    def register(
        self, category: str, handler: Handler, *, timeout: float | None = None
    ) -> None:
        """Run `handler` (async or plain def, one argument: the job's args) for
        jobs of `category`. With `timeout`, a run longer than that many seconds
        rejects the job with a TimeoutError. Register before ``open()``."""
        if not category:
            raise ValueError("category must not be empty")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if self._open:
            raise RuntimeError("register handlers before the queue is opened")
        self._handlers[category] = handler
        if timeout is None:
            self._timeouts.pop(category, None)
        else:
            self._timeouts[category] = timeout

    def handler(
        self, category: str, *, timeout: float | None = None
    ) -> Callable[[F], F]:
        """Decorator form of ``register``."""

        def decorate(fn: F) -> F:
            self.register(category, fn, timeout=timeout)
            return fn

        return decorate

    @property
    def categories(self) -> list[str]:
        """The categories this queue has handlers for."""
        return sorted(self._handlers)

    def observe(self, observer: Observer) -> Observer:
        """Call `observer` with each JobEvent of this queue's worker (JobStarted,
        then one of JobFinished, JobLostClaim, JobAbandoned), on the event
        loop, as it happens; returns it, so it also works as a decorator.

        An observer must be quick and must not block (it runs on the event
        loop, between jobs); one that raises is logged and changes nothing.
        """
        self._observers.append(observer)
        return observer
