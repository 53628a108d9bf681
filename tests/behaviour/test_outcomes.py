"""Results and errors, the same from Queue and MemoryQueue."""

from __future__ import annotations

import asyncio
import math
import threading
from typing import Any

import pytest

from pyqueue import InvalidJob, Job, JobDeleted, JobRejected, QueueNotOpen

ERROR_KEYS = {"type", "message", "traceback"}


async def test_async_handler_result_resolves_done(make_any_queue: Any) -> None:
    queue = make_any_queue()

    @queue.handler("increment")
    async def increment(a: int) -> int:
        return a + 1

    async with queue:
        job = await queue.publish("increment", 17, queue_name="increment-queue")
        result = await job.done

    assert result == 18
    assert isinstance(job, Job)


async def test_plain_handler_runs_in_a_thread(make_any_queue: Any) -> None:
    queue = make_any_queue()
    main_thread = threading.get_ident()

    @queue.handler("where")
    def where(args: Any) -> bool:
        return threading.get_ident() != main_thread

    async with queue:
        job = await queue.publish("where")
        ran_elsewhere = await job.done

    assert ran_elsewhere is True


async def test_handler_gets_args_as_json_gives_them_back(make_any_queue: Any) -> None:
    queue = make_any_queue()
    queue.register("echo", lambda args: args)

    async with queue:
        jobs = [
            await queue.publish("echo", (1, "two", None)),
            await queue.publish("echo", {1: 2.5}),
            await queue.publish("echo"),
        ]
        results = [await job.done for job in jobs]

    assert results == [[1, "two", None], {"1": 2.5}, None]


async def test_done_can_be_awaited_many_times(make_any_queue: Any) -> None:
    queue = make_any_queue()
    queue.register("echo", lambda args: args)

    async with queue:
        job = await queue.publish("echo", [1, "two", None])
        first = await job.done
        second = await job.done
        third = await queue.job(job.id).done

    assert first == second == third == [1, "two", None]


async def test_publish_by_registered_handler_uses_its_category(
    make_any_queue: Any,
) -> None:
    queue = make_any_queue()

    @queue.handler("double")
    async def double(a: int) -> int:
        return a * 2

    async with queue:
        job = await queue.publish(double, 21)
        result = await job.done

    assert result == 42


async def test_publish_by_unregistered_function_is_refused(
    make_any_queue: Any,
) -> None:
    queue = make_any_queue()
    queue.register("known", lambda args: args)

    async with queue:
        with pytest.raises(InvalidJob, match="not registered"):
            await queue.publish(lambda args: args, 1)


async def test_handler_exception_rejects_with_error_dict(make_any_queue: Any) -> None:
    queue = make_any_queue()

    @queue.handler("fail")
    async def fail(args: Any) -> None:
        raise ValueError(f"bad input {args!r}")

    async with queue:
        job = await queue.publish("fail", 3)
        with pytest.raises(JobRejected) as caught:
            await job.done

    error = caught.value.error
    assert caught.value.job_id == job.id
    assert set(error) >= ERROR_KEYS
    assert error["type"] == "ValueError"
    assert error["message"] == "bad input 3"
    assert 'raise ValueError(f"bad input {args!r}")' in error["traceback"]


async def test_failing_handler_does_not_stop_the_worker(make_any_queue: Any) -> None:
    queue = make_any_queue()

    def flaky(args: int) -> int:
        if args == 0:
            raise ZeroDivisionError("zero")
        return 10 // args

    queue.register("divide", flaky)

    async with queue:
        bad = await queue.publish("divide", 0)
        good = await queue.publish("divide", 5)
        with pytest.raises(JobRejected):
            await bad.done
        result = await good.done

    assert result == 2


async def test_unserializable_args_raise_before_anything_is_stored(
    make_any_queue: Any,
) -> None:
    queue = make_any_queue()

    async with queue:
        before = await queue.publish("nobody", 1)
        with pytest.raises(InvalidJob, match="not JSON-serializable"):
            await queue.publish("nobody", {"when": object()})
        with pytest.raises(InvalidJob, match="not JSON-serializable"):
            await queue.publish("nobody", math.nan)
        after = await queue.publish("nobody", 2)

    # Ids are drawn in publish order with no gaps: nothing was stored between.
    assert after.id == before.id + 1


