"""The async pool: per event loop, SQLAlchemy ``AsyncEngine``s over asyncpg, guarded.

The async half of the pool, as :mod:`..sync.pool` is the sync half. It owns:

* :class:`LoopState`: one event loop's engines (read-write, and read-only when
  first used), each on a :class:`~.fairpool.GuardedPool`, disposed while the
  loop shuts down (asyncpg connections belong to the loop that opened them);
* :class:`_Listeners`: what the pool does at connect, checkout (the pool's ``check``:
  the liveness rules of :mod:`..core.liveness`), a session's first round trip, error
  and check-in;
* :func:`connect_kwargs`, the asyncpg arguments of an alias, and the "connection
  lost" test and error (:func:`is_lost`, :func:`lost_error`).

:class:`~.pool.ConnectionPool` is the public face; the scopes it hands out are in
:mod:`.scopes` and :mod:`.readonly`.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
from typing import Any
from urllib.parse import urlencode

import asyncpg
import sqlalchemy.exc
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util.concurrency import await_

from ..config import AliasConfig, refuse_unusable
from ..core import registry as _registry
from ..core import sqlstate as _sqlstate
from ..core import waiters as _waiters
from ..core.checkout import RETURNED
from ..core.hangups import forget_hint, hinted, watch_socket
from ..core.liveness import DUE, GONE, clock, poller, verdict
from ..core.loops import drain_on, run_at_loop_shutdown
from ..core.renewal import lifetime
from ..core.stats import Stats
from ..errors import AsyncConnectionLost, redact
from .dual import dual
from .fairpool import GuardedPool

__all__ = ["LoopState", "connect_kwargs", "is_lost", "lost_error"]

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


#: In a record's info: clock() when it is due to be replaced (``recycle``, spread +-10 %).
_EXPIRES = "asyncpool_expires"
#: In a record's info: its socket's number and :func:`~..core.liveness.poller` (None: no socket).
_SOCKET = "asyncpool_socket"


def connect_kwargs(config: AliasConfig) -> dict[str, Any]:
    """Return ``asyncpg.connect()`` keyword arguments for ``config``."""
    params = dict(config.params)
    # libpq's comma-separated lists (several hosts) are lists for asyncpg; a host that
    # is a directory is a unix socket for both.
    host: str | list[str] | None = config.host or None
    if "," in config.host:
        host = config.host.split(",")
    port: int | list[int] | None = None
    if isinstance(config.port, str):  # one per host; an empty one is the default
        port = [int(p) if p else 5432 for p in config.port.split(",")]
    elif config.port:
        port = config.port
    kwargs: dict[str, Any] = {
        "host": host,
        "port": port,
        "user": config.user or None,
        # asyncpg asks a callable for each connection itself.
        "password": config.password_source or config.password or None,
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
    dsn_query = urlencode({k: params[k] for k in sorted(_ASYNCPG_DSN_KEYS & set(params))}, safe="/")
    if dsn_query:
        kwargs["dsn"] = f"postgresql://?{dsn_query}"
    if config.pgbouncer:
        kwargs["statement_cache_size"] = 0
    return {k: v for k, v in kwargs.items() if v is not None}


def is_lost(exc: BaseException) -> bool:
    """Return True if asyncpg's ``exc`` says the connection died (not the query failed).

    The server's goodbye (shutdown, pg_terminate_backend) that arrives between two
    messages of a statement (after its Parse, before its Bind) leaves asyncpg's
    protocol out of step for good: the statement fails with InternalClientError.
    """
    return (
        isinstance(
            exc,
            (
                asyncpg.exceptions.ConnectionDoesNotExistError,
                asyncpg.exceptions.InternalClientError,
                ConnectionError,
            ),
        )
        # The server's goodbye (57P01 pg_terminate_backend, fast shutdown ...), 08xxx.
        or _sqlstate.classify(exc) == _sqlstate.GONE
    )


def lost_error(
    config: AliasConfig, exc: BaseException, statement: str | None = None, params: Any = None
) -> AsyncConnectionLost:
    """Return the error a caller sees for a connection that died under a query."""
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        # Say what happened rather than asyncpg's internals ("cannot switch to state").
        exc = asyncpg.exceptions.ConnectionDoesNotExistError(
            "the server closed the connection during the request"
        )
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


def _socket(raw: Any) -> tuple[int, Any] | None:
    """Return a new asyncpg connection's socket number and its poller, watched for hang-ups;
    None if it has none."""
    transport = getattr(raw, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return None
    fd = sock.fileno()
    watch_socket(fd)
    return fd, poller(fd)


def _hung_up(sock: tuple[int, Any]) -> bool:
    """Return True if the socket the hang-up watcher named is readable for real.

    Otherwise the hint was stale (a number reused): forgotten.
    """
    fd, poll = sock
    if poll(0):
        return True
    forget_hint(fd)
    return False


class _Listeners:
    """The pool events of one engine: liveness, accounting, lost connections.

    ``connect`` and ``handle_error`` are registered on the engine; ``checkout`` is its
    pool's :attr:`~.fairpool.GuardedPool.check`, run without SQLAlchemy's event dispatch.

    A record is stamped with :func:`~..core.liveness.clock` when it opens (here) and each
    time it comes back (``RETURNED``, by the pool's own check-in); at checkout the
    rules of :mod:`..core.liveness` decide whether it is pinged.
    """

    __slots__ = ("bypass", "config", "ping_timeout", "readonly", "recycle", "stats")

    def __init__(self, config: AliasConfig, stats: Stats, readonly: bool = False) -> None:
        self.config = config
        self.stats = stats
        self.readonly = readonly  # the read-only scopes' engine: 25006 is the caller's write
        self.bypass = config.liveness_bypass
        self.recycle = config.async_pool.recycle
        self.ping_timeout = config.async_pool.timeout

    def register(self, engine: AsyncEngine) -> None:
        target = engine.sync_engine
        event.listen(target, "connect", self.connect)
        event.listen(target, "handle_error", self.handle_error)
        if not self.readonly:
            event.listen(target, "begin", self.begin)

    def connect(self, dbapi_connection: Any, record: Any) -> None:
        self.stats.created += 1
        info = record.info
        now = info[RETURNED] = clock()  # new: no ping at its first checkout
        # Recycled here, not by SQLAlchemy: its recycle has no jitter, and a pool's
        # connections opened together would all be replaced in the same second.
        info[_EXPIRES] = now + lifetime(self.recycle) if self.recycle > 0 else math.inf
        info[_SOCKET] = _socket(dbapi_connection.driver_connection)

    def checkout(self, dbapi_connection: Any, record: Any, now: float) -> None:
        """Check a connection about to be handed out at ``now`` (clock()): the pool's
        :attr:`~.fairpool.GuardedPool.check`. Raise ``DisconnectionError`` to replace it."""
        raw = dbapi_connection.driver_connection
        stats = self.stats
        info = record.info
        # Closed, or bytes (or EOF) waiting on an idle connection: the server's goodbye,
        # which the event loop may not have processed yet. Looked up in the hang-up
        # watcher's set, as the other pools do, and polled only when it names the socket
        # (or where nothing watches): no system call per checkout
        # (benchmarks/bench_checkout.py; docs/performance.md has the figures).
        sock = info.get(_SOCKET)
        found = verdict(
            raw.is_closed() or (sock is not None and hinted(sock[0]) and _hung_up(sock)),
            info.get(RETURNED, 0.0),
            now,
            self.bypass,
        )
        if found == GONE:
            stats.invalidated += 1
            raise sqlalchemy.exc.DisconnectionError("the server closed the connection")
        if now >= info[_EXPIRES]:
            raise sqlalchemy.exc.DisconnectionError(
                "older than OPTIONS['async_pool']['recycle']: replaced"
            )
        if found == DUE:
            stats.pings += 1
            try:
                # Bounded: on a dead network path (packets dropped, nothing refused)
                # an unbounded ping would hang the checkout for good.
                await_(raw.execute("select 1", timeout=self.ping_timeout))
            except Exception as exc:
                stats.invalidated += 1
                # Now: SQLAlchemy's invalidation would first try a graceful close,
                # for up to 2 s more on a dead path.
                raw.terminate()
                raise sqlalchemy.exc.DisconnectionError(str(exc)) from exc
        if record.fresh:
            # A new connection (SQLAlchemy sets it at connect), not yet handed out: no
            # reuse. Cleared as SQLAlchemy's own checkout would, were it to run the check.
            record.fresh = False
        else:
            stats.reused += 1

    def begin(self, conn: Any) -> None:
        """Send a transaction's BEGIN now, replacing a connection found dead by it.

        The liveness check cannot see a backend that is dying right now (terminated,
        its goodbye not yet sent) or a link a firewall dropped silently: the BEGIN,
        the first round trip, is what finds them. Sent here (SQLAlchemy's "begin"
        event, as the asyncpg adapter's cursor would with the first statement: its
        ``_start_transaction``), nothing has run on the connection yet, so another is
        taken once and the caller never sees it. A transaction with its own isolation
        level, read-only or deferrable flag is left to the first statement, as is any
        other failure; a cancelled BEGIN throws the connection away.
        """
        for retry in (True, False):
            adapter = conn.connection.dbapi_connection
            if (
                adapter._transaction is not None
                or adapter.isolation_level is not None
                or adapter.readonly
                or adapter.deferrable
            ):
                return
            try:
                await_(adapter._start_transaction())
                return
            except Exception as exc:
                if not (retry and (is_lost(exc) or is_lost(exc.__cause__ or exc))):
                    return
                self.stats.invalidated += 1
                conn.invalidate(exc)  # the next conn.connection checks out another
            except BaseException:
                conn.invalidate()  # cancelled mid-BEGIN: out of step, never reused
                raise

    def handle_error(self, context: Any) -> Exception | None:
        # The server's goodbye (shutdown, pg_terminate_backend) arrives as an error
        # before the socket closes, so the dialect's is_disconnect() (is_closed())
        # says no and the session would ROLLBACK on the dying connection. When it
        # arrives between two statements, asyncpg's protocol is left mid-error and
        # the next one fails with InternalClientError ("another operation is in
        # progress"): the connection is out of step for good. Only this connection
        # is thrown away; the checkout liveness check finds the others.
        exc = context.original_exception
        cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
        if is_lost(exc) or is_lost(cause):
            context.is_disconnect = True
            context.invalidate_pool_on_disconnect = False
        elif (
            not self.readonly
            and context.connection is not None
            and _sqlstate.classify(exc) == _sqlstate.READ_ONLY
            and _registry.guard(self.config.alias).demoted("async", self.stats)
        ):
            # A demoted primary: this connection is thrown away, and every other of the
            # engine's pool replaced as a drain does: the idle ones closed now (they
            # hold server slots), those in use when they come back.
            context.is_disconnect = True
            context.invalidate_pool_on_disconnect = False
            pool = context.engine.pool if context.engine is not None else None
            if isinstance(pool, GuardedPool):
                pool.drain()
            error = context.sqlalchemy_exception
            return dual(error) if isinstance(error, sqlalchemy.exc.DBAPIError) else None
        if not isinstance(exc, Exception):  # cancelled: SQLAlchemy calls it a disconnect
            return None
        if not context.is_disconnect or context.connection is None:
            # The statement's own error (or 25006): also Django's class of the same kind.
            error = context.sqlalchemy_exception
            return dual(error) if isinstance(error, sqlalchemy.exc.DBAPIError) else None
        # One error for a lost connection, whichever way asyncpg said it (the
        # server's goodbye, "connection was closed in the middle of operation", a
        # reset socket): ours, and SQLAlchemy's OperationalError.
        return lost_error(self.config, cause, context.statement, context.parameters)


#: The hosts that answered during one connect of several hosts (:func:`_connect`).
_ANSWERED: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "asyncpool_answered", default=None
)


class _Answering(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's connection, noting that its host answered (see :func:`_connect`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        answered = _ANSWERED.get()
        if answered is not None:
            answered.append(self._addr)


async def _connect(kwargs: dict[str, Any]) -> Any:
    """Return ``asyncpg.connect(**kwargs)``; say when a host answered but did not match.

    With several hosts and ``target_session_attrs``, asyncpg raises the last network
    error when one host is down and another is not what is asked for (the primary
    stopped, the standby not yet promoted): a failover under way, not an outage.
    libpq says so (one line per host); here it is said the same way, so that the
    guard retries it without counting it (:func:`..core.sqlstate.classify`).
    """
    if not isinstance(kwargs.get("host"), list) or "target_session_attrs" not in kwargs.get(
        "dsn", ""
    ):
        return await asyncpg.connect(**kwargs)
    answered: list[Any] = []
    token = _ANSWERED.set(answered)
    try:
        return await asyncpg.connect(**kwargs, connection_class=_Answering)
    except OSError as exc:
        if not answered:
            raise
        raise asyncpg.exceptions.TargetServerAttributeNotMatched(
            f"None of the hosts match the target attribute requirement: {len(answered)} "
            f"answered but did not match, and {exc}"
        ) from exc
    finally:
        _ANSWERED.reset(token)


def _create_engine(
    config: AliasConfig, stats: Stats, budget: _waiters.Budget, *, readonly: bool
) -> AsyncEngine:
    """Return a new engine of ``config`` on a :class:`GuardedPool`, its listeners registered."""
    kwargs = connect_kwargs(config)
    if readonly and not config.pgbouncer:
        # Every statement in autocommit is its own read-only transaction: writes
        # are refused by the server, at no round-trip cost.
        kwargs.setdefault("server_settings", {})["default_transaction_read_only"] = "on"

    async def connect() -> Any:
        if config.password_source is None:
            return await _connect(kwargs)
        try:
            return await _connect(kwargs)
        except asyncpg.InvalidPasswordError:
            pass
        # The password expired between asking and connecting: asked once more.
        return await _connect(kwargs)

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
    # SQLAlchemy makes the pool itself from poolclass (and again in recreate()), so
    # the guard and stats ride on a per-engine subclass, as class attributes.
    listeners = _Listeners(config, stats, readonly)
    poolclass = type(
        "GuardedPool",
        (GuardedPool,),
        {
            "guard": _registry.guard(config.alias),
            "stats": stats,
            "metered": config.metrics,
            "budget": budget,
            "check": listeners.checkout,
        },
    )
    engine = create_async_engine(
        "postgresql+asyncpg://",
        creator=creator,
        poolclass=poolclass,
        pool_size=options.pool_size,
        max_overflow=options.max_overflow,
        pool_recycle=-1,  # _Listeners.checkout recycles, each connection at its own time
        pool_timeout=options.timeout,
        # Our scopes always end their transactions; a ROLLBACK per return would
        # cost a round trip for nothing.
        pool_reset_on_return=None,
        echo=options.echo,
        isolation_level="AUTOCOMMIT" if autocommit else None,
        execution_options={"postgresql_readonly": True} if readonly and not autocommit else {},
    )
    listeners.register(engine)
    return engine


class LoopState:
    """The engines of one event loop: read-write, and read-only (made when first used).

    Both count their connections in the alias's one budget on this loop
    (:func:`._waiters.budget`), with the native async ORM's.
    """

    def __init__(self, stats: Stats, config: AliasConfig) -> None:
        refuse_unusable(config)
        self.stats = stats
        self.config = config
        options = config.async_pool
        self.budget = _waiters.budget(config.alias, options.pool_size + options.max_overflow)
        self.engine = _create_engine(config, stats, self.budget, readonly=False)
        self._readonly: AsyncEngine | None = None
        self._guardian = run_at_loop_shutdown(self.dispose)

    @property
    def readonly(self) -> AsyncEngine:
        if self._readonly is None:
            self._readonly = _create_engine(self.config, self.stats, self.budget, readonly=True)
        return self._readonly

    def counts(self) -> tuple[int, int]:
        """Return ``(idle, in_use)`` connections of this loop's engines."""
        idle = in_use = 0
        for engine in (self.engine, self._readonly):
            if engine is not None:
                pool: Any = engine.sync_engine.pool
                idle += pool.checkedin()
                in_use += pool.checkedout()
        return idle, in_use

    def drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Replace every connection of this loop's engines (from any thread).

        Each engine's :meth:`GuardedPool.drain`: marked now, so that none opened before
        is used again; the idle ones closed on ``loop``, the others when they come back.
        """
        for engine in (self.engine, self._readonly):
            if engine is not None:
                drain_on(loop, engine.sync_engine.pool)

    async def dispose(self) -> None:
        for engine in (self.engine, self._readonly):
            if engine is not None:
                await engine.dispose()
