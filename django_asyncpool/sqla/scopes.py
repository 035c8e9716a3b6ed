"""The scopes the async pool hands out: sessions, and raw connections on the fast path.

:class:`SessionScope` is ``session_scope()``, :class:`ConnectionLease` is
``connection()``; the read-only scope and its fast path are in :mod:`.readonly`.
Also here: what a scope does with a connection that is lost or cancelled
(:func:`discard`), and which errors a transaction is run again for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import asyncpg
import sqlalchemy.exc
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.util.concurrency import greenlet_spawn

from ..errors import ConnectionLost
from .dual import dual
from .engines import is_lost, lost_error

if TYPE_CHECKING:
    from .engines import LoopState  # annotations only: what pool.for_loop() returns

__all__ = [
    "DIALECT",
    "ConnectionLease",
    "Pool",
    "SessionScope",
    "discard",
    "retryable",
]

#: SQLAlchemy's asyncpg dialect, to compile text and wrap errors as a session would.
DIALECT = asyncpg_dialect()  # type: ignore[no-untyped-call]

#: SQLSTATEs worth re-running a whole transaction for (opt-in).
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock


class Pool(Protocol):
    """What a scope needs of its pool (:class:`~django_asyncpool.pool.ConnectionPool`).

    Named here, not imported: the pool is the public face above this package.
    """

    alias: str

    def __init__(self, alias: str = "default") -> None: ...

    def for_loop(self) -> LoopState: ...

    async def open_session(
        self, engine: AsyncEngine, options: dict[str, Any] | None = None
    ) -> AsyncSession: ...


def retryable(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", exc)
    if getattr(exc, "connection_invalidated", False):
        return True
    sqlstate = getattr(orig, "sqlstate", None) or getattr(
        getattr(orig, "__cause__", None), "sqlstate", None
    )
    return sqlstate in _RETRY_SQLSTATES or isinstance(
        getattr(orig, "__cause__", orig), asyncpg.exceptions.ConnectionDoesNotExistError
    )


async def discard(session: AsyncSession) -> None:
    """Throw a session's connection away: after a cancellation it may be mid-query."""
    try:
        await session.invalidate()
    finally:
        await session.close()


class SessionScope:
    """``session_scope()``: an ``AsyncSession`` in a transaction, committed or rolled back."""

    __slots__ = ("_pool", "_session")

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    def _new_session(self, state: LoopState) -> AsyncSession:
        return AsyncSession(state.engine, expire_on_commit=False)

    async def __aenter__(self) -> AsyncSession:
        state = self._pool.for_loop()
        self._session = self._new_session(state)
        return self._session

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        session = self._session
        if exc_type is None:
            try:
                await session.commit()
            except BaseException:
                await discard(session)
                raise
            await session.close()
        elif isinstance(exc, Exception) and not _lost(exc):
            await session.close()  # rolls back
        else:
            await discard(session)  # cancelled, or the connection is gone


def _lost(exc: BaseException) -> bool:
    return bool(getattr(exc, "connection_invalidated", False))


class ConnectionLease:
    """``connection()``: a raw asyncpg connection of the pool, given back on exit.

    Whatever transaction the caller left open is rolled back; a connection that was
    lost or cancelled mid-query is thrown away, never handed to someone else.
    """

    __slots__ = ("_engine", "_fairy", "_pool")

    def __init__(self, pool: Pool, engine: AsyncEngine | None = None) -> None:
        self._pool = pool
        self._engine = engine

    @property
    def raw(self) -> Any:
        return self._fairy.driver_connection

    async def __aenter__(self) -> asyncpg.Connection:
        state = self._pool.for_loop()
        self._fairy = await (self._engine or state.engine).raw_connection()
        return self._fairy.driver_connection

    def dbapi_error(self, exc: Exception, sql: str, args: Any) -> sqlalchemy.exc.DBAPIError:
        """Return ``exc`` as SQLAlchemy would raise it: a DBAPIError around the adapted error."""
        adapter: Any = self._fairy.dbapi_connection
        try:
            adapter._handle_exception(exc)
        except Exception as adapted:
            error = sqlalchemy.exc.DBAPIError.instance(
                sql, args, adapted, adapter.dbapi.Error, dialect=DIALECT
            )
            assert isinstance(error, sqlalchemy.exc.DBAPIError)
            return dual(error)
        raise AssertionError("unreachable")  # pragma: no cover

    def lost(self, exc: BaseException) -> bool:
        """Return True if ``exc`` (raised using this lease) means its connection died."""
        if isinstance(exc, ConnectionLost) or is_lost(exc):
            return True
        # asyncpg's "connection is closed" and the like; never the caller's own errors.
        return isinstance(exc, (asyncpg.InterfaceError, asyncpg.PostgresError, OSError)) and bool(
            self.raw.is_closed()
        )

    def lost_error(self, exc: BaseException, sql: str | None = None, args: Any = None) -> Any:
        """Return our ConnectionLost for ``exc``, which :meth:`lost` said is one."""
        return (
            exc
            if isinstance(exc, ConnectionLost)
            else lost_error(self._pool.for_loop().config, exc, sql, args)
        )

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        fairy = self._fairy
        raw: Any = fairy.driver_connection
        lost: Exception | None = None  # a lost connection, to raise as ours
        if exc_type is not None and (not isinstance(exc, Exception) or self.lost(exc)):
            # Cancelled mid-query, or gone: never hand it to someone else.
            fairy.invalidate()
            if isinstance(exc, Exception) and not isinstance(exc, ConnectionLost):
                lost = exc
        elif raw.is_closed():
            fairy.invalidate()
        elif raw.is_in_transaction():
            try:
                await raw.execute("ROLLBACK")
            except Exception as rollback_exc:
                gone = self.lost(rollback_exc)  # before invalidate(): it reads the connection
                fairy.invalidate()
                if not gone:
                    raise
                lost = rollback_exc
            except BaseException:
                fairy.invalidate()
                raise
        pool: Any = fairy._pool
        if pool.closes_on_return():
            # This check-in may close a connection, which awaits: in SQLAlchemy's greenlet.
            await greenlet_spawn(fairy.close)
        else:
            fairy.close()  # back to the pool, no I/O: spare the greenlet
        if lost is not None:
            raise self.lost_error(lost) from lost
