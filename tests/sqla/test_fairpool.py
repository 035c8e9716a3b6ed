"""Overload and lost connections: waiters served in order, a full pool is not an outage.

Issue 13's reproduction and its guards, against the real server. The full 20 s
reproduction (and the same load on the sync pool) is ``benchmarks/soak_overload.py``.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy.exc
from django.db import OperationalError, connections
from sqlalchemy import text

from django_asyncpool import (
    AsyncConnectionLost,
    ConnectionLost,
    ConnectionPool,
    PoolTimeout,
    session_scope,
)
from django_asyncpool.base import DatabaseWrapper
from django_asyncpool.core import registry as _registry
from testproject import pgserver

from ..conftest import backends, query, wait_until
from ..loadmatrix import DjangoOrm, Figures, OurScope, describe, ensure_table, run

ROWS = 1000
LOOKUP = text("select v from fairness_items where id = :i")
#: Issue 13's configuration: 32 callers against a cap of 12.
OVERLOAD: dict[str, Any] = {
    "application_name": "asyncpool-fairness",
    "pool": {"min_size": 2, "max_size": 8, "timeout": 5},
    "async_pool": {"pool_size": 8, "max_overflow": 4, "timeout": 5},
    "circuit_breaker": {"fail_max": 3, "reset_timeout": 2},
}
#: Small pools, for the order and cancellation tests.
ONE: dict[str, Any] = {
    "async_pool": {"pool_size": 1, "max_overflow": 0, "timeout": 5},
}


class Outcomes:
    """Every request of a load: how long it waited for a connection, or its error.

    Waits are recorded after ``WARMUP`` seconds: the pool opening its connections
    (one at a time on the sync side) is a cold start, not queueing.
    """

    WARMUP = 1.0

    def __init__(self, alias: str) -> None:
        self.steady_from = time.perf_counter() + self.WARMUP
        self.waits: list[float] = []
        self.errors: list[tuple[float, BaseException]] = []
        self.opened = 0
        self.lock = threading.Lock()
        _registry.guard(alias).transitions.append(self.on_transition)

    def on_transition(self, old: str | None, new: str) -> None:
        if new == "open":
            self.opened += 1

    def waited(self, started: float) -> None:
        if started >= self.steady_from:
            self.waits.append(time.perf_counter() - started)

    def error(self, exc: BaseException) -> None:
        with self.lock:
            self.errors.append((time.monotonic(), exc))

    def samples(self) -> dict[str, str]:
        """Return the first line of one error of each type."""
        return {type(e).__name__: str(e).splitlines()[0][:160] for _, e in self.errors}

    def summary(self, what: str) -> str:
        waits = sorted(self.waits) or [0.0]
        kinds = collections.Counter(type(e).__name__ for _, e in self.errors)
        return (
            f"{what}: {len(self.waits)} served after {self.WARMUP:g}s of warm-up, errors "
            f"{len(self.errors)} {dict(kinds)}; wait for a connection p50 "
            f"{statistics.median(waits) * 1e3:.1f} ms, p99 "
            f"{waits[int(len(waits) * 0.99)] * 1e3:.1f} ms, max {waits[-1] * 1e3:.0f} ms; "
            f"breaker opened {self.opened} times"
        )


async def run_async(
    alias: str, tasks: int, done: Callable[[], bool], pause_on_error: float = 0.0
) -> Outcomes:
    """Loop ``tasks`` PK lookups through ``session_scope()`` on this loop until ``done()``."""
    out = Outcomes(alias)

    async def worker(n: int) -> None:
        i = n
        while not done():
            i = i % ROWS + 1
            started = time.perf_counter()
            try:
                async with session_scope(alias) as session:
                    await session.connection()  # the checkout: the wait measured
                    out.waited(started)
                    await session.execute(LOOKUP, {"i": i})
            except Exception as exc:
                out.error(exc)
                await asyncio.sleep(pause_on_error)

    await asyncio.gather(*(worker(n) for n in range(tasks)))
    await ConnectionPool(alias).close()
    return out


def create_items(alias: str = "default") -> None:
    """Create (once) the table the loads look up."""
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "create table if not exists fairness_items (id int primary key, v int not null);"
            "insert into fairness_items select g, g from generate_series(1, %s) g "
            "on conflict do nothing",
            [ROWS],
        )


@pytest.fixture
def items(db_access: None) -> None:
    create_items()


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.001)


async def select_one(pool: ConnectionPool) -> int:
    async with pool.connection() as conn:
        return int(await conn.fetchval("select 1"))


# -- issue 13: the reproduction ----------------------------------------------------------------


def overload(alias: str, side: str, seconds: float) -> Figures:
    """Issue 13's load: 32 workers on ``side`` of ``alias``, ``seconds`` with the warm-up."""
    ensure_table(connections[alias].settings_dict)
    client = OurScope(alias) if side == "async" else DjangoOrm(alias)
    # One request first: the pool exists before its handoffs are watched.
    [figures] = run(
        [client], 32, warmup=Outcomes.WARMUP, seconds=seconds - Outcomes.WARMUP, prewarm=1
    )
    return figures


