"""Connections that renew (``core.renewal``): a password source on every pool, spread lifetimes.

A role of its own whose password the test changes on the server, as a cloud IAM
token or a Vault lease changes: each pool asks ``OPTIONS["password"]`` for every new
connection, and asks once more when the server rejects the answer.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from sqlalchemy import text

from django_asyncpool import ConnectionPool, session_scope
from django_asyncpool.core import registry as _registry
from django_asyncpool.core.renewal import JITTER, lifetime
from django_asyncpool.orm import native as _asyncorm
from testproject import pgserver
from testproject.shop.models import Product

from ..conftest import wait_until

pytestmark = pytest.mark.usefixtures("db_access")

_roles = itertools.count(1)


class Secret:
    """The password source the aliases name: the answers it gives, and how often it was asked."""

    answers: deque[str] = deque(["unset"])
    asked = 0

    @classmethod
    def give(cls, *answers: str) -> None:
        """Answer these in turn; the last one from then on."""
        cls.answers = deque(answers)


def secret() -> str:
    Secret.asked += 1
    return Secret.answers.popleft() if len(Secret.answers) > 1 else Secret.answers[0]


@pytest.fixture
def role(pg: pgserver.LocalPostgres) -> Iterator[str]:
    """A login role with the password 'first-pw'; dropped afterwards."""
    name = f"rotating_{os.getpid()}_{next(_roles)}"
    pg.psql(f"create role {name} login superuser password 'first-pw'")
    Secret.give("first-pw")
    yield name
    _drop_connections(pg, name)
    pg.psql(f"drop role {name}")


def _drop_connections(pg: pgserver.LocalPostgres, role: str) -> None:
    """End the role's sessions, and wait until the server has (the pools see the hang-ups)."""
    sessions = f"from pg_stat_activity where usename = '{role}'"
    pg.psql(f"select pg_terminate_backend(pid) {sessions}")
    wait_until(lambda: pg.psql(f"select count(*) {sessions}") == "0", timeout=5)
    time.sleep(0.1)  # the hang-ups reach the pools' watchers


def _rotate(pg: pgserver.LocalPostgres, role: str, new: str) -> None:
    """Change the role's password on the server, and end its sessions (as a lease expiring)."""
    pg.psql(f"alter role {role} password '{new}'")
    _drop_connections(pg, role)


@pytest.fixture
def product_table(db_access: None) -> Iterator[None]:
    """shop.Product's table in the database of ``db_access`` (which has none), for a while."""
    with connections["default"].cursor() as cursor:
        cursor.execute("select to_regclass(%s) is null", [Product._meta.db_table])
        missing = cursor.fetchone()[0]
    if missing:
        with connections["default"].schema_editor() as editor:
            editor.create_model(Product)
    yield
    if missing:
        with connections["default"].schema_editor() as editor:
            editor.delete_model(Product)


@pytest.fixture
def sourced(product_table: None, make_alias: Callable[..., str], role: str) -> str:
    """An alias of ``role`` whose password comes from :func:`secret` (PASSWORD is wrong)."""
    _asyncorm.install()
    return make_alias(
        USER=role,
        PASSWORD="not-the-password",  # the source wins over PASSWORD
        OPTIONS={
            "password": f"{__name__}.secret",
            "pool": {"min_size": 0, "max_size": 1},
            "async_pool": {"pool_size": 1, "max_overflow": 0},
            "async_orm": True,
        },
    )


def _each_path(alias: str) -> list[tuple[str, Callable[[], Any]]]:
    """One new connection's work on each pool, as (name, call): current_user, or "orm"."""

    def sync_side() -> Any:
        wrapper = connections[alias]
        try:
            with wrapper.cursor() as cursor:
                cursor.execute("select current_user")
                return cursor.fetchone()[0]
        finally:
            wrapper.close()

    async def scope() -> Any:
        async with session_scope(using=alias) as session:
            return (await session.execute(text("select current_user"))).scalar_one()

    async def orm() -> Any:
        await Product.objects.using(alias).acount()  # on a connection of the native pool
        return "orm"

    async def both() -> list[Any]:  # one loop: the async pools live as long as it runs
        return [await scope(), await orm()]

    return [("sync", sync_side), ("session_scope and native ORM", lambda: asyncio.run(both()))]


def test_every_pool_asks_the_source_for_each_new_connection(
    sourced: str, role: str, pg: pgserver.LocalPostgres
) -> None:
    Secret.asked = 0
    results = [call() for _, call in _each_path(sourced)]
    assert results == [role, [role, "orm"]]
    assert Secret.asked == 3, "one connection per pool, each asking for its password"

    _rotate(pg, role, "second-pw")
    Secret.give("second-pw")
    Secret.asked = 0
    results = [call() for _, call in _each_path(sourced)]
    assert results == [role, [role, "orm"]]
    assert Secret.asked == 3


