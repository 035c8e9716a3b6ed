"""The load matrix's runner: closed-loop clients on a pool, each wait for a connection timed.

Shared by ``tests/test_load_matrix.py`` (the steady cells of our pools, asserted)
and ``benchmarks/soak_matrix.py`` (every cell, faults too, beside the peers a user
would pick instead: bare SQLAlchemy and psycopg_pool).

A *client* is one pool and how one request uses it: our async ``session_scope()``,
our ENGINE through ``connections[alias]`` in threads, SQLAlchemy's ``AsyncSession``
on its own engine, psycopg_pool's ``ConnectionPool`` in threads. Each of ``workers``
tasks (async clients, all on one event loop in a thread of their own) or threads
(sync clients) sends requests back to back: take a connection, look one row up by
primary key, give it back.

A request records (in :class:`Times`):

- the *wait*: the time in the pool's own checkout, timed the same way for every client
  by wrapping that one method on the instance: ``get_new_connection()`` of both Django
  ENGINEs (ours: the breaker, the retries, ``SyncPool.getconn`` and its liveness check,
  what ``Stats.latency`` covers; Django's: ``pool.getconn()``), psycopg_pool's
  ``getconn()``, and ``Pool.connect()`` of both SQLAlchemy engines (ours: the fair
  pool, its breaker and liveness check);
- the *connect* time: from the start of the request to a connection the caller can
  use: the wait and whatever the caller's path adds around it (Django's
  ``ensure_connection()``: its connection parameters, ``init_connection_state()``...;
  a session's ``connection()``, its transaction begun);
- the *hold*: from then to the end of the request;
- for the threaded clients, the pool's handoffs, from its own queues (under its
  lock): when a request joined the waiting queue, and when the pool handed it a
  connection. A thread handed one but not yet scheduled by the OS is not kept
  waiting by the pool: the order of handoffs is the pool's, whatever the machine's
  load, where wall-clock times are the OS scheduler's too.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextvars
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from django.db import connections

from django_asyncpool import ConnectionPool, session_scope

TABLE = "asyncpool_loadmatrix"
ROWS = 100
#: After a failed request a worker pauses, as a client backing off would: without it a
#: breaker failing fast turns every worker into a busy loop that starves the others.
ERROR_PAUSE = 0.05


@dataclass(frozen=True, kw_only=True)
class Sizes:
    """One pool's size, the same for every client of a cell."""

    pool_size: int
    max_overflow: int
    timeout: float  # seconds to wait for a connection
    connect_timeout: float = 1.0

    @property
    def cap(self) -> int:
        """The most connections a pool opens: pool_size + max_overflow (sync: max_size)."""
        return self.pool_size + self.max_overflow


def our_options(sizes: Sizes, **extra: Any) -> dict[str, Any]:
    """Return an alias's OPTIONS: both of its pools sized as ``sizes``; a quick breaker."""
    return {
        "connect_timeout": sizes.connect_timeout,
        "pool": {"min_size": sizes.pool_size, "max_size": sizes.cap, "timeout": sizes.timeout},
        "async_pool": {
            "pool_size": sizes.pool_size,
            "max_overflow": sizes.max_overflow,
            "timeout": sizes.timeout,
        },
        "circuit_breaker": {"fail_max": 3, "reset_timeout": 1},
        "retry": {"max_tries": 2, "max_time": 1, "base_delay": 0.05},
        **extra,
    }


def ensure_table(settings_dict: dict[str, Any]) -> None:
    """Create the looked-up table (``ROWS`` rows, primary key ``id``) if it is missing."""
    import psycopg

    with psycopg.connect(**conninfo(settings_dict), autocommit=True) as conn:
        conn.execute(
            f"create table if not exists {TABLE} (id int primary key, v int not null);"
            f"insert into {TABLE} select g, g from generate_series(1, {ROWS}) g "
            "on conflict do nothing"
        )


def conninfo(settings_dict: dict[str, Any]) -> dict[str, Any]:
    return {
        "host": settings_dict["HOST"],
        "port": int(settings_dict["PORT"]),
        "user": settings_dict["USER"],
        "password": settings_dict["PASSWORD"],
        "dbname": settings_dict["NAME"],
    }


# -- what a request records -------------------------------------------------------------------


class Times:
    """A request's time stamps (``time.perf_counter()``; 0.0: not reached)."""

    __slots__ = ("got", "handed", "pool_asked", "pool_got", "queued")

    def __init__(self) -> None:
        self.got = 0.0  # had a connection it can use
        self.pool_asked = 0.0  # entered the pool's checkout
        self.pool_got = 0.0  # left it
        self.queued = 0.0  # threaded: joined the pool's waiting queue, or took an idle one
        self.handed = 0.0  # threaded: the pool handed it a connection


