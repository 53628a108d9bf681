"""Where a job's time goes: worker CPU profile, handler kinds, claim plans.

Usage: python bench/breakdown.py [--jobs N] [--top N]

On its own throwaway server (default durability, as bench/run.py):
1. drains a W1-shaped run (100 queues) with the worker under cProfile and
   prints the top functions and the CPU split by package;
2. compares an async handler with a plain one (run in a thread pool);
3. EXPLAIN ANALYZEs every statement inside claim_next_job and complete_job
   (auto_explain, nested statements) at depth: 100 queues x 1,000 waiting
   jobs, then the same with 1,000,000 finished jobs in the table, and times
   the calls themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run
from run import Bench, drain, pgserver, progress, publish, reset


def cpu_profile(bench: Bench, jobs: int, top: int) -> None:
    dsn = bench.new_database("profile_cpu")
    reset(bench, dsn)
    publish(dsn, jobs, 100)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "worker.prof")
        figures = drain(bench, dsn, jobs, 1, profile=path)
        stats = pstats.Stats(path)
    print(f"\n== worker under cProfile: {figures['jobs_per_s']:.0f} jobs/s ==")
    print(f"per job: {figures['per_job']}")

    # Own time by package: where the worker's Python CPU goes.
    by_package: collections.Counter[str] = collections.Counter()
    total = 0.0
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _, name), (_, _, own, _, _) in raw.items():
        total += own
        if "/pyqueue/" in filename:
            key = "pyqueue"
        elif "psycopg_pool" in filename:
            key = "psycopg_pool"
        elif "psycopg" in filename:
            key = "psycopg"
        elif "asyncio" in filename or "selectors" in filename:
            key = "asyncio"
        elif filename.startswith("~"):
            key = (
                f"builtin {name}" if "select" in name or "poll" in name else "builtins"
            )
        elif "json" in filename:
            key = "json"
        else:
            key = "other"
        by_package[key] += own
    per_job = total / jobs * 1000
    print(f"own time by package ({total:.2f}s profiled, {per_job:.2f} ms/job):")
    for key, own in by_package.most_common():
        print(f"  {key:<28} {own / total * 100:5.1f}%  {own / jobs * 1000:6.3f} ms/job")
    print(f"top {top} functions by own time:")
    stats.sort_stats("tottime").print_stats(top)


def handler_kinds(bench: Bench, jobs: int) -> None:
    dsn = bench.new_database("profile_handlers")
    print("\n== async handler vs plain handler (thread pool) ==")
    for sync in (False, True, False, True):
        reset(bench, dsn)
        publish(dsn, jobs, 100)
        figures = drain(bench, dsn, jobs, 1, sync_handler=sync)
        print(
            f"  {'plain def' if sync else 'async def'}: "
            f"{figures['jobs_per_s']:.0f} jobs/s, worker CPU "
            f"{figures['per_job']['worker_cpu_ms']:.3f} ms/job"
        )


def explain_claims(bench: Bench, history: int) -> None:
    dsn = bench.new_database(f"profile_explain_{history}")
    label = f"100 queues x 1,000 waiting jobs, {history:,} finished"
    progress(f"explain: loading {label}")
    if history:
        bench.query(
            dsn,
            "INSERT INTO jobs (category, args, status, finished_at, queue, result)"
            " SELECT 'increment', to_jsonb(g), 'resolved', now(),"
            "  'q' || lpad((g %% 100)::text, 3, '0'), to_jsonb(g + 1)"
            " FROM generate_series(1, %s) AS g",
            (history,),
        )
    bench.query(
        dsn,
        "INSERT INTO jobs (category, args, queue)"
        " SELECT 'increment', to_jsonb(g), 'q' || lpad((g % 100)::text, 3, '0')"
        " FROM generate_series(1, 100000) AS g",
    )
    bench.query(dsn, "VACUUM ANALYZE jobs")
    bench.query(dsn, "VACUUM ANALYZE queue_heads")
    print(f"\n== claim_next_job at depth: {label} ==")

    with psycopg.connect(dsn, autocommit=True) as conn:
        # Timings with commits, moving through the queues, so the depth stays
        # and no dead row versions pile up (claiming and rolling back the same
        # head job again and again slows both calls down, an artefact).
        claim_ms, complete_ms = [], []
        for _ in range(300):
            started = time.perf_counter()
            row = conn.execute(
                "SELECT id FROM claim_next_job('profiler', ARRAY['increment'],"
                " interval '60 seconds')"
            ).fetchone()
            claim_ms.append((time.perf_counter() - started) * 1000)
            assert row is not None
            started = time.perf_counter()
            conn.execute(
                "SELECT complete_job(%s, 'profiler', 'resolved', '1')", (row[0],)
            )
            complete_ms.append((time.perf_counter() - started) * 1000)
        print(
            f"claim_next_job: median {statistics.median(claim_ms):.3f} ms,"
            f" p95 {run.percentile(claim_ms, 95):.3f} ms; complete_job: median"
            f" {statistics.median(complete_ms):.3f} ms (each a committed call from"
            " one client, round trip included)"
        )
        conn.autocommit = False

        notices: list[str] = []
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary))
        conn.execute("LOAD 'auto_explain'")
        conn.execute("SET auto_explain.log_min_duration = 0")
        conn.execute("SET auto_explain.log_analyze = on")
        conn.execute("SET auto_explain.log_buffers = on")
        conn.execute("SET auto_explain.log_nested_statements = on")
        conn.execute("SET auto_explain.log_level = notice")
        conn.execute("SET client_min_messages = notice")
        row = conn.execute(
            "SELECT id FROM claim_next_job('profiler', ARRAY['increment'],"
            " interval '60 seconds')"
        ).fetchone()
        assert row is not None
        print("-- plans inside claim_next_job (auto_explain, nested):")
        for note in notices:
            print(note.replace("\n", "\n   "))
        notices.clear()
        conn.execute("SELECT complete_job(%s, 'profiler', 'resolved', '1')", (row[0],))
        print("-- plans inside complete_job:")
        for note in notices:
            print(note.replace("\n", "\n   "))
        conn.rollback()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--skip", default="", help="cpu,handlers,explain to skip")
    options = parser.parse_args()
    skip = set(options.skip.split(","))

    bin_dir = os.environ.get("PYQUEUE_TEST_PG_BIN")
    server = pgserver.LocalServer(
        Path(bin_dir) if bin_dir else pgserver.embedded_bin_dir()
    ).start()
    try:
        bench = Bench(server)
        pgserver.create_database(bench.admin, "bench_template")
        asyncio.run(run._migrate(server.dsn("bench_template")))
        if "cpu" not in skip:
            cpu_profile(bench, options.jobs, options.top)
        if "handlers" not in skip:
            handler_kinds(bench, options.jobs // 2)
        if "explain" not in skip:
            explain_claims(bench, 0)
            explain_claims(bench, 1_000_000)
    finally:
        server.destroy()


if __name__ == "__main__":
    main()
