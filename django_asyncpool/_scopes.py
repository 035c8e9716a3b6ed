"""The scopes the async pool hands out: sessions, and raw connections on the fast path."""

from __future__ import annotations

import asyncio
import logging
import traceback
from typing import TYPE_CHECKING, Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.util.concurrency import greenlet_spawn

from . import _registry
from .errors import ReadOnlyError

if TYPE_CHECKING:
    from .pool import ConnectionPool

logger = logging.getLogger("django_asyncpool")

#: SQLSTATEs worth re-running a whole transaction for (opt-in).
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock


def _retryable(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", exc)
    if getattr(exc, "connection_invalidated", False):
        return True
    sqlstate = getattr(orig, "sqlstate", None) or getattr(
        getattr(orig, "__cause__", None), "sqlstate", None
    )
    return sqlstate in _RETRY_SQLSTATES or isinstance(
        getattr(orig, "__cause__", orig), asyncpg.exceptions.ConnectionDoesNotExistError
    )


async def _discard(session: AsyncSession) -> None:
    """Throw a session's connection away: after a cancellation it may be mid-query."""
    try:
        await session.invalidate()
    finally:
        await session.close()


def _leak_timer(pool: ConnectionPool, what: str) -> asyncio.TimerHandle | None:
    threshold = _registry.guard(pool.alias).config.leak_threshold
    if threshold is None:
        return None
    stack = "".join(traceback.format_stack(limit=12)[:-2])

    def warn() -> None:
        pool.stats.leaks += 1
        logger.warning(
            "A %s of database %r has been held for more than %gs; it was taken at:\n%s",
            what,
            pool.alias,
            threshold,
            stack,
        )

    return asyncio.get_running_loop().call_later(threshold, warn)


class _SessionScope:
    __slots__ = ("_pool", "_readonly", "_session", "_timer")

    def __init__(self, pool: ConnectionPool, readonly: bool) -> None:
        self._pool = pool
        self._readonly = readonly
        self._timer: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> AsyncSession:
        state = self._pool._for_loop()
        engine = state.readonly if self._readonly else state.engine
        self._session = AsyncSession(engine, expire_on_commit=False)
        self._timer = _leak_timer(self._pool, "session")
        return self._session

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        session = self._session
        if self._timer is not None:
            self._timer.cancel()
        if exc_type is None:
            try:
                if not self._readonly:
                    await session.commit()
            except BaseException:
                await _discard(session)
                raise
            await session.close()
        elif isinstance(exc, Exception) and not _lost(exc):
            await session.close()  # rolls back
        else:
            await _discard(session)  # cancelled, or the connection is gone
        if exc_type is not None and self._readonly and _readonly_violation(exc):
            raise ReadOnlyError(
                f"A read-only session_scope() on {self._pool.alias!r} tried to write. Use "
                "session_scope() (without readonly=True) for writes.",
                alias=self._pool.alias,
            ) from exc


def _lost(exc: BaseException) -> bool:
    return bool(getattr(exc, "connection_invalidated", False))


def _readonly_violation(exc: BaseException) -> bool:
    return getattr(getattr(exc, "orig", None), "sqlstate", None) == "25006" or isinstance(
        getattr(getattr(exc, "orig", None), "__cause__", None),
        asyncpg.exceptions.ReadOnlySQLTransactionError,
    )


class _Lease:
    __slots__ = ("_fairy", "_pool", "_timer")

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._timer: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        engine = self._pool._for_loop().engine
        self._fairy = await engine.raw_connection()
        self._timer = _leak_timer(self._pool, "connection")
        return self._fairy.driver_connection

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        fairy = self._fairy
        if self._timer is not None:
            self._timer.cancel()
        raw: Any = fairy.driver_connection
        if (exc_type is not None and not isinstance(exc, Exception)) or raw.is_closed():
            fairy.invalidate()  # cancelled mid-query, or gone: never hand it to someone else
        elif raw.is_in_transaction():
            try:
                await raw.execute("ROLLBACK")
            except BaseException:
                fairy.invalidate()
                raise
        # In SQLAlchemy's greenlet: a check-in past pool_size closes the connection.
        await greenlet_spawn(fairy.close)