def assert_served_in_turn(alias: str, figures: Figures) -> None:
    assert figures.errors == {} and figures.warmup_errors == 0, figures.samples
    guard = _registry.guard(alias)
    assert guard.entered["open"] == 0 and guard.state == "closed"
    # From the start of a request to a connection it can use, as ``session.connection()``
    # or ``wrapper.connect()`` returns it.
    assert max(figures.connects) < 1.0
    assert len(figures.connects) > 300  # the load ran (a loaded machine serves fewer)
    assert figures.stuck == 0


@pytest.mark.slow
def test_async_overload_has_no_errors_and_no_starved_waiter(make_alias, db_access) -> None:
    # Shortened from the 20 s (benchmarks/soak_overload.py runs those): long
    # enough for the first wave of pool timeouts (at 5.0 s) the bug caused.
    alias = make_alias(OPTIONS=OVERLOAD)
    figures = overload(alias, "async", 6.5)
    print(f"\nasync, 32 tasks, pool 8 + 4: {describe(figures)}")
    assert_served_in_turn(alias, figures)


def test_sync_overload_has_no_errors_and_no_starved_waiter(make_alias, db_access) -> None:
    # psycopg_pool serves its waiters in order already: this guards it.
    alias = make_alias(OPTIONS=OVERLOAD)
    figures = overload(alias, "sync", 3.0)
    print(f"\nsync, 32 threads, max_size 8: {describe(figures)}")
    assert_served_in_turn(alias, figures)


# -- the wait queue ------------------------------------------------------------------------------


async def test_waiters_are_served_oldest_first(make_alias, db_access) -> None:
    pool = ConnectionPool(make_alias(OPTIONS=ONE))
    served: list[int] = []

    async def waiter(n: int) -> None:
        for _ in range(3):  # each one queues again at once, behind the others
            async with pool.connection() as conn:
                served.append(n)
                await conn.fetchval("select 1")

    tasks = []
    async with pool.connection():
        for n in range(5):
            tasks.append(asyncio.create_task(waiter(n)))
            await until(lambda n=n: pool.stats.waiting == n + 1)
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    # SQLAlchemy's queue let the task giving a connection back take it again
    assert served == [0, 1, 2, 3, 4] * 3
    await pool.close()


