"""The counted checkout and check-in every pool goes through, and the stamps it leaves.

:func:`checkout` puts the alias's guard (breaker and retries) around a pool's own
getconn and counts the attempt, its outcome, the retries and the latency into the
pool's :class:`~.stats.Stats`; :func:`checkin` counts how long the connection was
held. The stamps are attributes of a connection (or keys of a SQLAlchemy record's
``info``), read with :func:`~.liveness.clock`:

* :data:`RETURNED`: when it was opened or last came back (the liveness bypass window);
* :data:`TAKEN`: when it was handed out, for the time it is held (None with metrics
  off, or once back; missing on a connection never handed out before).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .liveness import clock

if TYPE_CHECKING:
    from .guard import Guard
    from .stats import Stats

__all__ = ["RETURNED", "TAKEN", "checkin", "checkout"]

T = TypeVar("T")

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
) -> T:
    """Return ``guard.acquire(acquire, *args)``, counting the attempt, outcome, retries, latency.

    ``sleep`` waits between tries (an awaiting one in a greenlet: the native async ORM).
    """
    stats.attempts += 1
    started = clock()
    try:
        conn = guard.acquire(acquire, *args, sleep=sleep, stats=stats)
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
    return conn


def checkin(stats: Stats, conn: Any) -> None:
    """Count the time ``conn`` was held, as it goes back (or is closed)."""
    taken = getattr(conn, TAKEN, None)
    if taken is not None:
        stats.held.observe(clock() - taken)
        setattr(conn, TAKEN, None)
