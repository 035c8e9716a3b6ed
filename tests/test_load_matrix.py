"""The load matrix's steady cells: our pools at 0.5x to 10x their cap, no fault.

Workers send primary-key lookups back to back (tests/loadmatrix.py) through the
async ``session_scope()`` or the ENGINE in threads, with a pool timeout far above
the queueing time. Whatever the oversubscription, the pool must serve every
waiter in its turn: no error, no waiter starved, the breaker left alone. The same
cells, with faults and beside bare SQLAlchemy and psycopg_pool, are
``benchmarks/soak_matrix.py``; run with ``-s`` to see each cell's figures.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from django_asyncpool.core import registry as _registry

from .loadmatrix import (
    DjangoOrm,
    OurScope,
    Sizes,
    conninfo,
    describe,
    ensure_table,
    our_options,
    run,
)

pytestmark = pytest.mark.slow

MULTIPLES = (0.5, 1, 2.5, 4, 10)
SECONDS = 1.0  # per cell, after a 0.3 s warm-up


@pytest.mark.parametrize("multiple", MULTIPLES, ids=lambda m: f"{m:g}x")
@pytest.mark.parametrize("max_overflow", [0, 2], ids=lambda o: f"overflow{o}")
@pytest.mark.parametrize("side", ["async", "sync"])
def test_steady_load_serves_every_waiter_in_turn(
    make_alias: Any, db_access: None, side: str, max_overflow: int, multiple: float
) -> None:
    # A timeout far above any wait in the queue (~10 ms at 10x): a timeout here is starvation.
    sizes = Sizes(pool_size=4, max_overflow=max_overflow, timeout=5.0)
    alias = make_alias(OPTIONS=our_options(sizes))
    from django.db import connections

    ensure_table(connections[alias].settings_dict)
    guard = _registry.guard(alias)
    transitions: list[str] = []
    guard.transitions.append(lambda old, new: transitions.append(f"{old} -> {new}"))
    client = OurScope(alias) if side == "async" else DjangoOrm(alias)
    workers = max(1, round(multiple * sizes.cap))

    def outcomes() -> tuple[int, int, int]:
        stats = _registry.stats(alias, side)
        return stats.timeouts, stats.failures, stats.rejected

    measured_from: list[tuple[int, int, int]] = []
    stalls = [0.0]  # the slowest round trip to the server while measured

    def measure() -> None:
        measured_from.append(outcomes())
        # Connecting included: the server may be stalled now.
        now = time.perf_counter()
        end = now + SECONDS
        info = conninfo(connections[alias].settings_dict)
        with psycopg.connect(**info, autocommit=True) as probe:
            while True:
                probe.execute("select 1")
                stalls.append(time.perf_counter() - now)
                time.sleep(0.02)
                if (now := time.perf_counter()) > end:
                    break

    [figures] = run([client], workers, during=measure, prewarm=min(workers, sizes.cap))

    stats = _registry.stats(alias, side)
    # The pool's failed checkouts while measured: those of the warm-up (opening the
    # connections while this machine or the server stalls) are printed, with their errors.
    measured = tuple(now - then for now, then in zip(outcomes(), measured_from[0], strict=True))
    longest = max(figures.waits)
    slowest = max(figures.holds)
    # The longest wait in hold times, counted rather than timed: the requests served while
    # it waited, per connection. Served in turn, a waiter waits for those ahead of it
    # (9 holds at 10x the cap), however slow this shared machine is at that moment; the
    # timed ratio below (to the mean hold, by Little's law) is printed, not asserted.
    # Async: counted in connections had, on the one event loop. Threads: counted in the
    # pool's own handoffs, from joining its queue to being handed a connection: a thread
    # handed one but not yet scheduled by the OS is not kept waiting by the pool.
    assert figures.by_handoffs is (side == "sync")
    holds = figures.served_meanwhile / sizes.cap
    hold = min(workers, sizes.cap) * SECONDS / figures.requests
    print(
        f"\n{side} {workers} workers, cap {sizes.cap}: {describe(figures)}; longest wait "
        f"{holds:.1f} holds counted, {longest / hold:.1f}x the mean hold ({hold * 1e3:.2f} ms), "
        f"the slowest hold {slowest * 1e3:.1f} ms, server stall {max(stalls) * 1e3:.1f} ms; "
        f"breaker {guard.state} {transitions}; attempts {stats.attempts}, timeouts "
        f"{stats.timeouts}, failures {stats.failures}, rejected {stats.rejected} (measured: "
        f"{measured}); warm-up errors {figures.warmup_errors} {figures.samples}"
    )
    assert figures.requests > 100 * min(multiple, 1)
    assert figures.errors == {}, figures.samples
    assert figures.stuck == 0
    # Starved, a waiter waits the whole cell while every other request overtakes it.
    # Threads: the pool's fairness is the handoff count below; the wall-clock maximum
    # also holds what the OS scheduler adds after a handoff, and on this 2-core CI
    # machine one sync wait in ~3 runs reached 1.1 s with 1.2 holds counted in the
    # pool (unexplained, not the queue): the sync bound is the p99, the max is printed.
    # Nor can a wait be shorter than the holds it waits for, or than a stall of the
    # machine or the server (twice in CI, ~1.6 s with every count in order and a few
    # dozen requests served meanwhile): the queries holding the connections stall with
    # it, or the liveness check's round trip, in the wait. A pool that stops handing
    # connections out keeps the waits long, the holds short and the server answering.
    waited = longest if side == "async" else figures.wait(0.99)
    assert waited < 1.0 + max(slowest, max(stalls)), (waited, slowest, max(stalls))
    assert holds <= 20
    # In order: none on one event loop, none in the pool's handoffs (a few if the liveness
    # check finds a dead connection and the thread takes another).
    assert figures.overtaken <= 4 * workers
    assert transitions == [] and guard.state == "closed"
    assert measured == (0, 0, 0), figures.samples
    assert stats.checkouts >= figures.requests
