"""The async side's pool: fair handoff to waiters, guarded by the alias's breaker.

SQLAlchemy's ``AsyncAdaptedQueuePool`` is replaced, not patched: its
``asyncio.Queue`` cannot hand a connection to a particular waiter.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from sqlalchemy.pool import Pool, PoolProxiedConnection
from sqlalchemy.pool.base import _AsyncConnDialect
from sqlalchemy.util.concurrency import await_

from ._guard import Guard
from ._stats import Stats
from .errors import PoolTimeout, pool_timeout

__all__ = ["_GuardedPool"]


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
            return guard.acquire(create, record, sleep=_greenlet_sleep, stats=stats)

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
            # An idle connection means nobody is waiting. The one returned last: its
            # backend is warm and it needs no ping (liveness_bypass); the others idle.
            return idle.pop()
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
            error = pool_timeout(
                PoolTimeout,
                guard.config.describe(),
                guard.alias,
                self._timeout,
                f"size {self._size}, in use {self.checkedout()}, waiting {stats.waiting + 1}",
                "OPTIONS['async_pool']['pool_size'], ['max_overflow'] or ['timeout']",
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
                    self._idle.popleft().close()  # the longest idle
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
