"""The pools' runtime statistics as plain data: counters and histograms, no Prometheus.

One :class:`Stats` per alias and side (``"sync"`` or ``"async"``) for the life of
the process: pools are rebuilt (settings changes, ``close()``, a fork) but their
counters carry on, so that what :mod:`django_asyncpool.metrics` renders from them
only ever grows. Updates on the hot path are attribute increments and one
``bisect``: no lock, no label lookup (under the GIL an increment between two
calls is not interrupted; see DESIGN.md for what each Prometheus call would cost).
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import CircuitOpenError, PoolTimeout

if TYPE_CHECKING:
    from ._guard import Guard

__all__ = ["HELD_BUCKETS", "LATENCY_BUCKETS", "SIDES", "Histogram", "Stats", "get", "snapshot"]

T = TypeVar("T")

SIDES = ("sync", "async")
#: Seconds to obtain a connection: ~50 us from an idle pool, ms to open one, up to the timeout.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
#: Seconds a connection is held: a fast-path query, a request, a long task.
HELD_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip

#: perf_counter() when a sync connection was handed out, for the time it is held (None
#: with metrics off, or once back). Missing on a connection never handed out before.
_TAKEN = "_asyncpool_taken_at"
_NEVER = object()


class Histogram:
    """Counts of observations per bucket (the last one is +Inf), and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # A bucket's bound is inclusive (Prometheus' "le"): bisect_left finds it.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(slots=True, eq=False)
class Stats:
    """Counters of one alias's sync or async side.

    Every request for a connection is an attempt, with one outcome: a checkout
    (success), a timeout, a rejection by the open breaker, or another failure
    (``failures`` counts timeouts too, not rejections).
    """

    attempts: int = 0
    checkouts: int = 0
    failures: int = 0
    timeouts: int = 0
    rejected: int = 0
    retries: int = 0  # connection tries beyond the first, within attempts
    created: int = 0  # new connections (sync: counted when first handed out)
    reused: int = 0  # checkouts of a connection handed out before
    invalidated: int = 0  # found dead (or returned broken) and replaced
    leaks: int = 0  # leak warnings
    waiting: int = 0  # async: callers waiting for a connection now
    fallbacks: dict[str, int] = field(default_factory=dict)  # async_orm: thread path, by method
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    held: Histogram = field(default_factory=lambda: Histogram(HELD_BUCKETS))

    def failed(self, exc: BaseException) -> None:
        """Count an attempt that raised ``exc`` (a cancelled caller is no outcome)."""
        if isinstance(exc, CircuitOpenError):
            self.rejected += 1
        elif isinstance(exc, PoolTimeout):
            # timeouts first: failures - timeouts (the "failure" outcome) never overshoots
            self.timeouts += 1
            self.failures += 1
        elif isinstance(exc, Exception):
            self.failures += 1


_lock = threading.Lock()
_all: dict[tuple[str, str], Stats] = {}


def get(alias: str, side: str) -> Stats:
    """Return the statistics of ``alias``'s ``side`` ("sync" or "async")."""
    try:
        return _all[alias, side]
    except KeyError:
        pass
    with _lock:
        stats = _all.setdefault((alias, side), Stats())
    from .metrics import install

    install()  # also when the app is not in INSTALLED_APPS (the ENGINE alone)
    return stats


def snapshot() -> list[tuple[str, str, Stats]]:
    """Return ``(alias, side, stats)`` for every alias and side used in this process."""
    return [(alias, side, stats) for (alias, side), stats in list(_all.items())]


# -- the sync side's acquisition path (the async side's is _fairpool._GuardedPool) -----------


def acquire_sync(
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
    started = time.perf_counter()
    try:
        conn = guard.acquire(acquire, *args, sleep=sleep, stats=stats)
    except BaseException as exc:
        stats.failed(exc)
        raise
    stats.checkouts += 1
    taken = getattr(conn, _TAKEN, _NEVER)
    if taken is _NEVER:
        stats.created += 1
    else:
        stats.reused += 1
    if guard.config.metrics:
        now = time.perf_counter()
        stats.latency.observe(now - started)
        setattr(conn, _TAKEN, now)
    elif taken is _NEVER:
        setattr(conn, _TAKEN, None)
    return conn


def returned_sync(stats: Stats, conn: Any) -> None:
    """Count the time ``conn`` was held, as it goes back (or is closed)."""
    taken = getattr(conn, _TAKEN, None)
    if taken is not None:
        stats.held.observe(time.perf_counter() - taken)
        setattr(conn, _TAKEN, None)
