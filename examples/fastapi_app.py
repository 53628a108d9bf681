"""A FastAPI app: the queue opens with the app, one endpoint publishes, one
awaits a result.

Run it from the repository root (with no $PYQUEUE_DSN, pyqueue starts an
embedded PostgreSQL server)::

    uvicorn examples.fastapi_app:app
    curl -X POST localhost:8000/jobs -H 'content-type: application/json' \\
        -d '{"category": "increment", "args": 17}'        # {"job_id": 1}
    curl 'localhost:8000/jobs/1?timeout=5'                 # {"status": "resolved", ...}

This process also works the jobs, because handlers are registered on its
queue; register none and it only publishes, for workers elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from pyqueue import InvalidJob, JobDeleted, JobRejected, Queue, QueueLike

from . import tasks


class NewJob(BaseModel):
    category: str
    args: Any = None
    queue_name: str = "default"


def create_app(queue: QueueLike) -> FastAPI:
    """The app around `queue`: a Queue in production, a MemoryQueue in tests."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with queue:
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/jobs", status_code=201)
    async def publish(new: NewJob) -> dict[str, int]:
        try:
            job = await queue.publish(new.category, new.args, queue_name=new.queue_name)
        except InvalidJob as exc:
            raise HTTPException(422, str(exc)) from exc
        return {"job_id": job.id}

    @app.post("/increment/{n}")
    async def increment(n: int) -> dict[str, int]:
        # Publishing with the handler itself types the result: Job[int].
        job = await queue.publish(tasks.increment, n, queue_name="increments")
        result: int = await job.done
        return {"job_id": job.id, "result": result}

    @app.get("/jobs/{job_id}")
    async def outcome(job_id: int, timeout: float = 10.0) -> dict[str, Any]:
        try:
            # Giving up here leaves the job, and other waiters, untouched.
            result = await asyncio.wait_for(queue.job(job_id).done, timeout)
        except TimeoutError:
            return {"job_id": job_id, "status": "unfulfilled"}
        except JobRejected as exc:
            return {"job_id": job_id, "status": "rejected", "error": exc.error}
        except JobDeleted as exc:
            raise HTTPException(404, f"no job {job_id}") from exc
        return {"job_id": job_id, "status": "resolved", "result": result}

    return app


app = create_app(tasks.register(Queue()))