#: The running request's times: read by the timed checkouts and the handoff logs.
_current: contextvars.ContextVar[Times | None] = contextvars.ContextVar("_current", default=None)

F = TypeVar("F", bound=Callable[..., Any])


def timed(checkout: F) -> F:
    """Return ``checkout`` noting the running request's ``pool_asked`` and ``pool_got``."""

    def timed_checkout(*args: Any, **kwargs: Any) -> Any:
        times = _current.get()
        asked = time.perf_counter()
        try:
            return checkout(*args, **kwargs)
        finally:
            if times is not None and not times.pool_asked:
                times.pool_asked, times.pool_got = asked, time.perf_counter()

    return timed_checkout  # type: ignore[return-value]


class _WaitingLog(collections.deque[Any]):
    """psycopg_pool's queue of waiters, noting when each joins it and is handed a connection.

    Both happen under the pool's lock: ``append`` in the waiting thread,
    ``popleft`` (then ``set(conn)``) in the thread giving a connection back.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.times: dict[Any, Times] = {}

    def append(self, waiter: Any) -> None:
        times = _current.get()
        if times is not None:
            times.queued = time.perf_counter()
            self.times[waiter] = times
        super().append(waiter)

    def popleft(self) -> Any:
        waiter = super().popleft()
        times = self.times.pop(waiter, None)
        if times is not None:
            times.handed = time.perf_counter()
        return waiter


class _ReadyLog(collections.deque[Any]):
    """psycopg_pool's idle connections, noting when a request takes one (under the lock)."""

    def popleft(self) -> Any:
        times = _current.get()
        if times is not None:
            times.queued = times.handed = time.perf_counter()
        return super().popleft()


def log_handoffs(pool: Any) -> None:
    """Note the handoffs of a psycopg_pool ``pool`` in the requests' :class:`Times`."""
    with pool._lock:
        if not isinstance(pool._waiting, _WaitingLog):
            pool._waiting = _WaitingLog(pool._waiting)
            pool._pool = _ReadyLog(pool._pool)


# -- the clients ----------------------------------------------------------------------------


