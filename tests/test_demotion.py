"""A server that turns read-only (a demoted primary) on a throwaway server: 25006.

``ALTER SYSTEM SET default_transaction_read_only = on`` and a reload make every
session refuse writes with SQLSTATE 25006, as a primary demoted by a failover does.
The first refused write replaces the pool's connections (counted in
``db_pool_demotions_total``, logged once); the idle ones the pool had before are
gone from the server. The error is Django's OperationalError on both sides (on the
async side also SQLAlchemy's).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import django.db
import pytest
import sqlalchemy.exc
from django.db import connections
from sqlalchemy import text

from django_asyncpool import session_scope
from django_asyncpool.core import registry as _registry
from testproject.pgserver import LocalPostgres

from .conftest import wait_until

APP = "asyncpool-demotion"
WRITES = 6


@pytest.fixture(scope="module")
def server() -> Iterator[LocalPostgres]:
    home = Path(tempfile.mkdtemp(prefix="asyncpool-demotion-"))
    pg = LocalPostgres(home / "data")
    try:
        pg.init()
        pg.start()
        pg.psql("create table if not exists note (x int)")
        yield pg
    finally:
        pg.destroy()
        shutil.rmtree(home, ignore_errors=True)


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


def write(side: str, alias: str, runner: asyncio.Runner) -> None:
    if side == "sync":
        wrapper = connections[alias]
        try:
            with wrapper.cursor() as cursor:
                cursor.execute("insert into note values (1)")
        finally:
            wrapper.close()
        return

    async def scope() -> None:
        async with session_scope(using=alias) as session:
            await session.execute(text("insert into note values (1)"))

    runner.run(scope())


def warm(side: str, alias: str, runner: asyncio.Runner) -> None:
    """Open two connections in the pool (they stay idle)."""
    if side == "sync":
        return  # min_size 2

    async def two() -> None:
        async with session_scope(using=alias) as one, session_scope(using=alias) as other:
            await one.execute(text("select 1"))
            await other.execute(text("select 1"))

    runner.run(two())


@pytest.mark.parametrize("side", ["sync", "async"])
def test_a_demoted_primary_replaces_the_pools_connections_once(
    make_alias, db_access, server: LocalPostgres, caplog, side
) -> None:
    alias = make_alias(
        NAME="postgres",
        HOST=server.host,
        PORT=server.port,
        PASSWORD=server.password,
        OPTIONS={
            "pool": {"min_size": 2, "max_size": 4, "timeout": 5},
            "async_pool": {"pool_size": 4, "max_overflow": 0, "timeout": 5},
            "application_name": APP,
        },
    )
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
