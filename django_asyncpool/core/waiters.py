"""The fair FIFO core every async pool shares: one budget per alias and loop, one queue.

No I/O. One alias on one event loop has up to three kinds of async connection: the
read-write and read-only SQLAlchemy engines' (:class:`~..sqla.fairpool.GuardedPool`) and
the native async ORM's (:class:`~..orm.pool.OrmPool`). Each pool opens, checks and
closes its own connections and keeps its own idle list; a :class:`Budget` counts
all of them against the one cap (``async_pool.pool_size + max_overflow``) and
queues every caller, whatever kind it wants, in one FIFO queue. Each pool sees it
through its own :class:`Slots` (its kind's share).

A connection that comes back goes straight to the oldest caller still waiting
(direct handoff, as psycopg_pool's waiting deque), so a wait is bounded by the
queue ahead of it. When that caller wants another kind, the connection is closed
and its slot handed over instead; when a caller finds the budget full and an idle
connection of another kind, that one is closed to make room (:meth:`Slots.take`).

A waiter's future resolves to what it is handed: a connection of its kind,
``None`` (a free slot, already counted, to open a connection in), or
:data:`TIMED_OUT`. Everything runs on one event loop: no lock.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["TIMED_OUT", "Budget", "Slots", "budget", "budgets", "forget"]

#: What a waiter's future resolves to when nobody handed it anything in time.
TIMED_OUT: Any = object()


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(TIMED_OUT)


class Budget:
    """Every async connection of one alias on one loop: opened under ``cap``, and who waits."""

    __slots__ = ("__weakref__", "busy_at", "cap", "kinds", "opened", "queue")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        #: Connections idle, checked out or being opened, every kind together.
        self.opened = 0
        #: ``(future, kind)`` of the waiters, oldest first; done ones are skipped.
        self.queue: deque[tuple[asyncio.Future[Any], Slots]] = deque()
        #: The kinds sharing this budget (a pool's Slots lives as long as its pool).
        self.kinds: weakref.WeakSet[Slots] = weakref.WeakSet()
        #: ``time.monotonic()`` when a checkout last found pool_size connections in use.
        self.busy_at = 0.0

    def waiting(self) -> int:
        """Return how many callers of every kind wait now."""
        return sum(not waiter.done() for waiter, _ in self.queue)

    def _head(self) -> tuple[asyncio.Future[Any], Slots] | None:
        """Return the oldest caller still waiting (dropping done ones), or None."""
        queue = self.queue
        while queue:
            if not queue[0][0].done():
                return queue[0]
            queue.popleft()
        return None

    def _evict(self, wanting: Slots) -> bool:
        """Close one idle connection of a kind other than ``wanting``; return True if one was."""
        return any(kind is not wanting and kind.evict() for kind in list(self.kinds))


class Slots:
    """One kind's share of a :class:`Budget`: its connections, its callers in the shared queue.

    ``evict`` (given by the pool) closes the pool's longest-idle connection through
    :meth:`release` and returns True, or returns False when it has none idle; with
    no ``evict`` the kind's idle connections are never closed for another kind.
    """

    __slots__ = ("__weakref__", "budget", "evict", "opened")

    def __init__(self, budget: Budget | int, evict: Callable[[], bool] | None = None) -> None:
        self.budget = budget if isinstance(budget, Budget) else Budget(budget)
        self.budget.kinds.add(self)
        self.evict: Callable[[], bool] = evict or _no_evict
        #: This kind's connections idle, checked out or being opened.
        self.opened = 0

    @property
    def cap(self) -> int:
        return self.budget.cap

    def take(self) -> bool:
        """Count a connection about to be opened; return False if the budget is spent.

        At the cap, an idle connection of another kind is closed to make room, unless
        callers wait already (they come first).
        """
        budget = self.budget
        if budget.opened >= budget.cap and (budget._head() is not None or not budget._evict(self)):
            return False
        budget.opened += 1
        self.opened += 1
        return True

    def join(self, timeout: float) -> tuple[asyncio.Future[Any], asyncio.TimerHandle]:
        """Queue a caller at the back; its future resolves to TIMED_OUT after ``timeout`` s.

        The caller cancels the returned timer once its wait is over.
        """
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.budget.queue.append((waiter, self))
        return waiter, loop.call_later(timeout, _expire, waiter)

    def hand_over(self, got: Any) -> bool:
        """Give connection ``got`` to the oldest caller if it wants this kind; return True if so.

        False when nobody waits, or when the oldest caller wants another kind: then
        :meth:`wanted_elsewhere` is True, and the pool closes ``got`` and
        :meth:`release`\\ s its slot, which goes to that caller.
        """
        head = self.budget._head()
        if head is None or head[1] is not self:
            return False
        self.budget.queue.popleft()
        head[0].set_result(got)
        return True

    def wanted_elsewhere(self) -> bool:
        """Return True if the oldest caller waiting wants another kind of connection."""
        head = self.budget._head()
        return head is not None and head[1] is not self

    def release(self) -> None:
        """Give up one counted slot (a connection closed, or never opened): to a waiter first."""
        self.opened -= 1
        head = self.budget._head()
        if head is None:
            self.budget.opened -= 1
            return
        self.budget.queue.popleft()
        head[1].opened += 1
        head[0].set_result(None)

    def abandon(self, waiter: asyncio.Future[Any], pass_on: Callable[[Any], None]) -> None:
        """Take a cancelled caller out; ``pass_on`` what it was handed meanwhile, if anything."""
        if not waiter.done():
            waiter.cancel()
        elif not waiter.cancelled() and waiter.exception() is None:
            got = waiter.result()
            if got is not TIMED_OUT:
                pass_on(got)

    def fail_all(self, error: Callable[[], BaseException]) -> None:
        """Raise ``error()`` in every caller of this kind still waiting (its pool is closing)."""
        queue = self.budget.queue
        for waiter, kind in [entry for entry in queue if entry[1] is self]:
            queue.remove((waiter, kind))
            if not waiter.done():
                waiter.set_exception(error())

    def waiting(self) -> int:
        """Return how many callers of this kind wait now."""
        return sum(kind is self and not waiter.done() for waiter, kind in self.budget.queue)


def _no_evict() -> bool:
    return False


_lock = threading.Lock()
#: alias -> {event loop: its budget}
_budgets: dict[str, weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Budget]] = {}


def budget(alias: str, cap: int) -> Budget:
    """Return the running loop's budget of ``alias``, its cap set to ``cap`` (settings change)."""
    loop = asyncio.get_running_loop()
    with _lock:
        loops = _budgets.setdefault(alias, weakref.WeakKeyDictionary())
        found = loops.get(loop)
        if found is None:
            found = loops[loop] = Budget(cap)
        found.cap = cap
        return found


def budgets(alias: str) -> list[Budget]:
    """Return the budgets of ``alias`` on every loop of this process still open."""
    loops = _budgets.get(alias)
    if loops is None:
        return []
    with _lock:
        return [b for loop, b in list(loops.items()) if not loop.is_closed()]


def forget() -> None:
    """Drop every budget (a forked child: the parent's loops are not its own)."""
    global _lock
    _lock = threading.Lock()
    _budgets.clear()
