"""Faults against a real server: how both pools, the breaker and the retries behave.

The server stopped, restarted or blackholed, its backends terminated, the pool
exhausted, a connection never given back, a storm of cancelled requests. A
scenario both pools go through is one test parametrised by ``side``.

The load scenarios print their figures (run with ``-s`` to see them). The long
soaks are ``benchmarks/soak_*.py``; docs/reliability.md has what each one shows.
The breaker and retries alone, without a server, are in ``core/test_guard.py``.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import pickle
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy.exc
from django.db import IntegrityError, OperationalError, connection, connections
from sqlalchemy import text

from django_asyncpool import (
    CircuitOpenError,
    ConnectionPool,
    DatabaseUnavailable,
    PoolError,
    PoolTimeout,
    session_scope,
)
from django_asyncpool.base import DatabaseWrapper
from django_asyncpool.core import hangups
from django_asyncpool.core import registry as _registry
from django_asyncpool.sqla import engines as _engines
from testproject.pgserver import PASSWORD
from testproject.shop.models import Product

from .conftest import backends, in_forked_child, query, terminate_backends, wait_until

SIDES = ["sync", "async"]
APP = "asyncpool-reliability"  # application_name of the load scenarios' pools, to count them
FAST = {"pool": {"min_size": 0, "max_size": 2, "timeout": 2}}


def clean(exc: BaseException) -> bool:
    """Return True for the errors a caller may see while the server is away.

    Ours (typed, with what to do), or the driver saying the connection it was using
    died (Django's OperationalError/InterfaceError, SQLAlchemy's DBAPIError): never
    a hang, an internal error, or "another operation is in progress".
    """
    if isinstance(exc, PoolError):
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        # The connection it was using died, and was thrown away; said plainly.
        return exc.connection_invalidated and "another operation" not in str(exc)
    from django.db import InterfaceError

    return isinstance(exc, (OperationalError, InterfaceError))


def connect(alias: str) -> None:
    """Take a connection for this thread's ``connections[alias]``, as ensure_connection() would.

    Django's per-test guard patches ensure_connection() to refuse aliases the test
    case did not declare (ours are made during the test); connect() is not guarded.
    """
    connections[alias].close()
    connections[alias].connect()


class Load:
    """Concurrent async scopes and ORM threads against one alias, recording every outcome."""

    def __init__(self, alias: str, *, tasks: int, threads: int, pool_timeout: float) -> None:
        self.alias = alias
        self.tasks = tasks
        self.threads = threads
        self.pool_timeout = pool_timeout
        self.stop = threading.Event()
        self.gate = threading.Event()  # cleared: workers pause before their next request
        self.gate.set()
        self.in_flight = 0
        self.lock = threading.Lock()
        # (monotonic end time, seconds taken, error or None, side)
        self.outcomes: list[tuple[float, float, BaseException | None, str]] = []

    def record(self, started: float, error: BaseException | None, side: str) -> None:
        now = time.monotonic()
        with self.lock:
            self.outcomes.append((now, now - started, error, side))
            self.in_flight -= 1

    def try_begin(self) -> bool:
        with self.lock:  # with pause(): no request starts once the gate is seen closed
            if self.gate.is_set():
                self.in_flight += 1
                return True
            return False

    def begin(self) -> float:
        while not self.try_begin():
            time.sleep(0.01)
        return time.monotonic()

    def orm_worker(self, n: int) -> None:
        alias = self.alias
        while not self.stop.is_set():
            started = self.begin()
            error: BaseException | None = None
            try:
                connect(alias)
                qs = Product.objects.using(alias)
                assert qs.filter(sku=f"R{1 + n % 20}").count() == 1
            except Exception as exc:
                error = exc
            finally:
                connections[alias].close()
            self.record(started, error, "orm")
            time.sleep(0.002 if error is None else 0.05)

    async def scope_worker(self, n: int) -> None:
        while not self.stop.is_set():
            while not self.try_begin():
                await asyncio.sleep(0.01)
            started = time.monotonic()
            error: BaseException | None = None
            try:
                async with session_scope(self.alias) as session:
                    row = await session.execute(
                        text("select price_cents from shop_product where sku = :s"),
                        {"s": f"R{1 + n % 20}"},
                    )
                    row.one()
            except Exception as exc:
                error = exc
            self.record(started, error, "async")
            await asyncio.sleep(0.002 if error is None else 0.05)

    def run(self, during: Callable[[Load], None]) -> None:
        """Run the load, call ``during(self)`` in this thread, stop; nothing may be stuck."""
        threads = [threading.Thread(target=self.orm_worker, args=(n,)) for n in range(self.threads)]
        for t in threads:
            t.start()
        stuck: list[Any] = []

        def async_side() -> None:
            async def main() -> None:
                tasks = [asyncio.create_task(self.scope_worker(n)) for n in range(self.tasks)]
                while not self.stop.is_set():
                    await asyncio.sleep(0.05)
                _, pending = await asyncio.wait(tasks, timeout=self.pool_timeout + 5)
                stuck.extend(pending)
                for task in pending:
                    task.cancel()
                await ConnectionPool(self.alias).close()

            asyncio.run(main())

        loop_thread = threading.Thread(target=async_side)
        loop_thread.start()
        try:
            during(self)
        finally:
            self.stop.set()
            self.gate.set()
            loop_thread.join(self.pool_timeout + 10)
            for t in threads:
                t.join(self.pool_timeout + 10)
        stuck += [t for t in threads if t.is_alive()]
        self.stuck = len(stuck) + loop_thread.is_alive()

    def pause(self) -> None:
        """Let the requests in flight finish and hold the next ones back."""
        with self.lock:
            self.gate.clear()
        assert wait_until(lambda: self.in_flight == 0, timeout=10)

    def errors(self, start: float = 0.0, end: float = float("inf")) -> list[BaseException]:
        return [e for t, _, e, _ in self.outcomes if e is not None and start <= t <= end]


@pytest.fixture
def products(django_db_blocker: Any) -> None:
    with django_db_blocker.unblock():
        Product.objects.filter(sku__startswith="R").delete()
        Product.objects.bulk_create(
            Product(sku=f"R{i}", name=f"reliable {i}", price_cents=i) for i in range(1, 21)
        )


def _options(**extra: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "application_name": APP,
        "pool": {"min_size": 1, "max_size": 4, "timeout": 2},
        "async_pool": {"pool_size": 3, "max_overflow": 1, "timeout": 2},
        "circuit_breaker": {"fail_max": 3, "reset_timeout": 1},
        "retry": {"max_tries": 2, "max_time": 1, "base_delay": 0.05},
    }
    options.update(extra)
    return options


# -- 1 and 7: the server restarted under load ----------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_restart_under_load(make_alias, pg, products) -> None:
    options = _options()
    alias = make_alias(OPTIONS=options)
    reset_timeout = options["circuit_breaker"]["reset_timeout"]
    pool_timeout = options["async_pool"]["timeout"]
    cap = options["pool"]["max_size"] + options["async_pool"]["pool_size"] + 1
    marks: dict[str, float] = {}

    def outage(load: Load) -> None:
        time.sleep(1.0)
        marks["down"] = time.monotonic()
        pg.stop("fast")
        time.sleep(2.0)
        pg.start()
        marks["up"] = time.monotonic()
        time.sleep(reset_timeout + 3.0)

    load = Load(alias, tasks=8, threads=4, pool_timeout=pool_timeout)
    try:
        load.run(outage)
    finally:
        if not pg.is_running():
            pg.start()
        connections["default"].close()  # the test case's own connection died with the server
    ok_since = max((t for t, _, e, _ in load.outcomes if e is not None), default=marks["up"])
    recovery = max(ok_since - marks["up"], 0.0)
    late = [d for _, d, _, _ in load.outcomes if d > pool_timeout + 0.5]
    errors = load.errors()
    kinds = collections.Counter(type(e).__name__ for e in errors)
    samples = {type(e).__name__: str(e).splitlines()[0][:120] for e in errors}
    after = backends(pg, app=APP)
    print(
        f"\nrestart under load: {len(load.outcomes)} requests, waited > pool timeout "
        f"({pool_timeout:g}s): {len(late)}; errors {len(errors)} {dict(kinds)}; back to 100% "
        f"success {recovery:.2f}s after the server (bar {reset_timeout + 2:g}s); server "
        f"connections afterwards {after} (max {cap}); stuck {load.stuck}"
    )
    for kind, sample in samples.items():
        print(f"  {kind}: {sample}")
    assert late == []
    assert all(clean(e) for e in errors), [repr(e) for e in errors if not clean(e)][:3]
    assert all(marks["down"] <= t for t, _, e, _ in load.outcomes if e is not None)
    assert recovery <= reset_timeout + 2
    assert sum(e is None for t, _, e, _ in load.outcomes if t > ok_since) > 50
    assert after <= cap
    assert load.stuck == 0


# -- 2: every backend terminated under load -----------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_terminated_backends_under_load_cost_callers_nothing(make_alias, pg, products) -> None:
    alias = make_alias(OPTIONS=_options())
    killed = []

    def massacre(load: Load) -> None:
        for _ in range(3):
            time.sleep(0.5)
            load.pause()  # between requests: the pools' connections are all idle
            killed.append(terminate_backends(pg, app=APP))
            wait_until(lambda: backends(pg, app=APP) == 0, timeout=5)
            load.gate.set()
        time.sleep(0.5)

    load = Load(alias, tasks=8, threads=4, pool_timeout=2)
    load.run(massacre)
    errors = load.errors()
    metrics = ConnectionPool(alias).metrics
    print(
        f"\nterminated backends: {sum(killed)} killed in {len(killed)} rounds under "
        f"{len(load.outcomes)} requests; errors seen by callers {len(errors)}; async "
        f"connections found dead at checkout {metrics['invalidated']}"
    )
    assert min(killed) >= 2
    assert errors == [], [repr(e) for e in errors[:3]]
    assert metrics["invalidated"] >= 1
    assert load.stuck == 0


# -- 3: the network path blackholed --------------------------------------------------------


@pytest.mark.slow
def test_blackhole_fails_within_the_timeout_then_fails_fast_then_recovers(
    make_alias, proxy
) -> None:
    options = _options(
        connect_timeout=1,
        async_pool={"pool_size": 2, "max_overflow": 0, "timeout": 1},
        liveness_bypass=0.1,
    )
    alias = make_alias(HOST=proxy.host, PORT=proxy.port, NAME="postgres", OPTIONS=options)
    figures: dict[str, Any] = {}

    async def one() -> None:
        async with session_scope(alias) as session:
            await session.execute(text("select 1"))

    async def scenario() -> None:
        pool = ConnectionPool(alias)
        await asyncio.gather(one(), one())
        await asyncio.sleep(0.2)  # idle past liveness_bypass: checkouts ping
        proxy.blackhole()
        slowest, kinds = 0.0, collections.Counter[str]()
        while pool.metrics["breaker_state"] != "open" and sum(kinds.values()) < 20:
            started = time.monotonic()
            try:
                await one()
            except Exception as exc:
                kinds[type(exc).__name__] += 1
            slowest = max(slowest, time.monotonic() - started)
        figures.update(slowest=slowest, kinds=dict(kinds), state=pool.metrics["breaker_state"])
        started = time.monotonic()
        fast = 0
        for _ in range(20):
            try:
                await one()
            except PoolError:
                fast += 1
        figures["fast"] = (fast, (time.monotonic() - started) / 20)
        proxy.restore()
        started = time.monotonic()
        while True:
            try:
                await one()
                break
            except PoolError:
                await asyncio.sleep(0.05)
            assert time.monotonic() - started < 10
        figures["recovery"] = time.monotonic() - started
        await pool.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
    print(
        f"\nblackhole: slowest failing call {figures['slowest']:.2f}s (connect_timeout 1s, "
        f"pool timeout 1s); errors {figures['kinds']}; breaker {figures['state']}; "
        f"while open {figures['fast'][0]}/20 failed fast, {figures['fast'][1] * 1e3:.2f} ms "
        f"each; recovered {figures['recovery']:.2f}s after the link returned"
    )
    assert figures["state"] == "open"
    assert figures["slowest"] < 1 + 1 + 1  # connect_timeout + pool timeout + slack
    assert figures["fast"][0] == 20 and figures["fast"][1] < 0.01
    assert figures["recovery"] < 1 + 2  # reset_timeout + 2 s


@pytest.mark.slow
def test_a_healthy_idle_connection_is_pinged_and_kept(make_alias) -> None:
    alias = make_alias(NAME="postgres", OPTIONS=_options(liveness_bypass=0.05))

    async def pid() -> int:
        async with ConnectionPool(alias).connection() as conn:
            return int(await conn.fetchval("select pg_backend_pid()"))

    async def scenario() -> tuple[int, int, int, int]:
        stats = ConnectionPool(alias).stats
        first = await pid()
        pings = stats.pings
        await asyncio.sleep(0.1)  # idle past liveness_bypass: the checkout pings it
        second = await pid()
        invalidated = ConnectionPool(alias).metrics["invalidated"]
        await ConnectionPool(alias).close()
        return first, second, invalidated, stats.pings - pings

    first, second, invalidated, pinged = asyncio.run(scenario())
    assert (second, invalidated) == (first, 0)
    assert pinged == 1  # pinged, found alive, and kept


@pytest.mark.slow
def test_a_healthy_idle_sync_connection_is_pinged_and_kept(make_wrapper) -> None:
    wrapper = make_wrapper(
        OPTIONS=_options(pool={"min_size": 1, "max_size": 1}, liveness_bypass=0.05)
    )

    first = query(wrapper)
    assert wrapper.pool is not None
    pings = wrapper.pool.stats.pings
    time.sleep(0.1)  # idle past liveness_bypass: the checkout pings it
    assert query(wrapper) == first
    assert wrapper.pool.stats.pings == pings + 1
    assert wrapper.pool.get_stats().get("returns_bad", 0) == 0


# -- 4: a cancellation storm --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_cancellation_storm_leaves_nothing_behind(make_alias, pg, products) -> None:
    options = _options(async_pool={"pool_size": 5, "max_overflow": 3, "timeout": 5})
    alias = make_alias(OPTIONS=options)
    requests = 600
    figures: dict[str, Any] = {}

    async def work(i: int) -> None:
        pool = ConnectionPool(alias)
        kind = i % 3
        if kind == 0:  # mid-commit: a write, then the commit round trip
            async with pool.session_scope() as session:
                await session.execute(
                    text("update shop_product set price_cents = price_cents + 1 where sku = :s"),
                    {"s": f"R{1 + i % 20}"},
                )
                await session.execute(text("select pg_sleep(0.003)"))
        elif kind == 1:  # mid-query on the fast path
            async with pool.connection() as conn:
                await conn.fetchval("select pg_sleep(0.01)")
        else:
            async with pool.session_scope(readonly=True) as session:
                await session.execute(text("select pg_sleep(0.005), count(*) from shop_product"))

    async def storm() -> None:
        pool = ConnectionPool(alias)
        rng = random.Random(8)
        tasks = [asyncio.create_task(work(i)) for i in range(requests)]
        loop = asyncio.get_running_loop()
        for task in rng.sample(tasks, requests // 3):  # waiting, mid-query, mid-commit
            loop.call_later(rng.random() * 0.5, task.cancel)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        figures["cancelled"] = sum(isinstance(r, asyncio.CancelledError) for r in results)
        figures["failed"] = [
            r
            for r in results
            if isinstance(r, Exception) and not isinstance(r, asyncio.CancelledError)
        ]
        figures["in_use"] = pool.metrics["in_use"]
        figures["waiting"] = pool.metrics["waiting"]
        await asyncio.sleep(0.2)
        figures["active"] = backends(pg, state="active", app=APP)
        figures["idle_tx"] = backends(pg, state="idle in transaction", app=APP)
        # full strength: pool_size + max_overflow connections at once, at once
        started = time.monotonic()
        async with asyncio.timeout(5):
            await asyncio.gather(*(work(3 * i + 1) for i in range(8)))
        figures["full"] = time.monotonic() - started
        await pool.close()

    asyncio.run(storm())
    print(
        f"\ncancellation storm: {requests} requests, {figures['cancelled']} cancelled, "
        f"{len(figures['failed'])} failed; leaked (in use afterwards) {figures['in_use']}; "
        f"server backends active {figures['active']}, idle in transaction "
        f"{figures['idle_tx']}; 8 at once afterwards in {figures['full']:.2f}s"
    )
    assert figures["failed"] == []
    assert figures["cancelled"] >= requests // 10  # the rest had finished before their cancel
    assert figures["in_use"] == 0 and figures["waiting"] == 0
    assert figures["active"] == 0 and figures["idle_tx"] == 0
    assert figures["full"] < 1


# -- 5 and 7: more demand than the pool can serve --------------------------------------------


@pytest.mark.slow
def test_async_exhaustion_times_out_typed_then_resumes_at_once(make_alias) -> None:
    alias = make_alias(
        NAME="postgres",
        OPTIONS=_options(
            async_pool={"pool_size": 2, "max_overflow": 1, "timeout": 0.5},
            circuit_breaker={"fail_max": 100},
        ),
    )
    figures: dict[str, Any] = {}

    async def hold(seconds: float) -> float:
        started = time.monotonic()
        async with ConnectionPool(alias).connection() as conn:
            await conn.execute(f"select pg_sleep({seconds})")
        return time.monotonic() - started

    async def scenario() -> None:
        started = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(*(hold(1.0) for _ in range(10)), return_exceptions=True), 10
        )
        figures["all_done"] = time.monotonic() - started
        figures["timeouts"] = [r for r in results if isinstance(r, PoolTimeout)]
        figures["other"] = [r for r in results if isinstance(r, BaseException)]
        figures["served"] = [r for r in results if isinstance(r, float)]
        figures["resume"] = await hold(0)
        await ConnectionPool(alias).close()

    asyncio.run(scenario())
    message = str(figures["timeouts"][0])
    print(
        f"\nasync exhaustion: 10 callers, size 2 + overflow 1, timeout 0.5s: "
        f"{len(figures['served'])} served, {len(figures['timeouts'])} PoolTimeout; all done in "
        f"{figures['all_done']:.2f}s; next request after the load {figures['resume'] * 1e3:.1f} "
        f"ms\n  {message}"
    )
    assert len(figures["served"]) == 3 and len(figures["timeouts"]) == 7
    assert len(figures["other"]) == 7  # nothing but the timeouts failed
    assert "size 3/3, in use 3, idle 0, waiting" in message
    assert figures["all_done"] < 1.0 + 0.5 + 1  # no deadlock: held 1 s, waited 0.5 s
    assert figures["resume"] < 0.2


@pytest.mark.slow
def test_sync_exhaustion_times_out_typed_then_resumes_at_once(make_wrapper) -> None:
    wrapper = make_wrapper(
        OPTIONS=_options(
            pool={"min_size": 0, "max_size": 2, "timeout": 0.5}, circuit_breaker={"fail_max": 100}
        )
    )
    outcomes: list[Any] = []

    def hold() -> None:
        w = DatabaseWrapper(copy.deepcopy(wrapper.settings_dict), alias=wrapper.alias)
        started = time.monotonic()
        try:
            with w.cursor() as cursor:
                cursor.execute("select pg_sleep(1)")
            outcomes.append(time.monotonic() - started)
        except Exception as exc:
            outcomes.append(exc)
        finally:
            w.close()

    threads = [threading.Thread(target=hold) for _ in range(6)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    all_done = time.monotonic() - started
    timeouts = [o for o in outcomes if isinstance(o, PoolTimeout)]
    resume = time.monotonic()
    with wrapper.cursor() as cursor:
        cursor.execute("select 1")
    resume = time.monotonic() - resume
    wrapper.close()
    print(
        f"\nsync exhaustion: 6 threads, max_size 2, timeout 0.5s: "
        f"{sum(isinstance(o, float) for o in outcomes)} served, {len(timeouts)} PoolTimeout; "
        f"all done in {all_done:.2f}s; next request {resume * 1e3:.1f} ms\n  {timeouts[0]}"
    )
    assert len(timeouts) == 4 and len(outcomes) == 6
    assert "size 2/2, in use 2" in str(timeouts[0]) and "waiting" in str(timeouts[0])
    assert all_done < 1 + 0.5 + 1
    assert resume < 0.2


# -- 6: a connection taken in a thread that never gives it back ----------------------------


@pytest.mark.slow
@pytest.mark.parametrize("leak_threshold", [None, 0.3])
def test_a_connection_never_given_back(make_wrapper, leak_threshold, caplog) -> None:
    """Without leak detection the pool is a connection short for good (as Django's own
    pool would be); with it the connection is reported, with where it was taken, and
    replaced, and closed when it finally comes back."""
    options = _options(pool={"min_size": 0, "max_size": 2, "timeout": 0.5})
    if leak_threshold is not None:
        options["leak_threshold"] = leak_threshold
    wrapper = make_wrapper(OPTIONS=options)
    taken, release = threading.Event(), threading.Event()
    kept: list[Any] = []

    def forgetful_thread() -> None:
        w = DatabaseWrapper(copy.deepcopy(wrapper.settings_dict), alias=wrapper.alias)
        w.ensure_connection()  # and never closes it, until told to
        kept.append(w.connection)
        taken.set()
        release.wait(10)
        with w.cursor() as cursor:  # still usable by its holder
            cursor.execute("select 1")
        w.close()

    holder = threading.Thread(target=forgetful_thread)
    with caplog.at_level(logging.WARNING, logger="django_asyncpool"):
        holder.start()
        taken.wait(5)
        time.sleep(0.8)  # past the threshold, and a sweep
        pool = wrapper.pool
        assert pool is not None
        two = [
            DatabaseWrapper(copy.deepcopy(wrapper.settings_dict), alias=wrapper.alias)
            for _ in range(2)
        ]
        served = 0
        for w in two:  # the pool's whole size at once
            try:
                w.ensure_connection()
                served += 1
            except PoolTimeout:
                pass
        for w in two:
            w.close()
        release.set()
        holder.join(10)
    stats = pool.get_stats()
    print(
        f"\nleak_threshold {leak_threshold}: {served} of max_size 2 available while one is "
        f"kept; leaks reported {pool.stats.leaks}; pool size afterwards {stats.get('pool_size')}"
    )
    if leak_threshold is None:
        assert served == 1  # a connection short for as long as the thread keeps it
        assert pool.stats.leaks == 0
    else:
        assert served == 2
        assert pool.stats.leaks == 1 and stats["connections_leaked"] == 1
        assert "forgetful_thread" in caplog.text and "leak_threshold" in caplog.text
        assert kept[0].closed  # closed when it came back, not pooled
        assert stats["pool_size"] <= 2


@pytest.mark.slow
@pytest.mark.parametrize("health_checks", [False, True])
def test_sync_blackhole_fails_within_the_timeout_then_fails_fast(
    make_wrapper, proxy, health_checks
) -> None:
    wrapper = make_wrapper(
        HOST=proxy.host,
        PORT=proxy.port,
        CONN_HEALTH_CHECKS=health_checks,  # every checkout pinged: bounded the same way
        OPTIONS=_options(
            connect_timeout=1,
            pool={"min_size": 1, "max_size": 2, "timeout": 1},
            liveness_bypass=0.1,
        ),
    )

    def query() -> None:
        try:
            with wrapper.cursor() as cursor:
                cursor.execute("select 1")
        finally:
            wrapper.close()

    query()
    time.sleep(0.2)  # idle past liveness_bypass: the checkout pings it
    proxy.blackhole()
    slowest, kinds = 0.0, collections.Counter[str]()
    guard = _registry.guard(wrapper.alias, wrapper)
    while guard.state != "open" and sum(kinds.values()) < 10:
        started = time.monotonic()
        with pytest.raises(PoolError) as info:
            query()
        kinds[type(info.value).__name__] += 1
        slowest = max(slowest, time.monotonic() - started)
    started = time.monotonic()
    with pytest.raises(PoolError):
        query()
    fast = time.monotonic() - started
    proxy.restore()
    print(
        f"\nsync blackhole: slowest failing call {slowest:.2f}s (connect_timeout 1s, pool "
        f"timeout 1s); errors {dict(kinds)}; breaker {guard.state}; then {fast * 1e3:.2f} ms"
    )
    assert guard.state == "open"
    assert slowest < 1 + 1 + 1
    assert fast < 0.01


# -- the breaker and the retries around getting a connection -------------------------------


def request(side: str, alias: str, runner: asyncio.Runner) -> int:
    """One request on ``side`` of ``alias``; return the server backend's pid."""
    if side == "sync":
        return query(connections[alias])

    async def one() -> int:
        async with ConnectionPool(alias).connection() as conn:
            return int(await conn.fetchval("select pg_backend_pid()"))

    return runner.run(one())


