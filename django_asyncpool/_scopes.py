"""The scopes the async pool hands out: sessions, and raw connections on the fast path."""

from __future__ import annotations

import asyncio
import functools
import logging
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import asyncpg
import sqlalchemy.exc
from sqlalchemy import TextClause, text
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.engine.result import IteratorResult, Result, SimpleResultMetaData
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.util import EMPTY_DICT
from sqlalchemy.util.concurrency import greenlet_spawn

from ._engines import is_lost, lost_error
from .errors import ConnectionLost, ReadOnlyError

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


def _leak_timer(pool: ConnectionPool, threshold: float, what: str) -> asyncio.TimerHandle:
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


@functools.lru_cache(maxsize=1024)
def _compile_text(sql: str) -> tuple[str, tuple[str, ...]]:
    """Return ``sql`` with asyncpg's ``$n`` placeholders, and the parameter names in order."""
    compiled = text(sql).compile(dialect=_DIALECT)
    return str(compiled), tuple(compiled.positiontup or ())


_DIALECT = asyncpg_dialect()  # type: ignore[no-untyped-call]


class ReadOnlySession(AsyncSession):
    """The ``AsyncSession`` of a ``session_scope(readonly=True)``.

    Every statement runs in autocommit, as its own read-only transaction (behind
    PgBouncer: in one ``BEGIN READ ONLY`` transaction per scope). Textual
    SQL (``text()`` with plain parameters) goes straight to an asyncpg connection
    of the read-only pool and comes back as SQLAlchemy's own ``Result``; the ORM
    session machinery, which costs more than the query, is used only for other
    statements (ORM queries, typed or expanding parameters, ``echo``).
    """

    def __init__(self, engine: AsyncEngine, pool: ConnectionPool, *, fast: bool = True) -> None:
        super().__init__(engine, expire_on_commit=False, autoflush=False)
        self._readonly_engine = engine
        self._asyncpool = pool
        # Off with echo (SQLAlchemy logs statements) and behind PgBouncer, where the
        # read-only setting cannot ride on the connection: there every statement runs
        # in the engine's BEGIN READ ONLY transaction.
        self._fast = fast and not engine.echo
        self._lease: _Lease | None = None

    def _plan(self, statement: Any, params: Any) -> tuple[str, list[Any]] | None:
        if not self._fast or type(statement) is not TextClause:
            return None
        if params is not None and not isinstance(params, Mapping):
            return None  # executemany
        for bind in statement._bindparams.values():
            if bind.expanding or bind.value is not None or not bind.type._isnull:
                return None
        sql, names = _compile_text(statement.text)
        try:
            return sql, [params[name] for name in names] if names else []  # type: ignore[index]
        except (KeyError, TypeError):
            return None  # missing parameters: SQLAlchemy says which

    async def execute(
        self,
        statement: Any,
        params: Any = None,
        *,
        execution_options: Any = EMPTY_DICT,
        bind_arguments: Any = None,
        **kw: Any,
    ) -> Result[Any]:
        plan = None if execution_options or bind_arguments or kw else self._plan(statement, params)
        if plan is None:
            result: Result[Any] = await super().execute(
                statement,
                params,
                execution_options=execution_options,
                bind_arguments=bind_arguments,
                **kw,
            )
            return result
        sql, args = plan
        if self._lease is None:
            lease = _Lease(self._asyncpool, self._readonly_engine, track=False)
            await lease.__aenter__()
            self._lease = lease
        raw: Any = self._lease.raw
        try:
            rows = await raw.fetch(sql, *args)  # asyncpg's statement cache: no extra trip
            if rows:
                keys = list(rows[0].keys())
            else:  # the column names still matter (report headers)
                keys = [attr.name for attr in (await raw.prepare(sql)).get_attributes()]
        except Exception as exc:
            if self._lease.lost(exc):
                raise self._lease.lost_error(exc, sql, args) from exc
            if isinstance(exc, asyncpg.PostgresError):
                raise self._lease.dbapi_error(exc, sql, args) from None
            raise
        return IteratorResult(SimpleResultMetaData(keys), iter(rows))

    async def checkout(self) -> None:
        """Check a connection out now rather than at the first statement (failover does)."""
        if not self._fast:
            await self.connection()
        elif self._lease is None:
            lease = _Lease(self._asyncpool, self._readonly_engine, track=False)
            await lease.__aenter__()
            self._lease = lease

    async def scalar(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return (await self.execute(statement, params, **kw)).scalar()

    async def scalars(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return (await self.execute(statement, params, **kw)).scalars()

    async def end(self, exc_type: Any, exc: Any) -> None:
        """Give the connections back: the lease's, and the ORM session's if it used one."""
        lease, self._lease = self._lease, None
        try:
            if lease is not None:
                await lease.__aexit__(exc_type, exc, None)
        finally:
            if exc is not None and not isinstance(exc, Exception):
                await _discard(self)
            elif self.in_transaction():
                await self.close()


class _SessionScope:
    __slots__ = ("_pool", "_readonly", "_session", "_timer")

    def __init__(self, pool: ConnectionPool, readonly: bool) -> None:
        self._pool = pool
        self._readonly = readonly
        self._timer: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> AsyncSession:
        state = self._pool._for_loop()
        if self._readonly:
            self._session: AsyncSession = ReadOnlySession(
                state.readonly, self._pool, fast=not state.config.pgbouncer
            )
        else:
            self._session = AsyncSession(state.engine, expire_on_commit=False)
        if state.config.leak_threshold is not None:
            self._timer = _leak_timer(self._pool, state.config.leak_threshold, "session")
        return self._session

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        session = self._session
        if self._timer is not None:
            self._timer.cancel()
        if isinstance(session, ReadOnlySession):
            await session.end(exc_type, exc)
            if exc_type is not None and _readonly_violation(exc):
                raise ReadOnlyError(
                    f"A read-only session_scope() on {self._pool.alias!r} tried to write. Use "
                    "session_scope() (without readonly=True) for writes.",
                    alias=self._pool.alias,
                ) from exc
            return
        if exc_type is None:
            try:
                await session.commit()
            except BaseException:
                await _discard(session)
                raise
            await session.close()
        elif isinstance(exc, Exception) and not _lost(exc):
            await session.close()  # rolls back
        else:
            await _discard(session)  # cancelled, or the connection is gone


def _lost(exc: BaseException) -> bool:
    return bool(getattr(exc, "connection_invalidated", False))


def _readonly_violation(exc: BaseException) -> bool:
    return getattr(getattr(exc, "orig", None), "sqlstate", None) == "25006" or isinstance(
        getattr(getattr(exc, "orig", None), "__cause__", None),
        asyncpg.exceptions.ReadOnlySQLTransactionError,
    )


class _Lease:
    __slots__ = ("_engine", "_fairy", "_pool", "_timer", "_track")

    def __init__(
        self, pool: ConnectionPool, engine: AsyncEngine | None = None, *, track: bool = True
    ) -> None:
        self._pool = pool
        self._engine = engine
        self._track = track
        self._timer: asyncio.TimerHandle | None = None

    @property
    def raw(self) -> Any:
        return self._fairy.driver_connection

    async def __aenter__(self) -> asyncpg.Connection:
        state = self._pool._for_loop()
        self._fairy = await (self._engine or state.engine).raw_connection()
        if self._track and state.config.leak_threshold is not None:
            self._timer = _leak_timer(self._pool, state.config.leak_threshold, "connection")
        return self._fairy.driver_connection

    def dbapi_error(self, exc: Exception, sql: str, args: Any) -> sqlalchemy.exc.DBAPIError:
        """Return ``exc`` as SQLAlchemy would raise it: a DBAPIError around the adapted error."""
        adapter: Any = self._fairy.dbapi_connection
        try:
            adapter._handle_exception(exc)
        except Exception as adapted:
            error = sqlalchemy.exc.DBAPIError.instance(
                sql, args, adapted, adapter.dbapi.Error, dialect=_DIALECT
            )
            assert isinstance(error, sqlalchemy.exc.DBAPIError)
            return error
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
            else lost_error(self._pool._for_loop().config, exc, sql, args)
        )

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        fairy = self._fairy
        if self._timer is not None:
            self._timer.cancel()
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
