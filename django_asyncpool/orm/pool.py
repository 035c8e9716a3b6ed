"""The native async ORM's connections: psycopg ``AsyncConnection``s that Django drives in sync.

Django's ORM is sync code. To run it on the event loop without a thread, it runs
in a greenlet (SQLAlchemy's ``greenlet_spawn``) and the DB-API connection it holds
is a :class:`GreenConnection`: psycopg's own sync ``Connection`` sharing the
libpq connection of a pooled ``AsyncConnection``, whose one I/O entry point,
``wait()``, hands the protocol generator to the async connection's ``wait()`` and
switches back to the loop until it is done. So Django's cursors (client-side
binding, and the named cursors of ``iterator()``), its adapters, converters and
error wrapping run unchanged; only the waiting is async.

Each event loop has its own pool per alias (:class:`OrmPool`: the fair FIFO handoff
of :mod:`..core.waiters`, as the SQLAlchemy pool's), closed while the loop shuts its
async generators down, as the SQLAlchemy engines are. Every pooled
connection carries one :class:`NativeWrapper`: Django's ``DatabaseWrapper`` of the
alias bound to that connection for its whole life, so a checkout builds nothing.
"""

from __future__ import annotations

import asyncio
import logging
import select
import threading
from collections import deque
from typing import Any

import psycopg
import psycopg_pool
from django.core.exceptions import SynchronousOnlyOperation
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.postgresql import base as postgresql
from django.db.backends.signals import connection_created
from psycopg import IsolationLevel, pq
from psycopg.waiting import READY_R, WAIT_R
from sqlalchemy.util.concurrency import await_, greenlet_spawn, in_greenlet

from .. import metrics
from ..base import DatabaseWrapper
from ..config import AliasConfig
from ..core import checkout as _checkout
from ..core import registry as _registry
from ..core import stats as _stats
from ..core import waiters as _waiters
from ..core.checkout import RETURNED, Leaks
from ..core.guard import Guard
from ..core.hangups import clear_hint, hung_up, maybe_closed, watch_hangups
from ..core.liveness import DUE, GONE, LIVE, clock, verdict
from ..core.loops import drain_on, greenlet_sleep, live, run_at_loop_shutdown
from ..core.renewal import lifetime, rejected
from ..core.waiters import TIMED_OUT, Slots
from ..errors import PoolClosed, PoolTimeout, pool_timeout
from . import idle as _idle

__all__ = [
    "GreenConnection",
    "Holder",
    "Lease",
    "NativeWrapper",
    "OrmPool",
    "bind_twin",
    "drain",
    "holder",
    "holders",
    "snapshots",
]

logger = logging.getLogger("django_asyncpool")

SIDE = "async_orm"
#: On a pooled AsyncConnection: its NativeWrapper.
_NATIVE = "_asyncpool_native"
#: An enum member read once: every check-in compares with it.
_IDLE = pq.TransactionStatus.IDLE


class GreenConnection(psycopg.Connection[Any]):
    """psycopg's sync connection over an ``AsyncConnection``'s libpq connection.

    Every query, commit and cursor operation of psycopg's sync API goes through
    ``wait()``; here it awaits the async connection's ``wait()`` from the greenlet
    (which also cancels the query on the server when the task is cancelled).
    """

    aconn: psycopg.AsyncConnection[Any]

    def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        if not in_greenlet():  # sync ORM code called in the task's own code: Django's error
            raise SynchronousOnlyOperation(
                "You cannot call this from an async context - use a thread or sync_to_async."
            )
        if args or kwargs:  # a timeout (cancel, close): psycopg's own wait
            return await_(self.aconn.wait(gen, *args, **kwargs))
        try:
            state = next(gen)
            if state == WAIT_R:
                # The query is sent: let the loop run the other tasks once, and the
                # answer is usually there. psycopg's wait would register a reader, a
                # future and a timer for each query; this is a yield and a poll.
                # Cancelled here, the query still running: the pool discards the
                # connection when it comes back (its transaction status is ACTIVE).
                # With nothing else for the loop to do, the wait is right here (.idle),
                # for each part of a large answer.
                fd = self.pgconn.socket
                while _idle.wait_here(self, fd):
                    state = gen.send(READY_R)
                    if state != WAIT_R:
                        break
                else:
                    await_(_YIELD)
                    if _ready_now(fd):
                        state = gen.send(READY_R)
        except StopIteration as done:
            return done.value
        # Still waiting (a slow query, a large result): psycopg's wait, which also
        # cancels the query on the server when the task is cancelled.
        return await_(self.aconn.wait(_resume(gen, state)))


