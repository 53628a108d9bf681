"""The behaviour suite runs every test against both Queue implementations.

``make_any_queue(**options)`` builds a ``Queue`` on the test database (through
the ``make_queue`` fixture) or a ``pyqueue.testing.MemoryQueue``, so that the
two cannot drift apart. Only options both accept belong here: concurrency,
shutdown_grace.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from pyqueue.testing import MemoryQueue


@pytest.fixture
async def make_memory_queue() -> AsyncIterator[Callable[..., MemoryQueue]]:
    """Build MemoryQueues; closed after the test."""
    made: list[MemoryQueue] = []

    def make(**options: Any) -> MemoryQueue:
        options.setdefault("shutdown_grace", 5.0)
        queue = MemoryQueue(**options)
        made.append(queue)
        return queue

    yield make
    for queue in made:
        await queue.close(grace=1.0)


@pytest.fixture(params=["postgres", "memory"])
def make_any_queue(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """A factory of Queues (the real one, then the in-memory one)."""
    if request.param == "postgres":
        factory: Callable[..., Any] = request.getfixturevalue("make_queue")
    else:
        factory = request.getfixturevalue("make_memory_queue")
    return factory
