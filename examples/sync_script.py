"""A plain synchronous script: publish inside a transaction, then wait.

The same calls work from a Flask or Django view holding a sync psycopg
connection. A worker runs the jobs; start one first::

    export PYQUEUE_DSN=postgresql://localhost/mydb
    pyqueue migrate
    pyqueue worker examples.tasks:queue &
    python -m examples.sync_script "the cat saw the other cat"
"""

from __future__ import annotations

import json
import os
import sys

import psycopg

from pyqueue import JobRejected, sync


def main(argv: list[str]) -> int:
    dsn = os.environ.get("PYQUEUE_DSN")
    if not dsn:
        print("set PYQUEUE_DSN to the database's connection string", file=sys.stderr)
        return 2
    text = " ".join(argv) or "to be or not to be"

    # One transaction: both jobs exist only if it commits, as would the rows
    # an application writes beside them.
    with psycopg.connect(dsn) as conn, conn.transaction():
        count_id = sync.publish(conn, "word-count", text)
        (increment_id,) = sync.publish_many(conn, [("increment", len(text))])
    print(f"published jobs {count_id} and {increment_id}")

    try:
        counts = sync.wait(count_id, dsn=dsn, timeout=30.0)
        length = sync.wait(increment_id, dsn=dsn, timeout=30.0)
    except TimeoutError as exc:
        print(f"{exc}; is a worker running?", file=sys.stderr)
        return 1
    except JobRejected as exc:
        print(f"{exc}", file=sys.stderr)
        return 1
    print(f"word counts: {json.dumps(counts, sort_keys=True)}")
    print(f"length plus one: {length}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