@pytest.mark.parametrize("side", SIDES)
def test_breaker_opens_fails_fast_half_opens_and_closes(
    make_alias, pg, server_down, db_access, side
) -> None:
    alias = make_alias(
        NAME="postgres",
        OPTIONS={
            **FAST,
            "async_pool": {"pool_size": 2, "max_overflow": 0, "timeout": 2},
            "circuit_breaker": {"fail_max": 3, "reset_timeout": 1},
            "retry": {"max_tries": 1},
        },
    )
    guard = _registry.guard(alias)
    # The async side may first see its pooled connection die mid-query.
    lost = (
        (DatabaseUnavailable,)
        if side == "sync"
        else (DatabaseUnavailable, sqlalchemy.exc.DBAPIError)
    )
    with asyncio.Runner() as runner:
        request(side, alias, runner)
        server_down()

        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(lost) as info:
                request(side, alias, runner)
            # the waiter is failed when the connect attempt fails, not after the 2 s timeout
            assert time.monotonic() - started < 1.5
        assert "Check that the server is running" in str(info.value)
        assert guard.state == "open"

        started = time.monotonic()
        with pytest.raises(CircuitOpenError) as open_error:
            request(side, alias, runner)
        assert time.monotonic() - started < 0.05
        assert "circuit breaker is open" in str(open_error.value)

        time.sleep(1.05)  # reset_timeout: the next call is a trial, which fails: open again
        with pytest.raises(DatabaseUnavailable):
            request(side, alias, runner)
        assert guard.state == "open"

        pg.start()
        time.sleep(1.05)
        request(side, alias, runner)  # the trial succeeds
        assert guard.state == "closed"
        if side == "async":
            assert ConnectionPool(alias).metrics["breaker_state"] == "closed"
            runner.run(ConnectionPool(alias).close())