async def test_empty_category_is_refused(make_any_queue: Any) -> None:
    queue = make_any_queue()

    async with queue:
        with pytest.raises(InvalidJob, match="must not be empty"):
            await queue.publish("", 1)
        with pytest.raises(InvalidJob, match="must not be empty"):
            await queue.publish_many([("ok", 1), ("", 2)])


@pytest.mark.parametrize("value", [{1, 2}, math.inf, b"bytes"])
async def test_unserializable_result_rejects_saying_so(
    make_any_queue: Any, value: Any
) -> None:
    queue = make_any_queue()
    queue.register("odd", lambda args: value)

    async with queue:
        job = await queue.publish("odd")
        with pytest.raises(JobRejected) as caught:
            await job.done

    assert caught.value.error["type"] == "TypeError"
    assert "not JSON-serializable" in caught.value.error["message"]


async def test_handler_past_its_timeout_rejects_with_timeout_error(
    make_any_queue: Any,
) -> None:
    queue = make_any_queue()

    @queue.handler("stuck", timeout=0.2)
    async def stuck(args: Any) -> None:
        await asyncio.Event().wait()  # never set: only the timeout ends it

    queue.register("quick", lambda args: "fine", timeout=30)

    async with queue:
        slow = await queue.publish("stuck", queue_name="a")
        fast = await queue.publish("quick", queue_name="b")
        with pytest.raises(JobRejected) as caught:
            await slow.done
        quick_result = await fast.done

    assert caught.value.error["type"] == "TimeoutError"
    assert "'stuck' timeout" in caught.value.error["message"]
    assert quick_result == "fine"


async def test_done_of_an_id_without_a_job_raises_job_deleted(
    make_any_queue: Any,
) -> None:
    queue = make_any_queue()

    async with queue:
        job = await queue.publish("nobody")
        with pytest.raises(JobDeleted) as caught:
            await queue.job(job.id + 1000).done

    assert caught.value.job_id == job.id + 1000


async def test_publish_needs_an_open_queue(make_any_queue: Any) -> None:
    queue = make_any_queue()

    with pytest.raises(QueueNotOpen):
        await queue.publish("anything", 1)
    with pytest.raises(QueueNotOpen):
        queue.job(1).done  # noqa: B018


async def test_register_after_open_is_refused(make_any_queue: Any) -> None:
    queue = make_any_queue()
    queue.register("b", print)
    queue.register("a", print)

    async with queue:
        with pytest.raises(RuntimeError, match="before the queue is opened"):
            queue.register("c", print)

    assert queue.categories == ["a", "b"]


async def test_handlers_own_timeout_error_is_its_outcome_not_the_timeout(
    make_any_queue: Any,
) -> None:
    queue = make_any_queue()

    @queue.handler("impatient", timeout=30)
    async def impatient(args: Any) -> None:
        raise TimeoutError("the upstream service did not answer")

    async with queue:
        job = await queue.publish("impatient")
        with pytest.raises(JobRejected) as caught:
            await job.done

    assert caught.value.error["type"] == "TimeoutError"
    assert caught.value.error["message"] == "the upstream service did not answer"


async def test_handler_raising_cancelled_error_rejects_and_worker_goes_on(
    make_any_queue: Any,
) -> None:
    queue = make_any_queue()

    @queue.handler("cancels")
    async def cancels(args: Any) -> None:
        raise asyncio.CancelledError("gave up")

    queue.register("echo", lambda args: args)

    async with queue:
        cancelled = await queue.publish("cancels", queue_name="q")
        after = await queue.publish("echo", "still here", queue_name="q")
        with pytest.raises(JobRejected) as caught:
            await asyncio.wait_for(asyncio.shield(cancelled.done), 30)
        result = await asyncio.wait_for(asyncio.shield(after.done), 30)

    assert caught.value.error["type"] == "CancelledError"
    assert result == "still here"
