"""The ``pyqueue`` command: migrate, worker, publish, stats and demo.

Every command takes ``--dsn`` (default ``$PYQUEUE_DSN``, else the embedded
server), ``--schema``, ``-v`` and ``-q``. A user's mistake is one line on
stderr and exit status 2 (misuse) or 1 (failure); a traceback only with -v.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.string import TextLoader

from . import _connection, _embedded, _sql, migrations
from .errors import InvalidJob, JobDeleted, JobRejected, PyqueueError
from .queue import ENV_DSN, Queue

logger = logging.getLogger(__name__)

EXIT_FAILURE = 1
EXIT_MISUSE = 2
EXIT_INTERRUPTED = 130

# Type oids psql right-aligns: integers, floats, numeric, oid.
_NUMERIC_OIDS = frozenset({20, 21, 23, 26, 700, 701, 1700})

# How long the demo waits for its job before saying the queue is stuck.
DEMO_TIMEOUT = 60.0


class UsageError(Exception):
    """The command line is wrong (exit 2): a bad argument, DSN or import path."""


class Failure(Exception):
    """The command could not do its work (exit 1), for a reason already worded."""


# -- entry point --------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pyqueue`` command with `argv` (default: sys.argv); return the
    exit status."""
    try:
        status = _run(argv)
        sys.stdout.flush()  # now, so that a closed pipe is caught below
        return status
    except BrokenPipeError:
        # Output piped into `head` or the like, which stopped reading: stop
        # quietly (the rest would go nowhere), as Python's docs advise.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = args.verbose - args.quiet
    _configure_logging(args.command, verbose)
    try:
        status: int = asyncio.run(args.run(args))
        return status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise
    except (UsageError, InvalidJob) as exc:
        return _report(exc, verbose, EXIT_MISUSE)
    except (Failure, PyqueueError) as exc:
        return _report(exc, verbose, EXIT_FAILURE)
    except Exception as exc:
        # Not a user's mistake: our bug, or the user's code failing at import.
        _report(exc, verbose, EXIT_FAILURE, unexpected=True)
        return EXIT_FAILURE


def _report(exc: BaseException, verbose: int, status: int, **kw: bool) -> int:
    if verbose > 0:
        traceback.print_exception(exc, file=sys.stderr)
    # One line, whatever the driver's message looks like.
    message = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    message = message or type(exc).__name__
    if kw.get("unexpected"):
        message = f"{type(exc).__name__}: {message}"
        if verbose <= 0:
            message += "; run with -v for the traceback"
    print(f"pyqueue: error: {message}", file=sys.stderr)
    return status


def _configure_logging(command: str, verbose: int) -> None:
    # The worker reports start, stop and reconnects by default; the other
    # commands print their results and stay quiet otherwise.
    base = logging.INFO if command == "worker" else logging.WARNING
    level = min(logging.CRITICAL, max(logging.DEBUG, base - 10 * verbose))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.addHandler(handler)
    # Other libraries only when asked: their view of a failure would repeat
    # the one line pyqueue prints.
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.CRITICAL)
    if verbose == 1:
        root.setLevel(logging.WARNING)
    logging.getLogger("pyqueue").setLevel(level)


