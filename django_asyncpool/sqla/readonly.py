"""The read-only scope, ``session_scope(readonly=True)``, and its fast path.

Every statement runs in autocommit on the read-only engine, as its own read-only
transaction. Textual SQL goes straight to asyncpg and comes back as SQLAlchemy's
own ``Result``, skipping the ORM session machinery, which costs more than the
query. That fast path reads SQLAlchemy internals (a ``TextClause``'s
``_bindparams``, a bind type's ``_isnull``, the asyncpg adapter's
``_handle_exception``): they are all here, and ``tests/test_pool.py``'s
read-only tests fail if one moves.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import asyncpg
from sqlalchemy import TextClause, text
from sqlalchemy.engine.result import IteratorResult, Result, SimpleResultMetaData
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.util import EMPTY_DICT

from ..core import sqlstate as _sqlstate
from ..errors import ReadOnlyError
from .scopes import DIALECT, ConnectionLease, Pool, SessionScope, discard

if TYPE_CHECKING:
    from .engines import LoopState  # annotations only: what pool.for_loop() returns

__all__ = ["ReadOnlyScope", "ReadOnlySession", "readonly_violation"]


@functools.lru_cache(maxsize=1024)
def _compile_text(sql: str) -> tuple[str, tuple[str, ...]]:
    """Return ``sql`` with asyncpg's ``$n`` placeholders, and the parameter names in order."""
    compiled = text(sql).compile(dialect=DIALECT)
    return str(compiled), tuple(compiled.positiontup or ())


class ReadOnlySession(AsyncSession):
    """The ``AsyncSession`` of a ``session_scope(readonly=True)``.

    Every statement runs in autocommit, as its own read-only transaction (behind
    PgBouncer: in one ``BEGIN READ ONLY`` transaction per scope). Textual
    SQL (``text()`` with plain parameters) goes straight to an asyncpg connection
    of the read-only pool and comes back as SQLAlchemy's own ``Result``; the ORM
    session machinery, which costs more than the query, is used only for other
    statements (ORM queries, typed or expanding parameters, ``echo``).
    """

    def __init__(self, engine: AsyncEngine, pool: Pool, *, fast: bool = True) -> None:
        super().__init__(engine, expire_on_commit=False, autoflush=False)
        self._readonly_engine = engine
        self._asyncpool = pool
        # Off with echo (SQLAlchemy logs statements) and behind PgBouncer, where the
        # read-only setting cannot ride on the connection: there every statement runs
        # in the engine's BEGIN READ ONLY transaction.
        self._fast = fast and not engine.echo
        self._lease: ConnectionLease | None = None
        self._untried = False  # the lease is new: nothing has run on it yet

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
        lease = self._lease or await self._take()
        # Nothing has run on a new lease: if its first statement finds the connection
        # dead (a backend dying right now, a link dropped silently: what the liveness
        # check cannot see), the statement, read-only, runs once more on another.
        retry, self._untried = self._untried, False
        while True:
            raw: Any = lease.raw
            try:
                rows = await raw.fetch(sql, *args)  # asyncpg's statement cache: no extra trip
                if rows:
                    keys = list(rows[0].keys())
                else:  # the column names still matter (report headers)
                    keys = [attr.name for attr in (await raw.prepare(sql)).get_attributes()]
            except Exception as exc:
                if lease.lost(exc):
                    if retry:
                        retry = False
                        self._lease = None
                        with contextlib.suppress(Exception):
                            await lease.__aexit__(type(exc), exc, None)  # thrown away
                        lease = await self._take()
                        self._untried = False
                        continue
                    raise lease.lost_error(exc, sql, args) from exc
                if isinstance(exc, asyncpg.PostgresError):
                    raise lease.dbapi_error(exc, sql, args) from None
                raise
            return IteratorResult(SimpleResultMetaData(keys), iter(rows))

    async def _take(self) -> ConnectionLease:
        lease = ConnectionLease(self._asyncpool, self._readonly_engine)
        await lease.__aenter__()
        self._lease, self._untried = lease, True
        return lease

    async def checkout(self) -> None:
        """Check a connection out now rather than at the first statement (failover does)."""
        if not self._fast:
            await self.connection()
        elif self._lease is None:
            await self._take()

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
                await discard(self)
            elif self.in_transaction():
                await self.close()


class ReadOnlyScope(SessionScope):
    """``session_scope(readonly=True)``: a :class:`ReadOnlySession`; writes raise ReadOnlyError."""

    __slots__ = ()

    def _new_session(self, state: LoopState) -> AsyncSession:
        return ReadOnlySession(state.readonly, self._pool, fast=not state.config.pgbouncer)

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        session = self._session
        assert isinstance(session, ReadOnlySession)
        await session.end(exc_type, exc)
        if exc_type is not None and readonly_violation(exc):
            raise ReadOnlyError(
                f"A read-only session_scope() on {self._pool.alias!r} tried to write. Use "
                "session_scope() (without readonly=True) for writes.",
                alias=self._pool.alias,
            ) from exc


def readonly_violation(exc: BaseException) -> bool:
    """Return True if ``exc`` is the server refusing a write in a read-only transaction."""
    return _sqlstate.classify(exc) == _sqlstate.READ_ONLY