def test_half_open_admits_one_trial_at_a_time(make_wrapper, proxy) -> None:
    wrapper = make_wrapper(
        HOST=proxy.host,
        PORT=proxy.port,
        OPTIONS={
            **FAST,
            "circuit_breaker": {"fail_max": 1, "reset_timeout": 0.2},
            "retry": {"max_tries": 1},
        },
    )
    guard = _registry.guard(wrapper.alias, wrapper)
    proxy.cut()
    with pytest.raises(DatabaseUnavailable):
        query(wrapper)
    assert guard.state == "open"
    proxy.restore()
    proxy.delay(0.05)  # the trial connection takes a while (several round trips)
    time.sleep(0.25)

    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def caller(settings_dict) -> None:
        w = DatabaseWrapper(copy.deepcopy(settings_dict), alias=wrapper.alias)
        barrier.wait()
        try:
            query(w)
            outcomes.append("ok")
        except CircuitOpenError:
            outcomes.append("fast-fail")
        except Exception as exc:
            outcomes.append(repr(exc))

    # each thread has its own wrapper (as Django's thread-local connections do),
    # all sharing the alias's pool and guard
    threads = [threading.Thread(target=caller, args=(wrapper.settings_dict,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 1, outcomes
    assert outcomes.count("fast-fail") == 5
    assert guard.state == "closed"


def test_short_outage_within_the_retry_budget_is_invisible(make_wrapper, pg, server_down) -> None:
    wrapper = make_wrapper(
        OPTIONS={
            **FAST,
            "circuit_breaker": {"fail_max": 50},
            "retry": {"max_tries": 30, "max_time": 10, "max_delay": 0.3},
        }
    )
    first = query(wrapper)
    server_down()
    threading.Timer(1.0, pg.start).start()
    started = time.monotonic()
    second = query(wrapper)  # retried until the server is back
    assert time.monotonic() - started >= 0.5
    assert second != first  # a new backend: the old one died with the server


@pytest.mark.django_db(transaction=True)
def test_application_errors_never_move_the_breaker() -> None:
    guard = _registry.guard("default")
    Product.objects.create(sku="DUP", name="one", price_cents=1)
    for _ in range(guard.breaker.fail_max + 2):
        with pytest.raises(IntegrityError):
            Product.objects.create(sku="DUP", name="two", price_cents=1)
        connection.close()
    assert guard.state == "closed"
    assert guard.breaker.fail_counter == 0


def test_pool_timeout_is_typed_and_says_how_full_the_pool_is(make_wrapper) -> None:
    wrapper = make_wrapper(
        OPTIONS={
            "pool": {"min_size": 1, "max_size": 1, "timeout": 0.3},
            "circuit_breaker": {"fail_max": 100},
        }
    )
    holder = DatabaseWrapper(copy.deepcopy(wrapper.settings_dict), alias=wrapper.alias)
    holder.ensure_connection()  # takes the only connection
    started = time.monotonic()
    with pytest.raises(PoolTimeout) as info:
        query(wrapper)
    assert time.monotonic() - started < 1.0  # not retried past the pool timeout
    assert "size 1/1, in use 1" in str(info.value)
    # Django's parallel test runner pickles errors: one that is its own cause breaks it.
    assert info.value.__cause__ is not info.value
    pickle.loads(pickle.dumps(info.value))
    holder.close()
    query(wrapper)  # service resumes at once


def test_password_never_appears_in_errors_or_logs(make_wrapper, proxy, caplog) -> None:
    bad = "Wr0ng-" + PASSWORD
    wrappers = [
        make_wrapper(PASSWORD=bad, OPTIONS={**FAST, "retry": {"max_tries": 2, "base_delay": 0.01}}),
        make_wrapper(
            PASSWORD=bad,
            HOST=proxy.host,
            PORT=proxy.port,
            OPTIONS={**FAST, "retry": {"max_tries": 2, "base_delay": 0.01}},
        ),
    ]
    proxy.cut()
    texts = []
    with caplog.at_level(logging.DEBUG):
        for wrapper in wrappers:
            with pytest.raises(DatabaseUnavailable) as info:
                query(wrapper)
            err = info.value
            texts += [str(err), repr(err), str(err.__cause__), repr(_registry.guard(wrapper.alias))]
            texts.append(repr(_registry.guard(wrapper.alias).config))
    texts.append(caplog.text)
    assert "password authentication failed" in texts[0]
    for text_ in texts:
        assert bad not in text_ and PASSWORD not in text_


# -- terminated backends, idle connections the server closed --------------------------------


@pytest.mark.parametrize(
    ("side", "watch"),
    [
        ("sync", "epoll"),
        ("sync", "poll at checkout"),
        ("async", "epoll"),
        ("async", "poll at checkout"),
    ],
    ids=["sync-epoll", "sync-poll", "async-epoll", "async-poll"],
)
def test_terminated_backends_are_replaced_before_the_caller_sees_them(
    make_alias, pg, monkeypatch, db_access, side, watch
) -> None:
    if watch == "poll at checkout":  # what platforms without epoll do
        monkeypatch.setattr(hangups, "_hangups", None)
    elif watch == "epoll" and hangups._hangups is None:
        pytest.skip("no epoll on this platform")
    alias = make_alias(
        NAME="postgres",
        OPTIONS={
            "application_name": APP,
            "pool": {"min_size": 2, "max_size": 2},
            "async_pool": {"pool_size": 2, "max_overflow": 0},
            "retry": {"max_tries": 1},
        },
    )
    with asyncio.Runner() as runner:

        async def several() -> set[int]:
            async def one() -> int:
                async with ConnectionPool(alias).connection() as conn:
                    await asyncio.sleep(0.01)  # held together: several idle afterwards
                    return int(await conn.fetchval("select pg_backend_pid()"))

            return set(await asyncio.gather(*(one() for _ in range(4))))

        if side == "sync":
            pids = {request(side, alias, runner) for _ in range(4)}
        else:
            pids = runner.run(several())
        assert terminate_backends(pg, app=APP) >= 1
        assert wait_until(lambda: backends(pg, app=APP) == 0, timeout=5)
        wait_until(lambda: False, timeout=0.2)  # within liveness_bypass: no ping
        for _ in range(10):
            assert request(side, alias, runner) not in pids
        assert _registry.guard(alias).breaker.fail_counter == 0
        if side == "async":
            assert ConnectionPool(alias).metrics["invalidated"] >= 1
            runner.run(ConnectionPool(alias).close())


def test_a_stale_hangup_hint_costs_a_check_not_the_connection(make_wrapper) -> None:
    if hangups._hangups is None:
        pytest.skip("no epoll on this platform")
    wrapper = make_wrapper(OPTIONS={"pool": {"min_size": 1, "max_size": 1}})
    pid = query(wrapper)
    conn = wrapper.pool.getconn()
    fd = conn.pgconn.socket
    wrapper.pool.putconn(conn)
    hangups._hangups.fds.add(fd)  # as if an old socket with this number had hung up
    assert query(wrapper) == pid  # checked for real, found alive, kept
    assert fd not in hangups._hangups.fds


def test_a_stale_hangup_hint_costs_an_async_check_not_the_connection(make_alias, db_access) -> None:
    if hangups._hangups is None:
        pytest.skip("no epoll on this platform")
    alias = make_alias(OPTIONS={"async_pool": {"pool_size": 1, "max_overflow": 0}})

    async def pid() -> int:
        async with ConnectionPool(alias).connection() as conn:
            return int(await conn.fetchval("select pg_backend_pid()"))

    async def body() -> None:
        first = await pid()
        state = ConnectionPool(alias).for_loop()
        (record,) = list(state.engine.sync_engine.pool._idle)
        fd = record.info[_engines._SOCKET][0]
        hangups._hangups.fds.add(fd)  # as if an old socket with this number had hung up
        invalidated = ConnectionPool(alias).metrics["invalidated"]
        assert await pid() == first  # checked for real, found alive, kept
        assert fd not in hangups._hangups.fds
        assert ConnectionPool(alias).metrics["invalidated"] == invalidated
        await ConnectionPool(alias).close()

    asyncio.run(body())


# -- fork ------------------------------------------------------------------------------------


def test_fork_child_builds_its_own_pool(make_wrapper) -> None:
    """A child forked after the parent used the pool never touches the parent's sockets."""
    wrapper = make_wrapper(OPTIONS={"pool": {"min_size": 1, "max_size": 2}})
    with wrapper.cursor() as cursor:  # the parent holds a connection across the fork
        cursor.execute("select pg_backend_pid()")
        parent_pid = cursor.fetchone()[0]
    child = in_forked_child(lambda: [query(wrapper) for _ in range(3)])
    with wrapper.cursor() as cursor:  # the parent keeps working meanwhile
        cursor.execute("select pg_backend_pid()")
        assert cursor.fetchone()[0] == parent_pid
    status, written = child()
    child_pids = eval(written)
    assert status == 0
    assert len(child_pids) == 3 and parent_pid not in child_pids
    with wrapper.cursor() as cursor:  # still the same healthy connection after the child exit
        cursor.execute("select pg_backend_pid()")
        assert cursor.fetchone()[0] == parent_pid
    wrapper.close()
    query(wrapper)
