"""Exceptions raised by pyqueue.

The tree, each class saying when it is raised::

    PyqueueError                   base of everything pyqueue raises
    ├── ConnectionFailed           the server cannot be reached or refused us
    ├── SchemaNotReady             pyqueue is not installed, is behind, or differs
    ├── MigrationError             a migration could not be applied
    ├── InvalidJob (ValueError)    bad input to publish: empty category, args that
    │                              are not JSON-serializable; nothing was written
    ├── QueueNotOpen               an operation that needs an open Queue
    ├── JobRejected                the job finished as rejected (.job_id, .error)
    └── JobDeleted                 the job's row was deleted before it finished

Driver errors are wrapped once, with ``raise ... from exc``.
"""

from __future__ import annotations

import json
from typing import Any


class PyqueueError(Exception):
    """Base class of every error pyqueue raises."""


class ConnectionFailed(PyqueueError):
    """The database server could not be reached, or refused the connection."""


class SchemaNotReady(PyqueueError):
    """The schema lacks pyqueue's tables, is behind, or differs from this release."""


class MigrationError(PyqueueError):
    """A migration failed; the database keeps every migration applied before it."""


class InvalidJob(PyqueueError, ValueError):
    """A publish was refused before anything was written."""


class QueueNotOpen(PyqueueError):
    """The Queue must be open (``async with queue`` or ``await queue.open()``)."""


class JobRejected(PyqueueError):
    """The job finished as rejected; ``error`` is the serialized error (a dict).

    A handler's exception is stored as a dict with ``type``, ``message`` and
    ``traceback``. Anything else in the row's result (an operator's ``UPDATE
    jobs SET status = 'rejected'`` with no result, or another service's
    plain string) still gives a dict: ``type`` and ``traceback`` None,
    ``message`` saying what was there, and the stored value under
    ``result``.
    """

    def __init__(self, job_id: int, error: Any) -> None:
        self.job_id = job_id
        self.error: dict[str, Any] = _as_error(error)
        message = self.error.get("message")
        kind = self.error.get("type")
        detail = f"{kind}: {message}" if kind else f"{message}"
        super().__init__(f"job {job_id} was rejected: {detail}")


def _as_error(stored: Any) -> dict[str, Any]:
    """A rejected job's stored result as an error dict (see JobRejected)."""
    if isinstance(stored, dict):
        return stored
    if stored is None:
        message = "no error was recorded"
    elif isinstance(stored, str):
        message = stored
    else:
        message = json.dumps(stored)
    return {"type": None, "message": message, "traceback": None, "result": stored}


class JobDeleted(PyqueueError):
    """The job's row was deleted before it finished, so it has no outcome."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} was deleted before it finished")
