"""The async pool: SQLAlchemy ``AsyncEngine`` over asyncpg, one engine per event loop.

``ConnectionPool(alias)`` is one object per alias per process. Behind it, every
event loop that uses it gets its own engine (asyncpg connections belong to the
loop that opened them): uvicorn's long loop keeps one; Django's dev server,
``async_to_sync`` and Celery's ``asyncio.run()`` make a loop per call, and the
engine of such a loop is disposed while the loop shuts down.

Every checkout, whether from a session, ``connection()`` or the ORM, goes through
:class:`_GuardedPool`, which puts the alias's breaker and retries around
SQLAlchemy's own pool and checks liveness without a round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import threading
import time
import traceback
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import sqlalchemy.exc
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool
from sqlalchemy.util.concurrency import await_, greenlet_spawn

from . import _registry
from ._policy import Guard
from .config import AliasConfig
from .errors import PoolTimeout, ReadOnlyError

__all__ = ["ConnectionPool", "session_scope"]

logger = logging.getLogger("django_asyncpool")
T = TypeVar("T")

#: libpq parameters asyncpg understands in a DSN; application_name and options
#: become server settings, connect_timeout the connect timeout.
_ASYNCPG_DSN_KEYS = frozenset(
    {
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "sslpassword",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
        "passfile",
    }
)
#: SQLSTATEs worth re-running a whole transaction for (opt-in).
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock


@dataclass
class Stats:
    """Counters of one alias's async side, summed over its event loops."""

    attempts: int = 0
    failures: int = 0
    timeouts: int = 0
    created: int = 0
    checkouts: int = 0
    waiting: int = 0
    invalidated: int = 0
    leaks: int = 0


def connect_kwargs(config: AliasConfig) -> dict[str, Any]:
    """Return ``asyncpg.connect()`` keyword arguments for ``config``."""
    params = dict(config.params)
    kwargs: dict[str, Any] = {
        "host": config.host or None,
        "port": config.port,
        "user": config.user or None,
        "password": config.password or None,
        "database": config.dbname,
    }
    server_settings: dict[str, str] = {}
    if "application_name" in params:
        server_settings["application_name"] = str(params["application_name"])
    for part in str(params.get("options", "")).split("-c"):
        if "=" in part:
            key, value = part.strip().split("=", 1)
            server_settings[key.strip()] = value.strip()
    if "connect_timeout" in params:
        kwargs["timeout"] = float(params["connect_timeout"])
    if server_settings:
        kwargs["server_settings"] = server_settings
    dsn_query = "&".join(f"{k}={params[k]}" for k in sorted(_ASYNCPG_DSN_KEYS & set(params)))
    if dsn_query:
        kwargs["dsn"] = f"postgresql://?{dsn_query}"
    if config.pgbouncer:
        kwargs["statement_cache_size"] = 0
    return {k: v for k, v in kwargs.items() if v is not None}