class _Yield:
    """An awaitable that gives the loop one turn (``asyncio.sleep(0)`` without a coroutine)."""

    __slots__ = ()

    def __await__(self) -> Any:
        yield


_YIELD = _Yield()


def _ready_now(fileno: int) -> bool:
    return bool(select.select((fileno,), (), (), 0)[0])


def _resume(gen: Any, state: Any) -> Any:
    """Return a generator yielding ``state`` and then what ``gen`` yields (a started one)."""
    while True:
        ready = yield state
        try:
            state = gen.send(ready)
        except StopIteration as done:
            return done.value


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

    def demoted(self) -> None:
        """The server refused a write as read-only (25006): replace the alias's ORM connections.

        As the other pools (through the alias's guard, at most once a second): every
        loop's pool closes its idle connections and the others, this one included,
        when they come back; new ones follow ``target_session_attrs``.
        """
        if _registry.guard(self.alias).demoted(SIDE, _registry.stats(self.alias, SIDE)):
            drain(self.alias)

    def run_and_clear_commit_hooks(self) -> None:
        self.validate_no_atomic_block()
        # Callbacks are the application's sync code (mail, queues): not on the loop.
        self._pending_hooks.extend(self.run_on_commit)
        self.run_on_commit = []

    def clean(self) -> bool:
        """Return True if its connection is as a pooled one must be: open, idle, autocommit."""
        twin = self._twin
        return (
            not self._discard
            and self.connection is twin
            and not self.in_atomic_block
            and twin._autocommit
            and twin.pgconn.transaction_status == _IDLE
        )

    def reset(self) -> bool:
        """Make this wrapper ready for the next task; return False if its connection is not."""
        clean = self.clean()
        if self.run_on_commit:
            self.run_on_commit = []
        if self._pending_hooks:
            self._pending_hooks = []
        self._owner = None
        if not clean:
            self.connection = self._twin
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


#: For the request path (_handler): a wrapper that takes a pooled connection on first use.
bind_twin = _bind


