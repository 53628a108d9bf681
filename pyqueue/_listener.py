"""Listener: one connection that LISTENs, and reconnects with backoff.

It hands each notification to a callback, and after every (re)connect runs a
setup callback (LISTEN, register the worker) and a "reconnected" callback, so
that whatever was missed while away is looked at again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from . import _connection
from ._connection import Backoff, is_transient

logger = logging.getLogger(__name__)

Setup = Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]


class Listener:
    """Keeps one LISTENing connection alive and dispatches its notifications."""

    def __init__(
        self,
        dsn: str,
        *,
        setup: Setup,
        on_notify: Callable[[str, str], None],
        on_connected: Callable[[], None],
        on_disconnected: Callable[[], None],
    ) -> None:
        self._dsn = dsn
        self._setup = setup
        self._on_notify = on_notify
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect and set up once (errors propagate), then listen in the background."""
        self._conn = await _connection.connect(self._dsn)
        await self._setup(self._conn)
        self._on_connected()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def start_soon(self) -> None:
        """Connect and listen in the background, retrying until it works."""
        self._task = asyncio.get_running_loop().create_task(self._run(first=True))

    async def stop(self) -> None:
        """Stop listening and close the connection (which ends its registration)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _run(self, *, first: bool = False) -> None:
        backoff = Backoff()
        while True:
            try:
                if self._conn is None:
                    self._conn = await _connection.connect(self._dsn)
                    await self._setup(self._conn)
                    if not first:
                        logger.info("listener reconnected")
                    first = False
                    self._on_connected()
                backoff.reset()
                async for note in self._conn.notifies():
                    self._on_notify(note.channel, note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not is_transient(exc) and not isinstance(exc, psycopg.Error):
                    logger.error("listener failed", exc_info=True)
                if self._conn is not None:
                    logger.info("listener connection lost; reconnecting: %s", exc)
                    self._on_disconnected()
                    await self._conn.close()
                    self._conn = None
                await asyncio.sleep(backoff.next_delay())
