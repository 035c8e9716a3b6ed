"""One event loop's engines: SQLAlchemy ``AsyncEngine``s over asyncpg, guarded.

asyncpg connections belong to the loop that opened them, so each loop gets its
own engines; they are disposed while the loop shuts its async generators down
(``asyncio.run()`` and asgiref do).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import asyncpg
import sqlalchemy.exc
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util.concurrency import await_

from . import _registry
from ._fairpool import _GuardedPool
from ._liveness import due_for_ping, socket_readable
from ._stats import Stats
from .config import AliasConfig, refuse_unusable
from .errors import AsyncConnectionLost, redact

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
        or getattr(exc, "sqlstate", None) in _GOODBYE_SQLSTATES
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


def _socket_readable(raw: Any) -> bool:
    """Return True when an idle asyncpg connection has bytes (or EOF) waiting.

    The event loop may not have processed the server's goodbye yet.
    """
    transport = getattr(raw, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and socket_readable(sock.fileno())


class _LoopEngine:
    """The engines of one event loop: read-write, and read-only (made when first used)."""

    def __init__(self, stats: Stats, config: AliasConfig) -> None:
        refuse_unusable(config)
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
            if due_for_ping(info.get("returned_at", 0.0), now, bypass):
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
            cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
            if is_lost(exc) or is_lost(cause):
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
