"""``core.sqlstate``: the classification of real errors of every driver, and the log filter.

Each error is made by a real server (the embedded one): psycopg's, asyncpg's and
SQLAlchemy's wrapping of asyncpg's, at connect and under a query.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from django_asyncpool.core import sqlstate
from django_asyncpool.core.sqlstate import APPLICATION, CONFIG, GONE, READ_ONLY, classify
from testproject.pgserver import LocalPostgres

#: SQL -> (SQLSTATE, kind) under a query.
STATEMENTS = {
    "select 1/0": ("22012", APPLICATION),
    "selec 1": ("42601", APPLICATION),
    "select * from no_such_table": ("42P01", APPLICATION),
    "create temp table dup (x int primary key); insert into dup values (1); "
    "insert into dup values (1)": ("23505", APPLICATION),
    "begin read only; create temp table t (x int)": ("25006", READ_ONLY),
    "select pg_terminate_backend(pg_backend_pid())": ("57P01", GONE),
}


def _psycopg_error(pg: LocalPostgres, sql: str) -> BaseException:
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as info:
            for part in sql.split("; "):
                conn.execute(part)
        return info.value


def _asyncpg_error(pg: LocalPostgres, sql: str) -> BaseException:
    async def run() -> BaseException:
        conn = await asyncpg.connect(pg.url())
        try:
            with pytest.raises(Exception) as info:
                await conn.execute(sql)
            return info.value
        finally:
            await conn.close()

    return asyncio.run(run())


def _sqlalchemy_error(pg: LocalPostgres, sql: str) -> BaseException:
    async def run() -> BaseException:
        engine = create_async_engine(pg.url(scheme="postgresql+asyncpg"))
        try:
            async with engine.connect() as conn:
                with pytest.raises(Exception) as info:
                    for part in sql.split("; "):
                        await conn.execute(text(part))
                return info.value
        finally:
            await engine.dispose()

    return asyncio.run(run())


DRIVERS: dict[str, Callable[[LocalPostgres, str], BaseException]] = {
    "psycopg": _psycopg_error,
    "asyncpg": _asyncpg_error,
    "sqlalchemy": _sqlalchemy_error,
}


@pytest.mark.parametrize("driver", list(DRIVERS))
@pytest.mark.parametrize("sql", list(STATEMENTS))
def test_errors_under_a_query(pg: LocalPostgres, driver: str, sql: str) -> None:
    code, kind = STATEMENTS[sql]
    exc = DRIVERS[driver](pg, sql)
    if driver != "psycopg" and code == "57P01":
        # asyncpg may see the socket close before it reads the server's goodbye.
        code = sqlstate.sqlstate(exc) if sqlstate.sqlstate(exc) in ("08003", None) else code
    assert sqlstate.sqlstate(exc) == code
    assert classify(exc) == kind
    if kind == APPLICATION:  # whatever the moment, the statement's own fault is never config
        assert classify(exc, connecting=False) == APPLICATION


def _connect_errors(pg: LocalPostgres, **params: Any) -> list[BaseException]:
    """Return the errors of psycopg, asyncpg and SQLAlchemy connecting with ``params``."""
    dsn = {"host": pg.host, "port": pg.port, "user": pg.user, "password": pg.password}
    dsn.update(params)
    errors: list[BaseException] = []
    with pytest.raises(psycopg.Error) as info:
        psycopg.connect(dbname=dsn.pop("dbname", "postgres"), **dsn).close()
    errors.append(info.value)

    async def run() -> None:
        db = params.get("dbname", "postgres")
        kwargs = {k: v for k, v in dsn.items() if k != "dbname"}
        with pytest.raises(Exception) as info:
            await asyncpg.connect(database=db, **kwargs)
        errors.append(info.value)
        engine = create_async_engine(
            "postgresql+asyncpg://", connect_args={"database": db, **kwargs}
        )
        try:
            with pytest.raises(Exception) as info:
                async with engine.connect():
                    pass
            errors.append(info.value)
        finally:
            await engine.dispose()

    asyncio.run(run())
    return errors


@pytest.mark.parametrize(
    ("params", "words", "code"),
    [
        ({"password": "wrong"}, 'password authentication failed for user "postgres"', "28P01"),
        ({"dbname": "no_such_db"}, 'database "no_such_db" does not exist', "3D000"),
        ({"user": "no_such_role", "socket": True}, 'role "no_such_role" does not exist', "28000"),
    ],
    ids=["password", "database", "role"],
)
def test_configuration_faults_at_connect(
    pg: LocalPostgres, params: dict[str, Any], words: str, code: str
) -> None:
    if params.pop("socket", False):
        params["host"] = str(pg.socket_dir)
    for exc in _connect_errors(pg, **params):
        assert classify(exc, connecting=True) == CONFIG, repr(exc)
        assert sqlstate.server_words(exc) == words
        # libpq's connect errors carry no SQLSTATE: the words tell it.
        assert (sqlstate.sqlstate(exc) or sqlstate.inferred(words)) == code


def test_an_unreachable_server_is_gone_not_a_fault(pg: LocalPostgres) -> None:
    from testproject.pgserver import free_port

    for exc in _connect_errors(pg, port=free_port()):
        assert classify(exc, connecting=True) == GONE, repr(exc)


def test_once_per_minute() -> None:
    now = [100.0]
    once = sqlstate.OncePerMinute(60.0, clock=lambda: now[0])

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("x", logging.WARNING, __file__, 1, message, None, None)

    assert once.filter(record("error connecting in 'p': port 5432 refused"))
    # The same line, but for a number (a port, a delay): the same cause.
    assert not once.filter(record("error connecting in 'p': port 5433 refused"))
    assert once.filter(record("another cause"))
    now[0] += 59.0
    assert not once.filter(record("another cause"))
    now[0] += 2.0
    assert once.filter(record("another cause"))
