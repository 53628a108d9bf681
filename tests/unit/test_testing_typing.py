"""Typing: both queues meet QueueLike, and a handler's return type reaches Job."""

from __future__ import annotations

from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

ROOT = Path(__file__).resolve().parents[2]

SNIPPET = """
from pyqueue import Job, JobLike, Queue, QueueLike
from pyqueue.testing import MemoryQueue


async def increment(a: int) -> int:
    return a + 1


def shout(text: str) -> str:
    return text.upper()


async def check(queue: QueueLike, real: Queue, memory: MemoryQueue) -> None:
    for q in (real, memory):
        q.register("increment", increment)
        q.register("shout", shout)
    a = await real.publish(increment, 1)
    reveal_type(a)
    b = await memory.publish(shout, "x")
    reveal_type(b)
    c = await queue.publish(increment, 1)
    reveal_type(c)
    reveal_type(await c.done)
    d = await real.publish("increment", 1)
    reveal_type(d)
    also: QueueLike = MemoryQueue()
    wrong: int = await (await queue.publish(shout, "x")).done
"""


def test_publish_by_handler_types_the_result_and_both_meet_the_protocol(
    tmp_path: Path,
) -> None:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET)

    stdout, _, _ = mypy_api.run(
        ["--strict", "--no-error-summary", "--hide-error-context", str(snippet)]
    )

    # Some mypy releases spell builtins out ("builtins.int"), others not.
    lines = [
        line.split(": ", 1)[1].replace("builtins.", "")
        for line in stdout.splitlines()
        if ": " in line
    ]
    assert lines == [
        'note: Revealed type is "pyqueue.job.Job[int]"',
        'note: Revealed type is "pyqueue.job.Job[str]"',
        'note: Revealed type is "pyqueue.interface.JobLike[int]"',
        'note: Revealed type is "int"',
        'note: Revealed type is "pyqueue.job.Job[Any]"',
        'error: Incompatible types in assignment (expression has type "str", '
        'variable has type "int")  [assignment]',
    ]
