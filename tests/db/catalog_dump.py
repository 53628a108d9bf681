"""Dump what the migrations create in a schema as stable, reviewable text.

Tables with their columns and constraints, indexes, views with their columns,
functions with their signatures and properties, and triggers; each object's
schema name is written as ``<schema>`` so installations in different schemas
dump alike. Function and view bodies are left out: the sql/ diff shows them,
and their printed form differs between server versions.

``python tests/db/catalog_dump.py`` starts a throwaway server (as the tests
do), migrates an empty database and rewrites catalog_snapshot.txt beside this
file: ``make snapshot``.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

SNAPSHOT = Path(__file__).with_name("catalog_snapshot.txt")

_TABLES = """
SELECT c.relname, c.relkind
FROM pg_class AS c
WHERE c.relnamespace = %(schema)s::regnamespace AND c.relkind IN ('r', 'v', 'p')
ORDER BY c.relkind, c.relname
"""

_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
    pg_get_expr(d.adbin, d.adrelid), a.attidentity
FROM pg_attribute AS a
LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = %(relation)s::regclass
    AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

# Not-null constraints are columns' property above (PostgreSQL 18 also lists
# them in pg_constraint, older versions do not).
_CONSTRAINTS = """
SELECT con.conname, pg_get_constraintdef(con.oid)
FROM pg_constraint AS con
WHERE con.conrelid = %(relation)s::regclass
    AND con.contype IN ('p', 'u', 'c', 'f', 'x')
ORDER BY con.conname
"""

_INDEXES = """
SELECT i.indexname, i.indexdef
FROM pg_indexes AS i
WHERE i.schemaname = %(schema)s
ORDER BY i.tablename, i.indexname
"""

_FUNCTIONS = """
SELECT p.proname, pg_get_function_identity_arguments(p.oid),
    pg_get_function_result(p.oid), l.lanname, p.prokind, p.provolatile,
    p.proisstrict, p.prosecdef, p.proconfig
FROM pg_proc AS p
JOIN pg_language AS l ON l.oid = p.prolang
WHERE p.pronamespace = %(schema)s::regnamespace
ORDER BY p.proname, 2
"""

_TRIGGERS = """
SELECT t.tgname, pg_get_triggerdef(t.oid)
FROM pg_trigger AS t
JOIN pg_class AS c ON c.oid = t.tgrelid
WHERE c.relnamespace = %(schema)s::regnamespace AND NOT t.tgisinternal
ORDER BY c.relname, t.tgname
"""

_VOLATILITY = {"i": "IMMUTABLE", "s": "STABLE", "v": "VOLATILE"}


def dump(conn: psycopg.Connection[Any], schema: str) -> str:
    """The catalog text of pyqueue's objects in `schema`."""
    lines: list[str] = []
    params: dict[str, Any] = {"schema": schema}
    # Names on the path print unqualified, alike for every schema.
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    for table, kind in conn.execute(_TABLES, params).fetchall():
        lines.append(f"{'view' if kind == 'v' else 'table'} {table}")
        relation = _quote(schema) + "." + _quote(table)
        columns = conn.execute(_COLUMNS, {**params, "relation": relation}).fetchall()
        for name, type_, not_null, default, identity in columns:
            extra = " NOT NULL" if not_null else ""
            if identity:
                extra += " IDENTITY " + {"a": "ALWAYS", "d": "BY DEFAULT"}[identity]
            if default is not None:
                extra += f" DEFAULT {default}"
            lines.append(f"    column {name} {type_}{extra}")
        constraints = conn.execute(_CONSTRAINTS, {**params, "relation": relation})
        for name, definition in constraints.fetchall():
            lines.append(f"    constraint {name} {definition}")
    for name, definition in conn.execute(_INDEXES, params).fetchall():
        lines.append(f"index {name}: {definition}")
    for row in conn.execute(_FUNCTIONS, params).fetchall():
        name, args, result, language, kind, volatility, strict, definer, config = row
        props = [language, _VOLATILITY[volatility]]
        props += ["STRICT"] if strict else []
        props += ["SECURITY DEFINER"] if definer else []
        props += [f"SET {setting}" for setting in config or []]
        what = "procedure" if kind == "p" else "function"
        lines.append(f"{what} {name}({args}) RETURNS {result} {' '.join(props)}")
    for name, definition in conn.execute(_TRIGGERS, params).fetchall():
        lines.append(f"trigger {name}: {definition}")
    conn.execute("RESET search_path")
    return _neutral("\n".join(lines) + "\n", schema)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _neutral(text: str, schema: str) -> str:
    """`text` with the schema's name, bare or quoted, written as <schema>."""
    quoted = '"' + schema.replace('"', '""') + '"'
    text = text.replace(quoted + ".", "<schema>.")
    text = re.sub(rf"(?<![\w\"]){re.escape(schema)}\.", "<schema>.", text)
    return re.sub(
        rf"search_path={re.escape(quoted)}|search_path={re.escape(schema)}"
        r"(?=[, ]|$)",
        "search_path=<schema>",
        text,
        flags=re.M,
    )


async def _migrate(dsn: str, schema: str) -> None:
    from pyqueue import migrations

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await migrations.migrate(conn, schema=schema)


def write_snapshot() -> Path:
    """Migrate an empty database on a throwaway server and write the snapshot."""
    sys.path.insert(0, str(Path(__file__).parent.parent))
    import pgserver

    server = pgserver.start_server(settings={"fsync": "off"})
    try:
        pgserver.create_database(server.dsn(), "pyqueue_snapshot")
        dsn = server.dsn("pyqueue_snapshot")
        asyncio.run(_migrate(dsn, "public"))
        with psycopg.connect(dsn, autocommit=True) as conn:
            SNAPSHOT.write_text(dump(conn, "public"))
    finally:
        server.destroy()
    return SNAPSHOT


if __name__ == "__main__":
    print(write_snapshot())
