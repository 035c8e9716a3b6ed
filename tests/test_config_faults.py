"""Configuration faults and application errors against a real server, on every pool.

An unknown role, an unknown database and a wrong password (the embedded server
asks for a scram-sha-256 password over TCP): on the sync pool, ``session_scope()``
and the native async ORM, and in ``dbpool_check``, every error says the server's own
words, none is retried or counted by the breaker, no password shows anywhere, and
each cause is logged once. An application error (a unique violation) neither counts
nor costs the connection. How errors are classified alone: ``core/test_sqlstate.py``.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy.exc
from django.core.management import CommandError, call_command
from django.db import IntegrityError, OperationalError, connections
from sqlalchemy import text

from django_asyncpool import (
    CircuitOpenError,
    ConfigurationFault,
    DatabaseUnavailable,
    session_scope,
)
from django_asyncpool.core import registry as _registry
from django_asyncpool.orm import native as _asyncorm
from testproject.pgserver import PASSWORD, SUPERUSER, LocalPostgres
from testproject.shop.models import Product

from .sides import SIDES, run_sql

WRONG = "Wr0ng-pw-never-shown"
CALLS = 12
# Small pools; the default retries (3 tries) and breaker (5 failures), which a
# configuration fault must not spend.
OPTIONS = {
    "pool": {"min_size": 0, "max_size": 2, "timeout": 5},
    "async_pool": {"pool_size": 2, "max_overflow": 0, "timeout": 5},
}


def _role(pg: LocalPostgres) -> dict[str, Any]:
    # Over the unix socket (trust): over TCP the server hides which roles exist.
    return {"USER": "no_such_role", "HOST": str(pg.socket_dir), "PASSWORD": WRONG}


CASES: dict[str, tuple[Callable[[LocalPostgres], dict[str, Any]], str, str]] = {
    "unknown role": (_role, 'role "no_such_role" does not exist', "28000"),
    "unknown database": (
        lambda pg: {"NAME": "no_such_db", "PASSWORD": PASSWORD},
        'database "no_such_db" does not exist',
        "3D000",
    ),
    "wrong password": (
        lambda pg: {"USER": pg.user, "PASSWORD": WRONG},
        f'password authentication failed for user "{SUPERUSER}"',
        "28P01",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("side", SIDES)
def test_a_configuration_fault_is_said_at_once_never_retried_nor_counted(
    make_alias, pg, db_access, caplog, side, case
) -> None:
    overrides, words, code = CASES[case]
    options = {**OPTIONS, "async_orm": side == "async_orm"}
    alias = make_alias(**{"NAME": "postgres", **overrides(pg)}, OPTIONS=options)
    if side == "async_orm":
        _asyncorm.install()
    guard = _registry.guard(alias)
    stats = _registry.stats(alias, side)
    retries = stats.retries
    errors: list[BaseException] = []
    with caplog.at_level(logging.DEBUG), asyncio.Runner() as runner:
        started = time.monotonic()
        for _ in range(CALLS):
            with pytest.raises(OperationalError) as info:
                run_sql(side, alias, runner)
            errors.append(info.value)
        took = time.monotonic() - started
    # Twelve calls, each one attempt: no backoff slept (3 tries would sleep ~0.3 s each).
    assert took < 2.5, took
    assert stats.retries == retries
    assert guard.state == "closed" and guard.breaker.fail_counter == 0
    for err in errors:
        assert isinstance(err, ConfigurationFault), repr(err)
        assert isinstance(err, DatabaseUnavailable)  # what handlers of outages catch
        assert words in str(err) and err.reason == words and err.sqlstate == code
        assert "not retried" in str(err)
        if side == "async":  # also SQLAlchemy's, as its own connect errors are
            assert isinstance(err, sqlalchemy.exc.OperationalError), repr(err)
        for shown in (str(err), repr(err), str(err.__cause__)):
            assert WRONG not in shown and PASSWORD not in shown
    logged = [r for r in caplog.records if words in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert WRONG not in caplog.text and PASSWORD not in caplog.text


@pytest.mark.parametrize("case", list(CASES))
def test_dbpool_check_names_the_cause_and_leaves_the_breaker_closed(
    make_alias, pg, db_access, case
) -> None:
    overrides, words, _ = CASES[case]
    alias = make_alias(**{"NAME": "postgres", **overrides(pg)}, OPTIONS=OPTIONS)
    out = io.StringIO()
    started = time.monotonic()
    with pytest.raises(CommandError) as info:
        call_command("dbpool_check", "--database", alias, stdout=out)
    assert info.value.returncode == 1
    assert time.monotonic() - started < 5
    output = out.getvalue()
    for side in ("sync", "async"):
        line = next(x for x in output.splitlines() if x.startswith(f"  {alias} ({side}):"))
        assert "ConfigurationFault" in line and words in line, output
    assert "circuit breaker is open" not in output
    assert WRONG not in output and PASSWORD not in output
    # A probe with the wrong settings opens no breaker (shared through Redis, it would
    # fail every process that has the right ones).
    assert _registry.guard(alias).state == "closed"


def test_an_open_breaker_names_the_last_cause(make_alias, db_access, server_down) -> None:
    alias = make_alias(
        NAME="postgres",
        OPTIONS={
            **OPTIONS,
            "circuit_breaker": {"fail_max": 2, "reset_timeout": 30},
            "retry": {"max_tries": 1},
        },
    )
    server_down()
    with asyncio.Runner() as runner:
        for _ in range(2):
            with pytest.raises(DatabaseUnavailable):
                run_sql("async", alias, runner)
        with pytest.raises(CircuitOpenError) as info:
            run_sql("async", alias, runner)
    assert _registry.guard(alias).state == "open"
    assert isinstance(info.value, sqlalchemy.exc.OperationalError)  # the async side's
    assert "The last one: " in str(info.value)
    last = str(info.value).split("The last one: ", 1)[1]
    assert "Connect call failed" in last or "refused" in last.lower() or "No such file" in last


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("side", ["sync", "async"])
def test_a_unique_violation_neither_counts_nor_costs_the_connection(side) -> None:
    guard = _registry.guard("default")
    Product.objects.create(sku="DUP", name="one", price_cents=1)
    insert = "insert into shop_product (sku, name, price_cents) values ('DUP', 'two', 1)"

    def sync_pid() -> int:
        with connections["default"].cursor() as cursor:
            cursor.execute("select pg_backend_pid()")
            return int(cursor.fetchone()[0])

    async def async_pid() -> int:
        async with session_scope() as session:
            return int((await session.execute(text("select pg_backend_pid()"))).scalar_one())

    async def async_insert() -> None:
        async with session_scope() as session:
            await session.execute(text(insert))

    with asyncio.Runner() as runner:
        before = sync_pid() if side == "sync" else runner.run(async_pid())
        for _ in range(guard.breaker.fail_max + 2):
            if side == "sync":
                with pytest.raises(IntegrityError):
                    Product.objects.create(sku="DUP", name="two", price_cents=1)
            else:
                with pytest.raises(Exception) as info:
                    runner.run(async_insert())
                assert "duplicate key" in str(info.value)
        after = sync_pid() if side == "sync" else runner.run(async_pid())
    assert guard.state == "closed" and guard.breaker.fail_counter == 0
    assert after == before  # the same connection: never discarded for the caller's error


@pytest.mark.parametrize("side", SIDES)
def test_ssl_refused_is_a_configuration_fault(make_alias, db_access, caplog, side) -> None:
    # The embedded server has no SSL: sslmode=require can never connect.
    options = {**OPTIONS, "async_orm": side == "async_orm", "sslmode": "require"}
    alias = make_alias(NAME="postgres", OPTIONS=options)
    if side == "async_orm":
        _asyncorm.install()
    stats = _registry.stats(alias, side)
    with caplog.at_level(logging.WARNING), asyncio.Runner() as runner:
        started = time.monotonic()
        for _ in range(CALLS):
            with pytest.raises(ConfigurationFault) as info:
                run_sql(side, alias, runner)
        took = time.monotonic() - started
    assert took < 2.5, took
    assert stats.retries == 0 and _registry.guard(alias).breaker.fail_counter == 0
    assert "SSL" in info.value.reason and info.value.sqlstate is None
    assert "sslmode" in str(info.value)  # what to do
    assert len([r for r in caplog.records if "SSL" in r.getMessage()]) == 1
