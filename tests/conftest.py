"""Test fixtures: one PostgreSQL server per run, a database per test.

The server is chosen by tests/pgserver.py. A template database is migrated
once from sql/; each test gets a fresh copy (CREATE DATABASE ... TEMPLATE).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import pgserver

from pyqueue import Queue, migrations
from pyqueue.testing import MemoryQueue

TEMPLATE = "pyqueue_template"
_server: pgserver.LocalServer | pgserver.ExternalServer | None = None
_counter = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    global _server
    if config.option.collectonly:
        return
    _server = pgserver.start_server(settings={"fsync": "off"})
    pgserver.create_database(_server.dsn(), TEMPLATE)
    asyncio.run(_migrate(_server.dsn(TEMPLATE)))


async def _migrate(dsn: str) -> None:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        await migrations.migrate(conn, schema="public")
    finally:
        await conn.close()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _server is not None:
        _server.destroy()


def pytest_report_header(config: pytest.Config) -> list[str]:
    if _server is None:
        return []
    kind = type(_server).__name__
    where = getattr(_server, "bin_dir", "external")
    return [f"postgresql: {pgserver.server_version(_server.dsn())} ({kind}, {where})"]


@pytest.fixture(scope="session")
def server() -> pgserver.LocalServer | pgserver.ExternalServer:
    assert _server is not None
    return _server


@pytest.fixture
def own_server(server: Any) -> pgserver.LocalServer:
    """The server, for tests that restart it; skipped on a server we did not start."""
    if not server.restartable:
        pytest.skip("needs a server this run started (PYQUEUE_TEST_DSN or Docker set)")
    return server  # type: ignore[no-any-return]


@pytest.fixture
def empty_dsn(server: Any) -> Iterator[str]:
    """A DSN of a fresh, empty database (nothing migrated)."""
    name = f"pyqueue_test_{os.getpid()}_{next(_counter)}"
    pgserver.create_database(server.dsn(), name)
    yield server.dsn(name)
    pgserver.drop_database(server.dsn(), name)


@pytest.fixture
def dsn(server: Any) -> Iterator[str]:
    """A DSN of a fresh database with pyqueue migrated into public."""
    name = f"pyqueue_test_{os.getpid()}_{next(_counter)}"
    pgserver.create_database(server.dsn(), name, template=TEMPLATE)
    yield server.dsn(name)
    pgserver.drop_database(server.dsn(), name)


@pytest.fixture
def db(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test database, for arranging and asserting."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
async def make_queue(dsn: str) -> AsyncIterator[Callable[..., Queue]]:
    """Build Queues on the test database, with quick timings; closed after the test."""
    made: list[Queue] = []

    def make(**options: Any) -> Queue:
        options.setdefault("poll_interval", 5.0)
        options.setdefault("shutdown_grace", 5.0)
        queue = Queue(options.pop("dsn", dsn), **options)
        made.append(queue)
        return queue

    yield make
    for queue in made:
        await queue.close(grace=1.0)


@pytest.fixture
async def make_memory_queue() -> AsyncIterator[Callable[..., MemoryQueue]]:
    """Build MemoryQueues; closed after the test."""
    made: list[MemoryQueue] = []

    def make(**options: Any) -> MemoryQueue:
        options.setdefault("shutdown_grace", 5.0)
        queue = MemoryQueue(**options)
        made.append(queue)
        return queue

    yield make
    for queue in made:
        await queue.close(grace=1.0)


@pytest.fixture(params=["postgres", "memory"])
def make_any_queue(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """A factory of Queues (the real one, then the in-memory one)."""
    if request.param == "postgres":
        factory: Callable[..., Any] = request.getfixturevalue("make_queue")
    else:
        factory = request.getfixturevalue("make_memory_queue")
    return factory