def test_a_rejected_password_is_asked_for_once_more(
    sourced: str, role: str, pg: pgserver.LocalPostgres
) -> None:
    for name, call in _each_path(sourced):
        new = f"{name.split()[0]}-pw"
        _rotate(pg, role, new)
        # The first answer has expired meanwhile: the server rejects it, the pool asks again.
        connections_made = 1 if name == "sync" else 2
        Secret.give(*("first-pw", new) * connections_made)
        Secret.asked = 0
        assert call() in (role, [role, "orm"]), name
        assert Secret.asked == 2 * connections_made, name
    guard = _registry.guard(sourced)
    assert guard.state == "closed" and guard.breaker.fail_counter == 0, "no failure seen"


def test_a_source_that_keeps_being_rejected_fails_saying_so(
    sourced: str, role: str, pg: pgserver.LocalPostgres
) -> None:
    _rotate(pg, role, "nobody-knows")
    Secret.give("first-pw")
    Secret.asked = 0
    with pytest.raises(Exception, match="password authentication failed") as failed:
        connections[sourced].ensure_connection()
    assert "first-pw" not in str(failed.value) and "nobody-knows" not in str(failed.value)
    assert Secret.asked >= 2, "asked once more before failing"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("tests.core.test_renewal.no_such_function", "cannot be imported (ImportError)"),
        ("tests.core.test_renewal.Secret.asked", "cannot be imported"),
        (f"{__name__}.JITTER", "names something that is not callable"),
        ("s3cr3t-literal", "cannot be imported"),
        (42, "is not a string"),
    ],
)
def test_a_password_option_naming_no_callable_is_refused(
    make_alias: Callable[..., str], raw: Any, problem: str
) -> None:
    alias = make_alias(OPTIONS={"password": raw})
    with pytest.raises(ImproperlyConfigured) as refused:
        connections[alias].ensure_connection()
    message = str(refused.value)
    assert f"it {problem}" in message and "a fixed password goes in PASSWORD" in message
    assert str(raw) not in message, "the value could be a password: never echoed"


def test_lifetimes_are_spread_by_ten_percent_either_way() -> None:
    spread = [lifetime(100.0) for _ in range(2000)]
    assert min(spread) >= 100 * (1 - JITTER) and max(spread) <= 100 * (1 + JITTER)
    assert min(spread) < 95 and max(spread) > 105, "spread both ways, not only shortened"
    assert lifetime(-1) == -1 and lifetime(0) == 0  # off stays off


def test_each_pool_spreads_its_connections_lifetimes(
    product_table: None, make_alias: Callable[..., str]
) -> None:
    _asyncorm.install()
    alias = make_alias(
        OPTIONS={
            "pool": {"min_size": 4, "max_size": 4, "max_lifetime": 1000},
            "async_pool": {"pool_size": 4, "max_overflow": 0, "recycle": 1000},
            "async_orm": True,
        }
    )
    wrapper = connections[alias]
    wrapper.ensure_connection()
    wrapper.close()  # back in the pool, which opens min_size
    pool = wrapper.pool
    pool.wait(5)
    with pool._lock:
        sync_lives = [conn._expire_at - conn._created_at for conn in pool._pool]

    async def async_lives() -> tuple[list[float], list[float]]:
        async def hold() -> None:
            async with session_scope(using=alias) as session:
                await session.execute(text("select pg_sleep(0.05)"))

        await asyncio.gather(*(hold() for _ in range(4)))
        engine_pool: Any = ConnectionPool(alias).for_loop().engine.sync_engine.pool
        scope_lives = [record.info["asyncpool_expires"] for record in engine_pool._idle]
        await asyncio.gather(*(Product.objects.using(alias).acount() for _ in range(4)))
        orm_pool = _ormpool_of(alias)
        orm_lives = [conn._asyncpool_expires for conn in orm_pool.idle]
        return scope_lives, orm_lives

    scope_expiries, orm_expiries = asyncio.run(async_lives())
    for name, lives in (("sync", sync_lives), ("scope", scope_expiries), ("orm", orm_expiries)):
        assert len(lives) == 4, name
        assert len({round(x, 3) for x in lives}) == 4, f"{name}: expire together"
    assert all(900 <= life <= 1100 for life in sync_lives)


def _ormpool_of(alias: str) -> Any:
    from django_asyncpool.orm import pool as _ormpool

    return _ormpool.holder(alias).pool


def test_a_scope_connection_older_than_recycle_is_replaced(make_alias: Callable[..., str]) -> None:
    alias = make_alias(OPTIONS={"async_pool": {"pool_size": 1, "max_overflow": 0, "recycle": 1}})

    async def pids() -> list[int]:
        seen = []
        for pause in (0, 0, 1.3, 0):
            await asyncio.sleep(pause)
            async with session_scope(using=alias) as session:
                seen.append((await session.execute(text("select pg_backend_pid()"))).scalar_one())
        return seen

    first, again, after, kept = asyncio.run(pids())
    assert first == again, "reused within recycle"
    assert after != first, "replaced once older than recycle (1 s, +-10 %)"
    assert kept == after