# -- the parser ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pyqueue`` command and its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("database")
    where.add_argument(
        "--dsn",
        help=(
            "libpq connection string or URI of the server (default: $PYQUEUE_DSN, "
            "else the embedded server started on first use, its data in "
            f"{_embedded_dir()}; set ${_embedded.ENV_DIR} to move it)"
        ),
    )
    where.add_argument(
        "--schema",
        help="schema pyqueue is installed in (default: public)",
    )
    logs = common.add_argument_group("output")
    logs.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more (-v: debug lines and tracebacks; -vv: libraries too)",
    )
    logs.add_argument(
        "-q", "--quiet", action="count", default=0, help="log less (warnings only)"
    )

    parser = argparse.ArgumentParser(
        prog="pyqueue",
        description=(
            "A job queue that lives in PostgreSQL. Install its schema, run "
            "workers, publish jobs and watch the queues."
        ),
        epilog="Run 'pyqueue COMMAND --help' for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    migrate = commands.add_parser(
        "migrate",
        parents=[common],
        help="install or upgrade pyqueue's tables and functions",
        description=(
            "Apply the migrations the database lacks, each file in its own "
            "transaction, under an advisory lock (two migrators at once apply "
            "each file once). Refuses a database whose applied file differs "
            "from the shipped one. Applying sql/*.sql with 'psql -v "
            "ON_ERROR_STOP=1 -f' in name order is equivalent."
        ),
    )
    mode = migrate.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="print the SQL that would run, for psql or a DBA, and change nothing",
    )
    mode.add_argument(
        "--status",
        action="store_true",
        help="list each version: applied (when), pending, or differs",
    )
    migrate.set_defaults(run=cmd_migrate)

    worker = commands.add_parser(
        "worker",
        parents=[common],
        help="run the handlers of a Queue until SIGINT or SIGTERM",
        description=(
            "Import the Queue at MODULE:ATTR (or call the zero-argument function "
            "there that returns one) and work its registered categories. On "
            "SIGINT or SIGTERM, stop claiming, let running jobs finish within the "
            "Queue's shutdown_grace, give back the claims of the rest and exit 0; "
            "a second signal gives back the claims at once. --dsn and --schema "
            "override what the Queue was built with. Logs start, stop and "
            "reconnects (-v: one line per job)."
        ),
    )
    worker.add_argument("target", metavar="MODULE:ATTR", help="e.g. myapp.jobs:queue")
    worker.add_argument(
        "--concurrency",
        type=_positive_int,
        metavar="N",
        help="jobs (of different queues) run at once (default: the Queue's)",
    )
    worker.set_defaults(run=cmd_worker)

    publish = commands.add_parser(
        "publish",
        parents=[common],
        help="publish a job; print its id (and with --wait its result)",
        description=(
            "Publish a job of CATEGORY with the arguments ARGS_JSON (any JSON "
            "value: 17, '\"text\"', '{\"a\": 1}', null) and print its id. With "
            "--wait, print the result as JSON when the job resolves, or exit 1 "
            "with its error when it is rejected."
        ),
    )
    publish.add_argument("category", metavar="CATEGORY")
    publish.add_argument("args_json", metavar="ARGS_JSON")
    publish.add_argument(
        "--queue",
        default="default",
        metavar="NAME",
        help="queue to publish into (default: default)",
    )
    publish.add_argument(
        "--wait", action="store_true", help="wait for the job to finish"
    )
    publish.set_defaults(run=cmd_publish)

    stats = commands.add_parser(
        "stats",
        parents=[common],
        help="per queue: waiting, running, finished, oldest waiting age",
        description=(
            "Per queue: jobs waiting, running (with the worker and for how long), "
            "resolved and rejected, and how long the oldest waiting job has "
            "waited. Reads the view queue_stats, which psql can read too."
        ),
    )
    stats.add_argument("--json", action="store_true", help="print JSON for scripts")
    stats.set_defaults(run=cmd_stats)

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="the increment example end to end, then the jobs table",
        description=(
            "Migrate, register a handler 'increment', publish 17 to the queue "
            "'increment-queue', print the result (18), then the jobs table as "
            "psql prints it. Uses the embedded server unless --dsn or "
            "$PYQUEUE_DSN says otherwise."
        ),
    )
    demo.set_defaults(run=cmd_demo)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _embedded_dir() -> str:
    try:
        return str(_embedded.data_dir())
    except Exception:  # pragma: no cover - help text must never fail
        return "the user's data directory"


# -- shared steps -------------------------------------------------------------


def _schema(args: argparse.Namespace) -> str:
    schema: str = args.schema or "public"
    return schema


def _checked_dsn(dsn: str, *, source: str = "--dsn") -> str:
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unparsable"
        raise UsageError(
            f"invalid {source}: {reason}; pass a libpq URI or key=value string"
        ) from None
    return dsn


