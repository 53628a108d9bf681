"""Connecting, describing a server without its secrets, and backing off."""

from __future__ import annotations

import random
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .errors import ConnectionFailed

# Keepalives find a half-open connection (host lost, network cut) in about
# 10 + 3 * 5 seconds instead of the kernel's two hours.
CONNECT_KWARGS: dict[str, Any] = {
    "autocommit": True,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def describe(dsn: str) -> str:
    """Where `dsn` points, as host:port/dbname, never with its password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "an unparsable DSN"
    host = str(params.get("host") or "localhost")
    port = str(params.get("port") or "5432")
    return f"{host}:{port}/{params.get('dbname') or params.get('user') or ''}"


async def connect(dsn: str, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
    """Open one connection to `dsn`; raises ConnectionFailed with a remedy."""
    try:
        return await psycopg.AsyncConnection.connect(
            dsn, **{**CONNECT_KWARGS, **kwargs}
        )
    except psycopg.ProgrammingError as exc:
        raise ConnectionFailed(
            f"invalid DSN: {exc}; check --dsn or PYQUEUE_DSN"
        ) from exc
    except psycopg.OperationalError as exc:
        reason = failure_reason(exc)
        raise ConnectionFailed(
            f"cannot connect to {describe(dsn)!r}: {reason}; check --dsn or PYQUEUE_DSN"
        ) from exc


def failure_reason(exc: BaseException) -> str:
    """The gist of a failed connection attempt, for a one-line message.

    libpq says `connection to server at "db" (10.0.0.5), port 5432 failed:
    Connection refused`, then a hint on a line of its own; keep the reason.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return "no answer"
    reason = lines[0].rsplit("failed:", 1)[-1].strip() or lines[0]
    # The server's own refusals come as 'FATAL:  database "x" does not exist'.
    reason = reason.removeprefix("FATAL:").strip()
    if reason[1:2].isupper():
        return reason  # an acronym or a name: leave it as it is
    return reason[:1].lower() + reason[1:]


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is a lost or refused connection, worth retrying later."""
    if isinstance(exc, psycopg.OperationalError | ConnectionFailed):
        return True
    try:
        from psycopg_pool import PoolTimeout
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, PoolTimeout)


class Backoff:
    """Exponential delays with jitter, from `first` up to `cap` seconds."""

    def __init__(self, first: float = 0.05, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        """The delay before the next try; grows until reset()."""
        delay = min(self.cap, self.first * 2**self.attempt)
        self.attempt += 1
        return float(delay * random.uniform(0.5, 1.0))

    def reset(self) -> None:
        """Start again from the first delay, after a success."""
        self.attempt = 0
