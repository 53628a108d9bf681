"""Claims the worker must not strand or spin on: a claim whose reply was
lost, an expired claim of a category this worker cannot run, a claim for a
slot the last call already claimed for, and the jobs published while a
worker that had been full starts listening again."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import psycopg

from pyqueue import Queue


class ReplyLosingQueue(Queue):
    """A Queue whose first successful claim loses its reply, as when the
    connection drops between the claim's commit and its answer."""

    calls: Counter[str]

    async def _call(self, name: str, *params: Any) -> list[tuple[Any, ...]]:
        rows = await super()._call(name, *params)
        self.calls[name] += 1
        claimed = any(row[0] == "claimed" for row in rows)
        if name == "COMPLETE_AND_CLAIM_JOBS" and claimed and not self.calls["lost"]:
            self.calls["lost"] += 1
            raise psycopg.OperationalError("server closed the connection")
        return rows


async def test_claim_whose_reply_was_lost_is_given_back_not_stranded(
    dsn: str, db: psycopg.Connection[Any]
) -> None:
    # Neither expiry nor reaping can free the claim: only the worker itself.
    queue = ReplyLosingQueue(dsn, claim_timeout=3600, poll_interval=0.2)
    queue.calls = Counter()
    queue.register("increment", lambda n: n + 1)

    async with queue:
        job = await queue.publish("increment", 1)
        assert await asyncio.wait_for(job.done, 30) == 2

    assert queue.calls["lost"] == 1
    row = db.execute("SELECT attempts FROM jobs WHERE id = %s", (job.id,)).fetchone()
    assert row == (2,)


async def test_expired_claim_of_a_foreign_category_does_not_make_workers_spin(
    dsn: str, db: psycopg.Connection[Any]
) -> None:
    # A live worker (this session holds its liveness lock) whose claim on a
    # job this Queue cannot run has expired: nobody reaps or re-claims it.
    db.execute("SELECT register_worker('ghost')")
    db.execute("SELECT publish_job('foreign', NULL, 'x')")
    db.execute("SELECT claim_next_job('ghost', NULL, interval '0 seconds')")
    queue = ReplyLosingQueue(dsn, poll_interval=5.0, reap_interval=0.1)
    queue.calls = Counter()
    queue.calls["lost"] = 1  # lose nothing
    queue.register("mine", lambda args: None)

    async with queue:
        while not queue.calls["REAP_CLAIMS"]:
            await asyncio.sleep(0.05)
        # Work (which wakes the worker) after a reap saw the expired claim.
        await asyncio.wait_for((await queue.publish("mine")).done, 30)
        before = queue.calls["COMPLETE_AND_CLAIM_JOBS"]
        await asyncio.sleep(1.5)
        claims = queue.calls["COMPLETE_AND_CLAIM_JOBS"] - before

    # Without news, a worker looks again after poll_interval, not every few
    # milliseconds because an expiry it cannot act on lies in the past.
    assert claims <= 5


async def test_idle_worker_makes_one_call_to_claim_and_one_to_record_a_job(
    dsn: str,
) -> None:
    queue = ReplyLosingQueue(dsn, poll_interval=30.0, reap_interval=30.0)
    queue.calls = Counter()
    queue.calls["lost"] = 1  # lose nothing
    queue.register("increment", lambda n: n + 1)

    async with queue:
        await asyncio.wait_for((await queue.publish("increment", 0)).done, 30)
        before = queue.calls["COMPLETE_AND_CLAIM_JOBS"]
        for n in range(1, 21):
            job = await queue.publish("increment", n)
            assert await asyncio.wait_for(job.done, 30) == n + 1
        calls = queue.calls["COMPLETE_AND_CLAIM_JOBS"] - before

    # Per job: the claim its notification starts, and the call that records
    # its outcome (and claims for the slot it frees, finding nothing). A
    # third call, claiming again for that slot, would find nothing either.
    assert calls <= 2 * 20 + 1


class SlowToListenQueue(Queue):
    """A Queue whose worker's LISTEN, when it turns notifications back on,
    comes 0.3 s late; it records what its listening connection did."""

    heard: list[bool]
    turned_back_on: asyncio.Event

    async def _listen_for_work(self, conn: Any) -> None:
        if self._jobs_news_wanted and not self._hearing_jobs and self.heard:
            self.turned_back_on.set()
            await asyncio.sleep(0.3)
        await super()._listen_for_work(conn)
        self.heard.append(self._hearing_jobs)


async def test_worker_full_for_a_while_stops_listening_and_misses_nothing_after(
    dsn: str,
) -> None:
    queue = SlowToListenQueue(dsn, concurrency=2, poll_interval=30.0)
    queue.heard = []
    queue.turned_back_on = asyncio.Event()

    async def slow(n: int) -> int:
        await asyncio.sleep(0.02)
        return n + 1

    queue.register("slow", slow)
    async with queue:
        # Two slots, 60 jobs over 30 queues: full for about 0.6 s.
        jobs = await queue.publish_many(
            [("slow", n) for n in range(60)],
            queue_name=[f"q{n % 30}" for n in range(60)],
        )
        for job in jobs:
            await asyncio.wait_for(job.done, 30)
        # Its first short claim turns notifications back on; a job published
        # before its LISTEN takes effect is announced to nobody here.
        await asyncio.wait_for(queue.turned_back_on.wait(), 10)
        late = await queue.publish("slow", 100, queue_name="late")
        # Claimed by the claim made once LISTEN took effect, not at the poll.
        assert await asyncio.wait_for(late.done, 5) == 101

    assert False in queue.heard  # it did stop listening while full
    assert queue.heard[-1] is True
