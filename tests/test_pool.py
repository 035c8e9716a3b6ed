"""The async pool: ConnectionPool and session_scope over SQLAlchemy + asyncpg, real server."""

from __future__ import annotations

import asyncio
import logging

import pytest
import sqlalchemy.exc
from asgiref.sync import async_to_sync
from django.core.exceptions import ImproperlyConfigured
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from django_asyncpool import (
    ConnectionPool,
    ReadOnlyError,
    session_scope,
)
from django_asyncpool.config import from_settings
from django_asyncpool.sqla.engines import connect_kwargs

from .conftest import backends, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

PK = text("select id, name from shop_product where id = :pk")


@pytest.fixture
def dbname() -> str:
    from django.db import connections

    return connections["default"].settings_dict["NAME"]


@pytest.fixture
async def products() -> list[int]:
    async with session_scope() as session:
        await session.execute(text("truncate shop_product restart identity cascade"))
        await session.execute(
            text(
                "insert into shop_product (sku, name, price_cents) "
                "select 'S' || g, 'product ' || g, g from generate_series(1, 50) g"
            )
        )
    return list(range(1, 51))


def test_one_pool_per_alias_and_clear_errors_for_others() -> None:
    assert ConnectionPool() is ConnectionPool("default") is ConnectionPool(alias="default")
    assert ConnectionPool("replica") is not ConnectionPool()
    with pytest.raises(
        ImproperlyConfigured, match=r"'nope' is not in settings\.DATABASES.*default, replica"
    ):
        ConnectionPool("nope")


async def test_session_scope_commits_on_success(products) -> None:
    async with session_scope() as session:
        assert isinstance(session, AsyncSession)
        await session.execute(text("update shop_product set name = 'changed' where id = 1"))
    async with ConnectionPool().session_scope() as session:
        assert (
            await session.execute(text("select name from shop_product where id = 1"))
        ).scalar() == "changed"
    assert ConnectionPool().metrics["in_use"] == 0


async def test_session_scope_rolls_back_and_reraises(products) -> None:
    with pytest.raises(ZeroDivisionError):
        async with session_scope() as session:
            await session.execute(text("update shop_product set name = 'lost' where id = 2"))
            1 / 0  # noqa: B018
    async with session_scope() as session:
        assert (
            await session.execute(text("select name from shop_product where id = 2"))
        ).scalar() == "product 2"
    assert ConnectionPool().metrics["in_use"] == 0


async def test_get_connection_returns_a_session_the_caller_closes(products) -> None:
    session = await ConnectionPool().get_connection()
    assert ConnectionPool().metrics["in_use"] == 1
    assert (await session.execute(PK, {"pk": 3})).one().name == "product 3"
    await session.close()
    assert ConnectionPool().metrics["in_use"] == 0


async def test_fast_path_yields_asyncpg_and_cleans_up_open_transactions(
    products, pg, dbname
) -> None:
    pool = ConnectionPool()
    async with pool.connection() as conn:
        assert (await conn.fetchrow("select name from shop_product where id = $1", 4))[
            "name"
        ] == "product 4"
        await conn.execute("begin")
        await conn.execute("update shop_product set name = 'half done' where id = 4")
    async with pool.connection() as conn:
        assert not conn.is_in_transaction()
        assert await conn.fetchval("select name from shop_product where id = 4") == "product 4"
    assert backends(pg, dbname, "idle in transaction") == 0


async def test_readonly_skips_begin_and_refuses_writes(products) -> None:
    async with session_scope(readonly=True) as session:
        first = (await session.execute(text("select txid_current()"))).scalar()
        second = (await session.execute(text("select txid_current()"))).scalar()
        assert first != second  # each statement is its own transaction: no BEGIN was sent
    async with session_scope() as session:
        first = (await session.execute(text("select txid_current()"))).scalar()
        assert (await session.execute(text("select txid_current()"))).scalar() == first
    with pytest.raises(ReadOnlyError, match="tried to write"):
        async with session_scope(readonly=True) as session:
            await session.execute(text("delete from shop_product"))
    async with session_scope(readonly=True) as session:
        assert (await session.execute(text("select count(*) from shop_product"))).scalar() == 50


def test_every_loop_gets_its_own_engine_and_dead_loops_give_connections_back(pg, dbname) -> None:
    baseline = backends(pg, dbname)

    async def request() -> int:
        async with session_scope() as session:
            return int((await session.execute(text("select 1"))).scalar())

    for _ in range(20):
        assert asyncio.run(request()) == 1
    for _ in range(20):
        assert async_to_sync(request)() == 1
    assert wait_until(lambda: backends(pg, dbname) <= baseline, timeout=5)


async def test_many_concurrent_scopes_share_one_engine(products) -> None:
    async def one(pk: int) -> str:
        async with session_scope() as session:
            return (await session.execute(PK, {"pk": pk})).one().name

    names = await asyncio.gather(*(one(pk) for pk in products))
    assert names == [f"product {pk}" for pk in products]
    assert ConnectionPool().loops >= 1