class OrmPool:
    """One loop's pool of async psycopg connections of one alias: fair, and cheap to use.

    Not ``psycopg_pool.AsyncConnectionPool``: measured at 32 tasks over a pool of 10,
    its waiting clients (an ``asyncio.Condition`` and a ``wait_for()`` task each)
    cost more CPU than the query itself (docs/async-orm.md, "The driver"). Here
    a checkout from the idle list is a ``pop()``; a waiter is one future in a FIFO
    queue, handed the next connection that comes back (or the free slot, to connect
    itself), so a wait is bounded by the queue ahead of it. Connections open on
    demand, inside the caller's checkout (the guard's breaker and retries around
    it, as the SQLAlchemy pool does), and close after ``max_lifetime``.
    Liveness as :class:`~django_asyncpool.sync.pool.SyncPool`: a socket the server
    hung up on is found without a round trip; only a connection idle for longer
    than ``bypass`` seconds is pinged.
    """

    def __init__(
        self, *, kwargs: dict[str, Any], config: AliasConfig, wrapper: Any, stats: _stats.Stats
    ) -> None:
        options = config.async_pool
        self.stats = stats
        self.name = f"django_asyncpool:{config.alias}:async_orm"
        self.alias = config.alias
        self.max_size = options.pool_size + options.max_overflow
        self.timeout = options.timeout
        self.max_lifetime = options.recycle
        self.bypass = config.liveness_bypass
        self.password_source = config.password_source
        self.closed = False
        #: clock() of the last drain: a connection opened before it is not used again.
        self.drained_at = 0.0
        self.idle: deque[psycopg.AsyncConnection[Any]] = deque()
        #: task -> the connection it gave back in its current step, kept for its next
        #: query in that step (Holder.checkin): idle, but only for that task.
        self.parked: dict[asyncio.Task[Any], Lease] = {}
        #: Connections open or being opened, and the callers waiting for one: a share
        #: of the alias's one budget on this loop, with the SQLAlchemy engines'.
        self.slots = Slots(_waiters.budget(config.alias, self.max_size), self._evict)
        self._settings_dict = wrapper.settings_dict
        self._kwargs = dict(kwargs)
        self._twin_cursor = self._kwargs.pop("twin_cursor")
        self._kwargs.setdefault("connect_timeout", max(round(self.timeout), 1))
        self._configure_wrapper = wrapper

    @property
    def size(self) -> int:
        """Return how many connections are open or being opened."""
        return self.slots.opened

    def get_stats(self) -> dict[str, int]:
        """Return psycopg_pool's names for what the metrics show."""
        return {
            "pool_size": self.size,
            "pool_available": len(self.idle) + len(self.parked),
            "requests_waiting": self.slots.waiting(),
            "pool_max": self.max_size,
        }

    def take_idle(self) -> psycopg.AsyncConnection[Any] | None:
        """Return an idle connection that needs no check (used a moment ago), or None."""
        if self.idle and not self.closed:
            conn = self.idle[-1]
            hint = maybe_closed(conn)  # type: ignore[arg-type]
            if verdict(hint, getattr(conn, RETURNED, 0.0), clock(), self.bypass) == LIVE:
                return self.idle.pop()
        return None

    async def getconn(self) -> psycopg.AsyncConnection[Any]:
        """Return a live connection: an idle one, a new one, or the next one returned."""
        while True:
            if self.closed:
                raise PoolClosed(f"The pool {self.name!r} is closed.", alias=self.alias)
            while self.idle:
                conn = self.idle.pop()  # the most recently used: its socket is warm
                if await self._alive(conn):
                    return conn
            if self.slots.take():
                return await self._connect()
            conn_or_slot = await self._wait()
            if conn_or_slot is not None:
                if await self._alive(conn_or_slot):
                    return conn_or_slot
                continue
            return await self._connect()  # a slot was handed over: size counts it already

    async def _wait(self) -> psycopg.AsyncConnection[Any] | None:
        fut, timer = self.slots.join(self.timeout)
        try:
            got: psycopg.AsyncConnection[Any] | None = await fut
        except BaseException:
            self.slots.abandon(fut, self._hand_back)  # handed over as we were cancelled
            raise
        finally:
            timer.cancel()
        if got is TIMED_OUT:
            raise psycopg_pool.PoolTimeout()
        return got

    def _hand_back(self, conn: psycopg.AsyncConnection[Any] | None) -> None:
        if conn is None:
            self.slots.release()
        else:
            self.putconn(conn)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        """Open a connection in a slot counted already; free the slot if it fails."""
        try:
            conn = await self._connect_renewed()
            try:
                await greenlet_spawn(self._native, conn)
            except BaseException:
                await conn.close()
                raise
        except BaseException:
            self.slots.release()
            raise
        now = clock()
        setattr(conn, RETURNED, now)  # new: no ping at its first checkout
        conn._asyncpool_born = now  # type: ignore[attr-defined]
        conn._asyncpool_expires = now + lifetime(self.max_lifetime)  # type: ignore[attr-defined]
        watch_hangups(conn)  # type: ignore[arg-type]
        return conn

    async def _connect_renewed(self) -> psycopg.AsyncConnection[Any]:
        """Connect, with a password asked of OPTIONS["password"] if it names one."""
        source = self.password_source
        if source is None:
            return await psycopg.AsyncConnection.connect("", **self._kwargs)
        try:
            return await psycopg.AsyncConnection.connect("", **self._kwargs, password=source())
        except psycopg.OperationalError as exc:
            if not rejected(exc):
                raise
        # The password expired between asking and connecting: asked once more.
        return await psycopg.AsyncConnection.connect("", **self._kwargs, password=source())

    async def _alive(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Return True if ``conn`` is usable; close it (freeing its slot) otherwise."""
        hint = maybe_closed(conn)  # type: ignore[arg-type]
        if verdict(hint, getattr(conn, RETURNED, 0.0), clock(), self.bypass) == LIVE:
            return True  # every checkout's path: used a moment ago, not hung up on
        try:
            await self._check_liveness(conn)
        except (psycopg.Error, TimeoutError):
            self.stats.invalidated += 1
            await conn.close()
            self.slots.release()
            return False
        except BaseException:
            self.putconn(conn)
            raise
        clear_hint(conn)  # type: ignore[arg-type]  # a stale hint: a reused number
        return True

    async def _check_liveness(self, conn: psycopg.AsyncConnection[Any]) -> None:
        gone = hung_up(conn)  # type: ignore[arg-type]
        found = verdict(gone, getattr(conn, RETURNED, 0.0), clock(), self.bypass)
        if found == GONE:
            raise psycopg.OperationalError("the server closed the connection")
        if found == DUE:
            self.stats.pings += 1
            # Bounded: on a dead network path an unbounded ping would hang the checkout.
            async with asyncio.timeout(self.timeout):
                await conn.execute("")

    def putconn(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Give ``conn`` to the oldest waiter, or keep it idle; close it if it is spent."""
        if (
            self.stale(conn)
            or conn.pgconn.transaction_status != _IDLE
            or clock() >= getattr(conn, "_asyncpool_expires", 0.0)
        ):
            conn.pgconn.finish()  # no I/O to wait for: the server sees the socket close
            self.slots.release()
            return
        # Stamped RETURNED by the counted check-in (core.checkout.checkin) before this.
        slots = self.slots
        if slots.budget.queue:  # callers wait (else, every query's return: no more to ask)
            if slots.hand_over(conn):
                return
            if slots.wanted_elsewhere():  # the oldest caller wants another kind: its slot
                conn.pgconn.finish()
                slots.release()
                return
        self.idle.append(conn)

    def stale(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Return True if ``conn`` must not be used again: the pool is closed, or it was
        opened before the last drain."""
        return self.closed or getattr(conn, "_asyncpool_born", 0.0) < self.drained_at

    def _evict(self) -> bool:
        """Close the longest idle connection for another kind's caller; False if none is idle."""
        if not self.idle:
            return False
        self.idle.popleft().pgconn.finish()
        self.slots.release()
        return True

    def drain(self) -> None:
        """Replace every connection: the idle ones are closed now, the others when they come back.

        On the pool's loop; :meth:`stamp` (any thread) alone keeps those in use from
        being used again. Replacements are opened on demand.
        """
        self.stamp()
        while self._evict():
            pass

    def stamp(self) -> None:
        """Mark every connection open now as due for replacement (from any thread)."""
        self.drained_at = clock()

    async def close(self) -> None:
        """Close the idle connections and fail the waiters; others close when returned."""
        self.closed = True
        self.slots.fail_all(
            lambda: PoolClosed(f"The pool {self.name!r} is closed.", alias=self.alias)
        )
        while self.idle:
            self.idle.pop().pgconn.finish()
            self.slots.release()

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

    __slots__ = ("conn", "holder", "task", "unpark", "wrapper")

    def __init__(self, holder: Holder, conn: psycopg.AsyncConnection[Any]) -> None:
        self.holder = holder
        self.conn = conn
        self.wrapper: NativeWrapper = getattr(conn, _NATIVE)
        #: Once kept for a task (Holder.checkin): that task, and the loop's callback that
        #: gives it back unless the task took it again meanwhile (None once run).
        self.task: asyncio.Task[Any] | None = None
        self.unpark: asyncio.Handle | None = None


#: What the ORM pool does with a leaked connection, and what to do about it.
_KEPT = (
    "it is still its holder's, and counted in the alias's budget. Make the code that took "
    "it give it back: end its atomic() block (a task left waiting inside one keeps it)."
)


class Holder:
    """One alias's :class:`OrmPool` on one event loop, with the alias's guard and stats."""

    def __init__(self, config: AliasConfig, wrapper: Any) -> None:
        self.config = config
        self.guard: Guard = _registry.guard(config.alias)
        self.stats = _registry.stats(config.alias, SIDE)
        metrics.install()
        self.pool = OrmPool(
            kwargs=_pool_kwargs(wrapper), config=config, wrapper=wrapper, stats=self.stats
        )
        #: Where each connection out was taken; only with a leak_threshold.
        self.leaks = (
            None
            if config.leak_threshold is None
            else Leaks(self.pool.name, config.leak_threshold, self.stats, _KEPT, on_loop=True)
        )
        self._loop = asyncio.get_running_loop()
        self._guardian = run_at_loop_shutdown(self._close)

    async def _close(self) -> None:
        for task, lease in list(self.pool.parked.items()):
            self._unpark(task, lease)
        await self.pool.close()

    def checkout(self) -> Lease:
        """Return a connection through the breaker and retries (in the greenlet).

        The task's own connection again if it gave one back in this very step (nothing
        awaited since but its queries) and nobody waits for one: a view's queries one
        after another take one connection, as a thread's do in sync Django.
        """
        pool = self.pool
        parked = pool.parked
        if parked:
            lease = parked.pop(asyncio.current_task(self._loop), None)  # type: ignore[arg-type]
            if lease is not None:
                # Its give-back stays scheduled: it does nothing while the lease is out,
                # and the wait in the greenlet knows it for nothing to do (idle.QUIET).
                if self.keeps(lease):
                    if self.leaks is not None:
                        self.leaks.taken(lease.conn)  # taken again: where a leak report points
                    return lease
                # Callers wait (their turn first), or closed, drained or hung up on
                # meanwhile: back, checked at its next checkout.
                self.give_back(lease, clean=True)
        conn = _checkout.checkout(
            self.stats, self.guard, self._getconn, sleep=greenlet_sleep, leaks=self.leaks
        )
        return Lease(self, conn)

    def keeps(self, lease: Lease) -> bool:
        """Return True if the task that has ``lease`` may go on using it: nobody waits
        for a connection, and it was neither drained nor (maybe) hung up on meanwhile."""
        pool = self.pool
        conn = lease.conn
        return not pool.slots.budget.queue and not pool.stale(conn) and not maybe_closed(conn)  # type: ignore[arg-type]

    def _getconn(self) -> psycopg.AsyncConnection[Any]:
        pool = self.pool
        conn = pool.take_idle()
        if conn is not None:
            return conn  # the common case: no coroutine, no switch to the loop
        self.stats.waiting += 1
        try:
            return await_(pool.getconn())
        except psycopg_pool.PoolTimeout as exc:
            idle = len(pool.idle)
            state = _stats.snapshot(
                self.config.alias,
                SIDE,
                self.stats,
                self.guard,
                idle=idle,
                in_use=pool.size - idle,
                waiting=pool.slots.waiting() + 1,  # this caller, no longer counted
                min_size=0,
                max_size=pool.max_size,
            )
            raise pool_timeout(
                PoolTimeout, self.config, SIDE, pool.timeout, _stats.describe(state)
            ) from exc
        finally:
            self.stats.waiting -= 1

    def checkin(self, lease: Lease) -> None:
        """Give ``lease``'s connection back, discarding it if it is not clean (no I/O).

        A clean one is kept for its task until the task awaits anything else (the loop
        runs its next callbacks): its next query in this step takes it again, with no
        checkout and no wait in the queue. Not while callers wait: they come first. It
        never waits parked: the task's next wait, on anything, lets the loop give it back
        first.
        """
        task = asyncio.current_task(self._loop)
        parked = self.pool.parked
        if task is None or task in parked or self.pool.slots.budget.queue:
            self.give_back(lease)  # callers wait: the oldest has it now
            return
        wrapper = lease.wrapper
        clean = wrapper.reset()  # once: it changes the wrapper's state
        if clean:
            parked[task] = lease
            if lease.unpark is None or lease.task is not task:  # else the last one's is due
                lease.task = task
                lease.unpark = self._loop.call_soon(self._unpark, task, lease)
                setattr(wrapper._twin, _idle.QUIET, lease.unpark)
            return
        self.give_back(lease, clean)

    def _unpark(self, task: asyncio.Task[Any], lease: Lease) -> None:
        if lease.task is task:
            lease.unpark = None
        parked = self.pool.parked
        if parked.get(task) is lease:  # else out again, or given back already
            del parked[task]
            self.give_back(lease, clean=True)  # reset when it was kept, unused since

    def give_back(self, lease: Lease, clean: bool | None = None) -> None:
        """The pool's check-in; ``clean``: what ``lease.wrapper.reset()`` said already."""
        conn = lease.conn
        _checkout.checkin(self.stats, conn, self.leaks)
        if clean is None:
            clean = lease.wrapper.reset()
        if not clean:
            self.stats.invalidated += 1
            conn.pgconn.finish()  # closed: the pool frees its slot
        self.pool.putconn(conn)


_lock = threading.Lock()
#: alias -> event loop -> its Holder. Plain dictionaries (every native query looks one
#: up): a holder keeps its loop anyway, so weak keys would not let one go; a closed
#: loop's holder is dropped when another is made.
_holders: dict[str, dict[asyncio.AbstractEventLoop, Holder]] = {}


def holder(alias: str) -> Holder:
    """Return the running loop's :class:`Holder` of ``alias``."""
    loop = asyncio.get_running_loop()
    loops = _holders.get(alias)
    if loops is not None:
        found = loops.get(loop)
        if found is not None:
            return found
    with _lock:
        loops = _holders.setdefault(alias, {})
        for other in [lp for lp in loops if lp.is_closed()]:
            del loops[other]
        # A wrapper of its own: connections[alias] would bind one in the caller's context.
        made = loops[loop] = Holder(_registry.config(alias), connections.create_connection(alias))
        return made


def holders() -> list[tuple[str, Holder]]:
    """Return ``(alias, holder)`` of every loop's pool in this process (for metrics)."""
    return [(alias, h) for alias, loops in list(_holders.items()) for _, h in live(loops)]


def snapshots() -> list[dict[str, Any]]:
    """Return one snapshot (``_stats.SNAPSHOT_KEYS``) per alias, every loop's pool summed."""
    totals: dict[str, list[int]] = {}
    for alias, found in holders():
        pool = found.pool
        idle = len(pool.idle) + len(pool.parked)
        total = totals.setdefault(alias, [0, 0, 0])
        total[0] += idle
        total[1] += max(pool.size - idle, 0)
        total[2] += pool.max_size
    return [
        _stats.snapshot(
            alias,
            SIDE,
            _registry.stats(alias, SIDE),
            _registry.guard(alias),
            idle=idle,
            in_use=in_use,
            waiting=_registry.stats(alias, SIDE).waiting,
            min_size=0,
            max_size=max_size,
        )
        for alias, (idle, in_use, max_size) in totals.items()
    ]


#: Pools inherited from a parent process: kept referenced, never closed (closing
#: would send the server a goodbye on the parent's sockets).
_inherited: list[Any] = []


def _forget_in_child() -> None:
    _inherited.append(dict(_holders))
    _holders.clear()


def _drop(alias: str) -> None:
    """Drop every loop's pool of ``alias`` (its settings changed): each closes with its loop."""
    with _lock:
        _holders.pop(alias, None)


def drain(alias: str) -> int:
    """Replace the connections of every loop's pool of ``alias`` (each on its own loop).

    Return how many loops' pools were reached.
    """
    found = live(_holders.get(alias) or {})
    for loop, held in found:
        drain_on(loop, held.pool)
    return len(found)


_registry.register_kind(
    "async_orm", snapshots=snapshots, reset=_drop, forget=_forget_in_child, drain=drain
)
