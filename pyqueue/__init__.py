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
from .interface import JobLike, QueueLike
from .job import Job
from .queue import Queue

__all__ = [
    "ConnectionFailed",
    "InvalidJob",
    "Job",
    "JobDeleted",
    "JobLike",
    "JobRejected",
    "MigrationError",
    "PyqueueError",
    "Queue",
    "QueueLike",
    "QueueNotOpen",
    "SchemaNotReady",
]
