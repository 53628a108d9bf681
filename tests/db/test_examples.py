"""The examples run: the FastAPI app (on Queue and on MemoryQueue) and the
synchronous script against a `pyqueue worker` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from examples import fastapi_app, tasks  # noqa: E402
from pyqueue.testing import MemoryQueue  # noqa: E402

WAIT = 30.0


@pytest.fixture(params=["postgres", "memory"])
def example_queue(request: pytest.FixtureRequest) -> Any:
    """The example's handlers on the real queue, then on the in-memory one."""
    if request.param == "postgres":
        make_queue: Callable[..., Any] = request.getfixturevalue("make_queue")
        return tasks.register(make_queue())
    return tasks.register(MemoryQueue())


@pytest.fixture
async def client(example_queue: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the example app, inside the app's lifespan."""
    app = fastapi_app.create_app(example_queue)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://example") as http,
    ):
        yield http


async def test_app_publishes_then_reports_the_result(
    client: httpx.AsyncClient,
) -> None:
    published = await client.post("/jobs", json={"category": "increment", "args": 17})
    job_id = published.json()["job_id"]
    outcome = await client.get(f"/jobs/{job_id}", params={"timeout": WAIT})

    assert published.status_code == 201
    assert outcome.json() == {"job_id": job_id, "status": "resolved", "result": 18}


async def test_app_endpoint_awaits_its_own_job(client: httpx.AsyncClient) -> None:
    response = await client.post("/increment/41")

    assert response.status_code == 200
    assert response.json()["result"] == 42


async def test_app_reports_a_rejected_job_with_its_error(
    client: httpx.AsyncClient,
) -> None:
    published = await client.post("/jobs", json={"category": "word-count", "args": 5})
    job_id = published.json()["job_id"]
    outcome = (await client.get(f"/jobs/{job_id}", params={"timeout": WAIT})).json()

    assert outcome["status"] == "rejected"
    assert outcome["error"]["type"] == "AttributeError"


async def test_app_reports_a_job_still_waiting_and_can_ask_again(
    client: httpx.AsyncClient,
) -> None:
    published = await client.post(
        "/jobs", json={"category": "nobody-handles-this", "args": 1}
    )
    job_id = published.json()["job_id"]
    first = (await client.get(f"/jobs/{job_id}", params={"timeout": 0.2})).json()
    second = (await client.get(f"/jobs/{job_id}", params={"timeout": 0.2})).json()

    assert first == second == {"job_id": job_id, "status": "unfulfilled"}


async def test_app_refuses_bad_jobs_and_unknown_ids(client: httpx.AsyncClient) -> None:
    empty = await client.post("/jobs", json={"category": "", "args": 1})
    unknown = await client.get("/jobs/987654", params={"timeout": WAIT})

    assert empty.status_code == 422
    assert "must not be empty" in empty.json()["detail"]
    assert unknown.status_code == 404


def test_sync_script_publishes_and_waits_for_a_worker_process(dsn: str) -> None:
    env = {**os.environ, "PYQUEUE_DSN": dsn}
    worker = subprocess.Popen(
        [sys.executable, "-m", "pyqueue", "worker", "examples.tasks:queue"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        script = subprocess.run(
            [sys.executable, "-m", "examples.sync_script", "the cat saw the cat"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=2 * WAIT,
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        worker_output, _ = worker.communicate(timeout=WAIT)

    assert script.returncode == 0, script.stderr
    assert script.stdout.splitlines()[1:] == [
        'word counts: {"cat": 2, "saw": 1, "the": 2}',
        "length plus one: 20",
    ]
    assert worker.returncode == 0, worker_output
