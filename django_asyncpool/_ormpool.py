"""The native async ORM's connections: psycopg ``AsyncConnection``s that Django drives in sync.

Django's ORM is sync code. To run it on the event loop without a thread, it runs
in a greenlet (SQLAlchemy's ``greenlet_spawn``) and the DB-API connection it holds
is a :class:`GreenConnection`: psycopg's own sync ``Connection`` sharing the
libpq connection of a pooled ``AsyncConnection``, whose one I/O entry point,
``wait()``, hands the protocol generator to the async connection's ``wait()`` and
switches back to the loop until it is done. So Django's cursors (client-side
binding, and the named cursors of ``iterator()``), its adapters, converters and
error wrapping run unchanged; only the waiting is async.

Each event loop has its own pool per alias (:class:`OrmPool`, a
``psycopg_pool.AsyncConnectionPool``: a fair FIFO handoff), closed while the loop
shuts its async generators down, as the SQLAlchemy engines are. Every pooled
connection carries one :class:`NativeWrapper`: Django's ``DatabaseWrapper`` of the
alias bound to that connection for its whole life, so a checkout builds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import psycopg_pool
from django.core.exceptions import SynchronousOnlyOperation
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.postgresql import base as postgresql
from django.db.backends.signals import connection_created
from psycopg import IsolationLevel, pq
from sqlalchemy.util.concurrency import await_, greenlet_spawn, in_greenlet

from . import _registry, _stats
from ._policy import Guard
from ._syncpool import _RETURNED, _hangups, _maybe_closed, _readable, _watch
from .base import DatabaseWrapper
from .config import AliasConfig
from .errors import PoolClosed, PoolTimeout

__all__ = ["GreenConnection", "Holder", "Lease", "NativeWrapper", "OrmPool", "holder", "holders"]

logger = logging.getLogger("django_asyncpool")

SIDE = "async_orm"
#: On a pooled AsyncConnection: its NativeWrapper.
_NATIVE = "_asyncpool_native"


class GreenConnection(psycopg.Connection[Any]):
    """psycopg's sync connection over an ``AsyncConnection``'s libpq connection.

    Every query, commit and cursor operation of psycopg's sync API goes through
    ``wait()``; here it awaits the async connection's ``wait()`` from the greenlet
    (which also cancels the query on the server when the task is cancelled).
    """

    aconn: psycopg.AsyncConnection[Any]

    def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        if not in_greenlet():  # sync ORM code called in the task itself: Django's error
            raise SynchronousOnlyOperation(
                "You cannot call this from an async context - use a thread or sync_to_async."
            )
        return await_(self.aconn.wait(gen, *args, **kwargs))


def _unguarded(method: Any) -> Any:
    """Return ``method`` without Django's ``async_unsafe`` guard."""
    return getattr(method, "__wrapped__", method)


