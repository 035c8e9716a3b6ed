"""One event loop's engines: SQLAlchemy ``AsyncEngine``s over asyncpg, guarded.

asyncpg connections belong to the loop that opened them, so each loop gets its
own engines; they are disposed while the loop shuts its async generators down
(``asyncio.run()`` and asgiref do).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import sqlalchemy.exc
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import Pool, PoolProxiedConnection
from sqlalchemy.pool.base import _AsyncConnDialect
from sqlalchemy.util.concurrency import await_

from . import _registry
from ._policy import Guard, redact
from ._stats import Stats
from .config import AliasConfig, refuse_pgbouncer_conflicts
from .errors import AsyncConnectionLost, PoolTimeout

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
#: The server closing the connection: admin_shutdown (pg_terminate_backend, fast
#: shutdown), crash_shutdown, cannot_connect_now, idle_session_timeout.
_GOODBYE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "57P05"})
#: SQLSTATEs worth re-running a whole transaction for (opt-in).
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock


#: In a record's info: a new connection, not yet checked out (the next checkout is no reuse).
_FRESH = "asyncpool_fresh"
#: In a record's info: monotonic time of the checkout, for the time the connection is held.
_TAKEN = "asyncpool_taken_at"


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


def is_lost(exc: BaseException) -> bool:
    """Return True if asyncpg's ``exc`` says the connection died (not the query failed)."""
    return (
        isinstance(exc, (asyncpg.exceptions.ConnectionDoesNotExistError, ConnectionError))
        or getattr(exc, "sqlstate", None) in _GOODBYE_SQLSTATES
    )


def lost_error(
    config: AliasConfig, exc: BaseException, statement: str | None = None, params: Any = None
) -> AsyncConnectionLost:
    """Return the error a caller sees for a connection that died under a query."""
    return AsyncConnectionLost(
        f"The connection to database {config.describe()} was lost during a query "
        f"({redact(str(exc).strip(), config.password) or type(exc).__name__}) and discarded: "
        "the server restarted, the backend was terminated or the network failed. Run the "
        "transaction again once the server answers (ConnectionPool.run_transaction() does).",
        alias=config.alias,
        statement=statement,
        params=params,
        orig=exc,
    )


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