async def test_a_waiter_cancelled_in_the_queue_leaks_nothing(make_alias, pg, db_access) -> None:
    alias = make_alias(OPTIONS=ONE)
    pool = ConnectionPool(alias)
    async with pool.connection():
        waiter = asyncio.create_task(select_one(pool))
        await until(lambda: pool.stats.waiting == 1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert pool.stats.waiting == 0
    metrics = pool.metrics
    assert (metrics["in_use"], metrics["idle"], metrics["max_size"]) == (0, 1, 1), metrics
    started = time.monotonic()
    assert await select_one(pool) == 1  # the one connection is free at once
    assert time.monotonic() - started < 0.5
    await pool.close()


async def test_a_waiter_cancelled_once_handed_a_connection_passes_it_on(
    make_alias, pg, db_access
) -> None:
    alias = make_alias(OPTIONS={**ONE, "application_name": "asyncpool-handoff"})
    dbname = connections[alias].settings_dict["NAME"]
    pool = ConnectionPool(alias)
    holder = pool.connection()
    conn = await holder.__aenter__()
    await conn.execute("begin; select 1")  # given back mid-transaction: rolled back
    first = asyncio.create_task(select_one(pool))
    await until(lambda: pool.stats.waiting == 1)
    second = asyncio.create_task(select_one(pool))
    await until(lambda: pool.stats.waiting == 2)
    await holder.__aexit__(None, None, None)  # hands the connection to `first`...
    first.cancel()  # ...cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(second, 2) == 1  # the next in line got it
    metrics = pool.metrics
    assert (metrics["in_use"], metrics["idle"], metrics["waiting"]) == (0, 1, 0), metrics
    assert backends(pg, dbname, "idle in transaction") == 0
    await pool.close()


async def test_a_timed_out_waiter_leaves_the_queue(make_alias, db_access) -> None:
    pool = ConnectionPool(
        make_alias(OPTIONS={"async_pool": {"pool_size": 1, "max_overflow": 0, "timeout": 0.2}})
    )
    async with pool.connection():
        with pytest.raises(PoolTimeout, match=r"size 1/1, in use 1, idle 0, waiting 1") as info:
            await select_one(pool)
        assert isinstance(info.value, sqlalchemy.exc.TimeoutError)  # as SQLAlchemy's pool
        late = asyncio.create_task(select_one(pool))
        await until(lambda: pool.stats.waiting == 1)
    assert await late == 1  # handed the connection, not the timed-out waiter
    sa_pool: Any = pool.engine.sync_engine.pool
    assert sa_pool.waiting() == 0 and sa_pool.checkedout() == 0
    await pool.close()


# -- a full pool is not an outage ----------------------------------------------------------------


@pytest.mark.parametrize("count", [False, True])
async def test_async_pool_timeout_counts_for_the_breaker_only_if_asked(
    make_alias, db_access, caplog, count
) -> None:
    alias = make_alias(
        OPTIONS={
            "async_pool": {"pool_size": 1, "max_overflow": 0, "timeout": 0.2},
            "circuit_breaker": {"fail_max": 1, "reset_timeout": 30, "count_pool_timeouts": count},
        }
    )
    pool = ConnectionPool(alias)
    with caplog.at_level(logging.WARNING, logger="django_asyncpool"):
        async with pool.connection():
            with pytest.raises(PoolTimeout, match=r"became free within 0\.2s"):
                await select_one(pool)
    assert pool.metrics["timeouts"] == 1
    assert "became free within 0.2s" in caplog.text  # logged
    assert _registry.guard(alias).state == ("open" if count else "closed")
    if not count:
        assert await select_one(pool) == 1
    await pool.close()


@pytest.mark.parametrize("count", [False, True])
def test_sync_pool_timeout_counts_for_the_breaker_only_if_asked(
    make_wrapper, caplog, count
) -> None:
    wrapper = make_wrapper(
        OPTIONS={
            "pool": {"min_size": 1, "max_size": 1, "timeout": 0.2},
            "circuit_breaker": {"fail_max": 1, "reset_timeout": 30, "count_pool_timeouts": count},
        }
    )
    holder = DatabaseWrapper(copy.deepcopy(wrapper.settings_dict), alias=wrapper.alias)
    holder.ensure_connection()  # takes the only connection
    with caplog.at_level(logging.WARNING, logger="django_asyncpool"), pytest.raises(PoolTimeout):
        query(wrapper)
    holder.close()
    guard = _registry.guard(wrapper.alias, wrapper)
    assert "became free within 0.2s" in caplog.text
    assert guard.state == ("open" if count else "closed")
    if not count:
        query(wrapper)


# -- one error for a connection lost mid-query ------------------------------------------------


async def kill_sleeper(pg: pgserver.LocalPostgres, marker: str) -> None:
    """pg_terminate_backend() the backend running the query tagged ``marker``."""
    sql = (
        "select count(pg_terminate_backend(pid)) from pg_stat_activity "
        f"where query like '%{marker}%' and pid <> pg_backend_pid()"
    )
    for _ in range(200):
        if await asyncio.to_thread(pg.psql, sql) == "1":
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no backend ran {marker}")


def assert_lost(exc: BaseException) -> None:
    assert isinstance(exc, AsyncConnectionLost), repr(exc)
    assert isinstance(exc, ConnectionLost) and isinstance(exc, OperationalError)
    assert isinstance(exc, sqlalchemy.exc.OperationalError) and exc.connection_invalidated
    assert "was lost during a query" in str(exc)


@pytest.mark.parametrize("readonly", [False, True], ids=["session", "readonly-fast-path"])
async def test_a_query_cut_under_session_scope_raises_connection_lost(
    make_alias, pg, db_access, readonly
) -> None:
    alias = make_alias(OPTIONS=ONE)
    marker = f"lost-scope-{readonly}"
    seen: list[BaseException] = []
    with pytest.raises(ConnectionLost) as info:
        async with session_scope(alias, readonly=readonly) as session:
            # Not the scope's first statement: a read-only one would be run again
            # (tests/sqla/test_engines.py), as a session's BEGIN is.
            await session.execute(text("select 1"))
            killer = asyncio.create_task(kill_sleeper(pg, marker))
            try:
                await session.execute(text(f"select pg_sleep(10) -- {marker}"))
            except Exception as exc:
                seen.append(exc)
                raise
    await killer
    assert seen[0] is info.value  # the same error inside the scope as outside
    assert_lost(info.value)
    async with session_scope(alias, readonly=readonly) as session:  # the pool goes on
        assert (await session.execute(text("select 1"))).scalar() == 1
    assert ConnectionPool(alias).metrics["in_use"] == 0
    await ConnectionPool(alias).close()


@pytest.mark.parametrize("pause", [0.0, 0.2])
async def test_a_backend_killed_between_two_fast_path_reads_is_connection_lost(
    make_alias, pg, db_access, pause
) -> None:
    # The server's goodbye arrives while the connection is idle in the scope: the next
    # statement finds asyncpg out of step (or the socket closed), a lost connection too.
    alias = make_alias(OPTIONS={**ONE, "application_name": f"asyncpool-between-{pause}"})
    sql = (
        "select count(pg_terminate_backend(pid)) from pg_stat_activity "
        f"where application_name = 'asyncpool-between-{pause}'"
    )
    with pytest.raises(ConnectionLost) as info:
        async with session_scope(alias, readonly=True) as session:
            assert (await session.execute(text("select 1"))).scalar() == 1
            assert await asyncio.to_thread(pg.psql, sql) == "1"
            await asyncio.sleep(pause)
            await session.execute(text("select 2"))
    assert_lost(info.value)
    async with session_scope(alias, readonly=True) as session:
        assert (await session.execute(text("select 3"))).scalar() == 3
    await ConnectionPool(alias).close()


async def test_a_query_cut_under_get_connection_raises_connection_lost(
    make_alias, pg, db_access
) -> None:
    pool = ConnectionPool(make_alias(OPTIONS=ONE))
    session = await pool.get_connection()
    try:
        killer = asyncio.create_task(kill_sleeper(pg, "lost-get"))
        with pytest.raises(ConnectionLost) as info:
            await session.execute(text("select pg_sleep(10) -- lost-get"))
        await killer
    finally:
        await session.close()
    assert_lost(info.value)
    assert await select_one(pool) == 1
    await pool.close()


async def test_a_query_cut_under_connection_raises_connection_lost(
    make_alias, pg, db_access
) -> None:
    alias = make_alias(OPTIONS=ONE)
    pool = ConnectionPool(alias)
    with pytest.raises(ConnectionLost) as info:
        async with pool.connection() as conn:
            killer = asyncio.create_task(kill_sleeper(pg, "lost-raw"))
            await conn.execute("select pg_sleep(10) -- lost-raw")
    await killer
    assert_lost(info.value)
    assert info.value.__cause__ is not None  # asyncpg's own error, for the details
    assert await select_one(pool) == 1
    assert pool.metrics["in_use"] == 0
    await pool.close()


@pytest.mark.parametrize("readonly", [False, True])
async def test_a_cancelled_query_stays_a_cancellation(make_alias, db_access, readonly) -> None:
    alias = make_alias(OPTIONS=ONE)

    async def sleeper() -> None:
        async with session_scope(alias, readonly=readonly) as session:
            await session.execute(text("select pg_sleep(10)"))

    task = asyncio.create_task(sleeper())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):  # SQLAlchemy calls it a disconnect
        await task
    assert await select_one(ConnectionPool(alias)) == 1
    await ConnectionPool(alias).close()


