"""``sqla.engines``: a connection found dead at its first round trip is replaced unseen.

The liveness check at checkout cannot see a link a firewall dropped silently, or a
backend dying as it is used: nothing arrives until a query is sent. The proxy's
``doom()`` makes every open connection fail at its client's next byte. Nothing has
run on such a connection yet (the BEGIN of ``session_scope()``, the first statement
of a read-only scope), so another is taken and the caller never sees it; once
something has run, the loss is the caller's to see (a retry could run it twice).
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from django_asyncpool import session_scope
from django_asyncpool.errors import ConnectionLost
from django_asyncpool.pool import ConnectionPool

from ..conftest import terminate_backends

TASKS = 4
# A long liveness bypass: a connection given back just now is handed out without a ping.
OPTIONS = {
    "async_pool": {"pool_size": TASKS, "max_overflow": 0, "timeout": 5},
    "liveness_bypass": 60,
}


def make(make_alias, proxy) -> str:
    return make_alias(HOST=proxy.host, PORT=proxy.port, NAME="postgres", OPTIONS=OPTIONS)


async def warm(alias: str, readonly: bool) -> None:
    """Open TASKS connections at once and give them back: each is idle, recently used."""
    gate = asyncio.Barrier(TASKS)

    async def one() -> None:
        async with session_scope(using=alias, readonly=readonly) as session:
            await session.execute(text("select 1"))
            await gate.wait()

    await asyncio.gather(*(one() for _ in range(TASKS)))


@pytest.mark.parametrize("readonly", [False, True], ids=["read-write", "read-only"])
def test_a_connection_dead_at_its_first_round_trip_is_replaced(
    make_alias, proxy, db_access, readonly: bool
) -> None:
    alias = make(make_alias, proxy)

    async def scenario() -> list[object]:
        await warm(alias, readonly)
        before = proxy.connections
        proxy.doom()

        async def one(i: int) -> object:
            async with session_scope(using=alias, readonly=readonly) as session:
                return (await session.execute(text(f"select {i}"))).scalar()

        results = await asyncio.gather(*(one(i) for i in range(TASKS)), return_exceptions=True)
        assert proxy.connections - before == TASKS  # every one was replaced
        return results

    results = asyncio.run(scenario())
    assert results == list(range(TASKS)), [repr(r) for r in results]
    if not readonly:
        assert ConnectionPool(alias).metrics["invalidated"] >= TASKS


def test_a_connection_lost_after_a_statement_ran_is_the_callers_to_see(
    make_alias, proxy, db_access
) -> None:
    alias = make(make_alias, proxy)

    async def scenario() -> None:
        async with session_scope(using=alias) as session:
            await session.execute(text("select 1"))
            proxy.doom()
            await session.execute(text("select 2"))

    with pytest.raises(ConnectionLost):
        asyncio.run(scenario())


@pytest.mark.parametrize("readonly", [False, True], ids=["read-write", "read-only"])
def test_right_after_every_backend_is_terminated_no_call_fails(
    make_alias, pg, db_access, readonly: bool
) -> None:
    # The report: right after pg_terminate_backend() of every backend, 1 of the
    # next 100 scopes failed in about 1 run in 4 (the hang-up not yet seen at checkout).
    app = f"asyncpool-first-trip-{readonly}"
    alias = make_alias(NAME="postgres", OPTIONS={**OPTIONS, "application_name": app})

    async def scenario() -> list[object]:
        results: list[object] = []
        for _ in range(5):
            await warm(alias, readonly)
            assert await asyncio.to_thread(terminate_backends, pg, app=app) == TASKS

            async def one(i: int) -> object:
                async with session_scope(using=alias, readonly=readonly) as session:
                    return (await session.execute(text(f"select {i}"))).scalar()

            for i in range(20):
                results.append(await one(i))
        return results

    results = asyncio.run(scenario())
    assert results == list(range(20)) * 5, [repr(r) for r in results if isinstance(r, Exception)]