async def _resolve_dsn(args: argparse.Namespace) -> tuple[str, bool]:
    """The DSN to use and whether it is the embedded server's."""
    if args.dsn is not None:
        return _checked_dsn(args.dsn), False
    configured = os.environ.get(ENV_DSN)
    if configured:
        return _checked_dsn(configured, source=ENV_DSN), False
    return await asyncio.to_thread(_embedded.dsn), True


async def _ready_connection(
    args: argparse.Namespace,
) -> psycopg.AsyncConnection[Any]:
    """A connection to a schema with every migration applied. The embedded
    server is migrated here (as Queue.open does); any other is only checked."""
    dsn, embedded = await _resolve_dsn(args)
    conn = await _connection.connect(dsn)
    try:
        if embedded:
            await migrations.migrate(conn, schema=_schema(args))
        await migrations.check(conn, schema=_schema(args))
    except BaseException:
        await conn.close()
        raise
    return conn


# -- migrate ------------------------------------------------------------------


async def cmd_migrate(args: argparse.Namespace) -> int:
    """``pyqueue migrate [--dry-run | --status]``."""
    schema = _schema(args)
    dsn, _ = await _resolve_dsn(args)
    async with await _connection.connect(dsn) as conn:
        if args.status:
            states = await migrations.status(conn, schema=schema)
            print(
                format_table(
                    ["version", "name", "state", "applied_at"],
                    [
                        [
                            f"{s.version:04d}",
                            s.name,
                            s.state,
                            _timestamp(s.applied_at),
                        ]
                        for s in states
                    ],
                )
            )
            return 0

        if args.dry_run:
            todo = migrations.pending(
                await migrations.applied(conn, schema), schema=schema
            )
            if not todo:
                print(f"-- schema {schema!r} is up to date: nothing to apply")
                return 0
            names = ", ".join(f"{m.version:04d}_{m.name}" for m in todo)
            print(f"-- pyqueue migrate --dry-run, schema {schema!r}: {names}")
            print("-- apply with: psql -v ON_ERROR_STOP=1 -f THIS_FILE")
            sys.stdout.write(migrations.script(todo, schema=schema))
            return 0

        done = await migrations.migrate(conn, schema=schema)
    for migration in done:
        print(f"applied {migration.version:04d}_{migration.name}")
    if not done:
        print(f"schema {schema!r} is up to date: nothing to apply")
    return 0


# -- worker -------------------------------------------------------------------


