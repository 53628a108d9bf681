"""A worker process for reliability tests: runs a Queue until SIGTERM/SIGINT.

Usage: python worker.py DSN RUNLOG [--name N] [--claim-timeout S]
[--concurrency N] [--poll-interval S] [--reap-interval S] [--grace S]

Handlers (args are a dict with "n" and optional "seconds"):
  sleep   async, sleeps `seconds`
  block   plain def, blocks in time.sleep(`seconds`)
`--max-sleep` caps `seconds` (a stand-in worker that finishes at once).
Each appends "start <n> <pid>" and "end <n> <pid>" lines to RUNLOG and returns
{"n": n, "pid": pid}. Prints "ready" once open. The first signal closes the
Queue gracefully, a second one closes it with no grace; exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pyqueue import Queue


def note(runlog: str, line: str) -> None:
    """Append one line; O_APPEND writes this small are not interleaved."""
    fd = os.open(runlog, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def build(options: argparse.Namespace) -> Queue:
    queue = Queue(
        options.dsn,
        worker_name=options.name,
        claim_timeout=options.claim_timeout,
        concurrency=options.concurrency,
        poll_interval=options.poll_interval,
        reap_interval=options.reap_interval,
        shutdown_grace=options.grace,
    )
    pid = os.getpid()

    @queue.handler("sleep")
    async def sleep(args: dict[str, Any]) -> dict[str, Any]:
        note(options.runlog, f"start {args['n']} {pid}")
        await asyncio.sleep(min(args.get("seconds", 0), options.max_sleep))
        note(options.runlog, f"end {args['n']} {pid}")
        return {"n": args["n"], "pid": pid}

    @queue.handler("block")
    def block(args: dict[str, Any]) -> dict[str, Any]:
        note(options.runlog, f"start {args['n']} {pid}")
        time.sleep(min(args.get("seconds", 0), options.max_sleep))
        note(options.runlog, f"end {args['n']} {pid}")
        return {"n": args["n"], "pid": pid}

    return queue


async def main(options: argparse.Namespace) -> None:
    queue = build(options)
    await queue.open()
    print("ready", flush=True)

    loop = asyncio.get_running_loop()
    closing: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        grace = None if not closing else 0.0
        closing.append(loop.create_task(queue.close(grace=grace)))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    while not closing:
        await asyncio.sleep(0.05)
    while not all(task.done() for task in closing):
        await asyncio.gather(*closing)
    print("closed", flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("runlog")
    parser.add_argument("--name")
    parser.add_argument("--claim-timeout", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--reap-interval", type=float, default=2.0)
    parser.add_argument("--grace", type=float, default=30.0)
    parser.add_argument("--max-sleep", type=float, default=3600.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {os.getpid()} %(name)s %(levelname)s %(message)s",
    )
    asyncio.run(main(parse(sys.argv[1:])))
