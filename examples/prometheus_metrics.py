"""Prometheus metrics of a worker, fed by ``queue.observe``.

pyqueue depends on no metrics library: a Queue calls its observers with a
small event for every job it runs (JobStarted, then JobFinished, JobLostClaim
or JobAbandoned, with the handler's duration). ``JobMetrics`` turns them
into prometheus_client counters, a gauge and a histogram. Run it from the
repository root::

    PYQUEUE_DSN=postgresql://... python -m examples.prometheus_metrics

It works a few example jobs and prints the metrics; a long-running worker
would call ``prometheus_client.start_http_server(port)`` instead and let
Prometheus scrape them.
"""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from examples import tasks
from pyqueue import (
    JobAbandoned,
    JobEvent,
    JobFinished,
    JobLostClaim,
    JobRejected,
    JobStarted,
    Queue,
    QueueLike,
)


class JobMetrics:
    """An observer for ``queue.observe`` that counts jobs by category.

    Labels are the category and the status, never the queue: queue names are
    often per customer or per entity, and each label value is a time series.
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.started = Counter(
            "pyqueue_jobs_started",
            "Jobs whose handler started.",
            ["category"],
            registry=registry,
        )
        self.finished = Counter(
            "pyqueue_jobs_finished",
            "Jobs whose outcome was stored, by status.",
            ["category", "status"],
            registry=registry,
        )
        self.lost = Counter(
            "pyqueue_jobs_lost_claims",
            "Jobs whose outcome was discarded: the claim was lost meanwhile.",
            ["category"],
            registry=registry,
        )
        self.abandoned = Counter(
            "pyqueue_jobs_abandoned",
            "Jobs stopped without an outcome (shutdown); they run again.",
            ["category"],
            registry=registry,
        )
        self.running = Gauge(
            "pyqueue_jobs_running", "Jobs whose handler is running.", registry=registry
        )
        self.duration = Histogram(
            "pyqueue_job_duration_seconds",
            "Handler run time of jobs whose outcome was stored.",
            ["category", "status"],
            registry=registry,
        )

    def __call__(self, event: JobEvent) -> None:
        # Called on the event loop for every event: only cheap bookkeeping.
        match event:
            case JobStarted(category=category):
                self.started.labels(category).inc()
                self.running.inc()
            case JobFinished(category=category, status=status, duration=duration):
                self.finished.labels(category, status).inc()
                self.duration.labels(category, status).observe(duration)
                self.running.dec()
            case JobLostClaim(category=category):
                self.lost.labels(category).inc()
                self.running.dec()
            case JobAbandoned(category=category):
                self.abandoned.labels(category).inc()
                self.running.dec()


async def main(queue: QueueLike, registry: CollectorRegistry) -> str:
    """Work a few example jobs on `queue` and return its metrics as text."""
    queue.observe(JobMetrics(registry))
    async with queue:
        jobs = [await queue.publish("increment", n) for n in range(3)]
        jobs.append(await queue.publish("word-count", "to be or not to be"))
        # word_count needs a string: a number rejects the job.
        jobs.append(await queue.publish("word-count", 42))
        for job in jobs:
            with contextlib.suppress(JobRejected):
                await job.done
    return generate_latest(registry).decode()


if __name__ == "__main__":
    # $PYQUEUE_DSN, else the embedded server.
    metrics = asyncio.run(main(tasks.register(Queue()), CollectorRegistry()))
    print(*(line for line in metrics.splitlines() if "_created" not in line), sep="\n")