def _socket_readable(raw: Any) -> bool:
    """Return True when an idle asyncpg connection has bytes (or EOF) waiting.

    An idle connection receives nothing; anything there is the server saying
    goodbye, which the event loop may not have processed yet.
    """
    transport = getattr(raw, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    try:
        return bool(select.select([sock.fileno()], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class _GuardedPool(AsyncAdaptedQueuePool):
    """SQLAlchemy's asyncio queue pool with the alias's breaker, retries and stats.

    Opening a connection (for a checkout, or to replace a dead one in place) goes
    through the guard with retries; a checkout fails fast while the breaker is
    open, and a wait that times out counts as a failure. ``guard`` and ``stats``
    are class attributes of a per-engine subclass, so ``recreate()`` keeps them.
    """

    guard: Guard
    stats: Stats

    def __init__(self, creator: Any, **kwargs: Any) -> None:
        super().__init__(creator, **kwargs)
        create = self._invoke_creator
        guard = self.guard

        def guarded(record: Any) -> Any:
            return guard.run(lambda: create(record), sleep=_greenlet_sleep)

        self._invoke_creator = guarded  # type: ignore[assignment]

    def _do_get(self) -> Any:
        stats, guard = self.stats, self.guard
        stats.attempts += 1
        if guard.breaker.current_state != "closed":
            guard.check_open()
        stats.waiting += 1
        try:
            record = super()._do_get()
        except sqlalchemy.exc.TimeoutError as exc:
            stats.failures += 1
            stats.timeouts += 1
            guard.failed(exc, trial=False)
            raise PoolTimeout(
                f"No connection to database {guard.config.describe()} became free within "
                f"{self._timeout:.1f}s (size {self.size()}, in use {self.checkedout()}, "
                f"waiting {stats.waiting}). Raise OPTIONS['async_pool']['pool_size'], "
                "['max_overflow'] or ['timeout'], or find the code holding connections "
                "(OPTIONS['leak_threshold'] logs where they were taken).",
                alias=guard.alias,
            ) from exc
        except Exception:
            stats.failures += 1
            raise
        finally:
            stats.waiting -= 1
        stats.checkouts += 1
        return record


def _greenlet_sleep(seconds: float) -> None:
    await_(asyncio.sleep(seconds))


class _LoopEngine:
    """The engines of one event loop: read-write, and read-only (made when first used)."""

    def __init__(self, pool: ConnectionPool, config: AliasConfig) -> None:
        self.pool = pool
        self.config = config
        self.engine = self._engine(readonly=False)
        self._readonly: AsyncEngine | None = None
        # Disposed when the loop shuts its async generators down (asyncio.run does).
        self._guardian = self._guard_loop()
        with contextlib.suppress(StopIteration):
            # Run it to its yield now: that registers it with the running loop.
            self._guardian.asend(None).send(None)  # type: ignore[attr-defined]

    @property
    def readonly(self) -> AsyncEngine:
        if self._readonly is None:
            self._readonly = self._engine(readonly=True)
        return self._readonly

    def _engine(self, *, readonly: bool) -> AsyncEngine:
        config, pool = self.config, self.pool
        kwargs = connect_kwargs(config)
        if readonly and not config.pgbouncer:
            # Every statement in autocommit is its own read-only transaction: writes
            # are refused by the server, at no round-trip cost.
            kwargs.setdefault("server_settings", {})["default_transaction_read_only"] = "on"

        async def connect() -> Any:
            return await asyncpg.connect(**kwargs)

        options = config.async_pool
        engine = create_async_engine(
            "postgresql+asyncpg://",
            async_creator=connect,
            poolclass=type(
                "_GuardedPool",
                (_GuardedPool,),
                {"guard": _registry.guard(config.alias), "stats": pool.stats},
            ),
            pool_size=options.pool_size,
            max_overflow=options.max_overflow,
            pool_recycle=options.recycle,
            pool_timeout=options.timeout,
            # Our scopes always end their transactions; a ROLLBACK per return would
            # cost a round trip for nothing.
            pool_reset_on_return=None,
            echo=options.echo,
            isolation_level="AUTOCOMMIT" if readonly else None,
            **({"prepared_statement_cache_size": 0} if config.pgbouncer else {}),
        )
        bypass = config.liveness_bypass
        stats = pool.stats

        @event.listens_for(engine.sync_engine, "connect")
        def on_connect(dbapi_connection: Any, record: Any) -> None:
            stats.created += 1
            record.info["returned_at"] = time.monotonic()

        @event.listens_for(engine.sync_engine, "checkout")
        def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
            raw = dbapi_connection.driver_connection
            if raw.is_closed() or _socket_readable(raw):
                stats.invalidated += 1
                raise sqlalchemy.exc.DisconnectionError("the server closed the connection")
            if time.monotonic() - record.info.get("returned_at", 0.0) > bypass:
                try:
                    dbapi_connection.ping()
                except Exception as exc:
                    stats.invalidated += 1
                    raise sqlalchemy.exc.DisconnectionError(str(exc)) from exc

        @event.listens_for(engine.sync_engine, "checkin")
        def on_checkin(dbapi_connection: Any, record: Any) -> None:
            record.info["returned_at"] = time.monotonic()

        return engine

    async def _guard_loop(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.dispose()

    async def dispose(self) -> None:
        for engine in (self.engine, self._readonly):
            if engine is not None:
                await engine.dispose()


class ConnectionPool:
    """The async pool of one database alias; ``ConnectionPool()`` is the same object each time."""

    _instances: dict[str, ConnectionPool] = {}
    _lock = threading.Lock()

    alias: str
    stats: Stats
    _loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopEngine]

    def __new__(cls, alias: str = "default") -> ConnectionPool:
        try:
            return cls._instances[alias]
        except KeyError:
            pass
        with cls._lock:
            if alias not in cls._instances:
                _registry.settings_dict(alias)  # a clear error for an alias that is not ours
                pool = super().__new__(cls)
                pool.alias = alias
                pool.stats = Stats()
                pool._loops = weakref.WeakKeyDictionary()
                cls._instances[alias] = pool
            return cls._instances[alias]

    def __repr__(self) -> str:
        return f"<ConnectionPool {self.alias!r} loops={len(self._loops)}>"

    # -- engines -------------------------------------------------------------------------

    def _for_loop(self) -> _LoopEngine:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            state = self._start(loop)
        return state

    def _start(self, loop: asyncio.AbstractEventLoop) -> _LoopEngine:
        for other in [lp for lp in self._loops if lp.is_closed()]:
            # A loop closed without shutting down its async generators: its sockets
            # go with the engine's garbage.
            del self._loops[other]
        state = _LoopEngine(self, _registry.config(self.alias))
        self._loops[loop] = state
        return state

    @property
    def engine(self) -> AsyncEngine:
        """The read-write ``AsyncEngine`` of the running event loop."""
        return self._for_loop().engine

    # -- sessions and connections --------------------------------------------------------

    async def get_connection(self) -> AsyncSession:
        """Return a new ``AsyncSession`` with a connection checked out; the caller closes it."""
        session = AsyncSession(self._for_loop().engine, expire_on_commit=False)
        try:
            await session.connection()
        except BaseException:
            await _discard(session)
            raise
        return session

    def session_scope(self, *, readonly: bool = False) -> _SessionScope:
        """Return an async context manager: an ``AsyncSession`` in a transaction.

        Commit on success, roll back on any exception (re-raised), always close.
        ``readonly=True`` runs in autocommit with no BEGIN/COMMIT round trips, and
        the server refuses writes.
        """
        return _SessionScope(self, readonly)

    def connection(self) -> _Lease:
        """Return an async context manager yielding a raw ``asyncpg.Connection``.

        The fast path: no session, no transaction unless you start one, under the
        same connection cap, breaker and accounting as the sessions.
        """
        return _Lease(self)

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
                if attempt == attempts or not _retryable(exc):
                    raise
                logger.warning(
                    "Transaction on %r failed (%s), running it again (%d of %d)",
                    self.alias,
                    type(exc).__name__,
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
        for loop, state in list(self._loops.items()):
            del self._loops[loop]
            if loop is current:
                await state.dispose()
            elif loop.is_running():
                asyncio.run_coroutine_threadsafe(state.dispose(), loop)

    @property
    def metrics(self) -> dict[str, Any]:
        """Return a snapshot of the async side's runtime statistics, as a plain dict."""
        stats = self.stats
        size = in_use = idle = overflow = 0
        for state in list(self._loops.values()):
            for engine in (state.engine, state._readonly):
                if engine is None:
                    continue
                pool = engine.sync_engine.pool
                assert isinstance(pool, _GuardedPool)
                size += pool.size()
                in_use += pool.checkedout()
                idle += pool.checkedin()
                overflow += max(pool.overflow(), 0)
        guard = _registry.guard(self.alias)
        return {
            "alias": self.alias,
            "loops": len(self._loops),
            "pool_size": size,
            "max_overflow": guard.config.async_pool.max_overflow,
            "overflow": overflow,
            "in_use": in_use,
            "idle": idle,
            "waiting": stats.waiting,
            "attempts": stats.attempts,
            "failures": stats.failures,
            "timeouts": stats.timeouts,
            "created": stats.created,
            "reused": max(stats.checkouts - stats.created, 0),
            "invalidated": stats.invalidated,
            "leaks": stats.leaks,
            "breaker_state": guard.state,
            "breaker_failures": guard.breaker.fail_counter,
        }


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


def session_scope(using: str = "default", *, readonly: bool = False) -> _SessionScope:
    """Return ``ConnectionPool(using).session_scope(readonly=readonly)``, for views."""
    return ConnectionPool(using).session_scope(readonly=readonly)
