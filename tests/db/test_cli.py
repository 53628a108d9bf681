"""The pyqueue command, run as a user runs it: a subprocess per command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

TASKS = textwrap.dedent(
    """
    import asyncio
    from pyqueue import Queue

    queue = Queue("postgresql://nobody@127.0.0.1:1/wrong", poll_interval=1.0,
                  shutdown_grace=600)

    @queue.handler("increment")
    async def increment(a):
        return a + 1

    @queue.handler("fail")
    def fail(a):
        raise ValueError(f"bad {a}")

    @queue.handler("sleep")
    async def sleep(seconds):
        await asyncio.sleep(seconds)

    def make_queue():
        return queue
    """
)


def pyqueue(*args: str, cwd: Path | None = None, **env: str):
    return subprocess.run(
        [sys.executable, "-m", "pyqueue", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, **env},
    )


def start_worker(tmp_path: Path, dsn: str, *args: str) -> subprocess.Popen[str]:
    (tmp_path / "tasks.py").write_text(TASKS)
    with (tmp_path / "worker.log").open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pyqueue", "worker", "--dsn", dsn, *args],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )


def wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pyqueue: error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


def test_worker_runs_jobs_published_from_the_command_line_and_stops_on_sigterm(
    tmp_path: Path, dsn: str
) -> None:
    worker = start_worker(tmp_path, dsn, "tasks:queue")
    try:
        published = pyqueue("publish", "increment", "41", "--wait", "--dsn", dsn)
        rejected = pyqueue("publish", "fail", '"x"', "--wait", "--dsn", dsn)
    finally:
        worker.send_signal(signal.SIGTERM)
        status = worker.wait(timeout=60)

    job_id, result = published.stdout.split()
    assert published.returncode == 0, published.stderr
    assert json.loads(result) == 42
    assert int(job_id) > 0
    assert rejected.returncode == 1
    assert rejected.stdout.strip().isdigit()
    assert rejected.stderr.strip().endswith("was rejected: ValueError: bad x")
    assert status == 0
    log = (tmp_path / "worker.log").read_text()
    assert "worker started for fail, increment, sleep" in log
    assert "worker stopped" in log
    assert "Traceback" not in log


def test_second_signal_gives_back_the_running_job_at_once(
    tmp_path: Path, dsn: str, db: psycopg.Connection[Any]
) -> None:
    worker = start_worker(tmp_path, dsn, "tasks:make_queue", "--concurrency", "2")
    log = tmp_path / "worker.log"
    job_id = int(pyqueue("publish", "sleep", "600", "--dsn", dsn).stdout)
    try:
        wait_for(
            lambda: db.execute("SELECT count(*) FROM running_jobs").fetchone() == (1,),
            "the job to run",
        )
        worker.send_signal(signal.SIGINT)
        wait_for(lambda: "received SIGINT" in log.read_text(), "the first signal")
        worker.send_signal(signal.SIGTERM)
        status = worker.wait(timeout=60)
    finally:
        worker.kill()

    assert status == 0
    assert db.execute(
        "SELECT status, worker FROM jobs WHERE id = %s", (job_id,)
    ).fetchone() == ("unfulfilled", None)
    assert "gave back 1 unfinished jobs" in log.read_text()


def test_migrate_then_publish_then_stats(empty_dsn: str) -> None:
    migrated = pyqueue("migrate", "--dsn", empty_dsn)
    again = pyqueue("migrate", "--dsn", empty_dsn)
    pyqueue("publish", "c", '{"a": 1}', "--queue", "emails", "--dsn", empty_dsn)
    stats = pyqueue("stats", "--json", "--dsn", empty_dsn)
    table = pyqueue("stats", "--dsn", empty_dsn)

    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.splitlines()[0] == "applied 0001_create_jobs"
    assert "nothing to apply" in again.stdout
    [emails] = json.loads(stats.stdout)
    assert emails["queue"] == "emails"
    assert (emails["waiting"], emails["running"], emails["resolved"]) == (1, 0, 0)
    assert emails["oldest_waiting_seconds"] >= 0
    assert table.stdout.splitlines()[2].split("|")[:3] == [
        " emails ",
        "       1 ",
        "       0 ",
    ]


def test_demo_prints_the_result_and_the_jobs_table_as_psql_does(
    empty_dsn: str,
) -> None:
    result = pyqueue("demo", "--dsn", empty_dsn)

    assert result.returncode == 0, result.stderr
    assert "result: 18" in result.stdout
    table = result.stdout.split("\n\n", 1)[1]
    psql = subprocess.run(
        ["psql", "-X", "-d", empty_dsn, "-c", "SELECT * FROM jobs ORDER BY id"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert table.rstrip("\n") == psql.stdout.rstrip("\n")
    assert result.stderr == ""


def test_demo_on_a_fresh_embedded_server(tmp_path: Path) -> None:
    env = {"PYQUEUE_EMBEDDED_DIR": str(tmp_path / "pgdata"), "PYQUEUE_DSN": ""}

    result = pyqueue("demo", **env)

    assert result.returncode == 0, result.stderr
    assert f"embedded PostgreSQL server in {tmp_path / 'pgdata'}" in result.stdout
    assert "result: 18" in result.stdout
    assert " increment | 17   | resolved |" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["stats", "--dsn", "not a dsn"], 2, "invalid --dsn"),
        (
            ["stats", "--dsn", "postgresql://u@127.0.0.1:1/x?connect_timeout=5"],
            1,
            "cannot connect to '127.0.0.1:1/x'",
        ),
        (["publish", "c", "{oops", "--dsn", "{dsn}"], 2, "ARGS_JSON is not valid"),
        (["worker", "no_such_module:queue", "--dsn", "{dsn}"], 2, "cannot import"),
        (["worker", "tasks", "--dsn", "{dsn}"], 2, "expected MODULE:ATTR"),
        (["worker", "tasks:nothing", "--dsn", "{dsn}"], 2, "has no attribute"),
        (["publish", "c", "1", "--dsn", "{empty}"], 1, "run: pyqueue migrate"),
        (["stats", "--dsn", "{empty}"], 1, "is not installed in schema 'public'"),
        (["stats", "--dsn", "{dsn}", "--schema", "nope"], 1, "schema 'nope'"),
    ],
)
def test_a_users_mistake_is_one_line_and_a_nonzero_exit(
    tmp_path: Path,
    dsn: str,
    empty_dsn: str,
    args: list[str],
    status: int,
    message: str,
) -> None:
    (tmp_path / "tasks.py").write_text(TASKS)
    argv = [a.replace("{dsn}", dsn).replace("{empty}", empty_dsn) for a in args]

    result = pyqueue(*argv, cwd=tmp_path)

    assert result.returncode == status, result.stderr
    assert message in one_error_line(result)


def test_a_schema_that_is_behind_names_the_command(dsn: str, db: Any) -> None:
    db.execute("DELETE FROM pyqueue_migrations WHERE version = 4")

    result = pyqueue("publish", "c", "1", "--dsn", dsn)

    assert result.returncode == 1
    assert one_error_line(result).endswith("run: pyqueue migrate --schema public")


def test_verbose_adds_the_traceback(empty_dsn: str) -> None:
    result = pyqueue("stats", "-v", "--dsn", empty_dsn)

    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("pyqueue: error: ")


def test_command_line_dsn_overrides_the_queue_and_env(tmp_path: Path, dsn: str) -> None:
    # tasks.py builds its Queue with an unreachable DSN; --dsn must win.
    worker = start_worker(tmp_path, dsn, "tasks:queue")
    try:
        published = pyqueue(
            "publish",
            "increment",
            "1",
            "--wait",
            "--dsn",
            dsn,
            PYQUEUE_DSN="postgresql://nobody@127.0.0.1:1/wrong",
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)

    assert published.returncode == 0, published.stderr
    assert published.stdout.split()[1] == "2"


def test_python_dash_m_pyqueue_shows_the_commands() -> None:
    result = pyqueue("--help")

    assert result.returncode == 0
    for command in ("migrate", "worker", "publish", "stats", "demo"):
        assert command in result.stdout


@pytest.mark.parametrize(
    ("command", "database"),
    [(["stats"], "dsn"), (["migrate", "--dry-run"], "empty_dsn")],
)
def test_output_into_a_pipe_nobody_reads_stops_quietly(
    request: pytest.FixtureRequest, command: list[str], database: str
) -> None:
    # `pyqueue ... | head -1` once head has exited: writing raises EPIPE,
    # for a short output (stats) when it is flushed, for a long one (every
    # migration's SQL) while it is written.
    dsn = request.getfixturevalue(database)
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pyqueue", *command, "--dsn", dsn],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)

    assert done.stderr == ""  # no "error: BrokenPipeError", no traceback
    assert done.returncode == 1