class _GuardedPool(Pool):
    """A fair asyncio pool with the alias's breaker, retries and stats.

    SQLAlchemy's ``AsyncAdaptedQueuePool`` waits on an ``asyncio.Queue``, which is
    not fair: a connection put back wakes the oldest getter, but a task that runs
    first takes it, and the woken getter queues again at the back; under steady
    overload a waiter can be passed over until it times out. Here, as in
    psycopg_pool, a connection that comes back goes straight to the oldest waiter,
    and nobody takes an idle connection or opens one while someone waits.

    Connections above ``pool_size`` (up to ``max_overflow`` more) are kept while the
    demand lasts, like HikariCP and psycopg_pool (SQLAlchemy would close and reopen
    one per checkout), and closed on check-in once the demand stayed within
    ``pool_size`` for :attr:`KEEP_OVERFLOW` seconds.

    Opening a connection (for a checkout, or to replace a dead one in place) goes
    through the guard with retries; a checkout fails fast while the breaker is
    open. A wait that times out raises :class:`PoolTimeout`, counted by the breaker
    only with ``OPTIONS["circuit_breaker"]["count_pool_timeouts"]``. ``guard`` and
    ``stats`` are class attributes of a per-engine subclass, so ``recreate()``
    keeps them. All of it runs on the engine's one event loop: no lock.
    """

    _is_asyncio = True
    _dialect = _AsyncConnDialect()

    guard: Guard
    stats: Stats
    #: Time checkouts for the latency histogram (``OPTIONS["metrics"]``).
    metered: bool = True
    #: Seconds overflow connections are kept after demand last exceeded pool_size.
    KEEP_OVERFLOW = 30.0

    def __init__(
        self,
        creator: Any,
        pool_size: int = 5,
        max_overflow: int = 10,
        timeout: float = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(creator, **kwargs)
        self._size = pool_size
        self._max_overflow = max_overflow
        #: The most connections this engine opens: pool_size + max_overflow.
        self.cap = pool_size + max_overflow
        self._timeout = timeout
        self._idle: deque[Any] = deque()
        #: Futures of the callers waiting, oldest first; done ones are skipped.
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._opened = 0  # records idle, checked out, or being opened
        self._busy_at = 0.0  # monotonic time demand last exceeded pool_size
        self._disposed = False
        create = self._invoke_creator
        guard, stats = self.guard, self.stats

        def guarded(record: Any) -> Any:
            return guard.run(create, record, sleep=_greenlet_sleep, stats=stats)

        self._invoke_creator = guarded  # type: ignore[assignment]

    def connect(self) -> PoolProxiedConnection:
        # The whole checkout, liveness check and reconnection included: the time to a
        # usable connection, and its outcome.
        stats = self.stats
        stats.attempts += 1
        started = time.perf_counter()
        try:
            fairy = super().connect()
        except BaseException as exc:
            stats.failed(exc)
            raise
        stats.checkouts += 1
        if self.metered:
            stats.latency.observe(time.perf_counter() - started)
        return fairy

    # -- checkout ---------------------------------------------------------------------------

    def _do_get(self) -> Any:
        guard = self.guard
        if guard.breaker.current_state != "closed":
            guard.check_open()
        idle = self._idle
        if self._opened - len(idle) >= self._size:
            self._busy_at = time.monotonic()  # demand above pool_size: keep the overflow
        if idle:
            return idle.popleft()  # an idle connection means nobody is waiting
        if self._opened >= self.cap:
            record = self._wait()
            if record is not None:
                return record
            # None: a free slot was handed over, to open a connection in
        else:
            self._opened += 1
        try:
            return self._create_connection()
        except BaseException:
            self._release_slot()
            raise

    def _wait(self) -> Any:
        """Queue up; return the record handed over, or None for a slot to open one in."""
        stats = self.stats
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiting.append(waiter)
        timer = loop.call_later(self._timeout, _expire, waiter)
        stats.waiting += 1
        try:
            got = await_(waiter)
        except BaseException:
            # Cancelled: what was handed over meanwhile goes on to the next in line.
            if waiter.done() and not waiter.cancelled():
                self._pass_on(waiter.result())
            else:
                waiter.cancel()
            raise
        finally:
            timer.cancel()
            stats.waiting -= 1
        if got is _TIMED_OUT:
            guard = self.guard
            error = PoolTimeout(
                f"No connection to database {guard.config.describe()} became free within "
                f"{self._timeout:.1f}s (size {self._size}, in use {self.checkedout()}, "
                f"waiting {stats.waiting + 1}). Raise OPTIONS['async_pool']['pool_size'], "
                "['max_overflow'] or ['timeout'], or find the code holding connections "
                "(OPTIONS['leak_threshold'] logs where they were taken).",
                alias=guard.alias,
            )
            guard.failed(error, trial=False)  # counted only if the breaker is told to
            raise error
        return got

    def _pass_on(self, got: Any) -> None:
        """Give what a cancelled waiter was handed (a record, or a slot) to the next one."""
        if got is None:
            self._release_slot()
        elif got is not _TIMED_OUT and not self._hand_over(got):
            self._idle.append(got)

    def _hand_over(self, got: Any) -> bool:
        """Give ``got`` to the oldest caller still waiting; return False if there is none."""
        waiting = self._waiting
        while waiting:
            waiter = waiting.popleft()
            if not waiter.done():  # not timed out, not cancelled
                waiter.set_result(got)
                return True
        return False

    def _release_slot(self) -> None:
        """Give up a slot counted in ``_opened``: to a waiter, who opens a connection in it."""
        if not self._hand_over(None):
            self._opened -= 1

    # -- check-in ---------------------------------------------------------------------------

    def closes_on_return(self) -> bool:
        """Return True if a check-in now may close a connection (which awaits: a greenlet)."""
        return self._disposed or (
            self._opened > self._size and time.monotonic() - self._busy_at >= self.KEEP_OVERFLOW
        )

    def _do_return_conn(self, record: Any) -> None:
        if self._hand_over(record):
            return
        if self.closes_on_return():
            # The demand stayed within pool_size for a while (or the pool was disposed):
            # close this connection, and the idle ones above pool_size.
            self._opened -= 1
            try:
                record.close()
            finally:
                while self._idle and (self._disposed or self._opened > self._size):
                    self._opened -= 1
                    self._idle.pop().close()
            return
        self._idle.append(record)

    # -- the pool's state ---------------------------------------------------------------------

    def dispose(self) -> None:
        # Connections in use are closed as they come back (SQLAlchemy's queue pool
        # would keep them in a pool nobody uses any more).
        self._disposed = True
        while self._idle:
            self._opened -= 1
            self._idle.popleft().close()
        self.logger.info("Pool disposed. %s", self.status())

    def recreate(self) -> _GuardedPool:
        self.logger.info("Pool recreating")
        return self.__class__(
            self._creator,
            pool_size=self._size,
            max_overflow=self._max_overflow,
            timeout=self._timeout,
            recycle=self._recycle,
            echo=self.echo,
            logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return,
            pre_ping=self._pre_ping,
            _dispatch=self.dispatch,
            dialect=self._dialect,
        )

    def status(self) -> str:
        return (
            f"Pool size: {self.size()}  Connections in pool: {self.checkedin()} Current "
            f"Overflow: {self.overflow()} Current Checked out connections: "
            f"{self.checkedout()} Waiting: {self.waiting()}"
        )

    def size(self) -> int:
        return self._size

    def timeout(self) -> float:
        return self._timeout

    def checkedin(self) -> int:
        return len(self._idle)

    def checkedout(self) -> int:
        return self._opened - len(self._idle)

    def overflow(self) -> int:
        return self._opened - self._size

    def waiting(self) -> int:
        """Return how many callers wait for a connection of this engine."""
        return sum(not waiter.done() for waiter in self._waiting)


#: A waiter's future resolves to a record, to None (a free slot to open one in), or this.
_TIMED_OUT: Any = object()


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)


