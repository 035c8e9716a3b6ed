"""One alias, one budget: every async connection of a loop under ``pool_size + max_overflow``.

Read-write scopes, read-only scopes, ``connection()`` and the native async ORM of one
alias on one event loop share the cap and wait in one FIFO queue (``_waiters.Budget``).
Counted by the server itself (``pg_stat_activity``), with sync threads beside them.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from django.db import connections
from sqlalchemy import text

from django_asyncpool import ConnectionPool
from django_asyncpool.core import registry as _registry
from django_asyncpool.core import waiters as _waiters
from django_asyncpool.orm import native as _asyncorm
from testproject.shop.models import Product

APP = "asyncpool-budget"
CAP = {"pool_size": 3, "max_overflow": 1, "timeout": 30}  # 4 async connections per loop
SYNC = {"min_size": 1, "max_size": 3, "timeout": 30}


pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def budget_alias() -> Iterator[str]:
    """``default`` with the native ORM on and small caps, its connections named APP."""
    options = connections["default"].settings_dict["OPTIONS"]
    saved = copy.deepcopy(options)
    options.update(async_orm=True, async_pool=CAP, pool=SYNC, application_name=APP)
    _asyncorm.install()
    _registry.reset("default")
    yield "default"
    options.clear()
    options.update(saved)
    _registry.reset("default")


@pytest.fixture
def peak(budget_alias: str) -> Iterator[Callable[[], int]]:
    """Sample the alias's server connections every millisecond; yield a reader of the peak.

    The peak that lasts three samples in a row: a connection closed to make room stays
    listed until its backend process has exited (a moment, longer on a loaded
    machine), while one opened above the cap would be held for a whole request (a
    ``pg_sleep(0.005)`` here) and be seen again and again.
    """
    params = connections[budget_alias].get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("application_name", None)
    seen = [0]
    stop = threading.Event()

    def sample() -> None:
        last = collections.deque([0, 0, 0], maxlen=3)
        with psycopg.connect(**params, autocommit=True) as conn:
            while not stop.is_set():
                (count,) = conn.execute(
                    "select count(*) from pg_stat_activity where application_name = %s", (APP,)
                ).fetchone()  # type: ignore[misc]
                last.append(count)
                seen[0] = max(seen[0], min(last))
                stop.wait(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    yield lambda: seen[0]
    stop.set()
    sampler.join(5)


async def use(alias: str, kind: str) -> None:
    """One request of ``kind`` that holds its connection for a few milliseconds."""
    sleep = "select pg_sleep(0.005)"
    if kind == "rw":
        async with ConnectionPool(alias).session_scope() as session:
            await session.execute(text(sleep))
    elif kind == "ro":
        async with ConnectionPool(alias).session_scope(readonly=True) as session:
            await session.execute(text(sleep))
    elif kind == "raw":
        async with ConnectionPool(alias).connection() as conn:
            await conn.execute(sleep)
    else:
        await Product.objects.using(alias).filter(pk__gt=0).acount()


async def test_every_kind_shares_one_cap_with_sync_threads_beside(
    budget_alias: str, peak: Callable[[], int]
) -> None:
    alias = budget_alias
    stop = threading.Event()

    def sync_load() -> int:
        done = 0
        while not stop.is_set():
            try:
                Product.objects.using(alias).count()
                done += 1
            finally:
                connections[alias].close()
        return done

    threads = [asyncio.create_task(asyncio.to_thread(sync_load)) for _ in range(5)]
    kinds = ["rw", "ro", "raw", "orm"] * 3  # 12 tasks at once: 3x the cap of 4

    async def worker(kind: str) -> int:
        for _ in range(15):
            await use(alias, kind)
        return 15

    try:
        served = await asyncio.wait_for(asyncio.gather(*(worker(k) for k in kinds)), 120)
    finally:
        stop.set()
        synced = await asyncio.gather(*threads)
    assert served == [15] * 12  # every task served, none failed
    assert all(synced), synced
    (budget,) = _waiters.budgets(alias)
    assert budget.opened <= 4
    assert 4 < peak() <= 4 + 3, f"the server saw {peak()} connections: cap 4 async + 3 sync"


async def test_waiters_of_every_kind_are_served_oldest_first(budget_alias: str) -> None:
    alias = budget_alias
    pool = ConnectionPool(alias)
    leases = [pool.connection() for _ in range(4)]
    for lease in leases:
        await lease.__aenter__()  # the whole budget, read-write connections
    (budget,) = _waiters.budgets(alias)
    order: list[str] = []

    async def request(name: str) -> None:
        await use(alias, name.rstrip("0123456789"))
        order.append(name)

    names = ["ro1", "orm1", "rw1", "orm2", "raw1", "ro2", "rw2", "orm3"]
    tasks = []
    for n, name in enumerate(names, 1):
        tasks.append(asyncio.create_task(request(name)))
        for _ in range(500):  # until it queues, so the queue's order is the list's
            if budget.waiting() == n:
                break
            await asyncio.sleep(0.001)
        assert budget.waiting() == n
    # One connection comes back: one slot, passed from kind to kind in queue order.
    await leases[0].__aexit__(None, None, None)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    for lease in leases[1:]:
        await lease.__aexit__(None, None, None)
    assert order == names
    assert budget.opened <= 4 and budget.waiting() == 0


async def test_an_idle_connection_of_another_kind_makes_room(budget_alias: str) -> None:
    alias = budget_alias
    await asyncio.gather(*(use(alias, "rw") for _ in range(4)))  # 4 read-write, now idle
    (budget,) = _waiters.budgets(alias)
    assert budget.opened == 4
    # The budget is spent on idle read-write connections; the ORM needs its own kind.
    await asyncio.wait_for(asyncio.gather(*(use(alias, "orm") for _ in range(4))), 10)
    assert budget.opened == 4
    snap: Any = ConnectionPool(alias).metrics
    assert snap["size"] == 0  # every read-write connection made room for the ORM's