def load_queue(target: str) -> Queue:
    """The Queue at `target` ("module:attr"), calling attr when it is a
    factory. Raises UsageError for a wrong path, Failure when importing the
    module raises."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise UsageError(
            f"expected MODULE:ATTR, got {target!r}; for example myapp.jobs:queue"
        )
    # As `python -m` does: modules in the current directory are importable.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise UsageError(
                f"cannot import {module_name!r}: no module named {missing!r}; "
                "check the path, the current directory and PYTHONPATH"
            ) from exc
        raise Failure(f"importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise Failure(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc

    found: Any = module
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise UsageError(
                f"module {module_name!r} has no attribute {attr!r}; "
                "name the Queue (or a function returning one) after the colon"
            ) from None
    if isinstance(found, Queue):
        return found
    if callable(found):
        try:
            inspect.signature(found).bind()
        except TypeError:
            raise UsageError(
                f"{target!r} needs arguments (a handler?), not a Queue; "
                "point at a Queue or a function that returns one"
            ) from None
        except ValueError:
            pass  # no signature to read (some built-ins): just call it
        try:
            made = found()
        except Exception as exc:
            raise Failure(
                f"calling {target!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if isinstance(made, Queue):
            return made
        raise UsageError(
            f"{target!r} returned a {type(made).__name__}, not a Queue; "
            "point at a Queue or a function that returns one"
        )
    raise UsageError(
        f"{target!r} is a {type(found).__name__}, not a Queue; "
        "point at a Queue or a function that returns one"
    )


def _apply_overrides(queue: Queue, args: argparse.Namespace) -> None:
    if args.dsn is not None:
        queue.dsn = _checked_dsn(args.dsn)
    if args.schema is not None:
        queue.schema = args.schema


async def cmd_worker(args: argparse.Namespace) -> int:
    """``pyqueue worker MODULE:ATTR``: work until SIGINT/SIGTERM, then close."""
    queue = load_queue(args.target)
    _apply_overrides(queue, args)
    if args.concurrency is not None:
        queue.concurrency = args.concurrency
    if not queue.categories:
        raise UsageError(
            f"the Queue at {args.target!r} has no handlers; register some with "
            "@queue.handler(category) in that module"
        )

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    hurrying = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        if not stopping.is_set():
            logger.info(
                "received %s; stopping (again to give back running jobs now)",
                signum.name,
            )
            stopping.set()
        else:
            logger.info("received %s again; giving back running jobs", signum.name)
            hurrying.set()

    handled = (signal.SIGINT, signal.SIGTERM)
    for signum in handled:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await queue.open()
        await stopping.wait()
        await _close(queue, hurrying)
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
    return 0


async def _close(queue: Queue, hurrying: asyncio.Event) -> None:
    # A second signal cuts the grace period short: close() is re-entrant.
    closing = asyncio.ensure_future(queue.close())
    hurry = asyncio.ensure_future(hurrying.wait())
    try:
        await asyncio.wait({closing, hurry}, return_when=asyncio.FIRST_COMPLETED)
        if not closing.done():
            await queue.close(grace=0)
        await closing
    finally:
        hurry.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hurry


# -- publish ------------------------------------------------------------------


async def cmd_publish(args: argparse.Namespace) -> int:
    """``pyqueue publish CATEGORY ARGS_JSON [--queue NAME] [--wait]``."""
    try:
        value = json.loads(args.args_json)
    except ValueError as exc:
        raise UsageError(
            f"ARGS_JSON is not valid JSON: {args.args_json!r} ({exc}); "
            "quote strings as '\"text\"'"
        ) from None
    if not args.category:
        raise UsageError("CATEGORY must not be empty")
    if not args.queue:
        raise UsageError("--queue must not be empty")

    queue = Queue(
        _checked_dsn(args.dsn) if args.dsn is not None else None,
        schema=_schema(args),
    )
    async with queue:
        job = await queue.publish(args.category, value, queue_name=args.queue)
        print(job.id, flush=True)
        if not args.wait:
            return 0
        try:
            result = await job.done
        except (JobRejected, JobDeleted) as exc:
            raise Failure(str(exc)) from exc
    print(json.dumps(result))
    return 0


# -- stats --------------------------------------------------------------------


async def cmd_stats(args: argparse.Namespace) -> int:
    """``pyqueue stats [--json]``: the view queue_stats, per queue."""
    async with await _ready_connection(args) as conn:
        cursor = await conn.execute(_sql.compose(_sql.QUEUE_STATS, _schema(args)))
        rows = await cursor.fetchall()

    if args.json:
        print(
            json.dumps(
                [
                    {
                        "queue": queue,
                        "waiting": waiting,
                        "running": running,
                        "worker": worker,
                        "running_since": since.isoformat() if since else None,
                        "resolved": resolved,
                        "rejected": rejected,
                        "oldest_waiting_seconds": oldest,
                    }
                    for (
                        queue,
                        waiting,
                        running,
                        worker,
                        since,
                        resolved,
                        rejected,
                        oldest,
                    ) in rows
                ],
                indent=2,
            )
        )
        return 0

    now = datetime.now().astimezone()
    print(
        format_table(
            [
                "queue",
                "waiting",
                "running",
                "worker",
                "running_for",
                "resolved",
                "rejected",
                "oldest_waiting",
            ],
            [
                [
                    queue,
                    str(waiting),
                    str(running),
                    worker or "",
                    _duration((now - since).total_seconds()) if since else "",
                    str(resolved),
                    str(rejected),
                    _duration(oldest) if oldest is not None else "",
                ]
                for (
                    queue,
                    waiting,
                    running,
                    worker,
                    since,
                    resolved,
                    rejected,
                    oldest,
                ) in rows
            ],
            right={1, 2, 4, 5, 6, 7},
        )
    )
    return 0


def _duration(seconds: float) -> str:
    """A short human duration: 4s, 2m05s, 3h07m, 2d04h."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _timestamp(value: datetime | None) -> str:
    return value.isoformat(sep=" ", timespec="seconds") if value else ""


