"""The pools' runtime statistics as plain data: counters and histograms, no Prometheus.

One :class:`Stats` per alias and side (``"sync"`` or ``"async"``) for the life of
the process: pools are rebuilt (settings changes, ``close()``, a fork) but their
counters carry on, so that what :mod:`django_asyncpool.metrics` renders from them
only ever grows. Updates on the hot path are attribute increments and one
``bisect``: no lock, no label lookup (under the GIL an increment between two
calls is not interrupted). What metrics cost on the hot path is measured by
``benchmarks/bench_metrics.py`` (docs/metrics.md, "What it costs").
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CircuitOpenError, PoolTimeout

if TYPE_CHECKING:
    from .guard import Guard

__all__ = [
    "HELD_BUCKETS",
    "LATENCY_BUCKETS",
    "SIDES",
    "SNAPSHOT_KEYS",
    "Histogram",
    "Stats",
    "describe",
    "snapshot",
]

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
    demotions: int = 0  # 25006 on a connection: the pool's connections replaced
    drains: int = 0  # drains on request (pool.drain(), dbpool_check --drain): all replaced
    leaks: int = 0  # leak warnings
    pings: int = 0  # liveness round trips at checkout (sync: past liveness_bypass, or each)
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


#: The keys of a pool snapshot, the same for the sync and the async pool (and the
#: native async ORM's): what ``metrics``, ``dbpool_check``, the health check and the
#: demo's ``/pool/`` render, and what ``ConnectionPool().metrics`` returns.
SNAPSHOT_KEYS = (
    "alias",
    "pool",  # "sync", "async" or "async_orm"
    "size",  # open connections: idle + in_use
    "idle",
    "in_use",
    "waiting",  # callers waiting for a connection now
    "min_size",
    "max_size",  # the cap: the sync pool's max_size, async pool_size + max_overflow
    "attempts",
    "checkouts",  # attempts that got a connection
    "created",
    "reused",
    "invalidated",
    "demotions",  # 25006 (a demoted primary): every connection of the pool replaced
    "drains",  # drains on request (drain(), dbpool_check --drain): every connection replaced
    "pings",
    "timeouts",
    "failures",
    "rejected",
    "retries",
    "leaks",
    "breaker_state",  # "closed", "open" or "half-open"
    "breaker_failures",  # consecutive failures counted towards opening it
)


def describe(snap: dict[str, Any]) -> str:
    """Return a snapshot's state as error messages give it: "size 3/10, in use 3, idle 0,
    waiting 2"."""
    return (
        f"size {snap['size']}/{snap['max_size']}, in use {snap['in_use']}, "
        f"idle {snap['idle']}, waiting {snap['waiting']}"
    )


def snapshot(
    alias: str,
    side: str,
    stats: Stats,
    guard: Guard | None,
    *,
    idle: int,
    in_use: int,
    waiting: int,
    min_size: int,
    max_size: int,
) -> dict[str, Any]:
    """Return one pool's snapshot: its state now, its counters, its breaker (plain data)."""
    return {
        "alias": alias,
        "pool": side,
        "size": idle + in_use,
        "idle": idle,
        "in_use": in_use,
        "waiting": waiting,
        "min_size": min_size,
        "max_size": max_size,
        "attempts": stats.attempts,
        "checkouts": stats.checkouts,
        "created": stats.created,
        "reused": stats.reused,
        "invalidated": stats.invalidated,
        "demotions": stats.demotions,
        "drains": stats.drains,
        "pings": stats.pings,
        "timeouts": stats.timeouts,
        "failures": stats.failures,
        "rejected": stats.rejected,
        "retries": stats.retries,
        "leaks": stats.leaks,
        "breaker_state": guard.state if guard is not None else "closed",
        "breaker_failures": guard.breaker.fail_counter if guard is not None else 0,
    }
