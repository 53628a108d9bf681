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
from .worker import (
    JobAbandoned,
    JobEvent,
    JobFinished,
    JobLostClaim,
    JobStarted,
    Observer,
)

__all__ = [
    "ConnectionFailed",
    "InvalidJob",
    "Job",
    "JobAbandoned",
    "JobDeleted",
    "JobEvent",
    "JobFinished",
    "JobLike",
    "JobLostClaim",
    "JobRejected",
    "JobStarted",
    "MigrationError",
    "Observer",
    "PyqueueError",
    "Queue",
    "QueueLike",
    "QueueNotOpen",
    "SchemaNotReady",
]