# -- demo ---------------------------------------------------------------------


async def _increment(a: int) -> int:
    return a + 1


async def cmd_demo(args: argparse.Namespace) -> int:
    """``pyqueue demo``: the increment example, then the jobs table."""
    schema = _schema(args)
    dsn, embedded = await _resolve_dsn(args)
    if embedded:
        print(f"using the embedded PostgreSQL server in {_embedded.data_dir()}")

    async with await _connection.connect(dsn) as conn:
        done = await migrations.migrate(conn, schema=schema)
    names = ", ".join(f"{m.version:04d}_{m.name}" for m in done)
    print(f"migrated schema {schema!r}: {names or 'already up to date'}")

    queue = Queue(dsn, schema=schema)
    queue.register("increment", _increment)
    async with queue:
        job = await queue.publish("increment", 17, queue_name="increment-queue")
        print(f"published job {job.id}: increment(17) in queue 'increment-queue'")
        try:
            result = await asyncio.wait_for(job.done, DEMO_TIMEOUT)
        except TimeoutError:
            raise Failure(
                f"job {job.id} did not finish within {DEMO_TIMEOUT:.0f} s; "
                "an older job may block 'increment-queue': see pyqueue stats"
            ) from None
    print(f"result: {result}")
    print()

    async with await _connection.connect(dsn) as conn:
        print(await psql_table(conn, _sql.compose(_sql.JOBS_TABLE, schema)), end="")
    return 0


# -- psql's aligned format ----------------------------------------------------


async def psql_table(
    conn: psycopg.AsyncConnection[Any], query: psycopg.sql.Composed
) -> str:
    """Run `query` and lay out its rows as psql does (aligned, border 1), values
    in the server's own text form."""
    cursor = conn.cursor()
    # Every value as the server's text, exactly what psql shows.
    for type_name in (
        "int2",
        "int4",
        "int8",
        "float4",
        "float8",
        "numeric",
        "bool",
        "json",
        "jsonb",
        "timestamptz",
        "timestamp",
        "date",
        "interval",
        "uuid",
        "text",
    ):
        cursor.adapters.register_loader(type_name, TextLoader)
    await cursor.execute(query)
    description = cursor.description or []
    rows = await cursor.fetchall()
    return (
        format_table(
            [column.name for column in description],
            [["" if value is None else str(value) for value in row] for row in rows],
            right={
                i
                for i, column in enumerate(description)
                if column.type_code in _NUMERIC_OIDS
            },
        )
        + "\n"
    )


def format_table(
    columns: list[str], rows: list[list[str]], *, right: set[int] | None = None
) -> str:
    """`rows` of text under `columns`, aligned like psql's default output:
    centred headers, numbers (columns in `right`) right-aligned, a row count."""
    right = right or set()
    widths = [
        max([len(name)] + [len(row[i]) for row in rows])
        for i, name in enumerate(columns)
    ]
    header = " | ".join(
        " " * ((w - len(name)) // 2) + name + " " * ((w - len(name) + 1) // 2)
        for name, w in zip(columns, widths, strict=True)
    )
    lines = [f" {header} ", "+".join("-" * (w + 2) for w in widths)]
    last = len(columns) - 1
    for row in rows:
        cells = []
        for i, (value, w) in enumerate(zip(row, widths, strict=True)):
            if i in right:
                cells.append(value.rjust(w))
            elif i == last:
                cells.append(value)
            else:
                cells.append(value.ljust(w))
        lines.append(" " + " | ".join(cells))
    count = len(rows)
    lines.append(f"({count} {'row' if count == 1 else 'rows'})")
    return "\n".join(lines) + "\n"
