"""Listener: one connection that LISTENs, and reconnects with backoff.

It hands each notification to a callback, and after every (re)connect runs a
setup callback (LISTEN, register the worker) and a "reconnected" callback, so
that whatever was missed while away is looked at again.

Between two reads of notifications, ``poke()`` has it run a reconfigure
callback on the connection (to LISTEN or UNLISTEN while it runs).

Behind a transaction-pooling proxy with no direct connection, a Listener
instead holds a session without listening: its setup runs in a transaction
that it keeps open (the proxy then pins one server connection to it) and
renews every ``keepalive_interval`` seconds.
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

# Linux never gives a process an id above 2**22 (PID_MAX_LIMIT); a proxy such
# as PgBouncer hands its clients a random one instead of the server's.
_MAX_SERVER_PID = 2**22


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
        connect_kwargs: dict[str, Any] | None = None,
        keepalive: Setup | None = None,
        keepalive_interval: float = 5.0,
        expect_direct: bool = True,
        reconfigure: Setup | None = None,
    ) -> None:
        self._dsn = dsn
        self._setup = setup
        self._reconfigure = reconfigure
        self._poked = asyncio.Event()
        self._connect_kwargs = connect_kwargs or {}
        self._keepalive = keepalive
        self._keepalive_interval = keepalive_interval
        # Warn once when a connection expected to be direct looks proxied.
        self._warned = not expect_direct or keepalive is not None
        self._on_notify = on_notify
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect and set up once (errors propagate), then listen in the background."""
        self._conn = await self._connect()
        await self._setup(self._conn)
        self._on_connected()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def start_soon(self) -> None:
        """Connect and listen in the background, retrying until it works."""
        self._task = asyncio.get_running_loop().create_task(self._run(first=True))

    def poke(self) -> None:
        """Run the reconfigure callback on the connection soon, between reads
        (after a reconnect, setup has done what it would)."""
        if self._reconfigure is not None:
            self._poked.set()

    async def stop(self) -> None:
        """Stop listening and close the connection (which ends its registration)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await _connection.connect(self._dsn, **self._connect_kwargs)
        if not self._warned and not 0 < conn.info.backend_pid <= _MAX_SERVER_PID:
            # LISTEN and a session lock through transaction pooling land on
            # whichever server connection the proxy picks, and stay there.
            self._warned = True
            logger.warning(
                "listening through what looks like a connection pooler (backend"
                " pid %d); if it pools by transaction, pass listen_dsn= a direct"
                " connection, or transaction_pooling=True",
                conn.info.backend_pid,
            )
        return conn

    async def _run(self, *, first: bool = False) -> None:
        backoff = Backoff()
        while True:
            try:
                if self._conn is None:
                    self._conn = await self._connect()
                    self._poked.clear()
                    await self._setup(self._conn)
                    if not first:
                        logger.info("listener reconnected")
                    first = False
                    self._on_connected()
                backoff.reset()
                if self._keepalive is not None:
                    while True:
                        await asyncio.sleep(self._keepalive_interval)
                        await self._keepalive(self._conn)
                await self._read(self._conn)
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

    async def _read(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Hand notifications on until the connection fails, and run the
        reconfigure callback whenever poke() asks: reading holds the
        connection, so it stops for that and starts again."""
        while True:
            if self._poked.is_set() and self._reconfigure is not None:
                self._poked.clear()
                await self._reconfigure(conn)
            reading = asyncio.ensure_future(self._hand_on(conn))
            poked = asyncio.ensure_future(self._poked.wait())
            try:
                await asyncio.wait(
                    [reading, poked], return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                poked.cancel()
                reading.cancel()
                # Between reads psycopg has no query running: a cancelled
                # read leaves the connection as it was.
                await asyncio.gather(reading, poked, return_exceptions=True)
            if not reading.cancelled():
                reading.result()  # the connection failed: raise why

    async def _hand_on(self, conn: psycopg.AsyncConnection[Any]) -> None:
        async for note in conn.notifies():
            self._on_notify(note.channel, note.payload)
