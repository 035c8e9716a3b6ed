"""The async pool's scopes for an alias with ``failover_to``: read-only on the next alias.

:class:`~django_asyncpool.pool.ConnectionPool` hands these out instead of its own
scopes when the alias has ``OPTIONS["failover_to"]``; where each read goes is
:mod:`.route`'s decision (the chain, the breakers, the counts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ReadOnlyError
from ..sqla.readonly import ReadOnlyScope, ReadOnlySession, readonly_violation
from ..sqla.scopes import ConnectionLease, SessionScope
from .route import through_chain

if TYPE_CHECKING:
    import asyncpg
    from sqlalchemy.ext.asyncio import AsyncSession

    from ..sqla.scopes import Pool

__all__ = ["FailoverLease", "FailoverScope", "get_connection"]


class FailoverScope:
    """``session_scope()`` of an alias with ``failover_to``: checked out at entry.

    The connection is taken on entering, not at the first statement, so that an
    alias that cannot give one is passed over before the caller's code runs. On
    another alias the scope is read-only: a transaction scope keeps its transaction,
    begun READ ONLY.
    """

    __slots__ = ("_pool", "_readonly", "_scope", "_target")

    def __init__(self, pool: Pool, readonly: bool) -> None:
        self._pool = pool
        self._readonly = readonly
        self._target = pool.alias

    async def __aenter__(self) -> AsyncSession:
        async def enter(target: str) -> AsyncSession:
            pool = type(self._pool)(target)
            scope = ReadOnlyScope(pool) if self._readonly else SessionScope(pool)
            session = await scope.__aenter__()
            try:
                if isinstance(session, ReadOnlySession):
                    await session.checkout()
                else:
                    await session.connection(execution_options=_elsewhere(target, self._pool))
            except BaseException as exc:
                await scope.__aexit__(type(exc), exc, exc.__traceback__)
                raise
            self._scope, self._target = scope, target
            return session

        return await through_chain(self._pool.alias, enter)

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        alias, target = self._pool.alias, self._target
        try:
            await self._scope.__aexit__(exc_type, exc, tb)
        except ReadOnlyError as err:
            if target == alias:
                raise
            raise _write_refused(alias, target) from err
        if target != alias and exc is not None and readonly_violation(exc):
            raise _write_refused(alias, target) from exc


def _elsewhere(target: str, pool: Pool) -> dict[str, Any] | None:
    """Return the execution options of a session of ``pool`` that landed on ``target``."""
    return None if target == pool.alias else {"postgresql_readonly": True}  # BEGIN READ ONLY


def _write_refused(alias: str, target: str) -> ReadOnlyError:
    return ReadOnlyError(
        f"session_scope(using={alias!r}) tried to write, but it had failed over to "
        f"{target!r}, where it is read-only: writes never fail over. Send writes to "
        "the primary's alias.",
        alias=alias,
    )


class FailoverLease:
    """``connection()`` of an alias with ``failover_to``: read-only on another alias."""

    __slots__ = ("_lease", "_pool")

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def __aenter__(self) -> asyncpg.Connection:
        async def enter(target: str) -> asyncpg.Connection:
            pool = type(self._pool)(target)
            # Another alias's read-only engine: its server refuses writes.
            engine = None if target == self._pool.alias else pool.for_loop().readonly
            lease = ConnectionLease(pool, engine)
            conn = await lease.__aenter__()
            self._lease = lease
            return conn

        return await through_chain(self._pool.alias, enter)

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await self._lease.__aexit__(exc_type, exc, tb)


async def get_connection(pool: Pool) -> AsyncSession:
    """Return ``pool.get_connection()``'s session, on the next alias while ``pool``'s is down."""

    async def enter(target: str) -> AsyncSession:
        other = type(pool)(target)
        return await other.open_session(other.for_loop().engine, _elsewhere(target, pool))

    return await through_chain(pool.alias, enter)