async def test_a_callers_own_error_stays_its_own_on_a_closed_connection(
    make_alias, db_access
) -> None:
    pool = ConnectionPool(make_alias(OPTIONS=ONE))
    with pytest.raises(ValueError, match="mine"):
        async with pool.connection() as conn:
            await conn.close()
            raise ValueError("mine")
    assert await select_one(pool) == 1  # the closed one was replaced
    await pool.close()


async def test_run_transaction_runs_again_after_a_lost_connection(
    make_alias, pg, db_access
) -> None:
    pool = ConnectionPool(make_alias(OPTIONS=ONE))
    calls = 0

    async def work(session: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            killer = asyncio.create_task(kill_sleeper(pg, "lost-retried"))
            try:
                await session.execute(text("select pg_sleep(10) -- lost-retried"))
            finally:
                await killer
        return int((await session.execute(text("select 42"))).scalar())

    assert await pool.run_transaction(work) == 42
    assert calls == 2
    await pool.close()


def test_a_sync_query_cut_raises_djangos_operational_error(make_wrapper, pg) -> None:
    wrapper = make_wrapper(OPTIONS={"pool": {"min_size": 1, "max_size": 1, "timeout": 2}})
    killer = threading.Thread(target=asyncio.run, args=(kill_sleeper(pg, "lost-sync"),))
    killer.start()
    with pytest.raises(OperationalError) as info, wrapper.cursor() as cursor:
        cursor.execute("select pg_sleep(10) -- lost-sync")
    killer.join(10)
    assert "terminat" in str(info.value)
    wrapper.close()
    assert query(wrapper) > 0  # the pool goes on
    assert _registry.guard(wrapper.alias, wrapper).state == "closed"


# -- a restart under overload ----------------------------------------------------------------


@pytest.mark.slow
def test_restart_under_overload_recovers_within_reset_timeout(
    make_alias, pg, server_down, items
) -> None:
    alias = make_alias(OPTIONS=OVERLOAD)
    reset_timeout = OVERLOAD["circuit_breaker"]["reset_timeout"]
    marks: dict[str, float] = {}
    stop = threading.Event()
    result: list[Outcomes] = []
    loop_thread = threading.Thread(
        target=lambda: result.append(asyncio.run(run_async(alias, 32, stop.is_set, 0.01)))
    )
    loop_thread.start()
    try:
        time.sleep(1.0)
        marks["down"] = time.monotonic()
        server_down()
        time.sleep(5.0)
        pg.start()
        marks["up"] = time.monotonic()
        time.sleep(reset_timeout + 3.0)
    finally:
        stop.set()
        loop_thread.join(30)
        connections["default"].close()  # the test's own connection died with the server
    out = result[0]
    errors = [e for _, e in out.errors]
    late = [e for t, e in out.errors if t > marks["up"] + reset_timeout + 1]
    kinds = collections.Counter(type(e).__name__ for e in errors)
    last = max(t for t, _ in out.errors) - marks["up"]
    print(f"\n{out.summary('restart (5 s down) under 32 tasks, pool 8 + 4')}")
    print(f"  last error {last:.2f}s after the server was back (bar {reset_timeout + 1:g}s)")
    assert errors, "the outage went unnoticed: the test proves nothing"
    assert all(isinstance(e, OperationalError) for e in errors), [
        repr(e) for e in errors if not isinstance(e, OperationalError)
    ][:3]
    assert all(t >= marks["down"] for t, _ in out.errors)
    assert late == [], kinds
    assert len(out.waits) > 500  # served again after the outage
    assert not loop_thread.is_alive()
    assert wait_until(lambda: _registry.guard(alias).state == "closed", timeout=1)


@pytest.mark.parametrize("scope", ["session_scope", "readonly", "connection"])
async def test_a_connection_held_too_long_is_logged_once_with_its_taker(
    make_alias, db_access, caplog, scope
) -> None:
    alias = make_alias(OPTIONS={**ONE, "leak_threshold": 0.1})
    pool = ConnectionPool(alias)

    async def use(hold: float) -> None:
        if scope == "connection":
            async with pool.connection() as conn:
                await conn.fetchval("select 1")
                await asyncio.sleep(hold)
        else:
            async with pool.session_scope(readonly=scope == "readonly") as session:
                await session.execute(text("select 1"))
                await asyncio.sleep(hold)

    async def keep_a_connection() -> None:
        await use(0.6)  # several sweeps past the threshold

    with caplog.at_level(logging.WARNING, logger="django_asyncpool"):
        await use(0)  # given back at once: no leak
        assert pool.metrics["leaks"] == 0
        await keep_a_connection()
    reports = [r.getMessage() for r in caplog.records if "leak_threshold (0.1s)" in r.getMessage()]
    assert len(reports) == 1, reports
    assert "keep_a_connection" in reports[0]  # the stack of the code that took it
    assert pool.metrics["leaks"] == 1
