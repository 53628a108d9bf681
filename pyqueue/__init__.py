"""pyqueue: a job queue that lives in PostgreSQL."""

from .errors import (
    ConnectionFailed,
    InvalidJob,
    JobDeleted,
    JobRejected,
    MigrationError,
    PyqueueError,
    QueueNotOpen,
    SchemaNotReady,
)
from .job import Job
from .queue import Queue

__all__ = [
    "ConnectionFailed",
    "InvalidJob",
    "Job",
    "JobDeleted",
    "JobRejected",
    "MigrationError",
    "PyqueueError",
    "Queue",
    "QueueNotOpen",
    "SchemaNotReady",
]
