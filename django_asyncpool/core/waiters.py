"""The fair FIFO core both async pools share: slots under a cap, and who waits for one.

No I/O: each pool (:class:`~..sqla.fairpool.GuardedPool` for SQLAlchemy,
:class:`~..orm.pool.OrmPool` for the native async ORM) opens, checks and closes
its own connections and keeps its own idle list; :class:`Slots` counts the
connections against the cap and queues the callers, as psycopg_pool's waiting
deque does: a connection that comes back goes straight to the oldest caller
still waiting (direct handoff), so a wait is bounded by the queue ahead of it.

A waiter's future resolves to what it is handed: a connection, ``None`` (a free
slot, already counted in :attr:`Slots.opened`, to open a connection in), or
:data:`TIMED_OUT`. Everything runs on one event loop: no lock.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["TIMED_OUT", "Slots"]

#: What a waiter's future resolves to when nobody handed it anything in time.
TIMED_OUT: Any = object()


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(TIMED_OUT)


class Slots:
    """Connections opened (or being opened) under ``cap``, and the callers waiting, oldest first."""

    __slots__ = ("cap", "opened", "queue")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        #: Connections idle, checked out, or being opened.
        self.opened = 0
        #: The waiters' futures, oldest first; done ones (timed out, cancelled) are skipped.
        self.queue: deque[asyncio.Future[Any]] = deque()

    def take(self) -> bool:
        """Count a connection about to be opened; return False if the pool is at its cap."""
        if self.opened < self.cap:
            self.opened += 1
            return True
        return False

    def join(self, timeout: float) -> tuple[asyncio.Future[Any], asyncio.TimerHandle]:
        """Queue a caller at the back; its future resolves to TIMED_OUT after ``timeout`` s.

        The caller cancels the returned timer once its wait is over.
        """
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.queue.append(waiter)
        return waiter, loop.call_later(timeout, _expire, waiter)

    def hand_over(self, got: Any) -> bool:
        """Give ``got`` to the oldest caller still waiting; return False if there is none."""
        queue = self.queue
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(got)
                return True
        return False

    def release(self) -> None:
        """Give up one counted slot (a connection closed, or never opened): to a waiter first."""
        if not self.hand_over(None):
            self.opened -= 1

    def abandon(self, waiter: asyncio.Future[Any], pass_on: Callable[[Any], None]) -> None:
        """Take a cancelled caller out; ``pass_on`` what it was handed meanwhile, if anything."""
        if not waiter.done():
            waiter.cancel()
        elif not waiter.cancelled() and waiter.exception() is None:
            got = waiter.result()
            if got is not TIMED_OUT:
                pass_on(got)

    def fail_all(self, error: Callable[[], BaseException]) -> None:
        """Raise ``error()`` in every caller still waiting (the pool is closing)."""
        queue = self.queue
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_exception(error())

    def waiting(self) -> int:
        """Return how many callers wait now."""
        return sum(not waiter.done() for waiter in self.queue)
