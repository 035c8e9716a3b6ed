"""The async pool: SQLAlchemy ``AsyncEngine`` over asyncpg, one engine per event loop.

``ConnectionPool(alias)`` is one object per alias per process. Behind it, every
event loop that uses it gets its own engine (asyncpg connections belong to the
loop that opened them): uvicorn's long loop keeps one; Django's dev server,
``async_to_sync`` and Celery's ``asyncio.run()`` make a loop per call, and the
engine of such a loop is disposed while the loop shuts down.

Every checkout, whether from a session, ``connection()`` or the ORM, goes through
:class:`~django_asyncpool.sqla.fairpool.GuardedPool`, which puts the alias's breaker and
retries around SQLAlchemy's own pool; the engines and their liveness checks are
:mod:`.sqla.engines`', the scopes :mod:`.sqla.scopes`' and :mod:`.sqla.readonly`'s.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import sqlalchemy.exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from . import metrics
from .core import registry as _registry
from .core import stats as _stats
from .core import waiters as _waiters
from .core.loops import live
from .core.stats import Stats
from .errors import named
from .failover import scopes as _failover
from .sqla.engines import LoopState  # this module owns the loop states: it makes them
from .sqla.readonly import ReadOnlyScope
from .sqla.scopes import ConnectionLease, SessionScope, discard, retryable

__all__ = ["ConnectionLease", "ConnectionPool", "drain", "session_scope"]

logger = logging.getLogger("django_asyncpool")
T = TypeVar("T")


class ConnectionPool:
    """The async pool of one database alias; ``ConnectionPool()`` is the same object each time."""

    _instances: dict[str, ConnectionPool] = _registry.async_pools
    _lock = threading.Lock()

    alias: str
    stats: Stats
    #: ``OPTIONS["failover_to"]``: while this alias is down its reads go there.
    failover_to: tuple[str, ...]
    _loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopState]
    _last: tuple[asyncio.AbstractEventLoop, LoopState] | None  # the hot path's one lookup

    def __new__(cls, alias: str = "default") -> ConnectionPool:
        try:
            return cls._instances[alias]
        except KeyError:
            pass
        with cls._lock:
            if alias not in cls._instances:
                _registry.config(alias)  # a clear error for an alias that is not ours
                pool = super().__new__(cls)
                pool.alias = alias
                pool.failover_to = _registry.config(alias).failover_to
                pool.stats = _registry.stats(alias, "async")  # outlives this object
                metrics.install()  # also when the app is not in INSTALLED_APPS
                pool._loops = weakref.WeakKeyDictionary()
                pool._last = None
                cls._instances[alias] = pool
            return cls._instances[alias]

    def __repr__(self) -> str:
        return f"<ConnectionPool {self.alias!r} loops={self.loops}>"

    @property
    def loops(self) -> int:
        """Return how many event loops have engines of this pool now."""
        return len(self._loops)

    # -- engines -------------------------------------------------------------------------

    def for_loop(self) -> LoopState:
        """Return the running event loop's engines (made on first use)."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0] is loop:
            return last[1]
        state = self._loops.get(loop) or self._start(loop)
        self._last = (loop, state)
        return state

    def _start(self, loop: asyncio.AbstractEventLoop) -> LoopState:
        for other in [lp for lp in self._loops if lp.is_closed()]:
            # A loop closed without shutting down its async generators: its sockets
            # go with the engine's garbage.
            del self._loops[other]
        state = LoopState(self.stats, _registry.config(self.alias))
        self._loops[loop] = state
        return state

    @property
    def engine(self) -> AsyncEngine:
        """The read-write ``AsyncEngine`` of the running event loop."""
        return self.for_loop().engine

    # -- sessions and connections --------------------------------------------------------

    async def get_connection(self) -> AsyncSession:
        """Return a new ``AsyncSession`` with a connection checked out; the caller closes it."""
        if self.failover_to:
            return await _failover.get_connection(self)
        return await self.open_session(self.for_loop().engine)

    async def open_session(
        self, engine: AsyncEngine, options: dict[str, Any] | None = None
    ) -> AsyncSession:
        """Return a new ``AsyncSession`` on ``engine`` with a connection checked out."""
        session = AsyncSession(engine, expire_on_commit=False)
        try:
            await session.connection(execution_options=options)
        except BaseException:
            await discard(session)
            raise
        return session

    def session_scope(self, *, readonly: bool = False) -> SessionScope | _failover.FailoverScope:
        """Return an async context manager: an ``AsyncSession`` in a transaction.

        Commit on success, roll back on any exception (re-raised), always close.
        ``readonly=True`` runs in autocommit with no BEGIN/COMMIT round trips, and
        the server refuses writes.
        """
        if self.failover_to:
            return _failover.FailoverScope(self, readonly)
        return ReadOnlyScope(self) if readonly else SessionScope(self)

    def connection(self, *, failover: bool = True) -> ConnectionLease | _failover.FailoverLease:
        """Return an async context manager yielding a raw ``asyncpg.Connection``.

        The fast path: no session, no transaction unless you start one, under the
        same connection cap, breaker and accounting as the sessions. With
        ``OPTIONS["failover_to"]`` it is read-only on another alias while this one is
        down; ``failover=False`` asks for this alias's own (a health check's probe).
        """
        if failover and self.failover_to:
            return _failover.FailoverLease(self)
        return ConnectionLease(self)

    async def run_transaction(
        self, fn: Callable[[AsyncSession], Awaitable[T]], *, attempts: int = 3
    ) -> T:
        """Run ``await fn(session)`` in a ``session_scope()``, again on a retryable error.

        Retried: serialization failures, deadlocks and lost connections, up to
        ``attempts`` times in all. Whatever ``fn`` does must be safe to repeat.
        """
        for attempt in range(1, attempts + 1):
            try:
                async with self.session_scope() as session:
                    return await fn(session)
            except (sqlalchemy.exc.DBAPIError, asyncpg.PostgresError) as exc:
                if attempt == attempts or not retryable(exc):
                    raise
                logger.warning(
                    "Transaction on %r failed (%s), running it again (%d of %d)",
                    self.alias,
                    named(exc),
                    attempt + 1,
                    attempts,
                )
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close every connection of this pool; it opens new ones when used again.

        The running loop's engines are disposed here; those of loops running in
        other threads are disposed on their own loops.
        """
        current = asyncio.get_running_loop()
        self._last = None
        for loop, state in list(self._loops.items()):
            del self._loops[loop]
            if loop is current:
                await state.dispose()
            elif loop.is_running():
                asyncio.run_coroutine_threadsafe(state.dispose(), loop)

    def drain(self) -> int:
        """Replace every connection of this pool's engines, on every event loop.

        The idle ones are closed now (on a loop not running now, when it runs again),
        those in use when they come back; new ones are opened as needed. Only the
        SQLAlchemy engines: :func:`drain` replaces every pool of the alias. Return how
        many loops' engines were reached.
        """
        states = live(self._loops)
        for loop, state in states:
            state.drain(loop)
        return len(states)

    @property
    def metrics(self) -> dict[str, Any]:
        """Return the pool's snapshot (``_stats.SNAPSHOT_KEYS``): every loop's engines, summed."""
        idle = in_use = 0
        for _ in range(3):  # another thread may add or drop a loop meanwhile
            try:
                states = list(self._loops.values())
                break
            except RuntimeError:
                continue
        else:
            states = []
        for state in states:
            loop_idle, loop_in_use = state.counts()
            idle += loop_idle
            in_use += loop_in_use
        guard = _registry.guard(self.alias)
        options = guard.config.async_pool
        # One budget per loop, shared with the native ORM's pool of the alias.
        loops = max(len(_waiters.budgets(self.alias)), 1)
        return _stats.snapshot(
            self.alias,
            "async",
            self.stats,
            guard,
            idle=idle,
            in_use=in_use,
            waiting=self.stats.waiting,
            min_size=0,
            max_size=loops * (options.pool_size + options.max_overflow),
        )


def session_scope(
    using: str = "default", *, readonly: bool = False
) -> SessionScope | _failover.FailoverScope:
    """Return ``ConnectionPool(using).session_scope(readonly=readonly)``, for views."""
    return ConnectionPool(using).session_scope(readonly=readonly)


def drain(using: str = "default") -> dict[str, int]:
    """Replace every connection of alias ``using`` in this process, gracefully.

    Every pool of the alias: the sync pool, each event loop's ``session_scope()``
    engines (read-write and read-only) and native async ORM pool. The idle
    connections are closed now, those in use when they come back (no query is cut);
    new ones are opened in their place as needed. For what the pools cannot see: a
    failover behind a DNS name, rotated credentials, a changed ``search_path``.
    Other processes: ``manage.py dbpool_check --drain ALIAS``. Return
    ``{pool kind: pools reached}``; raise ImproperlyConfigured for an alias that is
    not django-asyncpool's.
    """
    return _registry.drain(using)


# -- the async kind of pool, for the registry ---------------------------------------------


def _snapshots() -> list[dict[str, Any]]:
    return [pool.metrics for pool in list(_registry.async_pools.values())]


def _drop(alias: str) -> None:
    """Drop ``alias``'s pool (its settings changed): each loop's engines close with the loop."""
    _registry.async_pools.pop(alias, None)


def _forget() -> list[Any]:
    """In a forked child: drop the parent's pools, close nothing; return them to keep."""
    pools = list(_registry.async_pools.values())
    _registry.async_pools.clear()
    return pools


def _drain(alias: str) -> int:
    pool = _registry.async_pools.get(alias)
    return pool.drain() if pool is not None else 0


_registry.register_kind("async", snapshots=_snapshots, reset=_drop, forget=_forget, drain=_drain)
