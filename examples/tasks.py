"""Handlers shared by the examples, and a Queue for ``pyqueue worker``.

Run a worker for them from the repository root::

    PYQUEUE_DSN=postgresql://... pyqueue worker examples.tasks:queue
"""

from __future__ import annotations

from pyqueue import Queue, QueueLike


async def increment(a: int) -> int:
    """Async handler: the seed example."""
    return a + 1


def word_count(text: str) -> dict[str, int]:
    """Plain def handler (runs in a thread): how often each word occurs."""
    counts: dict[str, int] = {}
    for word in text.lower().split():
        counts[word] = counts.get(word, 0) + 1
    return counts


def register(queue: QueueLike) -> QueueLike:
    """Register the example handlers on `queue` (a Queue or a MemoryQueue)."""
    queue.register("increment", increment)
    queue.register("word-count", word_count, timeout=30)
    return queue


# $PYQUEUE_DSN, else the embedded server.
queue = Queue()
register(queue)