async def test_leak_warning_carries_the_stack(make_alias, caplog) -> None:
    alias = make_alias(OPTIONS={"leak_threshold": 0.05})
    pool = ConnectionPool(alias)
    with caplog.at_level(logging.WARNING, logger="django_asyncpool"):
        async with pool.connection() as conn:
            await asyncio.sleep(0.2)
            await conn.fetchval("select 1")
    assert "longer than leak_threshold (0.05s)" in caplog.text
    assert "test_leak_warning_carries_the_stack" in caplog.text  # where it was taken
    assert pool.metrics["leaks"] == 1


async def test_run_transaction_retries_a_real_serialization_failure(products) -> None:
    pool = ConnectionPool()
    attempts = 0

    async def bump(session: AsyncSession) -> int:
        nonlocal attempts
        attempts += 1
        await session.execute(text("set transaction isolation level repeatable read"))
        price = (
            await session.execute(text("select price_cents from shop_product where id = 1"))
        ).scalar()
        if attempts == 1:  # another transaction changes the row after our snapshot
            async with pool.session_scope() as other:
                await other.execute(
                    text("update shop_product set price_cents = price_cents + 100 where id = 1")
                )
        await session.execute(
            text("update shop_product set price_cents = :p where id = 1"), {"p": price + 1}
        )
        return int(price + 1)

    assert await pool.run_transaction(bump) == 102  # 1, +100 by the other, +1 on the retry
    assert attempts == 2

    async def fails(session: AsyncSession) -> None:
        await session.execute(text("select 1/0"))

    with pytest.raises(sqlalchemy.exc.DBAPIError, match="division by zero"):
        await pool.run_transaction(fails)  # not retryable: raised at once


def test_asyncpg_arguments_from_django_settings(pg) -> None:
    config = from_settings(
        "x",
        {
            "NAME": "app",
            "USER": "u",
            "PASSWORD": "p",
            "HOST": str(pg.socket_dir),
            "PORT": pg.port,
            "OPTIONS": {
                "sslmode": "require",
                "sslrootcert": "/ca.pem",
                "application_name": "web",
                "options": "-c statement_timeout=5000",
                "connect_timeout": 3,
            },
        },
        environ={},
    )
    kwargs = connect_kwargs(config)
    assert kwargs["host"] == str(pg.socket_dir) and kwargs["database"] == "app"
    assert kwargs["dsn"] == "postgresql://?sslmode=require&sslrootcert=/ca.pem"
    assert kwargs["server_settings"] == {"application_name": "web", "statement_timeout": "5000"}
    assert kwargs["timeout"] == 3.0


def test_unix_socket_host_works(make_alias, pg) -> None:
    alias = make_alias(HOST=str(pg.socket_dir), PASSWORD="")

    async def which() -> str:
        async with ConnectionPool(alias).connection() as conn:
            return str(await conn.fetchval("select coalesce(inet_server_addr()::text, 'socket')"))

    assert asyncio.run(which()) == "socket"


async def test_readonly_session_behaves_like_an_async_session(products) -> None:
    from sqlalchemy import literal, select

    async with session_scope(readonly=True) as session:
        assert isinstance(session, AsyncSession)
        row = (await session.execute(PK, {"pk": 7})).one()  # text: the asyncpg fast path
        assert (row.id, row.name) == (7, "product 7")
        assert await session.scalar(text("select count(*) from shop_product")) == 50
        names = (await session.scalars(text("select name from shop_product order by id"))).all()
        assert names[:2] == ["product 1", "product 2"]
        empty = await session.execute(PK, {"pk": -1})
        assert list(empty.keys()) == ["id", "name"] and empty.all() == []
        assert (await session.execute(select(literal(5)))).scalar() == 5  # the ORM path
        with pytest.raises(sqlalchemy.exc.ProgrammingError, match="no_such_table"):
            await session.execute(text("select * from no_such_table"))
        with pytest.raises(sqlalchemy.exc.StatementError, match="pk"):
            await session.execute(PK)  # a missing parameter: SQLAlchemy's own message
    assert ConnectionPool().metrics["in_use"] == 0


def test_overflow_connections_are_kept_under_load_and_shed_after(make_alias, monkeypatch) -> None:
    from django_asyncpool.sqla import fairpool as _fairpool

    monkeypatch.setattr(_fairpool.GuardedPool, "KEEP_OVERFLOW", 0.5)
    alias = make_alias(OPTIONS={"async_pool": {"pool_size": 2, "max_overflow": 3, "timeout": 5}})

    async def scenario() -> None:
        pool = ConnectionPool(alias)

        async def worker() -> None:
            for _ in range(40):
                async with pool.connection() as conn:
                    await conn.fetchval("select 1")

        await asyncio.gather(*(worker() for _ in range(12)))  # demand far above pool_size
        # SQLAlchemy alone would close and reopen an overflow connection per check-in
        assert pool.metrics["created"] <= 5 + 2, pool.metrics
        # pool_size 2 + 3 overflow connections kept, all idle now
        assert pool.metrics["idle"] == 5 and pool.metrics["size"] == 2 + 3, pool.metrics
        await asyncio.sleep(0.6)  # demand stays within pool_size from here on
        for _ in range(5):
            async with pool.connection() as conn:
                await conn.fetchval("select 1")
        assert pool.metrics["size"] == 2 and pool.metrics["idle"] == 2, pool.metrics
        await pool.close()

    asyncio.run(scenario())