class NativeWrapper(DatabaseWrapper):
    """The alias's DatabaseWrapper, bound to one :class:`GreenConnection` for good.

    Django's ``async_unsafe`` guard refuses these methods on a thread running an
    event loop; in the greenlet they are safe (the I/O is awaited), so the
    undecorated methods are used. ``close()`` only marks the connection to be
    discarded when it goes back to the pool.
    """

    _twin: GreenConnection
    #: Its own query log, for a task without a wrapper of its own to share one with.
    own_queries_log: Any
    _discard = False
    #: The task of the atomic block holding this connection (None outside one).
    _owner: Any = None
    #: on_commit callbacks of a committed transaction, run after the greenlet (in a thread).
    _pending_hooks: list[Any]

    connect = _unguarded(BaseDatabaseWrapper.connect)
    cursor = _unguarded(BaseDatabaseWrapper.cursor)
    commit = _unguarded(BaseDatabaseWrapper.commit)
    rollback = _unguarded(BaseDatabaseWrapper.rollback)
    savepoint = _unguarded(BaseDatabaseWrapper.savepoint)
    savepoint_rollback = _unguarded(BaseDatabaseWrapper.savepoint_rollback)
    savepoint_commit = _unguarded(BaseDatabaseWrapper.savepoint_commit)
    clean_savepoints = _unguarded(BaseDatabaseWrapper.clean_savepoints)
    create_cursor = _unguarded(postgresql.DatabaseWrapper.create_cursor)
    chunked_cursor = _unguarded(postgresql.DatabaseWrapper.chunked_cursor)

    @property
    def pool(self) -> None:
        return None  # its connection is the async pool's, never the sync one's

    def ensure_connection(self) -> None:
        if self.connection is None:
            # Closed (an error in a transaction): the connection is discarded on return.
            from django.db import InterfaceError

            raise InterfaceError("connection already closed")

    def close(self) -> None:
        self.run_on_commit = []
        self._discard = True
        if self.in_atomic_block:
            self.closed_in_transaction = True
            self.needs_rollback = True

    def run_and_clear_commit_hooks(self) -> None:
        self.validate_no_atomic_block()
        # Callbacks are the application's sync code (mail, queues): not on the loop.
        self._pending_hooks.extend(self.run_on_commit)
        self.run_on_commit = []

    def reset(self) -> bool:
        """Make this wrapper ready for the next task; return False if its connection is not."""
        twin = self._twin
        clean = (
            not self._discard
            and self.connection is twin
            and not self.in_atomic_block
            and twin._autocommit
            and twin.pgconn.transaction_status == pq.TransactionStatus.IDLE
        )
        self.run_on_commit = []
        self._pending_hooks = []
        self._owner = None
        if not clean:
            self.connection = twin
            self.in_atomic_block = False
            self.savepoint_ids = []
            self.atomic_blocks = []
            self.needs_rollback = False
            self.closed_in_transaction = False
        return clean


def _bind(native: NativeWrapper, twin: GreenConnection) -> None:
    """Give ``wrapper`` the state Django's ``connect()`` gives a new connection."""
    wrapper: Any = native
    wrapper.connection = twin
    wrapper._twin = twin
    wrapper._pending_hooks = []
    wrapper.in_atomic_block = False
    wrapper.savepoint_ids = []
    wrapper.atomic_blocks = []
    wrapper.needs_rollback = False
    wrapper.health_check_enabled = False
    wrapper.health_check_done = True
    wrapper.close_at = None
    wrapper.closed_in_transaction = False
    wrapper.errors_occurred = False
    wrapper.autocommit = True
    wrapper.run_on_commit = []
    wrapper.own_queries_log = wrapper.queries_log
    wrapper.__dict__["pg_version"] = twin.info.server_version  # no query for it