def _greenlet_sleep(seconds: float) -> None:
    await_(asyncio.sleep(seconds))


class _LoopEngine:
    """The engines of one event loop: read-write, and read-only (made when first used)."""

    def __init__(self, stats: Stats, config: AliasConfig) -> None:
        refuse_pgbouncer_conflicts(config)
        self.stats = stats
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
        config = self.config
        kwargs = connect_kwargs(config)
        if readonly and not config.pgbouncer:
            # Every statement in autocommit is its own read-only transaction: writes
            # are refused by the server, at no round-trip cost.
            kwargs.setdefault("server_settings", {})["default_transaction_read_only"] = "on"

        async def connect() -> Any:
            return await asyncpg.connect(**kwargs)

        def creator() -> Any:
            # create_async_engine(async_creator=) would drop the adapter's arguments:
            # SQLAlchemy's own prepared-statement cache must be off behind PgBouncer.
            dbapi: Any = engine.sync_engine.dialect.dbapi
            return dbapi.connect(
                async_creator_fn=connect,
                prepared_statement_cache_size=0 if config.pgbouncer else 100,
            )

        options = config.async_pool
        # Behind PgBouncer a read-only scope runs in BEGIN READ ONLY ... ROLLBACK: it
        # accepts no startup setting, and autocommit would leave writes unchecked.
        autocommit = readonly and not config.pgbouncer
        engine = create_async_engine(
            "postgresql+asyncpg://",
            creator=creator,
            poolclass=type(
                "_GuardedPool",
                (_GuardedPool,),
                {
                    "guard": _registry.guard(config.alias),
                    "stats": self.stats,
                    "metered": config.metrics,
                },
            ),
            pool_size=options.pool_size,
            max_overflow=options.max_overflow,
            pool_recycle=options.recycle,
            pool_timeout=options.timeout,
            # Our scopes always end their transactions; a ROLLBACK per return would
            # cost a round trip for nothing.
            pool_reset_on_return=None,
            echo=options.echo,
            isolation_level="AUTOCOMMIT" if autocommit else None,
            execution_options={"postgresql_readonly": True} if readonly and not autocommit else {},
        )
        bypass = config.liveness_bypass
        ping_timeout = options.timeout
        stats = self.stats
        metered = config.metrics

        @event.listens_for(engine.sync_engine, "connect")
        def on_connect(dbapi_connection: Any, record: Any) -> None:
            stats.created += 1
            record.info["returned_at"] = time.monotonic()
            record.info[_FRESH] = True

        @event.listens_for(engine.sync_engine, "checkout")
        def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
            raw = dbapi_connection.driver_connection
            if raw.is_closed() or _socket_readable(raw):
                stats.invalidated += 1
                raise sqlalchemy.exc.DisconnectionError("the server closed the connection")
            info = record.info
            now = time.monotonic()
            if now - info.get("returned_at", 0.0) > bypass:
                try:
                    # Bounded: on a dead network path (packets dropped, nothing refused)
                    # an unbounded ping would hang the checkout for good.
                    await_(raw.execute("select 1", timeout=ping_timeout))
                except Exception as exc:
                    stats.invalidated += 1
                    # Now: SQLAlchemy's invalidation would first try a graceful close,
                    # for up to 2 s more on a dead path.
                    raw.terminate()
                    raise sqlalchemy.exc.DisconnectionError(str(exc)) from exc
            if not info.pop(_FRESH, False):
                stats.reused += 1
            if metered:
                info[_TAKEN] = now

        @event.listens_for(engine.sync_engine, "handle_error")
        def on_error(context: Any) -> Exception | None:
            # The server's goodbye (shutdown, pg_terminate_backend) arrives as an error
            # before the socket closes, so the dialect's is_disconnect() (is_closed())
            # says no and the session would ROLLBACK on the dying connection. When it
            # arrives between two statements, asyncpg's protocol is left mid-error and
            # the next one fails with InternalClientError ("another operation is in
            # progress"): the connection is out of step for good. Only this connection
            # is thrown away; the checkout liveness check finds the others.
            exc = context.original_exception
            out_of_step = isinstance(exc.__cause__, asyncpg.exceptions.InternalClientError)
            if getattr(exc, "sqlstate", None) in _GOODBYE_SQLSTATES or out_of_step:
                context.is_disconnect = True
                context.invalidate_pool_on_disconnect = False
            if (
                not context.is_disconnect
                or context.connection is None
                or not isinstance(exc, Exception)  # cancelled: SQLAlchemy calls it a disconnect
            ):
                return None
            # One error for a lost connection, whichever way asyncpg said it (the
            # server's goodbye, "connection was closed in the middle of operation", a
            # reset socket): ours, and SQLAlchemy's OperationalError.
            cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
            if out_of_step:
                # Say what happened rather than asyncpg's internals.
                cause = asyncpg.exceptions.ConnectionDoesNotExistError(
                    "the server closed the connection during the request"
                )
            return lost_error(config, cause, context.statement, context.parameters)

        @event.listens_for(engine.sync_engine, "checkin")
        def on_checkin(dbapi_connection: Any, record: Any) -> None:
            info = record.info
            now = info["returned_at"] = time.monotonic()
            taken = info.pop(_TAKEN, None)
            if taken is not None:
                stats.held.observe(now - taken)

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
