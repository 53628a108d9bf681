"""A throwaway PgBouncer in transaction-pooling mode, in front of the test server.

Debian's ``pgbouncer`` package provides /usr/sbin/pgbouncer (``.ci/run``
installs it); ``start_pgbouncer`` returns None when it is missing. PgBouncer
refuses to run as root, so as root it runs as tests/pgserver.py's
unprivileged account, with its files in a directory that account owns.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pgserver
from psycopg.conninfo import conninfo_to_dict, make_conninfo

BINARY = Path(os.environ.get("PYQUEUE_TEST_PGBOUNCER", "/usr/sbin/pgbouncer"))

# Transaction pooling is the mode that breaks LISTEN, session advisory locks
# and (before PgBouncer 1.21) server-side prepared statements. A small pool
# makes clients share server connections, as they do in production.
INI = """\
[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir =
auth_type = trust
auth_file = {base}/userlist.txt
pool_mode = transaction
default_pool_size = 4
max_client_conn = 400
ignore_startup_parameters = extra_float_digits
logfile = {base}/pgbouncer.log
pidfile = {base}/pgbouncer.pid
"""


class PgBouncer:
    """A running PgBouncer; ``dsn(direct)`` rewrites a server DSN to go through it."""

    def __init__(self, server_dsn: str) -> None:
        params = conninfo_to_dict(server_dsn)
        self.base = Path(tempfile.mkdtemp(prefix="pyqueue-pgbouncer-"))
        self.port = _free_port()
        # The password (if any) is what PgBouncer logs in to the server with.
        user = params.get("user") or "postgres"
        password = params.get("password") or ""
        (self.base / "userlist.txt").write_text(f'"{user}" "{password}"\n')
        (self.base / "pgbouncer.ini").write_text(
            INI.format(
                host=params.get("host") or "127.0.0.1",
                port=params.get("port") or 5432,
                listen_port=self.port,
                base=self.base,
            )
        )
        self.user = None
        if os.geteuid() == 0:
            self.user = pgserver._ensure_user(pgserver.SERVER_USER)
            uid = pwd.getpwnam(self.user).pw_uid
            for path in [self.base, *self.base.iterdir()]:
                os.chown(path, uid, -1)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> PgBouncer:
        """Start in the foreground of a child process; returns once it accepts."""
        self.process = subprocess.Popen(
            [str(BINARY), str(self.base / "pgbouncer.ini")],
            user=self.user,
            cwd=self.base,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited:\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"pgbouncer did not start:\n{self.log_tail()}")

    def dsn(self, direct: str) -> str:
        """`direct` (a DSN of the test server) rewritten to go through PgBouncer."""
        params = conninfo_to_dict(direct)
        params.update(host="127.0.0.1", port=str(self.port))
        return make_conninfo(**params)

    def stop(self) -> None:
        """Stop PgBouncer and delete its files."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.base / "pgbouncer.log").read_text()
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start_pgbouncer(server_dsn: str) -> PgBouncer | None:
    """A PgBouncer in front of `server_dsn`, or None when it is not installed."""
    if not BINARY.exists():
        return None
    return PgBouncer(server_dsn).start()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