class OrmPool(psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Any]]):
    """One loop's async psycopg pool of one alias, failing fast and checking liveness cheaply.

    As :class:`~django_asyncpool._syncpool.SyncPool`: a failed connection attempt
    fails the waiting clients at once (the breaker and retries take it from there),
    and a checkout pings only a connection idle for longer than ``bypass`` or whose
    socket says the server hung up.
    """

    def __init__(self, *args: Any, wrapper: Any, config: AliasConfig, **kwargs: Any) -> None:
        self.bypass = config.liveness_bypass
        self.alias = config.alias
        self.last_connect_error: BaseException | None = None
        self._settings_dict = wrapper.settings_dict
        self._twin_cursor = kwargs["kwargs"].pop("twin_cursor")
        self._configure_wrapper = wrapper
        super().__init__(*args, **kwargs)

    async def getconn(self, timeout: float | None = None) -> psycopg.AsyncConnection[Any]:
        if not self._opened:
            await self.open()
        started = time.monotonic()
        conn = await super().getconn(timeout)
        if started - getattr(conn, _RETURNED, 0.0) > self.bypass or _maybe_closed(conn):  # type: ignore[arg-type]
            conn = await self._checked(
                conn, started + (self.timeout if timeout is None else timeout)
            )
        return conn

    async def _checked(
        self, conn: psycopg.AsyncConnection[Any], deadline: float
    ) -> psycopg.AsyncConnection[Any]:
        """Return ``conn`` if it is alive, else another one that is (as SyncPool._checked)."""
        for _ in range(self.max_size):
            try:
                await self._check_liveness(conn)
            except (psycopg.Error, TimeoutError):
                await conn.close()
                await super().putconn(conn)  # a bad return: the pool replaces it
            except BaseException:
                await super().putconn(conn)
                raise
            else:
                if _hangups is not None:
                    _hangups.fds.discard(conn.pgconn.socket)
                return conn
            conn = await super().getconn(max(deadline - time.monotonic(), 0.0))
        return conn

    async def _check_liveness(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if conn.closed or conn.broken:
            raise psycopg.OperationalError("the connection is closed")
        if _readable(conn):  # type: ignore[arg-type]
            conn.pgconn.consume_input()
            if conn.pgconn.status != pq.ConnStatus.OK or conn.pgconn.notifies() is None:
                raise psycopg.OperationalError("the server closed the connection")
        if time.monotonic() - getattr(conn, _RETURNED, 0.0) > self.bypass:
            # Bounded: on a dead network path an unbounded ping would hang the checkout.
            async with asyncio.timeout(self.timeout):
                await psycopg_pool.AsyncConnectionPool.check_connection(conn)

    async def putconn(self, conn: psycopg.AsyncConnection[Any]) -> None:
        setattr(conn, _RETURNED, time.monotonic())  # for the liveness bypass window
        await super().putconn(conn)

    async def _connect(self, timeout: float | None = None) -> psycopg.AsyncConnection[Any]:
        try:
            conn = await super()._connect(timeout)
            await greenlet_spawn(self._native, conn)
        except Exception as exc:
            self.last_connect_error = exc
            async with self._lock:
                waiting = list(self._waiting)
                self._waiting.clear()
            for client in waiting:
                await client.fail(exc)
            raise
        self.last_connect_error = None
        setattr(conn, _RETURNED, time.monotonic())  # new: no ping at its first checkout
        _watch(conn)  # type: ignore[arg-type]
        return conn

    def _native(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Give ``conn`` its twin and wrapper, configured as Django configures connections."""
        isolation = self._settings_dict["OPTIONS"].get("isolation_level")
        twin = GreenConnection(conn.pgconn)
        twin.aconn = conn
        twin._pool = None  # psycopg: no "deleted while open" warning
        twin._adapters = conn.adapters
        twin.cursor_factory = self._twin_cursor
        twin.prepare_threshold = conn.prepare_threshold
        twin._autocommit = True
        if isolation is not None:
            twin._isolation_level = IsolationLevel(isolation)
        wrapper = NativeWrapper(self._settings_dict, self.alias)
        wrapper.isolation_level = (
            IsolationLevel(isolation) if isolation is not None else IsolationLevel.READ_COMMITTED
        )
        _bind(wrapper, twin)
        # Django's own: time zone (with USE_TZ) and assume_role.
        self._configure_wrapper._configure_connection(twin)
        connection_created.send(sender=NativeWrapper, connection=wrapper)
        setattr(conn, _NATIVE, wrapper)


def _pool_kwargs(wrapper: Any) -> dict[str, Any]:
    """Return the AsyncConnection kwargs of ``wrapper``'s alias: Django's own parameters."""
    params: dict[str, Any] = wrapper.get_connection_params()
    twin_cursor = params.pop("cursor_factory", postgresql.Cursor)
    params["twin_cursor"] = twin_cursor
    # The async connection never makes a cursor itself; the twin makes Django's.
    params["cursor_factory"] = (
        psycopg.AsyncCursor
        if issubclass(twin_cursor, postgresql.ServerBindingCursor)
        else psycopg.AsyncClientCursor
    )
    params["autocommit"] = True
    return params


class Lease:
    """One checked-out connection and its wrapper."""

    __slots__ = ("conn", "holder", "wrapper")

    def __init__(self, holder: Holder, conn: psycopg.AsyncConnection[Any]) -> None:
        self.holder = holder
        self.conn = conn
        self.wrapper: NativeWrapper = getattr(conn, _NATIVE)


class Holder:
    """One alias's :class:`OrmPool` on one event loop, with the alias's guard and stats."""

    def __init__(self, config: AliasConfig, wrapper: Any) -> None:
        options = config.async_pool
        self.config = config
        self.guard: Guard = _registry.guard(config.alias)
        self.stats = _stats.get(config.alias, SIDE)
        self.pool = OrmPool(
            "",
            kwargs=_pool_kwargs(wrapper),
            min_size=0,
            max_size=options.pool_size + options.max_overflow,
            timeout=options.timeout,
            max_lifetime=options.recycle,
            open=False,
            name=f"django_asyncpool:{config.alias}:async_orm",
            wrapper=wrapper,
            config=config,
        )
        # Closed when the loop shuts its async generators down (asyncio.run does).
        self._guardian = self._guard_loop()
        with contextlib.suppress(StopIteration):
            self._guardian.asend(None).send(None)  # type: ignore[attr-defined]

    def checkout(self) -> Lease:
        """Return a connection through the breaker and retries (in the greenlet)."""
        conn = _stats.acquire_sync(self.stats, self.guard, self._getconn, sleep=_greenlet_sleep)
        return Lease(self, conn)

    def _getconn(self) -> psycopg.AsyncConnection[Any]:
        pool = self.pool
        self.stats.waiting += 1
        try:
            return await_(pool.getconn())
        except psycopg_pool.PoolTimeout as exc:
            stats = pool.get_stats()
            raise PoolTimeout(
                f"No connection to database {self.config.describe()} for the async ORM became "
                f"free within {pool.timeout:.1f}s (size {stats.get('pool_size', 0)}/"
                f"{pool.max_size}, waiting {stats.get('requests_waiting', 0)}). Raise "
                "OPTIONS['async_pool']['pool_size'], ['max_overflow'] or ['timeout'].",
                alias=self.config.alias,
            ) from (pool.last_connect_error or exc)
        except psycopg_pool.PoolClosed as exc:
            raise PoolClosed(
                f"The async ORM pool of database {self.config.describe()} is closed.",
                alias=self.config.alias,
            ) from exc
        finally:
            self.stats.waiting -= 1

    def checkin(self, lease: Lease) -> None:
        """Give ``lease``'s connection back (in the greenlet), discarding it if it is unclean."""
        conn = lease.conn
        _stats.returned_sync(self.stats, conn)
        if not lease.wrapper.reset():
            self.stats.invalidated += 1
            conn.pgconn.finish()  # the pool sees it closed and opens a replacement
        pool = self.pool
        try:
            await_(pool.putconn(conn))
        except asyncio.CancelledError:
            # Cancelled while waiting for the pool's lock (a clean return does no I/O):
            # the connection is neither idle nor handed over yet. Not shielded up front:
            # a task per return costs a tenth of a primary-key read.
            if conn not in pool._pool:
                asyncio.get_running_loop().create_task(pool._add_to_pool(conn))
            raise

    async def _guard_loop(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.close()

    async def close(self) -> None:
        pool = self.pool
        try:
            await pool.close(timeout=1.0)
        except asyncio.CancelledError:
            # At loop shutdown its worker tasks were cancelled first: close what is idle.
            for conn in list(pool._pool):
                await conn.close()


def _greenlet_sleep(seconds: float) -> None:
    await_(asyncio.sleep(seconds))


_lock = threading.Lock()
_holders: dict[str, weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Holder]] = {}


def holder(alias: str) -> Holder:
    """Return the running loop's :class:`Holder` of ``alias``."""
    loop = asyncio.get_running_loop()
    loops = _holders.get(alias)
    if loops is not None:
        found = loops.get(loop)
        if found is not None:
            return found
    with _lock:
        loops = _holders.setdefault(alias, weakref.WeakKeyDictionary())
        for other in [lp for lp in loops if lp.is_closed()]:
            del loops[other]
        made = loops[loop] = Holder(_registry.config(alias), _engine_wrapper(alias))
        return made


def _engine_wrapper(alias: str) -> Any:
    from ._asyncorm import thread_wrapper

    return thread_wrapper(alias)


def holders() -> list[tuple[str, Holder]]:
    """Return ``(alias, holder)`` of every loop's pool in this process (for metrics)."""
    out: list[tuple[str, Holder]] = []
    for alias, loops in list(_holders.items()):
        for _ in range(3):  # another thread may add a loop meanwhile
            try:
                out.extend((alias, h) for lp, h in list(loops.items()) if not lp.is_closed())
                break
            except RuntimeError:
                continue
    return out


def forget(alias: str) -> None:
    """Forget the pools of ``alias`` (its settings changed); each closes with its loop."""
    _holders.pop(alias, None)
