"""Publishing, working and awaiting results through a real PgBouncer that pools
by transaction (tests/pgbouncer.py), with and without a direct listen_dsn."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pgbouncer
import psycopg
import pytest

from pyqueue import Queue

WAIT = 60.0


@pytest.fixture(scope="module")
def bouncer(server: Any) -> Iterator[pgbouncer.PgBouncer]:
    started = pgbouncer.start_pgbouncer(server.dsn())
    if started is None:
        pytest.skip(
            f"PgBouncer is not installed at {pgbouncer.BINARY} "
            "(apt-get install pgbouncer, as .ci/run does)"
        )
    yield started
    started.stop()


@pytest.fixture
def pooled_dsn(bouncer: pgbouncer.PgBouncer, dsn: str) -> str:
    """The test database, through PgBouncer in transaction-pooling mode."""
    return bouncer.dsn(dsn)


def pooled_queue(make_queue: Callable[..., Queue], pooled_dsn: str, **options: Any):
    options.setdefault("poll_interval", 0.2)
    return make_queue(
        dsn=pooled_dsn, transaction_pooling=True, prepare_threshold=None, **options
    )


def add_handlers(queue: Queue) -> Queue:
    async def increment(n: int) -> int:
        return n + 1

    def fail(message: str) -> None:
        raise ValueError(message)

    queue.register("increment", increment)
    queue.register("fail", fail)
    return queue


def finished_order(db: psycopg.Connection[Any]) -> dict[str, list[int]]:
    """Per queue, job ids in the order they finished."""
    rows = db.execute(
        "SELECT queue, id FROM jobs WHERE status <> 'unfulfilled'"
        " ORDER BY finished_at, id"
    ).fetchall()
    order: dict[str, list[int]] = {}
    for queue, job_id in rows:
        order.setdefault(queue, []).append(job_id)
    return order


async def publish_and_await(queue: Queue, publisher: Queue) -> list[Any]:
    """Many jobs (each statement runs far more than 5 times, the point at which
    psycopg would prepare it), one by one and in bulk, over several queues."""
    single = [
        await publisher.publish("increment", n, queue_name=f"q{n % 4}")
        for n in range(24)
    ]
    bulk = await publisher.publish_many(
        [("increment", n) for n in range(100, 140)],
        queue_name=[f"q{n % 5}" for n in range(40)],
    )
    results = await asyncio.wait_for(
        asyncio.gather(*(job.done for job in [*single, *bulk])), WAIT
    )
    return list(results)


EXPECTED = [n + 1 for n in range(24)] + [n + 1 for n in range(100, 140)]


async def test_work_and_results_through_pgbouncer_with_a_direct_listen_dsn(
    make_queue: Callable[..., Queue],
    pooled_dsn: str,
    dsn: str,
    db: psycopg.Connection[Any],
) -> None:
    worker = add_handlers(
        pooled_queue(make_queue, pooled_dsn, listen_dsn=dsn, poll_interval=30.0)
    )
    publisher = pooled_queue(make_queue, pooled_dsn, listen_dsn=dsn, poll_interval=30)

    async with worker, publisher:
        results = await publish_and_await(worker, publisher)

    # With a poll interval of 30 s, finishing within WAIT took notifications.
    assert results == EXPECTED
    for ids in finished_order(db).values():
        assert ids == sorted(ids)


async def test_work_and_results_through_pgbouncer_alone_by_polling(
    make_queue: Callable[..., Queue],
    pooled_dsn: str,
    db: psycopg.Connection[Any],
) -> None:
    worker = add_handlers(pooled_queue(make_queue, pooled_dsn, concurrency=6))
    publisher = pooled_queue(make_queue, pooled_dsn)

    async with worker, publisher:
        results = await publish_and_await(worker, publisher)
        rejected = await publisher.publish("fail", "no", queue_name="q0")
        with pytest.raises(Exception) as caught:
            await asyncio.wait_for(rejected.done, WAIT)

    assert results == EXPECTED
    assert caught.value.error["type"] == "ValueError"  # type: ignore[attr-defined]
    for ids in finished_order(db).values():
        assert ids == sorted(ids)


async def test_default_prepared_statements_break_under_transaction_pooling(
    pooled_dsn: str,
) -> None:
    # Why prepare_threshold=None: psycopg prepares a statement on its 5th run,
    # on whichever server connection PgBouncer lent, and uses it on others.
    conns = [
        await psycopg.AsyncConnection.connect(pooled_dsn, autocommit=True)
        for _ in range(8)
    ]

    async def run(conn: psycopg.AsyncConnection[Any]) -> None:
        for n in range(20):
            await conn.execute("SELECT pg_sleep(0.001), %s::int", (n,))

    try:
        with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
            await asyncio.gather(*(run(conn) for conn in conns))
    finally:
        for conn in conns:
            await conn.close()


async def test_registration_through_pgbouncer_survives_reaping_and_ends_with_worker(
    make_queue: Callable[..., Queue],
    pooled_dsn: str,
    db: psycopg.Connection[Any],
) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow(_: Any) -> str:
        started.set()
        await release.wait()
        return "done"

    worker = pooled_queue(make_queue, pooled_dsn, worker_name="pooled-worker")
    worker.register("slow", slow)
    busy = pooled_queue(make_queue, pooled_dsn)  # other clients of the pool
    held_lock = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
        " AND objid = hashtext('pooled-worker')::oid"
    )

    async with worker, busy:
        job = await busy.publish("slow")
        await asyncio.wait_for(started.wait(), WAIT)
        for n in range(20):
            await busy.publish("other", n, queue_name=f"other{n}")
            db.execute("SELECT reap_claims()")
        claimed_by = db.execute(
            "SELECT worker FROM jobs WHERE id = %s", (job.id,)
        ).fetchone()
        lock_while_open = db.execute(held_lock).fetchone()
        release.set()
        assert await asyncio.wait_for(job.done, WAIT) == "done"

    # PgBouncer closes the pinned server connection with its client: the
    # registration does not linger on a connection lent to someone else.
    for _ in range(200):
        if db.execute(held_lock).fetchone() == (0,):
            break
        await asyncio.sleep(0.05)
    assert claimed_by == ("pooled-worker",)
    assert lock_while_open == (1,)
    assert db.execute(held_lock).fetchone() == (0,)


async def test_listening_through_a_pooler_by_mistake_logs_a_warning(
    make_queue: Callable[..., Queue],
    pooled_dsn: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    queue = make_queue(dsn=pooled_dsn, prepare_threshold=None)
    queue.register("increment", lambda n: n + 1)

    with caplog.at_level(logging.WARNING, logger="pyqueue"):
        async with queue:
            pass

    assert any("looks like a connection pooler" in r.message for r in caplog.records)


async def test_registration_through_pgbouncer_outlives_idle_in_transaction_timeout(
    make_queue: Callable[..., Queue],
    pooled_dsn: str,
    db: psycopg.Connection[Any],
) -> None:
    # The held transaction re-registers every claim_timeout / 4 seconds, which
    # keeps it from looking idle to the server's timeout: the same session
    # holds the registration throughout, and the running job keeps its claim.
    statement = db.execute(
        "SELECT format('ALTER DATABASE %I SET"
        " idle_in_transaction_session_timeout = %L', current_database(), '1s')"
    ).fetchone()
    assert statement is not None
    db.execute(statement[0])
    holder = (
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory'"
        " AND objid = hashtext('pinned-worker')::oid"
    )
    started = asyncio.Event()
    release = asyncio.Event()
    events: list[Any] = []

    async def slow(_: Any) -> str:
        started.set()
        await release.wait()
        return "done"

    worker = pooled_queue(
        make_queue, pooled_dsn, claim_timeout=2.0, worker_name="pinned-worker"
    )
    worker.register("slow", slow)
    worker.observe(events.append)

    async with worker:
        job = await worker.publish("slow")
        await asyncio.wait_for(started.wait(), WAIT)
        first_holder = db.execute(holder).fetchall()
        # Three times the timeout, reaping all along.
        for _ in range(10):
            db.execute("SELECT reap_claims()")
            await asyncio.sleep(0.3)
        last_holder = db.execute(holder).fetchall()
        release.set()
        assert await asyncio.wait_for(job.done, WAIT) == "done"

    assert len(first_holder) == 1
    assert last_holder == first_holder
    assert [type(event).__name__ for event in events] == ["JobStarted", "JobFinished"]
