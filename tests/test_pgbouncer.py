"""PgBouncer in transaction-pooling mode: OPTIONS["pgbouncer"] = True, against a real pgbouncer.

The bouncer has fewer server connections than the clients have concurrent
transactions, so consecutive transactions of one client connection run on
different server connections: anything session-level (named prepared
statements, SET, WITH HOLD cursors) would break, and the test would see it.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Iterator

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, transaction
from sqlalchemy import text

from django_asyncpool import ConnectionPool, ReadOnlyError, session_scope
from django_asyncpool.config import from_settings
from django_asyncpool.sqla.engines import connect_kwargs
from testproject import pgserver
from testproject.shop.models import Product

from . import pgbouncer

SERVER_POOL = 3  # pgbouncer's server connections
CLIENTS = 12  # concurrent clients on each side: four times as many


@pytest.fixture
def bouncer(pg: pgserver.LocalPostgres) -> Iterator[pgbouncer.PgBouncer]:
    if pgbouncer.binary() is None:
        pytest.skip("pgbouncer is not installed: apt-get install pgbouncer (CI installs it)")
    b = pgbouncer.PgBouncer(pg, pool_size=SERVER_POOL)
    yield b
    b.stop()


def _connect(alias: str) -> None:
    """Take a connection from the pool, as ensure_connection() would.

    Django's per-test guard patches ensure_connection() to refuse aliases the test
    case did not declare (this one is made during the test); connect() is not guarded.
    """
    connections[alias].close()
    connections[alias].connect()


def _settings(**options: object) -> dict[str, object]:
    return {
        "ENGINE": "django_asyncpool",
        "NAME": "app",
        "USER": "app",
        "PASSWORD": "",
        "HOST": "db",
        "PORT": "",
        "OPTIONS": {"pgbouncer": True, **options},
    }


def test_the_switch_turns_off_session_state_and_refuses_what_cannot_work(make_wrapper) -> None:
    config = from_settings("default", _settings(), {})
    assert config.pgbouncer and config.problems == ()
    assert connect_kwargs(config)["statement_cache_size"] == 0
    wrapper = make_wrapper(OPTIONS={"pgbouncer": True})
    assert wrapper.settings_dict["DISABLE_SERVER_SIDE_CURSORS"] is True
    assert wrapper.get_connection_params()["prepare_threshold"] is None

    refused = from_settings(
        "default",
        {
            **_settings(prepare_threshold=5, assume_role="admin", options="-c work_mem=64MB"),
            "DISABLE_SERVER_SIDE_CURSORS": False,
        },
        {},
    )
    keys = {p.key for p in refused.problems if p.id == "dbpool.E020"}
    assert keys == {
        "OPTIONS['prepare_threshold']",
        "OPTIONS['assume_role']",
        "OPTIONS['options']",
        "DISABLE_SERVER_SIDE_CURSORS",
    }
    assert all("transaction pooling" in p.message for p in refused.problems)
    # the same settings without the switch are fine
    assert not from_settings("default", {"ENGINE": "django_asyncpool", "NAME": "app"}, {}).problems


def test_a_refused_setting_stops_the_connection_with_what_to_do(make_wrapper, bouncer) -> None:
    wrapper = make_wrapper(
        HOST=bouncer.host,
        PORT=bouncer.port,
        OPTIONS={"pgbouncer": True, "prepare_threshold": 1, "pool": {"min_size": 0}},
    )
    with pytest.raises(ImproperlyConfigured, match=r"prepare_threshold.*Remove"):
        wrapper.ensure_connection()


@pytest.mark.django_db(transaction=True)
def test_orm_and_session_scope_traffic_through_transaction_pooling(make_alias, bouncer) -> None:
    alias = make_alias(
        HOST=bouncer.host,
        PORT=bouncer.port,
        OPTIONS={
            "pgbouncer": True,
            "pool": {"min_size": 0, "max_size": CLIENTS, "timeout": 20},
            "async_pool": {"pool_size": CLIENTS, "max_overflow": 0, "timeout": 20},
        },
    )
    _connect(alias)
    Product.objects.using(alias).bulk_create(
        Product(sku=f"B{i}", name=f"bounced {i}", price_cents=i) for i in range(1, 51)
    )
    errors: collections.Counter[str] = collections.Counter()
    pids: set[int] = set()
    done = collections.Counter[str]()

    def orm_client(n: int) -> None:
        _connect(alias)
        try:
            for i in range(15):
                qs = Product.objects.using(alias)
                assert qs.filter(sku=f"B{1 + (n + i) % 50}").count() == 1
                with transaction.atomic(using=alias):
                    p = qs.select_for_update().get(sku=f"B{1 + (n + i) % 50}")
                    p.price_cents += 1
                    p.save(using=alias)
                assert sum(1 for _ in qs.order_by("id").iterator(chunk_size=10)) >= 50
                with connections[alias].cursor() as cursor:
                    cursor.execute("select pg_backend_pid(), %s::int", [i])
                    pids.add(cursor.fetchone()[0])
                done["orm"] += 1
                _connect(alias)  # back to the pool and out again: it may be another one
        except Exception as exc:
            errors[f"orm {type(exc).__name__}: {exc}"] += 1
        finally:
            connections[alias].close()

    async def async_client(n: int) -> None:
        pool = ConnectionPool(alias)
        try:
            for i in range(15):
                pk = 1 + (n + i) % 50
                async with session_scope(alias) as session:
                    row = await session.execute(
                        text("select name, pg_backend_pid() from shop_product where sku = :s"),
                        {"s": f"B{pk}"},
                    )
                    pids.add(row.one()[1])
                    await session.execute(
                        text(
                            "update shop_product set price_cents = price_cents + 1 where sku = :s"
                        ),
                        {"s": f"B{pk}"},
                    )
                async with session_scope(alias, readonly=True) as session:
                    count = await session.execute(
                        text("select count(*) from shop_product where price_cents > :c"), {"c": i}
                    )
                    assert count.scalar_one() >= 1
                async with pool.connection() as conn:
                    assert await conn.fetchval("select $1::int * 2", pk) == 2 * pk
                done["async"] += 1
        except Exception as exc:
            errors[f"async {type(exc).__name__}: {exc}"] += 1

    async def async_side() -> None:
        await asyncio.gather(*(async_client(n) for n in range(CLIENTS)))
        await ConnectionPool(alias).close()

    threads = [threading.Thread(target=orm_client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    asyncio.run(async_side())
    for t in threads:
        t.join(60)

    prepared = sum(v for k, v in errors.items() if "prepared statement" in k.lower())
    print(
        f"\npgbouncer transaction pooling: {CLIENTS} ORM threads + {CLIENTS} async tasks over "
        f"{SERVER_POOL} server connections; units done {dict(done)}; server backends seen "
        f"{len(pids)}; errors {sum(errors.values())} (prepared-statement errors {prepared})"
    )
    assert prepared == 0
    assert not errors, list(errors.items())[:3]
    assert done == {"orm": CLIENTS * 15, "async": CLIENTS * 15}
    assert len(pids) <= SERVER_POOL  # everything went through the bouncer's few servers


@pytest.mark.django_db(transaction=True)
def test_readonly_scope_refuses_writes_behind_pgbouncer(make_alias, bouncer) -> None:
    alias = make_alias(HOST=bouncer.host, PORT=bouncer.port, OPTIONS={"pgbouncer": True})

    async def write() -> None:
        try:
            async with session_scope(alias, readonly=True) as session:
                await session.execute(
                    text("insert into shop_product (sku, name, price_cents) values ('RO', 'x', 1)")
                )
        finally:
            await ConnectionPool(alias).close()

    with pytest.raises(ReadOnlyError):
        asyncio.run(write())
