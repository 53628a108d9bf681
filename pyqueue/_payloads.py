"""Checking what a publisher hands over, before anything is sent.

Shared by ``Queue``, ``pyqueue.sync`` and ``MemoryQueue``, so that the three
refuse the same input with the same InvalidJob.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from .errors import InvalidJob


def to_json(value: Any, *, what: str) -> str | None:
    """`value` as JSON text (None for None); InvalidJob when it cannot be."""
    if value is None:
        return None
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidJob(f"job {what} are not JSON-serializable: {exc}") from exc


def check_category(category: str) -> None:
    """InvalidJob for an empty category."""
    if not category:
        raise InvalidJob(f"job category must not be empty, got {category!r}")


def batch(
    jobs: Iterable[tuple[str, Any]], queue_name: str | Iterable[str] | None
) -> tuple[list[str], list[str | None], list[str | None]]:
    """The arrays publish_jobs() takes for (category, args) pairs: categories,
    args as JSON, and queue names (`queue_name` is one for all, or one per
    job). Raises InvalidJob for any bad pair, before anything is sent."""
    pairs = list(jobs)
    categories = [category for category, _ in pairs]
    payloads = [to_json(args, what="args") for _, args in pairs]
    queues: list[str | None]
    if isinstance(queue_name, str) or queue_name is None:
        queues = [queue_name] * len(pairs)
    else:
        queues = list(queue_name)
    if len(queues) != len(pairs):
        raise InvalidJob(f"got {len(pairs)} jobs but {len(queues)} queue names")
    if not all(categories):
        raise InvalidJob("job category must not be empty")
    return categories, payloads, queues
