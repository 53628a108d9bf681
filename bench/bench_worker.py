"""One benchmark worker process: a pyqueue.Queue with concurrency=10.

Protocol with bench/run.py over stdin/stdout, one line each:
  worker -> "ready"                  imports done, Queue built, not yet open
  run    -> "go"                     open the queue (the clock started already)
  worker -> "open <unix time>"       open() returned
  run    -> "stop"                   drained; close the queue and report
  worker -> "report <json>"          counters: stored-function calls by name,
                                     notifications by channel, CPU seconds;
                                     with --record-completions, when each
                                     job's completing call returned
The counters wrap Queue._call (count and wall time) and Queue._on_notify of
this process only, so that a benchmark can say how many round trips and
notifications a job costs without touching the package.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyqueue import Queue

# --record-completions: job id -> when the call that recorded its outcome
# returned (unix time), for W3's commit-to-done latency.
COMPLETED: dict[int, float] = {}
CALLS: collections.Counter[str] = collections.Counter()
CALL_SECONDS: collections.Counter[str] = collections.Counter()
NOTIFIES: collections.Counter[str] = collections.Counter()


def _count_calls(record_completions: bool) -> None:
    call = Queue._call
    on_notify = Queue._on_notify

    async def counting_call(self, name, *params):  # type: ignore[no-untyped-def]
        CALLS[name] += 1
        started = time.perf_counter()
        try:
            rows = await call(self, name, *params)
        finally:
            CALL_SECONDS[name] += time.perf_counter() - started
        if record_completions and name == "COMPLETE_AND_CLAIM_JOBS":
            returned = time.time()
            for job_id in params[1]:
                COMPLETED[job_id] = returned
        return rows

    def counting_notify(self, channel, payload):  # type: ignore[no-untyped-def]
        NOTIFIES[channel] += 1
        return on_notify(self, channel, payload)

    Queue._call = counting_call  # type: ignore[method-assign]
    Queue._on_notify = counting_notify  # type: ignore[method-assign]


async def increment(x):  # type: ignore[no-untyped-def]
    return x + 1


def increment_sync(x):  # type: ignore[no-untyped-def]
    return x + 1


async def stamp(x):  # type: ignore[no-untyped-def]
    # W3: the handler's start time travels back in the result, so the
    # publisher (same host, same clock) can compute publish-to-pickup.
    return {"n": x["n"] + 1, "started": time.time()}


async def serve(queue: Queue) -> None:
    await queue.open()
    print(f"open {time.time():.6f}", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # "stop"
    await queue.close(grace=5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--sync-handler", action="store_true")
    parser.add_argument("--profile", help="write cProfile stats to this file")
    parser.add_argument("--record-completions", action="store_true")
    options = parser.parse_args()

    _count_calls(options.record_completions)
    queue = Queue(options.dsn, concurrency=options.concurrency)
    queue.register("increment", increment_sync if options.sync_handler else increment)
    queue.register("stamp", stamp)
    print("ready", flush=True)
    sys.stdin.readline()  # "go"

    before = resource.getrusage(resource.RUSAGE_SELF)
    if options.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        asyncio.run(serve(queue))
        profiler.disable()
        profiler.dump_stats(options.profile)
    else:
        asyncio.run(serve(queue))
    after = resource.getrusage(resource.RUSAGE_SELF)
    report = {
        "pid": os.getpid(),
        "calls": dict(CALLS),
        "call_seconds": dict(CALL_SECONDS),
        "notifies": dict(NOTIFIES),
        "completed": COMPLETED,
        "cpu_user_s": after.ru_utime - before.ru_utime,
        "cpu_sys_s": after.ru_stime - before.ru_stime,
    }
    print("report " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
