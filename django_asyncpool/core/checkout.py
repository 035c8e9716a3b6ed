"""The counted checkout and check-in every pool goes through, and the stamps it leaves.

:func:`checkout` puts the alias's guard (breaker and retries) around a pool's own
getconn and counts the attempt, its outcome, the retries and the latency into the
pool's :class:`~.stats.Stats`; :func:`checkin` counts how long the connection was
held. The stamps are attributes of a connection (or keys of a SQLAlchemy record's
``info``), read with :func:`~.liveness.clock`:

* :data:`RETURNED`: when it was opened or last came back (the liveness bypass window);
* :data:`TAKEN`: when it was handed out, for the time it is held (None with metrics
  off, or once back; missing on a connection never handed out before).

With ``OPTIONS["leak_threshold"]``, a pool's :class:`Leaks` notes when and where each
connection was handed out, and reports once, with the stack of the code that took
it, each one held for longer than that: :func:`checkout` and :func:`checkin` note
the native ORM's, the SQLAlchemy pool notes its records itself (it counts its own
checkout), and the sync pool under its lock (it also replaces the leaked ones).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import traceback
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import greenlet
from pybreaker import STATE_CLOSED as CLOSED

from .liveness import clock

if TYPE_CHECKING:
    from .guard import Guard
    from .stats import Stats

__all__ = ["RETURNED", "TAKEN", "Leaks", "checkin", "checkout"]

T = TypeVar("T")

logger = logging.getLogger("django_asyncpool")

#: clock() when a connection was opened or last came back (the liveness bypass window).
RETURNED = "_asyncpool_returned_at"
#: clock() when a connection was handed out, for the time it is held (None with
#: metrics off, or once back). Missing on a connection never handed out before.
TAKEN = "_asyncpool_taken_at"
_NEVER = object()


def checkout(
    stats: Stats,
    guard: Guard,
    acquire: Callable[..., T],
    *args: Any,
    sleep: Callable[[float], object] = time.sleep,
    leaks: Leaks | None = None,
) -> T:
    """Return ``guard.acquire(acquire, *args)``, counting the attempt, outcome, retries, latency.

    ``sleep`` waits between tries (an awaiting one in a greenlet: the native async ORM);
    ``leaks``, the pool's :class:`Leaks` with a ``leak_threshold``, notes where it was taken.
    """
    stats.attempts += 1
    # One clock for the latency and the retry budget: the guard's is clock() but in tests.
    started = guard.clock()
    try:
        # Every checkout's path: with the breaker closed and no failure counted, the
        # call itself; a trial, a failure and the retries are the guard's.
        storage = guard.storage
        if storage.state == CLOSED and not storage.counter:
            try:
                conn = acquire(*args)
            except Exception as exc:
                conn = guard.attempt(acquire, args, sleep, stats, started, exc)
        else:
            conn = guard.attempt(acquire, args, sleep, stats, started, None)
    except BaseException as exc:
        stats.failed(exc)
        raise
    stats.checkouts += 1
    taken = getattr(conn, TAKEN, _NEVER)
    if taken is _NEVER:
        stats.created += 1
    else:
        stats.reused += 1
    if guard.config.metrics:
        now = clock()
        stats.latency.observe(now - started)
        setattr(conn, TAKEN, now)
    elif taken is _NEVER:
        setattr(conn, TAKEN, None)
    if leaks is not None:
        leaks.taken(conn)
    return conn


def checkin(stats: Stats, conn: Any, leaks: Leaks | None = None) -> None:
    """Stamp ``conn`` :data:`RETURNED` and count the time it was held, as it goes back.

    The pool's own check-in follows (or a close). One clock read for both stamps.
    """
    now = clock()
    setattr(conn, RETURNED, now)
    taken = getattr(conn, TAKEN, None)
    if taken is not None:
        stats.held.observe(now - taken)
        setattr(conn, TAKEN, None)
    if leaks is not None:
        leaks.back(conn)


#: Frames of these packages say nothing about which code took a connection.
_INTERNAL = (
    "/django_asyncpool/",
    "/psycopg_pool/",
    "/psycopg/",
    "/sqlalchemy/",
    "<sqlalchemy ",
    "/asyncio/",
    "/django/db/",
    "/django/utils/",
)

_Frame = tuple[types.CodeType, int]
#: A connection handed out: itself, clock() when, and the stack of the code that took it.
_Held = tuple[Any, float, list[_Frame]]


class Leaks:
    """The connections a pool has handed out, when and where: each held for longer than
    ``threshold`` seconds is reported once, with the stack of the code that took it.

    A pool on an event loop (``on_loop``) sweeps on that loop while it has connections
    out; the sync pool sweeps in psycopg_pool's maintenance thread (:meth:`due`, then
    :meth:`report`, so that it can replace them under its own lock). ``consequence``
    ends the report: what the pool did and what to do.
    """

    __slots__ = ("_loop", "consequence", "every", "held", "name", "on_loop", "stats", "threshold")

    def __init__(
        self, name: str, threshold: float, stats: Stats, consequence: str, *, on_loop: bool
    ) -> None:
        self.name = name
        self.threshold = threshold
        self.stats = stats
        self.consequence = consequence
        self.on_loop = on_loop
        #: How often to sweep: often enough to report a leak soon after its threshold.
        self.every = min(max(threshold / 2, 0.05), 10.0)
        self.held: dict[int, _Held] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # sweeping on it

    def taken(self, conn: Any) -> None:
        """Note that ``conn`` is handed out now, by the code calling the pool."""
        self.held[id(conn)] = (conn, clock(), _where())
        if self.on_loop and self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.call_later(self.every, self._sweep)

    def back(self, conn: Any) -> bool:
        """Forget ``conn``, given back; return False if it was reported (and forgotten) already."""
        return self.held.pop(id(conn), None) is not None

    def due(self) -> list[_Held]:
        """Forget and return the connections held for longer than the threshold."""
        now = clock()
        late = [held for held in list(self.held.values()) if now - held[1] > self.threshold]
        for held in late:
            self.held.pop(id(held[0]), None)
        return late

    def report(self, late: list[_Held]) -> None:
        """Log each of ``late`` (from :meth:`due`) with where it was taken, and count it."""
        now = clock()
        for _, taken, stack in late:
            self.stats.leaks += 1
            logger.warning(
                "A connection of pool %r has been held for %.1fs, longer than leak_threshold "
                "(%gs): %s It was taken at:\n%s",
                self.name,
                now - taken,
                self.threshold,
                self.consequence,
                _format_stack(stack),
            )

    def _sweep(self) -> None:
        self.report(self.due())
        loop = self._loop
        if self.held and loop is not None and not loop.is_closed():
            loop.call_later(self.every, self._sweep)
        else:
            self._loop = None  # the next checkout starts the sweep again


def _where(limit: int = 40) -> list[_Frame]:
    """Return the stack of the code taking a connection, innermost first, as (code, line).

    Only the code and line numbers: the source lines are read when a leak is reported.
    In a greenlet (SQLAlchemy's, the native ORM's) the stack goes on in the parent
    greenlet, from the coroutine that started it: the application's code.
    """
    frame: types.FrameType | None = sys._getframe(2)
    current: Any = greenlet.getcurrent()
    stack: list[_Frame] = []
    while len(stack) < limit:
        if frame is None:
            current = current.parent
            if current is None:
                break
            frame = current.gr_frame
            continue
        stack.append((frame.f_code, frame.f_lineno))
        frame = frame.f_back
    return stack


def _format_stack(stack: list[_Frame], shown: int = 12) -> str:
    """Return the innermost ``shown`` frames of ``stack`` outside the database layers,
    outermost first."""
    own = [
        traceback.FrameSummary(code.co_filename, line, code.co_name)
        for code, line in stack
        if not any(part in code.co_filename for part in _INTERNAL)
    ]
    return "".join(traceback.format_list(own[:shown][::-1]))
