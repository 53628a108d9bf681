"""Soak: many jobs, killed workers and a server restart; count what went wrong.

Starts its own PostgreSQL server (tests/pgserver.py), publishes --jobs jobs
over --queues queues while --workers worker processes (tests/workers/worker.py)
run them, SIGKILLs a random worker every --kill-every seconds (and starts a
replacement), restarts the server once, then prints: published, resolved,
rejected, lost (must be 0), outcomes recorded twice (must be 0), FIFO
violations (must be 0) and handler re-runs (expected only for jobs whose
worker was killed, or whose claim a restart cut). Exits 1 when a must-be-0
count is not. Not part of `make test`: run `make soak`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import pgserver  # noqa: E402
from workers import audit  # noqa: E402
from workers.procs import WorkerProcess, runs  # noqa: E402

from pyqueue import migrations  # noqa: E402


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--queues", type=int, default=50)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--kill-every", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args()


async def migrate(dsn: str) -> None:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        await migrations.migrate(conn, schema="public")
    finally:
        await conn.close()


class Soak:
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.random = random.Random(options.seed)
        self.dir = Path(tempfile.mkdtemp(prefix="pyqueue-soak-"))
        bin_dir = os.environ.get("PYQUEUE_TEST_PG_BIN")
        self.server = pgserver.LocalServer(
            Path(bin_dir) if bin_dir else pgserver.embedded_bin_dir(),
            settings={"fsync": "off", "max_connections": "300"},
        )
        self.workers: list[WorkerProcess] = []
        self.killed: set[int] = set()
        self.published: list[int] = []  # ids the publisher saw committed
        self.publish_failures = 0
        self.restarted = threading.Event()
        self.lock = threading.Lock()
        self.serial = 0

    @property
    def dsn(self) -> str:
        return self.server.dsn("soak")

    def start_worker(self) -> None:
        with self.lock:
            self.serial += 1
            name = f"soak-{self.serial}"
        worker = WorkerProcess(
            self.dsn,
            self.dir,
            name,
            concurrency=self.options.concurrency,
            claim_timeout=30,
            poll_interval=1.0,
            grace=5,
        ).wait_ready()
        with self.lock:
            self.workers.append(worker)

    def kill_one(self) -> None:
        with self.lock:
            alive = [w for w in self.workers if w.proc.poll() is None]
            if not alive:
                return
            victim = self.random.choice(alive)
            self.workers.remove(victim)
        victim.signal(signal.SIGKILL)
        victim.wait_exit()
        self.killed.add(victim.pid)
        victim.stop()
        self.start_worker()

    def publish(self) -> None:
        options = self.options
        conn: psycopg.Connection[object] | None = None
        n = 0
        while n < options.jobs:
            size = min(options.batch, options.jobs - n)
            args = [f'{{"n": {n + i}}}' for i in range(size)]
            queues = [f"q{(n + i) % options.queues}" for i in range(size)]
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True)
                rows = conn.execute(
                    "SELECT publish_jobs(%s::text[], %s::jsonb[], %s::text[])",
                    (["sleep"] * size, args, queues),
                ).fetchall()
            except psycopg.OperationalError:
                # Not known to be committed; the table will tell (n moves on,
                # so a batch that did commit is not confused with its retry).
                self.publish_failures += 1
                conn = None
                n += size
                time.sleep(0.2)
                continue
            self.published.extend(row[0] for row in rows)
            n += size
            time.sleep(0.01)

    def restart(self) -> None:
        print("restarting the server (fast)", flush=True)
        self.server.restart("fast")
        print("server back", flush=True)

    def progress(self) -> tuple[int, int]:
        """(unfinished, finished) jobs; (-1, -1) while the server is away."""
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'unfulfilled'),"
                    " count(*) FILTER (WHERE status <> 'unfulfilled') FROM jobs"
                ).fetchone()
        except psycopg.OperationalError:
            return -1, -1
        return (int(row[0]), int(row[1])) if row else (-1, -1)

    def run(self) -> int:
        options = self.options
        self.server.start()
        pgserver.create_database(self.server.dsn(), "soak")
        asyncio.run(migrate(self.dsn))
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            audit.install(conn)
        print(
            f"soak: {options.jobs} jobs, {options.queues} queues, "
            f"{options.workers} workers x {options.concurrency}, kill every "
            f"{options.kill_every}s, server {self.server.base}",
            flush=True,
        )
        started = time.monotonic()
        try:
            for _ in range(options.workers):
                self.start_worker()
            publisher = threading.Thread(target=self.publish)
            publisher.start()
            next_kill = time.monotonic() + options.kill_every
            last_report = 0.0
            while True:
                now = time.monotonic()
                if now - started > options.timeout:
                    print("timed out", flush=True)
                    break
                left, finished = self.progress()
                if not self.restarted.is_set() and finished >= options.jobs // 2:
                    # Once, half way through the work, in the middle of it.
                    self.restarted.set()
                    threading.Thread(target=self.restart, daemon=True).start()
                if now >= next_kill:
                    self.kill_one()
                    next_kill = now + options.kill_every
                if now - last_report > 10:
                    last_report = now
                    print(
                        f"  {now - started:6.0f}s published {len(self.published)}"
                        f" unfinished {left} killed {len(self.killed)}",
                        flush=True,
                    )
                if not publisher.is_alive() and left == 0:
                    break
                time.sleep(0.5)
            publisher.join()
            elapsed = time.monotonic() - started
            return self.report(elapsed)
        finally:
            for worker in self.workers:
                worker.signal(signal.SIGTERM)
            for worker in self.workers:
                try:
                    worker.wait_exit(30)
                finally:
                    worker.stop()
            self.server.destroy()

    def report(self, elapsed: float) -> int:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            counts = dict(
                conn.execute("SELECT status, count(*) FROM jobs GROUP BY status")
            )
            present = {row[0] for row in conn.execute("SELECT id FROM jobs")}
            trail = audit.read(conn)
        published = sum(counts.values())
        missing = [i for i in self.published if i not in present]
        lost = len(missing) + counts.get("unfulfilled", 0)

        starts: dict[int, list[int]] = defaultdict(list)
        for event, n, pid in runs(self.dir / "runs.log"):
            if event == "start":
                starts[n].append(pid)
        reruns = Counter[str]()
        for pids in starts.values():
            for pid in pids[:-1]:
                reruns["killed" if pid in self.killed else "other"] += 1

        lines = [
            f"elapsed                    {elapsed:.1f}s",
            f"published                  {published}"
            f" (publisher saw {len(self.published)} commit;"
            f" {self.publish_failures} batches failed)",
            f"resolved                   {counts.get('resolved', 0)}",
            f"rejected                   {counts.get('rejected', 0)}",
            f"lost                       {lost}",
            f"outcomes recorded twice    {len(trail.finished_twice)}",
            f"FIFO violations            {len(trail.fifo_violations)}",
            f"handler re-runs            {sum(reruns.values())}"
            f" (worker killed: {reruns['killed']}, other: {reruns['other']})",
            f"workers killed             {len(self.killed)}",
            f"throughput                 {published / elapsed:.0f} jobs/s",
        ]
        print("\n".join(lines))
        for violation in trail.fifo_violations[:10]:
            print("  FIFO:", violation)
        bad = lost or trail.finished_twice or trail.fifo_violations
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(Soak(parse()).run())
