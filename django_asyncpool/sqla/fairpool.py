"""The SQLAlchemy pool under every async engine: fair handoff, overflow kept, guarded.

SQLAlchemy's ``AsyncAdaptedQueuePool`` is replaced, not patched: its
``asyncio.Queue`` cannot hand a connection to a particular waiter. The waiting
core (slots, the FIFO queue, handoff) is :mod:`..core.waiters`, shared with the
native async ORM's pool; this module adds the idle list, the overflow kept while
demand lasts, the breaker and the accounting (each check-in stamped for the liveness
rules, ``RETURNED``, and the time it was held counted, from ``TAKEN``: both of
:mod:`..core.checkout`, as keys of the record's ``info``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import sqlalchemy.exc
from sqlalchemy import util
from sqlalchemy.pool import Pool, PoolProxiedConnection
from sqlalchemy.pool.base import _AsyncConnDialect, _ConnectionFairy
from sqlalchemy.util.concurrency import await_

from ..core.checkout import RETURNED, TAKEN, Leaks
from ..core.guard import Guard
from ..core.liveness import clock
from ..core.loops import greenlet_sleep
from ..core.stats import Stats, describe, snapshot
from ..core.waiters import TIMED_OUT, Budget, Slots
from ..errors import PoolError, PoolTimeout, for_async, pool_timeout

__all__ = ["GuardedPool"]

#: What the pool does with a leaked connection, and what to do about it.
_KEPT = (
    "it is still its holder's, and counted in the alias's budget. Make the code that took "
    "it give it back: leave its session_scope() or connection() block."
)


class GuardedPool(Pool):
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
    #: The alias's budget on this loop, shared with its other engine and the ORM's pool.
    budget: Budget
    #: Time checkouts for the latency histogram (``OPTIONS["metrics"]``).
    metered: bool = True
    #: Run on each connection handed out, with the DBAPI connection, its record and
    #: clock() when the checkout began (the engine's liveness rules and recycling); it
    #: raises ``DisconnectionError`` for a connection to replace, as a listener of
    #: SQLAlchemy's "checkout" event would.
    check: Callable[[Any, Any, float], None] | None = None
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
        self._timeout = timeout
        self._idle: deque[Any] = deque()
        # Records idle, checked out or being opened, under the alias's one budget.
        self._slots = Slots(self.budget, self._evict)
        self._disposed = False
        threshold = self.guard.config.leak_threshold
        #: Where each record out was taken; only with a leak_threshold.
        self._leaks = (
            None
            if threshold is None
            else Leaks(
                f"django_asyncpool:{self.guard.alias}:async",
                threshold,
                self.stats,
                _KEPT,
                on_loop=True,
            )
        )
        create = self._invoke_creator
        guard, stats = self.guard, self.stats

        def guarded(record: Any) -> Any:
            return guard.acquire(create, record, sleep=greenlet_sleep, stats=stats)

        self._invoke_creator = guarded  # type: ignore[assignment]

    def connect(self) -> PoolProxiedConnection:
        # The whole checkout, liveness check and reconnection included: the time to a
        # usable connection, and its outcome.
        stats = self.stats
        stats.attempts += 1
        started = clock()
        try:
            # Pool.connect(), with the check run here rather than as a "checkout" event:
            # SQLAlchemy's dispatch of it costs more than the check (benchmarks/bench_checkout.py).
            fairy = _ConnectionFairy._checkout(self)
            check = self.check
            if check is not None:
                try:
                    check(fairy.dbapi_connection, fairy._connection_record, started)
                except BaseException as exc:
                    self._replaced(fairy, exc)
        except PoolError as exc:
            stats.failed(exc)
            raise for_async(exc) from exc.__cause__
        except BaseException as exc:
            stats.failed(exc)
            raise
        stats.checkouts += 1
        record: Any = fairy._connection_record
        if self.metered:
            now = clock()
            stats.latency.observe(now - started)
            record.info[TAKEN] = now  # for the time it is held (_return_conn)
        if self._leaks is not None:
            self._leaks.taken(record)
        return fairy

    def _replaced(self, fairy: Any, exc: BaseException) -> None:
        """Handle what :attr:`check` raised on a new fairy as SQLAlchemy handles what a
        "checkout" listener raises (called while ``exc`` is being handled).

        A ``DisconnectionError`` replaces the connection in place, checked again, once
        more at most; any other error returns the record to the pool, invalidated.
        """
        check: Any = self.check
        record = fairy._connection_record
        for tries_left in (1, 0):
            if not isinstance(exc, sqlalchemy.exc.DisconnectionError):
                try:
                    record._checkin_failed(exc, _fairy_was_created=True)
                except BaseException as err:
                    raise err from exc
                raise exc
            self.logger.info(
                "Disconnection detected on checkout, invalidating individual "
                "connection %s (reason: %r)",
                fairy.dbapi_connection,
                exc,
            )
            record.invalidate(exc)
            try:
                fairy.dbapi_connection = record.get_connection()
            except BaseException as err:
                with util.safe_reraise():
                    record._checkin_failed(err, _fairy_was_created=True)
            if not tries_left:
                break
            try:
                check(fairy.dbapi_connection, record, clock())
                return
            except BaseException as again:
                exc = again
        self.logger.info("Reconnection attempts exhausted on checkout")
        fairy.invalidate()
        raise sqlalchemy.exc.InvalidRequestError("This connection is closed")

    # -- checkout ---------------------------------------------------------------------------

    def _do_get(self) -> Any:
        guard = self.guard
        if guard.breaker.current_state != "closed":
            guard.check_open()
        idle, slots = self._idle, self._slots
        budget = slots.budget
        if budget.opened - len(idle) >= self._size:
            budget.busy_at = time.monotonic()  # demand above pool_size: keep the overflow
        if idle:
            # An idle connection means nobody is waiting. The one returned last: its
            # backend is warm and it needs no ping (liveness_bypass); the others idle.
            return idle.pop()
        if not slots.take():
            record = self._wait()
            if record is not None:
                return record
            # None: a free slot was handed over, to open a connection in
        try:
            return self._create_connection()
        except BaseException:
            slots.release()
            raise

    def _wait(self) -> Any:
        """Queue up; return the record handed over, or None for a slot to open one in."""
        stats, slots = self.stats, self._slots
        waiter, timer = slots.join(self._timeout)
        stats.waiting += 1
        try:
            got = await_(waiter)
        except BaseException:
            # Cancelled: what was handed over meanwhile goes on to the next in line.
            slots.abandon(waiter, self._pass_on)
            raise
        finally:
            timer.cancel()
            stats.waiting -= 1
        if got is TIMED_OUT:
            guard = self.guard
            error = pool_timeout(
                PoolTimeout,
                guard.config,
                "async",
                self._timeout,
                describe(
                    snapshot(
                        guard.alias,
                        "async",
                        stats,
                        guard,
                        idle=self.checkedin(),
                        in_use=self.checkedout(),
                        waiting=stats.waiting + 1,  # this caller, no longer counted
                        min_size=0,
                        max_size=self.budget.cap,
                    )
                ),
            )
            guard.failed(error, trial=False)  # counted only if the breaker is told to
            raise error
        return got

    def _pass_on(self, got: Any) -> None:
        """Give what a cancelled waiter was handed (a record, or a slot) to the next one."""
        if got is None:
            self._slots.release()
        else:
            self._do_return_conn(got)

    def _evict(self) -> bool:
        """Close the longest idle connection for another kind's caller; False if none is idle."""
        if not self._idle:
            return False
        _drop(self._idle.popleft())
        self._slots.release()
        return True

    # -- check-in ---------------------------------------------------------------------------

    def closes_on_return(self) -> bool:
        """Return True if a check-in now may close a connection (which awaits: a greenlet)."""
        budget = self._slots.budget
        return self._disposed or (
            budget.opened > self._size and time.monotonic() - budget.busy_at >= self.KEEP_OVERFLOW
        )

    def _return_conn(self, record: Any) -> None:
        # Every check-in (SQLAlchemy calls it right after the "checkin" event; never for a
        # detached connection): stamped for the liveness bypass, and the time it was held.
        # Here rather than in a "checkin" listener: SQLAlchemy's event dispatch costs more
        # (benchmarks/bench_checkout.py; docs/performance.md has the figures).
        info = record.info
        now = info[RETURNED] = clock()
        taken = info.pop(TAKEN, None)
        if taken is not None:
            self.stats.held.observe(now - taken)
        if self._leaks is not None:
            self._leaks.back(record)
        self._do_return_conn(record)

    def _do_return_conn(self, record: Any) -> None:
        slots = self._slots
        if record.starttime < self._invalidate_time and record.dbapi_connection is not None:
            # Opened before a drain (or a demotion): replaced now that it is back.
            _drop(record)
            slots.release()
            return
        if slots.budget.queue:  # somebody may wait (an empty queue: the common case)
            if slots.hand_over(record):
                return
            if slots.wanted_elsewhere():
                # The oldest caller wants another kind: this one's slot is theirs.
                _drop(record)
                slots.release()
                return
        if self.closes_on_return():
            # The demand stayed within pool_size for a while (or the pool was disposed):
            # close this connection, and the idle ones above pool_size. Each slot is
            # released once its connection is closed: the server never sees more.
            try:
                record.close()
            finally:
                slots.release()
                budget = slots.budget
                while self._idle and (self._disposed or budget.opened > self._size):
                    self._idle.popleft().close()  # the longest idle
                    slots.release()
            return
        self._idle.append(record)

    # -- replacing every connection ------------------------------------------------------------

    def drain(self) -> None:
        """Replace every connection: the idle ones are closed now, the others when they come back.

        The one way this pool replaces its connections, on request (``drain()``) or
        after a write refused as read-only (25006). SQLAlchemy's own mark: a record
        opened before ``_invalidate_time`` is reconnected at its next checkout, and
        here closed when it comes back. Only on the pool's loop; replacements are
        opened on demand.
        """
        self.stamp()
        while self._evict():
            pass

    def stamp(self) -> None:
        """Mark every connection open now as due for replacement (from any thread)."""
        self._invalidate_time = time.time()

    # -- the pool's state ---------------------------------------------------------------------

    def dispose(self) -> None:
        # Connections in use are closed as they come back (SQLAlchemy's queue pool
        # would keep them in a pool nobody uses any more).
        self._disposed = True
        while self._idle:
            self._idle.popleft().close()
            self._slots.release()
        self.logger.info("Pool disposed. %s", self.status())

    def recreate(self) -> GuardedPool:
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
        return self._slots.opened - len(self._idle)

    def overflow(self) -> int:
        return self._slots.opened - self._size

    def waiting(self) -> int:
        """Return how many callers wait for a connection of this engine."""
        return self._slots.waiting()


def _drop(record: Any) -> None:
    """Close ``record``'s connection now, awaiting nothing (the server sees the socket close).

    No await: the slot it frees is counted again at once, and no other task may
    take it while a graceful close waits for the server.
    """
    raw = record.driver_connection
    if raw is not None:
        raw.terminate()
    record.dbapi_connection = None
