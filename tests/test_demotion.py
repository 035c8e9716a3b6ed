"""A server that turns read-only (a demoted primary) on a throwaway server: 25006.

``ALTER SYSTEM SET default_transaction_read_only = on`` and a reload make every
session refuse writes with SQLSTATE 25006, as a primary demoted by a failover does.
The first refused write replaces the pool's connections (counted in
``db_pool_demotions_total``, logged once); the idle ones the pool had before are
gone from the server. The same on the sync pool, ``session_scope()`` and the native
async ORM (``OPTIONS["async_orm"]``). The error is Django's OperationalError on every
side (on the async side also SQLAlchemy's).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator

import django.db
import pytest
import sqlalchemy.exc
from django.db import connections
from sqlalchemy import text

from django_asyncpool import session_scope
from django_asyncpool.core import registry as _registry
from django_asyncpool.orm import native as _asyncorm
from django_asyncpool.orm import pool as _ormpool
from testproject.pgserver import LocalPostgres

from .conftest import throwaway_server, wait_until
from .sides import native_sql, run_sql

APP = "asyncpool-demotion"
WRITES = 6


@pytest.fixture(scope="module")
def server() -> Iterator[LocalPostgres]:
    with throwaway_server("asyncpool-demotion-", "create table if not exists note (x int)") as pg:
        yield pg


def on_server(make_alias: Callable[..., str], server: LocalPostgres, *, async_orm: bool) -> str:
    """An alias of ``server``: small pools, its connections named ``APP``."""
    return make_alias(
        NAME="postgres",
        HOST=server.host,
        PORT=server.port,
        PASSWORD=server.password,
        OPTIONS={
            "pool": {"min_size": 2, "max_size": 4, "timeout": 5},
            "async_pool": {"pool_size": 4, "max_overflow": 0, "timeout": 5},
            "application_name": APP,
            "async_orm": async_orm,
        },
    )


def read_only(pg: LocalPostgres, on: bool) -> None:
    setting = (
        "set default_transaction_read_only = on" if on else "reset default_transaction_read_only"
    )
    pg.psql(f"alter system {setting}")
    pg.psql("select pg_reload_conf()")
    time.sleep(0.3)  # each backend reads the reloaded file at its next statement


def pids(pg: LocalPostgres) -> set[int]:
    out = pg.psql(f"select pid from pg_stat_activity where application_name = '{APP}'")
    return {int(line) for line in out.split()}


INSERT = "insert into note values (1)"


def write(side: str, alias: str, runner: asyncio.Runner) -> None:
    run_sql(side, alias, runner, INSERT)


def warm(side: str, alias: str, runner: asyncio.Runner) -> None:
    """Open two connections in the pool (they stay idle)."""
    if side == "sync":
        return  # min_size 2
    if side == "async_orm":
        runner.run(_warm_native(alias))
        return

    async def two() -> None:
        async with session_scope(using=alias) as one, session_scope(using=alias) as other:
            await one.execute(text("select 1"))
            await other.execute(text("select 1"))

    runner.run(two())


@pytest.mark.parametrize("side", ["sync", "async", "async_orm"])
def test_a_demoted_primary_replaces_the_pools_connections_once(
    make_alias, db_access, server: LocalPostgres, caplog, side
) -> None:
    alias = on_server(make_alias, server, async_orm=side == "async_orm")
    stats = _registry.stats(alias, side)
    with asyncio.Runner() as runner:
        write(side, alias, runner)
        warm(side, alias, runner)
        assert wait_until(lambda: len(pids(server)) >= 2)
        before = pids(server)
        read_only(server, True)
        try:
            errors = []
            with caplog.at_level(logging.WARNING, logger="django_asyncpool"):
                started = time.monotonic()
                for _ in range(WRITES):
                    with pytest.raises(django.db.Error) as info:
                        write(side, alias, runner)
                    errors.append(info.value)
                took = time.monotonic() - started
            # Every idle connection the pool had is gone from the server: none is kept
            # to refuse the next write the same way after a real failover.
            assert wait_until(lambda: not (pids(server) & before), timeout=5), (
                before,
                pids(server),
            )
        finally:
            read_only(server, False)
        write(side, alias, runner)  # writable again: at once
    assert 1 <= stats.demotions <= 1 + int(took), stats.demotions  # at most one a second
    lines = [r for r in caplog.records if "25006" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    for err in errors:
        assert "read-only transaction" in str(err)
        assert isinstance(err, django.db.OperationalError), repr(err)
        if side == "async":
            assert isinstance(err, sqlalchemy.exc.DBAPIError), repr(err)


def test_a_demoted_primary_replaces_the_native_orm_connections_of_every_loop(
    make_alias, db_access, server: LocalPostgres
) -> None:
    # Each event loop has its own native ORM pool: a 25006 met on one loop replaces
    # the other loops' connections too (on their own loop).
    alias = on_server(make_alias, server, async_orm=True)
    stats = _registry.stats(alias, "async_orm")
    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, daemon=True)
    thread.start()
    try:
        with asyncio.Runner() as runner:
            warm("async_orm", alias, runner)
            warm_there = asyncio.run_coroutine_threadsafe(_warm_native(alias), other)
            warm_there.result(timeout=10)
            assert wait_until(lambda: len(pids(server)) >= 4)
            before = pids(server)
            demotions = stats.demotions
            read_only(server, True)
            try:
                with pytest.raises(django.db.Error, match="read-only transaction"):
                    write("async_orm", alias, runner)
                # The other loop's idle connections are gone too, though it ran nothing.
                assert wait_until(lambda: not (pids(server) & before), timeout=5), (
                    before,
                    pids(server),
                )
            finally:
                read_only(server, False)
            assert stats.demotions == demotions + 1
            write("async_orm", alias, runner)
            asyncio.run_coroutine_threadsafe(native_sql(alias, INSERT), other).result(timeout=10)
    finally:
        asyncio.run_coroutine_threadsafe(_close_native(alias), other).result(timeout=10)
        other.call_soon_threadsafe(other.stop)
        thread.join(10)
        other.close()


async def _warm_native(alias: str) -> None:
    def hold() -> None:
        with connections[alias].cursor() as cursor:
            cursor.execute("select pg_sleep(0.1)")

    await asyncio.gather(_asyncorm.run(alias, hold), _asyncorm.run(alias, hold))


async def _close_native(alias: str) -> None:
    await _ormpool.holder(alias).pool.close()