class Client:
    """A pool under load. ``request(key, times)`` sets ``times.got`` once it has a connection."""

    name = ""
    threaded = False  # True: one thread per worker; False: one task per worker

    def open(self) -> None:
        """Make the pool (sync clients; async ones in ``aopen()``, on their loop)."""

    def close(self) -> None:
        """Close the pool (sync clients)."""

    def watch(self) -> None:
        """Log the pool's handoffs, once it is open and warm (sync clients)."""

    def request(self, key: int, times: Times) -> None:
        raise NotImplementedError

    async def aopen(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def arequest(self, key: int, times: Times) -> None:
        raise NotImplementedError


class OurScope(Client):
    """``async with session_scope(alias)``: a session in a transaction, our async pool."""

    name = "ours: session_scope()"

    def __init__(self, alias: str) -> None:
        self.alias = alias
        from sqlalchemy import text

        self.sql = text(f"select v from {TABLE} where id = :i")

    async def aopen(self) -> None:
        pool = ConnectionPool(self.alias).engine.sync_engine.pool
        pool.connect = timed(pool.connect)  # type: ignore[method-assign]

    async def arequest(self, key: int, times: Times) -> None:
        async with session_scope(self.alias) as session:
            await session.connection()
            times.got = time.perf_counter()
            (await session.execute(self.sql, {"i": key})).one()

    async def aclose(self) -> None:
        await ConnectionPool(self.alias).close()


class NativeOrm(Client):
    """The native async ORM (``OPTIONS["async_orm"]``): a task's query in a greenlet on the
    alias's ORM pool, as ``await Model.objects.aget()`` runs it (tasks, one loop)."""

    name = "ours: async ORM"
    portal_name = "ours: async ORM in a portal"

    def __init__(self, alias: str, portal: bool = False) -> None:
        self.alias = alias
        #: Each request in a portal of its own, as the package's ASGI application runs
        #: a view: the query right in the task's greenlet.
        self.portal = portal
        if portal:
            self.name = self.portal_name

    async def aopen(self) -> None:
        from django_asyncpool.orm import pool

        holder = pool.holder(self.alias)
        holder.checkout = timed(holder.checkout)  # type: ignore[method-assign]

    async def arequest(self, key: int, times: Times) -> None:
        from django_asyncpool.orm import native, watchdog

        query = native.run(self.alias, self._query, key, times)
        await (watchdog.portal(query) if self.portal else query)

    def _query(self, key: int, times: Times) -> None:
        with connections[self.alias].cursor() as cursor:
            times.got = time.perf_counter()
            cursor.execute(f"select v from {TABLE} where id = %s", (key,))
            cursor.fetchone()


class DjangoOrm(Client):
    """A thread's ``connections[alias]``, as the ORM uses it: the alias's ENGINE and its pool."""

    threaded = True

    def __init__(self, alias: str, name: str = "ours: ENGINE (threads)") -> None:
        self.alias = alias
        self.name = name

    def request(self, key: int, times: Times) -> None:
        wrapper = connections[self.alias]  # one per thread
        if "get_new_connection" not in vars(wrapper):
            wrapper.get_new_connection = timed(wrapper.get_new_connection)
        try:
            wrapper.ensure_connection()
            times.got = time.perf_counter()
            with wrapper.cursor() as cursor:
                cursor.execute(f"select v from {TABLE} where id = %s", (key,))
                cursor.fetchone()
        finally:
            wrapper.close()  # back to the pool, as at the end of a request

    def watch(self) -> None:
        log_handoffs(type(connections[self.alias])._connection_pools[self.alias])

    def close(self) -> None:
        # Both ENGINEs keep their pools in a class attribute (ours shadows Django's).
        pool = type(connections[self.alias])._connection_pools.pop(self.alias, None)
        if pool is not None:
            pool.close(timeout=1)


class SqlAlchemySession(Client):
    """Bare SQLAlchemy: ``create_async_engine(pool_size, max_overflow, pool_timeout)``."""

    name = "SQLAlchemy AsyncSession"

    def __init__(self, settings_dict: dict[str, Any], sizes: Sizes) -> None:
        from sqlalchemy import URL, text

        info = conninfo(settings_dict)
        self.url = URL.create(
            "postgresql+asyncpg",
            username=info["user"],
            password=info["password"],
            host=info["host"],
            port=info["port"],
            database=info["dbname"],
        )
        self.sizes = sizes
        self.sql = text(f"select v from {TABLE} where id = :i")

    async def aopen(self) -> None:
        from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

        sizes = self.sizes
        self.engine = create_async_engine(
            self.url,
            pool_size=sizes.pool_size,
            max_overflow=sizes.max_overflow,
            pool_timeout=sizes.timeout,
            connect_args={"timeout": sizes.connect_timeout},
        )
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        pool = self.engine.sync_engine.pool
        pool.connect = timed(pool.connect)  # type: ignore[method-assign]

    async def arequest(self, key: int, times: Times) -> None:
        async with self.sessions() as session, session.begin():
            await session.connection()
            times.got = time.perf_counter()
            (await session.execute(self.sql, {"i": key})).one()

    async def aclose(self) -> None:
        await self.engine.dispose()


class PsycopgPool(Client):
    """psycopg_pool's ``ConnectionPool(min_size=pool_size, max_size=cap)``, autocommit."""

    name = "psycopg_pool (threads)"
    threaded = True

    def __init__(self, settings_dict: dict[str, Any], sizes: Sizes) -> None:
        self.info = conninfo(settings_dict)
        self.sizes = sizes

    def open(self) -> None:
        from psycopg.conninfo import make_conninfo
        from psycopg_pool import ConnectionPool as PsycopgConnectionPool

        sizes = self.sizes
        self.pool = PsycopgConnectionPool(
            make_conninfo(**self.info, connect_timeout=max(int(sizes.connect_timeout), 1)),
            min_size=sizes.pool_size,
            max_size=sizes.cap,
            timeout=sizes.timeout,
            kwargs={"autocommit": True},  # as Django's connections are
            open=True,
        )
        self.pool.getconn = timed(self.pool.getconn)  # type: ignore[method-assign]

    def watch(self) -> None:
        log_handoffs(self.pool)

    def request(self, key: int, times: Times) -> None:
        with self.pool.connection() as conn:
            times.got = time.perf_counter()
            conn.execute(f"select v from {TABLE} where id = %s", (key,)).fetchone()

    def close(self) -> None:
        self.pool.close(timeout=1)


# -- running a cell ----------------------------------------------------------------------


@dataclass
class Figures:
    """What one client did in a cell. Times in seconds."""

    name: str
    requests: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    samples: dict[str, str] = field(default_factory=dict)  # an error message per type
    #: In the pool's checkout, of the requests that got a connection (the module's docstring).
    waits: list[float] = field(default_factory=list)
    #: From the start of a request to a connection it can use, of the same requests.
    connects: list[float] = field(default_factory=list)
    holds: list[float] = field(default_factory=list)
    error_times: list[float] = field(default_factory=list)  # perf_counter() at each error
    #: Errors of the requests over during the warm-up, the first burst's included (not in
    #: ``errors``; ``samples`` has one message per type, as "warm-up <type>").
    warmup_errors: int = 0
    stuck: int = 0  # workers still in a request long after the cell ended
    #: The most requests that arrived after one and had their connection before it.
    overtaken: int = 0
    #: The most requests that had a connection while one waited for its own. Divided by
    #: the pool's size, that is the longest wait counted in hold times, whatever the
    #: speed of the machine: served in turn, the requests ahead of it in the queue.
    served_meanwhile: int = 0
    #: Whether ``overtaken`` and ``served_meanwhile`` count the pool's own handoffs
    #: (threaded clients), rather than wall-clock arrivals and connections (tasks).
    by_handoffs: bool = False

    def wait(self, q: float) -> float:
        return quantile(self.waits, q)

    def connect(self, q: float) -> float:
        return quantile(self.connects, q)

    @property
    def hold_p50(self) -> float:
        return quantile(self.holds, 0.5)


def most_overtaken(arrivals: Sequence[tuple[float, float]]) -> int:
    """Return the most later arrivals served before one request, of ``(started, got)`` pairs.

    Served in turn, a request is overtaken by none (a few where two threads take their
    time stamps in one order and reach the pool in the other); a starved one by every
    request served while it waits.
    """
    worst = 0
    later: list[float] = []  # the times later arrivals got their connections, sorted
    for _, got in sorted(arrivals, reverse=True):
        worst = max(worst, bisect.bisect_left(later, got))
        bisect.insort(later, got)
    return worst


def most_served_meanwhile(arrivals: Sequence[tuple[float, float]], gots: list[float]) -> int:
    """Return the most of the sorted ``gots`` that fall within one ``(started, got)`` wait."""
    return max(
        (
            bisect.bisect_left(gots, got) - bisect.bisect_right(gots, started)
            for started, got in arrivals
            if got > started  # served at once (an idle connection taken): nobody meanwhile
        ),
        default=0,
    )


def quantile(values: Sequence[float], q: float) -> float:
    """Return the nearest-rank ``q`` quantile of ``values`` (0.0 when there are none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


class _Side:
    """The workers of one client, and every request they made."""

    def __init__(self, client: Client, workers: int, stop: threading.Event, grace: float) -> None:
        self.client = client
        self.workers = workers
        self.stop = stop
        self.grace = grace
        self.ready = threading.Event()  # the pool opened, and warmed by a first burst
        self.measure_from = float("inf")
        # (started, its times, ended, error or None): appends only, no lock.
        self.records: list[tuple[float, Times, float, BaseException | None]] = []
        self.threads: list[threading.Thread] = []
        self.stuck = 0

    def start(self, prewarm: int) -> None:
        self.prewarm = prewarm
        if self.client.threaded:
            self.client.open()
            burst = [
                threading.Thread(target=self._recorded, args=(n + 1,), daemon=True)
                for n in range(prewarm)
            ]
            for t in burst:
                t.start()
            for t in burst:
                t.join(10)
            self.client.watch()
            self.ready.set()
            self.threads = [
                threading.Thread(target=self._thread_worker, args=(n,), daemon=True)
                for n in range(self.workers)
            ]
        else:
            self.threads = [threading.Thread(target=asyncio.run, args=(self._loop(),), daemon=True)]
        for t in self.threads:
            t.start()

    def join(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for t in self.threads:
            t.join(max(deadline - time.monotonic(), 0.01))
        if self.client.threaded:
            self.stuck = sum(t.is_alive() for t in self.threads)
            if not self.stuck:
                self.client.close()

    def _recorded(self, key: int) -> BaseException | None:
        """Make one request, recorded (the warm-up's too: its errors are reported)."""
        times = Times()
        _current.set(times)
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            self.client.request(key, times)
        except Exception as exc:
            error = exc
        self.records.append((started, times, time.perf_counter(), error))
        return error

    async def _arecorded(self, key: int) -> BaseException | None:
        times = Times()
        _current.set(times)
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            await self.client.arequest(key, times)
        except Exception as exc:
            error = exc
        self.records.append((started, times, time.perf_counter(), error))
        return error

    def _thread_worker(self, n: int) -> None:
        key = n
        while not self.stop.is_set():
            key = key % ROWS + 1
            if self._recorded(key) is not None:
                time.sleep(ERROR_PAUSE)

    async def _task_worker(self, n: int) -> None:
        key = n
        while not self.stop.is_set():
            key = key % ROWS + 1
            if await self._arecorded(key) is not None:
                await asyncio.sleep(ERROR_PAUSE)

    async def _loop(self) -> None:
        await self.client.aopen()
        await asyncio.gather(*(self._arecorded(n + 1) for n in range(self.prewarm)))
        self.ready.set()
        tasks = [asyncio.create_task(self._task_worker(n)) for n in range(self.workers)]
        while not self.stop.is_set():
            await asyncio.sleep(0.02)
        _, pending = await asyncio.wait(tasks, timeout=self.grace)
        self.stuck = len(pending)
        for task in pending:
            task.cancel()
        await asyncio.wait(tasks, timeout=1)
        await self.client.aclose()

    def figures(self) -> Figures:
        figures = Figures(self.client.name, stuck=self.stuck)
        # Threaded: the order of the pool's handoffs (see the module's docstring).
        figures.by_handoffs = self.client.threaded and any(t.handed for _, t, _, _ in self.records)
        arrivals = []
        for started, times, ended, error in self.records:
            warmup = ended < self.measure_from
            if error is not None:
                kind = ("warm-up " if warmup else "") + type(error).__name__
                figures.samples.setdefault(kind, (str(error).strip() or kind).splitlines()[0][:200])
            if warmup:
                # Over during the warm-up (the pools opening their connections). A request
                # still waiting when the measure starts is counted: it may be starving.
                figures.warmup_errors += error is not None
                continue
            figures.requests += 1
            got = times.got
            if got:
                if not figures.by_handoffs:
                    # The order the pool served them in: when its checkout returned (a
                    # session's BEGIN, a round trip after it, finishes in any order).
                    arrivals.append((started, times.pool_got or got))
                figures.waits.append((times.pool_got - times.pool_asked) or (got - started))
                figures.connects.append(got - started)
                if error is None:
                    figures.holds.append(ended - got)
            if figures.by_handoffs and times.handed:
                arrivals.append((times.queued, times.handed))
            if error is not None:
                figures.errors[kind] += 1
                figures.error_times.append(ended)
        figures.overtaken = most_overtaken(arrivals)
        if figures.by_handoffs:
            gots = sorted(t.handed for _, t, _, _ in self.records if t.handed)
        else:
            gots = sorted(t.pool_got or t.got for _, t, _, _ in self.records if t.got)
        figures.served_meanwhile = most_served_meanwhile(arrivals, gots)
        return figures


def run(
    clients: Sequence[Client],
    workers: int,
    *,
    seconds: float = 1.0,
    warmup: float = 0.3,
    during: Callable[[], None] | None = None,
    grace: float = 10.0,
    prewarm: int = 0,
) -> list[Figures]:
    """Load every client at once with ``workers`` each; return their figures.

    First ``prewarm`` requests at once open the connections the load will use (on a
    busy machine opening one takes long enough to look like a queue); the first
    ``warmup`` seconds of load are not counted; then the load runs ``seconds`` (or as
    long as ``during()``, which injects a fault, takes). A request started before the
    end is counted whenever it finishes: a starved waiter shows as its whole wait.
    Workers still busy ``grace`` seconds after the end are reported as ``stuck``.
    """
    stop = threading.Event()
    sides = [_Side(client, workers, stop, grace) for client in clients]
    for side in sides:
        side.start(prewarm)
    try:
        for side in sides:
            side.ready.wait(30)
        time.sleep(warmup)
        measure_from = time.perf_counter()
        for side in sides:
            side.measure_from = measure_from
        if during is None:
            time.sleep(seconds)
        else:
            during()
    finally:
        stop.set()
        for side in sides:
            side.join(grace + 2)
    return [side.figures() for side in sides]


def describe(figures: Figures) -> str:
    """Return one line: requests, errors by type, wait, connect and hold times in ms."""
    errors = ", ".join(f"{k} {v}" for k, v in figures.errors.most_common()) or "0"
    return (
        f"{figures.name}: {figures.requests} requests, errors {errors}; wait p50 "
        f"{figures.wait(0.5) * 1e3:.2f} ms, p99 {figures.wait(0.99) * 1e3:.2f} ms, max "
        f"{max(figures.waits, default=0.0) * 1e3:.1f} ms; connect p99 "
        f"{figures.connect(0.99) * 1e3:.2f} ms, max {max(figures.connects, default=0.0) * 1e3:.1f}"
        f" ms; hold p50 {figures.hold_p50 * 1e3:.2f} ms; stuck {figures.stuck}; overtaken "
        f"{figures.overtaken}; served meanwhile {figures.served_meanwhile}"
        + (" (pool handoffs)" if figures.by_handoffs else "")
    )
