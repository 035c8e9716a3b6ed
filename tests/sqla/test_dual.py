"""``sqla.dual``: a statement's error on the async pool is SQLAlchemy's and Django's class.

Real statements on a real server, through ``session_scope()`` and the read-only
fast path: the error is caught by ``except django.db.<Class>`` and by
``except sqlalchemy.exc.<Class>`` alike; outages are OperationalErrors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import django.db
import pytest
import sqlalchemy.exc
from sqlalchemy import text

from django_asyncpool import session_scope
from django_asyncpool.core import registry as _registry
from testproject.pgserver import LocalPostgres

from ..conftest import terminate_backends

OPTIONS = {"async_pool": {"pool_size": 2, "max_overflow": 0, "timeout": 5}}
DUP = "create temp table dup (x int primary key); insert into dup values (1); " + (
    "insert into dup values (1)"
)
CASES = {
    "unique violation": (DUP, sqlalchemy.exc.IntegrityError, django.db.IntegrityError),
    "division by zero": ("select 1/0", sqlalchemy.exc.DBAPIError, django.db.DataError),
    "syntax error": ("selec 1", sqlalchemy.exc.ProgrammingError, django.db.ProgrammingError),
    "read-only transaction (25006)": (
        "set transaction read only; create temp table t (x int)",
        sqlalchemy.exc.DBAPIError,
        django.db.OperationalError,
    ),
}


def run(alias: str, sql: str) -> BaseException:
    async def scope() -> None:
        async with session_scope(using=alias) as session:
            for part in sql.split("; "):
                await session.execute(text(part))

    with pytest.raises(Exception) as info:
        asyncio.run(scope())
    return info.value


@pytest.mark.parametrize("case", list(CASES))
def test_a_statement_error_is_both_classes(make_alias, db_access, case: str) -> None:
    sql, theirs, django_cls = CASES[case]
    alias = make_alias(NAME="postgres", OPTIONS=OPTIONS)
    error = run(alias, sql)
    assert isinstance(error, theirs), repr(error)
    assert isinstance(error, django_cls), repr(error)
    assert isinstance(error, sqlalchemy.exc.DBAPIError) and isinstance(error, django.db.Error)
    assert error.orig is not None  # SQLAlchemy's own attributes carry over
    # An application error is never counted by the breaker.
    assert _registry.guard(alias).breaker.fail_counter == 0


def test_a_terminated_backend_mid_transaction_is_an_operational_error(
    make_alias, pg: LocalPostgres, db_access
) -> None:
    alias = make_alias(NAME="postgres", OPTIONS={**OPTIONS, "application_name": "dual-test"})

    async def scope(terminate: Callable[[], object]) -> None:
        async with session_scope(using=alias) as session:
            await session.execute(text("select 1"))
            await asyncio.to_thread(terminate)
            await session.execute(text("select 1"))

    with pytest.raises(Exception) as info:
        asyncio.run(scope(lambda: terminate_backends(pg, "postgres", app="dual-test")))
    assert isinstance(info.value, django.db.OperationalError), repr(info.value)
    assert isinstance(info.value, sqlalchemy.exc.OperationalError), repr(info.value)


def test_the_read_only_fast_path_raises_both_classes_too(make_alias, db_access) -> None:
    alias = make_alias(NAME="postgres", OPTIONS=OPTIONS)

    async def scope() -> None:
        async with session_scope(using=alias, readonly=True) as session:
            await session.execute(text("select 1/0"))

    with pytest.raises(django.db.DataError) as info:
        asyncio.run(scope())
    assert isinstance(info.value, sqlalchemy.exc.DBAPIError), repr(info.value)
