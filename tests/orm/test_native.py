"""The native async ORM (``OPTIONS["async_orm"]``): Django's async QuerySet API with no thread hop.

Every test runs against the real server. The native path and Django's thread path
run on the same alias: the thread path through ``sync_to_async`` of the sync
method, exactly what Django's own ``aget()`` & co. do.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import django
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import SynchronousOnlyOperation
from django.db import (
    DataError,
    IntegrityError,
    OperationalError,
    connections,
    transaction,
)
from django.db.models import Count, F, Max, Q, Sum
from django.db.models.expressions import RawSQL
from django.db.models.signals import m2m_changed, post_save
from django.db.transaction import TransactionManagementError
from django.test import override_settings
from greenlet import getcurrent
from sqlalchemy.util.concurrency import greenlet_spawn

import django_asyncpool
from django_asyncpool import (
    CircuitOpenError,
    DatabaseUnavailable,
    PoolTimeout,
)
from django_asyncpool.config import from_settings
from django_asyncpool.core import process as _process
from django_asyncpool.core import registry as _registry
from django_asyncpool.orm import native as _asyncorm
from django_asyncpool.orm import pool as _ormpool
from django_asyncpool.orm import watchdog as _watchdog
from testproject.shop.models import Note, Order, OrderLine, Product, Tag

from ..conftest import backends, hops, terminate_backends, wait_until

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "replica"])

POOL = {"pool_size": 4, "max_overflow": 0, "timeout": 5}


@pytest.fixture
def native() -> Iterator[str]:
    """Turn ``async_orm`` on for ``default`` (small pool) for one test; return the alias."""
    options = connections["default"].settings_dict["OPTIONS"]
    saved = dict(options)
    options.update(async_orm=True, async_pool=POOL)
    _asyncorm.install()
    yield "default"
    options.clear()
    options.update(saved)


@pytest.fixture
async def shop(native: str) -> dict[str, Any]:
    """Five products, two orders with lines (made through the sync ORM)."""

    def make() -> dict[str, Any]:
        products = [
            Product.objects.create(sku=f"S{i}", name=f"product {i}", price_cents=100 * i)
            for i in range(1, 6)
        ]
        orders = [Order.objects.create(customer=name) for name in ("ann", "bob")]
        for order, (a, b) in zip(orders, ((0, 1), (2, 3)), strict=True):
            for n, product in enumerate((products[a], products[b]), start=1):
                OrderLine.objects.create(
                    order=order, product=product, quantity=n, price_cents=product.price_cents
                )
        return {"products": products, "orders": orders}

    return await sync_to_async(make)()


@pytest.fixture
async def threads() -> Any:
    """Record the thread of every query on ``default`` (native or not)."""
    seen: list[int] = []

    def spy(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append(threading.get_ident())
        return execute(sql, params, many, context)

    with connections["default"].execute_wrapper(spy):
        yield seen


@pytest.fixture
def no_thread_hop(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count Django's ``sync_to_async`` calls in its query and model modules."""
    import django.db.models.base as model_base
    import django.db.models.query as model_query

    calls: list[str] = []
    for module in (model_query, model_base):
        real = module.sync_to_async

        def counting(fn: Any, *args: Any, real: Any = real, **kwargs: Any) -> Any:
            calls.append(getattr(fn, "__name__", repr(fn)))
            return real(fn, *args, **kwargs)

        monkeypatch.setattr(module, "sync_to_async", counting)
    return calls


def plain(value: Any) -> Any:
    """Return ``value`` with model instances as (class, field values): comparable."""
    if hasattr(value, "_meta"):
        fields = {f.attname: getattr(value, f.attname) for f in value._meta.concrete_fields}
        cached = {
            name: plain(obj) for name, obj in sorted(value._state.fields_cache.items()) if obj
        }
        return (type(value).__name__, fields, cached)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value) if not hasattr(value, "_fields") else value
    return value


def P() -> Any:
    return Product.objects.using("default")


def L() -> Any:
    return OrderLine.objects.using("default")


async def collect(aiterable: Any) -> list[Any]:
    return [item async for item in aiterable]


#: name -> (native coroutine, the sync call Django's thread path makes)
READS: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
    "aget": (lambda: P().aget(sku="S3"), lambda: P().get(sku="S3")),
    "afirst": (
        lambda: P().order_by("-price_cents").afirst(),
        lambda: P().order_by("-price_cents").first(),
    ),
    "alast": (lambda: P().order_by("sku").alast(), lambda: P().order_by("sku").last()),
    "aearliest": (
        lambda: Order.objects.using("default").aearliest("created_at", "pk"),
        lambda: Order.objects.using("default").earliest("created_at", "pk"),
    ),
    "alatest": (
        lambda: Order.objects.using("default").alatest("created_at", "pk"),
        lambda: Order.objects.using("default").latest("created_at", "pk"),
    ),
    "aexists": (
        lambda: P().filter(price_cents__gt=400).aexists(),
        lambda: P().filter(price_cents__gt=400).exists(),
    ),
    "acount": (
        lambda: P().filter(Q(sku="S1") | Q(price_cents__gte=300)).acount(),
        lambda: P().filter(Q(sku="S1") | Q(price_cents__gte=300)).count(),
    ),
    "aaggregate": (
        lambda: P().aaggregate(total=Sum("price_cents"), top=Max("price_cents")),
        lambda: P().aggregate(total=Sum("price_cents"), top=Max("price_cents")),
    ),
    "ain_bulk": (
        lambda: P().ain_bulk(["S1", "S4"], field_name="sku"),
        lambda: P().in_bulk(["S1", "S4"], field_name="sku"),
    ),
    "select_related": (
        lambda: L().select_related("order", "product").order_by("pk").afirst(),
        lambda: L().select_related("order", "product").order_by("pk").first(),
    ),
    "annotate": (
        lambda: collect(
            Order.objects.using("default")
            .annotate(n=Count("lines"), q=Sum(F("lines__quantity") * 2))
            .order_by("pk")
            .values("customer", "n", "q")
        ),
        lambda: list(
            Order.objects.using("default")
            .annotate(n=Count("lines"), q=Sum(F("lines__quantity") * 2))
            .order_by("pk")
            .values("customer", "n", "q")
        ),
    ),
    "async for": (lambda: collect(P().order_by("pk")), lambda: list(P().order_by("pk"))),
    "values": (
        lambda: collect(P().order_by("pk").values("sku", "price_cents")),
        lambda: list(P().order_by("pk").values("sku", "price_cents")),
    ),
    "values_list": (
        lambda: collect(P().order_by("pk").values_list("sku", "name")),
        lambda: list(P().order_by("pk").values_list("sku", "name")),
    ),
    "flat": (
        lambda: collect(P().order_by("pk").values_list("sku", flat=True)),
        lambda: list(P().order_by("pk").values_list("sku", flat=True)),
    ),
    "named": (
        lambda: collect(P().order_by("pk").values_list("sku", "price_cents", named=True)),
        lambda: list(P().order_by("pk").values_list("sku", "price_cents", named=True)),
    ),
    "aiterator": (
        lambda: collect(P().order_by("pk").aiterator(chunk_size=2)),
        lambda: list(P().order_by("pk").iterator(chunk_size=2)),
    ),
    "aexplain": (lambda: P().filter(pk=1).aexplain(), lambda: P().filter(pk=1).explain()),
}


@pytest.mark.parametrize("name", list(READS))
async def test_reads_return_what_the_thread_path_returns(
    name: str, shop: Any, threads: list[int], no_thread_hop: list[str]
) -> None:
    native_call, sync_call = READS[name]
    got = await native_call()
    queried = list(threads)
    assert no_thread_hop == []
    assert queried and set(queried) == {threading.get_ident()}  # on the loop's own thread
    expected = await sync_to_async(sync_call)()
    assert set(threads[len(queried) :]) != {threading.get_ident()}  # the thread path: another
    assert plain(got) == plain(expected)


async def test_acontains(shop: Any, no_thread_hop: list[str]) -> None:
    product = shop["products"][0]
    assert await P().filter(price_cents__lt=300).acontains(product) is True
    assert await P().filter(price_cents__gt=300).acontains(product) is False
    assert no_thread_hop == []


async def test_writes_run_natively_and_do_what_the_thread_path_does(
    shop: Any, threads: list[int], no_thread_hop: list[str]
) -> None:
    me = threading.get_ident()
    created = await P().acreate(sku="N1", name="new", price_cents=7)
    assert (await sync_to_async(P().get)(pk=created.pk)).name == "new"
    obj, made = await P().aget_or_create(sku="N1", defaults={"name": "other", "price_cents": 1})
    assert (obj.pk, made) == (created.pk, False)
    obj, made = await P().aget_or_create(sku="N2", defaults={"name": "two", "price_cents": 2})
    assert made and obj.name == "two"
    obj, made = await P().aupdate_or_create(sku="N2", defaults={"name": "deux"})
    assert not made and (await sync_to_async(P().get)(sku="N2")).name == "deux"
    bulk = await P().abulk_create(
        [Product(sku=f"B{i}", name="bulk", price_cents=i) for i in range(3)]
    )
    assert all(p.pk for p in bulk)  # RETURNING ids, as the thread path
    for p in bulk:
        p.price_cents += 10
    assert await P().abulk_update(bulk, ["price_cents"]) == 3
    assert await P().filter(name="bulk").aupdate(name="BULK") == 3
    assert await P().filter(name="BULK").acount() == 3
    deleted = await P().filter(name="BULK").adelete()
    assert deleted == (3, {"shop.Product": 3})
    order = shop["orders"][0]
    order.customer = "ann b."
    await order.asave()
    assert (await sync_to_async(Order.objects.get)(pk=order.pk)).customer == "ann b."
    stale = await Order.objects.using("default").aget(pk=order.pk)
    await sync_to_async(Order.objects.filter(pk=order.pk).update)(customer="changed")
    await stale.arefresh_from_db(using="default")  # the router would pick "replica"
    assert stale.customer == "changed"
    # A cascade: the order's lines go with it, as Django's Collector does.
    assert await order.adelete() == (3, {"shop.OrderLine": 2, "shop.Order": 1})
    assert not await sync_to_async(OrderLine.objects.filter(order_id=order.pk).exists)()
    assert len(threads) >= 15 and set(threads) == {me} and no_thread_hop == []


async def test_errors_are_the_ones_django_raises(make_alias: Any, shop: Any) -> None:
    async def both(native_call: Any, sync_call: Any) -> tuple[BaseException, BaseException]:
        with pytest.raises(Exception) as native_error:
            await native_call()
        with pytest.raises(Exception) as thread_error:
            await sync_to_async(sync_call)()
        return native_error.value, thread_error.value

    pairs = [
        await both(lambda: P().aget(sku="nope"), lambda: P().get(sku="nope")),
        await both(lambda: P().aget(price_cents__gt=0), lambda: P().get(price_cents__gt=0)),
        await both(
            lambda: P().acreate(sku="S1", name="dup", price_cents=1),
            lambda: P().create(sku="S1", name="dup", price_cents=1),
        ),
        await both(
            lambda: P().acreate(sku="X" * 40, name="long", price_cents=1),
            lambda: P().create(sku="X" * 40, name="long", price_cents=1),
        ),
    ]
    kinds = [type(native) for native, _ in pairs]
    assert kinds == [
        Product.DoesNotExist,
        Product.MultipleObjectsReturned,
        IntegrityError,
        DataError,
    ]
    for native_error, thread_error in pairs:
        assert type(native_error) is type(thread_error)
        assert str(native_error) == str(thread_error)
        assert type(native_error.__cause__) is type(thread_error.__cause__)  # psycopg's own
    # A statement cancelled by the server: OperationalError, and the connection goes on.
    slow = make_alias(OPTIONS={"async_orm": True, "options": "-c statement_timeout=50"})
    sleepy = Product.objects.using(slow).annotate(z=RawSQL("pg_sleep(1)", ()))
    with pytest.raises(OperationalError, match="statement timeout"):
        await sleepy.afirst()
    assert await Product.objects.using(slow).acount() == 5


async def test_a_model_with_signal_receivers_falls_back_counted(
    shop: Any, threads: list[int], no_thread_hop: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    heard: list[str] = []

    async def receiver(sender: Any, instance: Any, **kwargs: Any) -> None:
        heard.append(instance.sku)

    stats = _registry.stats("default", _ormpool.SIDE)
    before = stats.fallbacks.get("asave", 0)
    post_save.connect(receiver, sender=Product)
    try:
        product = shop["products"][0]
        product.name = "renamed"
        with caplog.at_level("DEBUG", logger="django_asyncpool"):
            await product.asave()
    finally:
        post_save.disconnect(receiver, sender=Product)
    assert heard == ["S1"]  # Django's thread path ran the async receiver
    assert no_thread_hop == ["save"] and threads == []  # the thread's own connection
    assert stats.fallbacks["asave"] == before + 1
    assert "asave() on 'default' runs in a thread: Product has signal receivers" in caplog.text
    # Without the receiver the same call is native again.
    await product.asave()
    assert set(threads) == {threading.get_ident()} and no_thread_hop == ["save"]
    assert stats.fallbacks["asave"] == before + 1


async def test_a_read_reaching_another_alias_runs_again_in_a_thread(
    shop: Any, threads: list[int]
) -> None:
    # The shop's router sends the prefetch of the lines' products to "replica",
    # which has no async_orm: the read starts natively, then runs in a thread.
    stats = _registry.stats("default", _ormpool.SIDE)
    before = stats.fallbacks.get("__aiter__", 0)
    got = await collect(
        Order.objects.using("default").prefetch_related("lines__product").order_by("pk")
    )
    assert [[line.product.sku for line in o.lines.all()] for o in got] == [
        ["S1", "S2"],
        ["S3", "S4"],
    ]
    assert stats.fallbacks["__aiter__"] == before + 1


async def test_queries_show_in_the_tasks_own_wrapper(shop: Any) -> None:
    own = connections["default"]
    own.force_debug_cursor = True  # as CaptureQueriesContext does (which connects: not here)
    try:
        await P().aget(sku="S2")
        await P().acount()
    finally:
        own.force_debug_cursor = False
    assert [q["sql"].split()[1] for q in own.queries[-2:]] == ['"shop_product"."id",', "COUNT(*)"]


@pytest.mark.parametrize("fast", [True, False], ids=["context variable", "asgiref Local"])
async def test_a_native_call_binds_the_tasks_connection_for_its_length(
    native: str, fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pooled wrapper is ``connections[alias]`` inside the call only: bound through the
    ``Local``'s context variable, or (another asgiref) through the ``Local`` itself."""
    monkeypatch.setattr(_asyncorm, "_FAST", fast and _asyncorm._FAST)
    seen: list[Any] = []

    def inside() -> None:
        seen.append(connections[native])

    async def fresh() -> None:
        await _asyncorm.run(native, inside)
        assert _asyncorm._current(native) is _asyncorm._MISSING  # nothing left bound

    await asyncio.create_task(fresh(), context=contextvars.Context())  # no wrapper yet
    own = connections[native]  # this task's own wrapper, made now
    await _asyncorm.run(native, inside)
    assert connections[native] is own
    assert len(seen) == 2
    assert all(isinstance(wrapper, _ormpool.NativeWrapper) for wrapper in seen)


# -- transactions ------------------------------------------------------------------------


async def test_atomic_commits_and_runs_on_commit_after(shop: Any, threads: list[int]) -> None:
    done: list[tuple[str, bool]] = []
    async with django_asyncpool.atomic():
        await P().acreate(sku="T1", name="in", price_cents=1)
        transaction.on_commit(lambda: done.append(("hook", threading.get_ident() != me)))
        pids = {await pid() for _ in range(3)}
        assert done == []
        # Another connection does not see it yet.
        assert not await sync_to_async(P().filter(sku="T1").exists)()
    assert done == [("hook", True)]  # after the commit, in a thread
    assert len(pids) == 1  # one connection for the whole block
    assert await P().filter(sku="T1").aexists()


me = threading.get_ident()


async def pid() -> int:
    row = (
        await P()
        .annotate(pid=RawSQL("pg_backend_pid()", ()))
        .values_list("pid", flat=True)
        .afirst()
    )
    assert row is not None
    return int(row)


async def test_atomic_rolls_back_on_exception_and_nests_as_savepoints(shop: Any) -> None:
    done: list[str] = []

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with django_asyncpool.atomic(using="default"):
            await P().acreate(sku="R1", name="gone", price_cents=1)
            transaction.on_commit(lambda: done.append("never"))
            raise Boom
    assert not await P().filter(sku="R1").aexists() and done == []

    async with django_asyncpool.atomic():
        await P().acreate(sku="O1", name="outer", price_cents=1)
        with pytest.raises(IntegrityError):
            async with django_asyncpool.atomic():
                await P().acreate(sku="I1", name="inner", price_cents=1)
                await P().acreate(sku="S1", name="duplicate", price_cents=1)
        await P().acreate(sku="O2", name="after", price_cents=1)
    skus = await collect(P().filter(sku__in=["O1", "I1", "O2"]).values_list("sku", flat=True))
    assert sorted(skus) == ["O1", "O2"]

    @django_asyncpool.atomic(durable=True)
    async def decorated() -> int:
        await P().filter(sku="O1").aupdate(name="decorated")
        return 7

    assert await decorated() == 7
    assert (await P().aget(sku="O1")).name == "decorated"

    @django_asyncpool.atomic
    async def bare() -> None:
        await P().filter(sku="O1").aupdate(name="bare")
        raise Boom

    with pytest.raises(Boom):
        await bare()
    assert (await P().aget(sku="O1")).name == "decorated"


async def test_the_transactions_connection_is_the_tasks_own(shop: Any) -> None:
    async with django_asyncpool.atomic():
        await P().acount()
        child = asyncio.create_task(P().acount())
        with pytest.raises(TransactionManagementError, match="atomic\\(\\) block of another task"):
            await child
        # A thread has its own connections (as with Django): not the transaction's.
        assert await sync_to_async(P().count)() == 5
        assert await P().acount() == 5  # still usable by its own task


async def test_sync_orm_in_async_code_is_refused(shop: Any) -> None:
    # Django's rule, in a portal too (a request's view): sync ORM code in a coroutine
    # raises, whether the task's connection is its own or an atomic block's.
    message = "You cannot call this from an async context"
    with pytest.raises(SynchronousOnlyOperation, match=message):
        P().count()
    async with django_asyncpool.atomic():
        await P().acreate(sku="S9", name="kept", price_cents=1)
        with pytest.raises(SynchronousOnlyOperation, match=message):
            P().count()
        with pytest.raises(SynchronousOnlyOperation, match=message):
            list(P().filter(sku="S9"))
        assert await P().filter(sku="S9").acount() == 1  # the block goes on
    assert await P().filter(sku="S9").aexists()  # and commits


async def test_atomic_needs_async_orm(shop: Any) -> None:
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="OPTIONS\\['async_orm'\\] = True"):
        async with django_asyncpool.atomic(using="replica"):
            pass


# -- cancellation, load and outages ---------------------------------------------------------


async def test_cancellation_mid_query_leaks_nothing(shop: Any, pg: Any) -> None:
    dbname = connections["default"].settings_dict["NAME"]
    sleepy = P().annotate(z=RawSQL("pg_sleep(30)", ()))
    for _ in range(3):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sleepy.afirst(), 0.2)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2), django_asyncpool.atomic():
                await P().acreate(sku="C1", name="cancelled", price_cents=1)
                await sleepy.afirst()
    pool = _ormpool.holder("default").pool
    assert pool.get_stats()["pool_available"] == pool.get_stats()["pool_size"]  # all back
    assert backends(pg, dbname, "active") == 0  # the sleeps were cancelled on the server
    assert backends(pg, dbname, "idle in transaction") == 0
    assert not await P().filter(sku="C1").aexists()  # rolled back
    assert await P().acount() == 5


async def test_cancelled_while_the_answer_is_on_its_way(
    shop: Any, pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wait gives the loop a turn right after sending the query; cancelled there,
    # the connection (a result still to read) is discarded, and the next query works.
    assert (await P().aget(sku="S1")).name == "product 1"  # an idle connection: no switch
    holder = _ormpool.holder("default")
    monkeypatch.setattr(holder.pool, "bypass", 60.0)  # no ping at checkout on a slow machine
    invalidated = holder.stats.invalidated
    task = asyncio.create_task(P().aget(sku="S2"))
    await asyncio.sleep(0)  # the task checks out, sends, and yields
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert holder.stats.invalidated == invalidated + 1
    stats = holder.pool.get_stats()
    assert stats["pool_available"] == stats["pool_size"]
    assert (await P().aget(sku="S2")).name == "product 2"
    dbname = connections["default"].settings_dict["NAME"]
    assert wait_until(lambda: backends(pg, dbname, "active") == 0)


async def test_in_a_portal_the_query_runs_in_the_tasks_own_greenlet(
    shop: Any, in_portal: bool
) -> None:
    seen: list[Any] = []

    def spy(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        here = getcurrent()
        seen.append((here, here.__sqlalchemy_greenlet_provider__))  # the query may await
        return execute(sql, params, many, context)

    with connections["default"].execute_wrapper(spy):
        assert await P().acount() == 5
        assert (await P().aget(sku="S1")).name == "product 1"
    mine = getcurrent()
    assert len(seen) == 2 and all(awaits for _, awaits in seen)
    assert not getattr(mine, "__sqlalchemy_greenlet_provider__", False)  # its own code may not
    # In a portal, the task's own greenlet; else one of the watchdog's, kept for the next.
    assert all((g is mine) is in_portal for g, _ in seen)
    assert isinstance(mine, _watchdog.Portal) is in_portal


async def test_32_tasks_share_a_pool_of_4(shop: Any, in_portal: bool) -> None:
    async def work(i: int) -> int:
        total = 0
        for _ in range(10):
            total += len(await collect(P().filter(price_cents__gte=100 * (i % 5))))
            await P().aget(sku=f"S{i % 5 + 1}")
        return total

    # Each task in a portal of its own too (gather's tasks have none): as 32 requests.
    tasks = (_watchdog.portal(work(i)) if in_portal else work(i) for i in range(32))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []
    stats = _ormpool.holder("default").pool.get_stats()
    assert stats["pool_max"] == 4 and stats["pool_size"] <= 4
    assert stats.get("requests_waiting", 0) == 0


async def test_a_tasks_queries_one_after_another_take_one_connection(
    shop: Any, in_portal: bool
) -> None:
    holder = _ormpool.holder("default")
    stats = _registry.stats("default", _ormpool.SIDE)
    await P().acount()
    await asyncio.sleep(0)  # given back to the pool
    assert not holder.pool.parked and len(holder.pool.idle) >= 1
    before = stats.checkouts
    assert (await P().aget(sku="S1")).name == "product 1"
    assert await P().filter(price_cents__gt=100).acount() == 4
    assert stats.checkouts == before + 1  # one checkout for the two
    assert _kept(holder) is not None  # the task's (in a portal, the portal's) till it awaits
    assert connections["default"] is not _kept(holder).wrapper  # the task's own, meanwhile
    assert [p.sku async for p in P().order_by("sku")[:2]] == ["S1", "S2"]  # takes it again
    assert stats.checkouts == before + 1
    # Kept for a task, it counts as available (a waiter would have it at once); a
    # portal's is in use until the step ends (it is given back at once to a waiter too).
    pool_stats = holder.pool.get_stats()
    assert pool_stats["pool_available"] == pool_stats["pool_size"] - in_portal
    await asyncio.sleep(0)  # the task awaits something else: the pool has it back
    assert _kept(holder) is None and len(holder.pool.idle) >= 1
    await P().acount()
    assert stats.checkouts == before + 2


def _kept(holder: Any) -> Any:
    """Return the lease this task keeps between its queries (a portal's, or parked), or None."""
    here = getcurrent()
    if isinstance(here, _watchdog.Portal) and here.leases:
        assert not holder.pool.parked
        return here.leases["default"]
    leases = [lease for task, lease in holder.pool.parked.items() if task is asyncio.current_task()]
    return leases[0] if leases else None


async def test_a_tasks_queries_one_after_another_leave_no_callbacks_behind(
    shop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taking the kept connection again leaves its give-back in the loop's queue, for the
    next check-in: not one callback a query, or the loop would not look idle to the wait
    in the greenlet."""
    from django_asyncpool.orm import idle as _idle

    ready = asyncio.get_running_loop()._ready  # type: ignore[attr-defined]
    seen: list[int] = []  # the live callbacks in the loop's queue at each wait
    real = _idle.wait_here

    def wait_here(conn: Any, fd: int) -> bool:
        seen.append(sum(not handle._cancelled for handle in ready))
        return real(conn, fd)

    monkeypatch.setattr(_idle, "wait_here", wait_here)
    for _ in range(6):
        assert await P().acount() == 5
    assert len(seen) >= 6 and max(seen) <= 1, seen


async def test_a_tasks_queries_one_after_another_wait_in_the_greenlet(
    shop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing else for the loop to do, each query's wait is right in the greenlet:
    a kept connection's give-back, taken back, leaves the loop idle."""
    from django_asyncpool.orm import idle as _idle

    answers: list[bool] = []
    real = _idle.wait_here

    def wait_here(conn: Any, fd: int) -> bool:
        answers.append(real(conn, fd))
        return answers[-1]

    monkeypatch.setattr(_idle, "wait_here", wait_here)
    for _ in range(6):
        assert await P().acount() == 5
    assert answers.count(True) >= 5, answers


async def test_queries_one_after_another_hold_nothing_up(shop: Any, in_portal: bool) -> None:
    """Queries back to back with nothing else for the loop to do hold no one up, even
    in a portal, where they are one slice of the task's code: each wait in the greenlet
    with the loop idle starts it over."""

    def computes() -> None:
        deadline = time.thread_time() + 0.05
        while time.thread_time() < deadline:
            pass

    with override_settings(ASYNCPOOL_LOOP_BLOCKED_MS=5):
        before = dict(_watchdog.blocked)
        started = time.thread_time()
        done = 0
        while time.thread_time() - started < 0.1 or done < 20:
            assert await P().acount() == 5
            done += 1
        assert _watchdog.blocked == before
        # What the task computes after them holds the loop all the same: counted.
        await _watchdog.spawn(computes)
        await asyncio.sleep(0)
    grown = {w: n - before.get(w, 0) for w, n in _watchdog.blocked.items() if n != before.get(w)}
    assert grown == {f"{__name__}.computes": 1}


async def test_a_kept_connection_given_back_in_another_task_goes_back_to_the_pool(
    shop: Any,
) -> None:
    """Taken again by its task (its give-back still due), then checked in by another task
    (an async generator closed elsewhere): the other task's step ends, and it is back."""
    holder = _ormpool.holder("default")
    await asyncio.sleep(0)
    lease = await greenlet_spawn(holder.checkout)
    holder.checkin(lease)  # kept for this task, its give-back due
    assert await greenlet_spawn(holder.checkout) is lease  # taken again: still due
    await asyncio.create_task(_checkin_elsewhere(holder, lease))
    await asyncio.sleep(0)
    assert not holder.pool.parked
    assert lease.conn in holder.pool.idle


def _one_connection(make_alias: Callable[..., str], timeout: float) -> str:
    """Return a new alias with async_orm on and one connection (no overflow)."""
    pool = {"pool_size": 1, "max_overflow": 0, "timeout": timeout}
    return make_alias(OPTIONS={"async_orm": True, "async_pool": pool})


async def _checkin_elsewhere(holder: Any, lease: Any) -> None:
    holder.checkin(lease)
    assert list(holder.pool.parked.values()) == [lease]  # kept for this task, for now


def _as_request(coro: Any, in_portal: bool) -> Any:
    """``coro`` in a portal of its own when the test runs in one (as a request's view)."""
    return _watchdog.portal(coro) if in_portal else coro


async def test_a_kept_connection_goes_back_before_its_task_waits(
    shop: Any, make_alias: Any, in_portal: bool
) -> None:
    # One connection for the alias: a task that keeps it while it waits would starve the other.
    alias = _one_connection(make_alias, timeout=2)
    order: list[str] = []

    async def slow() -> None:
        await Product.objects.using(alias).acount()
        order.append("a: first")
        await asyncio.sleep(0.3)  # not a query: the connection goes back meanwhile
        await Product.objects.using(alias).acount()
        order.append("a: second")

    async def quick() -> None:
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await Product.objects.using(alias).acount()
        order.append(f"b: waited {time.monotonic() - started < 0.2}")

    await asyncio.gather(_as_request(slow(), in_portal), _as_request(quick(), in_portal))
    assert order == ["a: first", "b: waited True", "a: second"]


async def test_a_kept_connection_is_not_taken_again_while_another_task_waits(
    shop: Any, make_alias: Any, in_portal: bool
) -> None:
    # One connection: a task whose queries follow one another with nothing awaited in
    # between would keep it for all of them, the waiting task served last.
    alias = _one_connection(make_alias, timeout=5)
    order: list[str] = []

    async def busy() -> None:
        for _ in range(20):
            await Product.objects.using(alias).acount()
            order.append("a")

    async def other() -> None:
        await asyncio.sleep(0)  # once the busy task has the connection
        await Product.objects.using(alias).acount()
        order.append("b")

    await asyncio.gather(_as_request(busy(), in_portal), _as_request(other(), in_portal))
    assert order.index("b") <= 2, order


async def test_one_connection_serves_a_step_and_what_it_starts(
    shop: Any, make_alias: Any, in_portal: bool
) -> None:
    # A task's connection, kept from one query to the next of a step (in a portal, the
    # portal's), is given back before anything else needs one: the tasks it starts, an
    # atomic block, an iteration over a server-side cursor. One connection serves them all.
    alias = _one_connection(make_alias, timeout=2)
    products = Product.objects.using(alias)

    async def child(sku: str) -> str:
        return (await products.aget(sku=sku)).name

    async def pid() -> int:
        return int(
            await products.annotate(p=RawSQL("pg_backend_pid()", ()))
            .values_list("p", flat=True)
            .afirst()
        )  # type: ignore[arg-type]

    first = await pid()
    assert await products.acount() == 5
    assert await asyncio.gather(child("S1"), child("S2")) == ["product 1", "product 2"]
    assert await products.acount() == 5
    async with django_asyncpool.atomic(using=alias):
        assert await pid() == first  # the same connection, taken for the block
        await products.filter(sku="S1").aupdate(price_cents=7)
    assert await products.acount() == 5
    assert [p.sku async for p in products.order_by("sku").aiterator(chunk_size=2)][:2] == [
        "S1",
        "S2",
    ]
    assert await pid() == first
    assert (await products.aget(sku="S1")).price_cents == 7
    await asyncio.sleep(0)
    stats = _ormpool.holder(alias).pool.get_stats()
    assert stats["pool_available"] == stats["pool_size"] == 1


async def test_a_kept_connection_drained_or_hung_up_on_is_not_used_again(
    sync_reconnects: None, shop: Any, pg: Any
) -> None:
    holder = _ormpool.holder("default")
    await P().acount()
    kept = _kept(holder)
    django_asyncpool.drain(using="default")  # no await: the task's step goes on
    await P().acount()
    now = _kept(holder)
    assert now.conn is not kept.conn and kept.conn.closed  # replaced, as the drain asks
    dbname = connections["default"].settings_dict["NAME"]
    assert terminate_backends(pg, dbname) >= 1
    assert wait_until(lambda: _hinted(now.conn))  # the hang-up watcher saw it (no await)
    assert await P().acount() == 5  # on another connection: nobody saw the dead one
    assert _kept(holder).conn is not now.conn


def _hinted(conn: Any) -> bool:
    from django_asyncpool.core.hangups import maybe_closed

    return maybe_closed(conn)


@pytest.fixture
async def sync_reconnects() -> Any:
    """Afterwards, drop sync_to_async's thread's connections: a restart killed them."""
    yield
    await sync_to_async(connections.close_all)()


@pytest.mark.slow
async def test_server_restart_breaker_and_recovery(
    sync_reconnects: None, shop: Any, make_alias: Any, server_down: Callable[[], None], pg: Any
) -> None:
    alias = make_alias(
        OPTIONS={
            "async_orm": True,
            "async_pool": {"pool_size": 2, "max_overflow": 0, "timeout": 2},
            "circuit_breaker": {"fail_max": 2, "reset_timeout": 1},
            "retry": {"max_tries": 1},
        }
    )
    assert await Product.objects.using(alias).acount() == 5
    server_down()
    with pytest.raises(DatabaseUnavailable):
        await Product.objects.using(alias).aget(sku="S1")
    with pytest.raises(DatabaseUnavailable):
        await Product.objects.using(alias).acount()
    with pytest.raises(CircuitOpenError):
        await Product.objects.using(alias).acount()  # fails fast
    pg.start()
    await asyncio.sleep(1.1)  # the breaker lets a trial through

    async def answers() -> bool:
        try:
            return await Product.objects.using(alias).acount() == 5
        except OperationalError:
            await asyncio.sleep(0.2)
            return False

    for _ in range(25):
        if await answers():
            break
    else:
        pytest.fail("the async ORM did not recover after the restart")
    stats = _registry.stats(alias, _ormpool.SIDE)
    assert stats.failures >= 2 and stats.rejected >= 1


def test_async_orm_must_be_a_boolean() -> None:
    conf = from_settings("x", {"NAME": "db", "OPTIONS": {"async_orm": "yes"}})
    assert conf.async_orm is False
    assert [p.id for p in conf.problems] == ["dbpool.E050"]
    assert from_settings("x", {"NAME": "db", "OPTIONS": {"async_orm": True}}).async_orm
    assert not from_settings("x", {"NAME": "db"}).async_orm


async def test_metrics_render_the_async_orm_pool_and_fallbacks(shop: Any) -> None:
    from prometheus_client import REGISTRY

    from django_asyncpool import metrics

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = value(
        "db_connection_attempts_total", alias="default", pool="async_orm", outcome="success"
    )
    falls = value("db_async_orm_fallbacks_total", alias="default", method="acreate")
    await P().aget(sku="S1")

    async def receiver(sender: Any, **kwargs: Any) -> None:
        pass

    post_save.connect(receiver, sender=Product)
    try:
        await P().acreate(sku="M1", name="m", price_cents=1)
    finally:
        post_save.disconnect(receiver, sender=Product)
    metrics.flush()
    after = value(
        "db_connection_attempts_total", alias="default", pool="async_orm", outcome="success"
    )
    assert after == before + 1
    assert value("db_async_orm_fallbacks_total", alias="default", method="acreate") == falls + 1
    assert value("db_pool_max_size", alias="default", pool="async_orm") == POOL["pool_size"]
    idle = value("db_connection_state", alias="default", pool="async_orm", state="idle")
    assert idle >= 1


def test_a_loop_per_call_gets_its_own_pool_closed_with_it(native: str, pg: Any) -> None:
    # Celery tasks and Django's dev server run each call on a fresh loop.
    dbname = connections["default"].settings_dict["NAME"]

    async def call() -> tuple[int, Any]:
        count = await P().acount()
        return count, _ormpool.holder("default").pool

    before = backends(pg, dbname)
    (n1, pool1), (n2, pool2) = asyncio.run(call()), asyncio.run(call())
    assert n1 == n2 and pool1 is not pool2
    assert pool1.closed and pool2.closed and pool1.size == pool2.size == 0
    assert wait_until(lambda: backends(pg, dbname) <= before)


async def test_an_alias_reset_gets_a_new_pool_on_a_running_loop(shop: Any) -> None:
    """Settings changed (registry.reset): the loop's next query takes the alias's new pool,
    not the one the loop had looked up before."""
    assert await P().acount() == 5
    before = _ormpool.holder("default")
    _registry.reset("default")
    assert await P().acount() == 5
    after = _ormpool.holder("default")
    assert after is not before and after.stats.checkouts >= 1


async def test_a_full_pool_times_out_with_what_to_do(shop: Any, make_alias: Any) -> None:
    alias = _one_connection(make_alias, timeout=0.3)
    stats = _registry.stats(alias, _ormpool.SIDE)
    before = stats.timeouts
    async with django_asyncpool.atomic(using=alias):
        await Product.objects.using(alias).acount()
        other = asyncio.create_task(asyncio.sleep(0))  # a task of its own, no transaction
        await other

        async def elsewhere() -> Any:
            # Made outside the block's context: a task that does not inherit the transaction.
            return await Product.objects.using(alias).aget(sku="S1")

        with pytest.raises(PoolTimeout, match=r"async ORM became free within 0\.3s.*pool_size"):
            await asyncio.get_running_loop().create_task(elsewhere(), context=contextvars.Context())
    assert stats.timeouts == before + 1
    assert (await Product.objects.using(alias).aget(sku="S1")).name == "product 1"


async def test_a_connection_held_too_long_is_logged_once_with_its_taker(
    shop: Any, make_alias: Any, caplog: Any
) -> None:
    alias = make_alias(OPTIONS={"async_orm": True, "async_pool": POOL, "leak_threshold": 0.1})
    stats = _registry.stats(alias, _ormpool.SIDE)
    before = stats.leaks

    async def keep_a_connection() -> None:
        async with django_asyncpool.atomic(using=alias):
            await Product.objects.using(alias).acount()
            await asyncio.sleep(0.6)  # several sweeps past the threshold

    with caplog.at_level(logging.WARNING, logger="django_asyncpool"):
        assert await Product.objects.using(alias).acount() == 5  # given back at once
        assert stats.leaks == before
        await keep_a_connection()
    reports = [r.getMessage() for r in caplog.records if "leak_threshold (0.1s)" in r.getMessage()]
    assert len(reports) == 1, reports
    assert "keep_a_connection" in reports[0]  # the stack of the code that took it
    assert stats.leaks == before + 1


@pytest.mark.slow
async def test_terminated_backends_are_replaced_unseen(
    sync_reconnects: None, shop: Any, pg: Any
) -> None:
    dbname = connections["default"].settings_dict["NAME"]
    await asyncio.gather(*(P().acount() for _ in range(4)))  # four connections, idle
    invalidated = _registry.stats("default", _ormpool.SIDE).invalidated
    assert terminate_backends(pg, dbname) >= 4
    await asyncio.sleep(0.2)  # the kernel reports the hang-ups
    counts = await asyncio.gather(*(P().acount() for _ in range(8)))
    assert counts == [5] * 8  # no caller saw a dead connection
    assert _registry.stats("default", _ormpool.SIDE).invalidated >= invalidated + 1  # replaced


async def test_aiterator_fetches_in_chunks_from_a_server_side_cursor(
    shop: Any, monkeypatch: pytest.MonkeyPatch, threads: list[int]
) -> None:
    named: list[str] = []
    real = _ormpool.NativeWrapper.chunked_cursor

    def chunked_cursor(self: Any) -> Any:
        cursor = real(self)
        named.append(type(cursor.cursor).__name__)
        return cursor

    monkeypatch.setattr(_ormpool.NativeWrapper, "chunked_cursor", chunked_cursor)
    got = [p.sku async for p in P().order_by("pk").aiterator(chunk_size=2)]
    assert got == ["S1", "S2", "S3", "S4", "S5"]
    assert named == ["ServerSideCursor"]  # Django's own named cursor, on the native connection
    assert set(threads) == {threading.get_ident()}


async def test_aprefetch_related_objects(shop: Any, no_thread_hop: list[str]) -> None:
    from django.db.models import aprefetch_related_objects

    stats = _registry.stats("default", _ormpool.SIDE)
    before = stats.fallbacks.get("aprefetch_related_objects", 0)
    orders = await collect(Order.objects.using("default").order_by("pk"))
    # In a transaction on "default" the shop's router reads from "default": native.
    async with django_asyncpool.atomic():
        await aprefetch_related_objects(orders, "lines")
    assert [[line.quantity for line in o.lines.all()] for o in orders] == [[1, 2], [1, 2]]
    assert no_thread_hop == []
    # Outside one it reads from "replica" (no async_orm): the thread path, counted.
    orders = await collect(Order.objects.using("default").order_by("pk"))
    await aprefetch_related_objects(orders, "lines")
    assert [len(o.lines.all()) for o in orders] == [2, 2]
    assert stats.fallbacks["aprefetch_related_objects"] == before + 1
    assert no_thread_hop == ["prefetch_related_objects"]


# -- the caller's transaction: async_to_sync() inside atomic() in a thread -------------------


@pytest.fixture
def locking(native: str) -> str:
    """``native``, and its new connections give up waiting for a lock after 2 s."""
    connections[native].settings_dict["OPTIONS"]["options"] = "-c lock_timeout=2000"
    return native


def on(alias: str) -> Any:
    return Product.objects.using(alias)


def test_async_to_sync_inside_atomic_reads_in_the_callers_transaction(
    locking: str, no_thread_hop: list[str]
) -> None:
    stats = _registry.stats(locking, _ormpool.SIDE)
    checkouts, borrowed = stats.checkouts, _asyncorm.borrowed.get(locking, 0)
    queried: list[int] = []

    def spy(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        queried.append(threading.get_ident())
        return execute(sql, params, many, context)

    async def read(pk: int) -> Product:
        return await on(locking).aget(pk=pk)

    with transaction.atomic(using=locking), connections[locking].execute_wrapper(spy):
        made = on(locking).create(sku="T1", name="uncommitted", price_cents=1)
        got = async_to_sync(read)(made.pk)
    assert got.name == "uncommitted"
    # Natively, on the loop async_to_sync made (not a hop back to this thread, Django's path).
    assert no_thread_hop == []
    assert len(queried) == 2 and queried[1] != threading.get_ident()
    assert _asyncorm.borrowed[locking] == borrowed + 1
    assert stats.checkouts == checkouts  # no pooled connection
    assert connections[locking].allow_thread_sharing is False  # nothing left changed


def test_acreate_there_rolls_back_with_the_callers_transaction(locking: str) -> None:
    async def create() -> Product:
        return await on(locking).acreate(sku="T2", name="rolled back", price_cents=2)

    with pytest.raises(RuntimeError, match="roll back"), transaction.atomic(using=locking):
        made = async_to_sync(create)()
        assert on(locking).filter(pk=made.pk).exists()  # the caller's transaction sees it
        raise RuntimeError("roll back")
    assert not on(locking).filter(sku="T2").exists()


def test_a_row_the_caller_locked_is_no_wait(locking: str) -> None:
    product = on(locking).create(sku="T3", name="committed", price_cents=3)

    async def rename() -> int:
        return await on(locking).filter(pk=product.pk).aupdate(name="renamed")

    started = time.monotonic()
    with transaction.atomic(using=locking):
        on(locking).select_for_update().get(pk=product.pk)  # the caller's row lock
        # On a connection of its own this would wait for the lock: OperationalError in 2 s.
        assert async_to_sync(rename)() == 1
    assert time.monotonic() - started < 1.5
    assert on(locking).get(pk=product.pk).name == "renamed"


async def test_with_no_async_to_sync_above_the_pool_serves(locking: str) -> None:
    """As under uvicorn: another thread's open transaction changes nothing for this task."""
    stats = _registry.stats(locking, _ormpool.SIDE)
    checkouts, borrowed = stats.checkouts, _asyncorm.borrowed.get(locking, 0)
    entered, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with transaction.atomic(using=locking):
            on(locking).create(sku="T4", name="uncommitted", price_cents=4)
            entered.set()
            leave.wait(10)

    holder = asyncio.get_running_loop().run_in_executor(None, hold)
    try:
        await asyncio.to_thread(entered.wait, 10)
        assert _process.transactions  # the cheap gate is open: the full check runs
        assert await on(locking).filter(sku="T4").acount() == 0  # not the thread's transaction
    finally:
        leave.set()
        await holder
    assert stats.checkouts == checkouts + 1
    assert _asyncorm.borrowed.get(locking, 0) == borrowed


async def test_async_to_sync_back_to_a_serving_loop_goes_to_the_callers_thread(
    locking: str,
) -> None:
    """The caller's loop serves others: no blocking I/O on it, Django's path (counted)."""
    stats = _registry.stats(locking, _ormpool.SIDE)
    fallbacks = stats.fallbacks.get("aget", 0)

    async def read(pk: int) -> tuple[str, int]:
        return (await on(locking).aget(pk=pk)).name, threading.get_ident()

    def in_a_thread() -> tuple[str, int, int]:
        with transaction.atomic(using=locking):
            made = on(locking).create(sku="T5", name="uncommitted", price_cents=5)
            name, thread = async_to_sync(read)(made.pk)  # runs on the test's loop
            transaction.set_rollback(True)
        return name, thread, threading.get_ident()

    name, loop_thread, caller = await sync_to_async(in_a_thread)()
    assert name == "uncommitted"
    assert loop_thread == threading.get_ident() != caller
    assert stats.fallbacks["aget"] == fallbacks + 1


# -- related managers, database-only receivers, asave()'s positional arguments ---------------


def stored_lines(order: Order) -> list[tuple[int, int]]:
    return sorted(L().filter(order=order).values_list("product_id", "quantity"))


async def test_related_managers_run_natively(shop: Any, threads: list[int]) -> None:
    products, (ann, bob) = shop["products"], shop["orders"]
    stats = _registry.stats("default", _ormpool.SIDE)
    falls = dict(stats.fallbacks)
    # A generic relation's manager looks its content type up when made (sync, cached), as
    # Django's own async tests: before the first async use.
    await sync_to_async(ContentType.objects.get_for_model)(Order)
    with hops() as seen:
        # A reverse foreign key.
        line = await ann.lines.acreate(product=products[4], quantity=5, price_cents=1)
        got, made = await ann.lines.aget_or_create(product=products[4], defaults={"quantity": 9})
        assert (got.pk, made) == (line.pk, False)
        got, made = await ann.lines.aupdate_or_create(product=products[4], defaults={"quantity": 6})
        assert (got.pk, made, got.quantity) == (line.pk, False, 6)
        await bob.lines.aadd(got, bulk=False)  # moved to bob (a save)
        # Many-to-many, both sides.
        red = await Tag.objects.acreate(name="red")
        await red.products.aadd(products[0], products[1])
        await products[2].tags.aadd(red)
        blue, made = await products[0].tags.aget_or_create(name="blue")
        assert made
        await red.products.aremove(products[1])
        await blue.products.aset([products[3]], clear=False)  # products[0] removed, [3] added
        green = await products[4].tags.acreate(name="green")
        await green.products.aclear()
        # A generic relation.
        note = await ann.notes.acreate(text="call back")
        await ann.notes.aupdate_or_create(text="call back", defaults={"text": "called"})
        other = await bob.notes.acreate(text="gift")
        await ann.notes.aadd(other)  # moved to ann
        await ann.notes.aremove(note)  # deleted (a generic relation's remove)
    assert seen == [] and set(threads) == {threading.get_ident()}
    assert stats.fallbacks == falls

    def stored() -> Any:
        tags = {t.name: sorted(p.sku for p in t.products.all()) for t in Tag.objects.all()}
        notes = sorted(Note.objects.values_list("text", "object_id"))
        return stored_lines(ann), stored_lines(bob), tags, notes

    lines_ann, lines_bob, tags, notes = await sync_to_async(stored)()
    assert lines_ann == [(products[0].pk, 1), (products[1].pk, 2)]
    assert lines_bob == [(products[2].pk, 1), (products[3].pk, 2), (products[4].pk, 6)]
    assert tags == {"red": ["S1", "S3"], "blue": ["S4"], "green": []}
    assert notes == [("gift", ann.pk)]


def audited(sender: Any, **kwargs: Any) -> None:
    """A receiver that queries the database (and only it)."""
    heard.append((kwargs.get("action") or "saved", Product.objects.using("default").count()))


heard: list[tuple[str, int]] = []


async def test_receivers_listed_as_database_only_run_natively(
    shop: Any, threads: list[int]
) -> None:
    product = shop["products"][0]
    stats = _registry.stats("default", _ormpool.SIDE)
    post_save.connect(audited, sender=Product)
    m2m_changed.connect(audited, sender=Tag.products.through)
    heard.clear()
    try:
        with override_settings(ASYNCPOOL_DATABASE_ONLY=[f"{__name__}.audited"]):
            falls = dict(stats.fallbacks)
            with hops() as seen:
                await product.asave()
                await P().acreate(sku="A1", name="audited", price_cents=1)
                tag = await Tag.objects.acreate(name="audited")
                await tag.products.aadd(product)
            assert seen == [] and stats.fallbacks == falls
            assert heard == [("saved", 5), ("saved", 6), ("pre_add", 6), ("post_add", 6)]
            assert set(threads) == {threading.get_ident()}  # the receiver's query too

            # An unlisted receiver beside it: the thread path, counted.
            def unknown(sender: Any, **kwargs: Any) -> None:
                pass

            post_save.connect(unknown, sender=Product)
            try:
                with hops() as seen:
                    await product.asave()
            finally:
                post_save.disconnect(unknown, sender=Product)
            assert seen == ["Model.save"] and stats.fallbacks["asave"] == falls.get("asave", 0) + 1
        # Not listed: the thread path.
        with hops() as seen:
            await tag.products.aremove(product)
        assert [name.rsplit(".", 1)[-1] for name in seen] == ["remove"]
    finally:
        post_save.disconnect(audited, sender=Product)
        m2m_changed.disconnect(audited, sender=Tag.products.through)


@pytest.mark.skipif(django.VERSION >= (6, 0), reason="Django 6 takes no positional arguments")
async def test_asave_positional_arguments_warn_at_the_callers_line(shop: Any) -> None:
    from django.utils.deprecation import RemovedInDjango60Warning

    product = shop["products"][0]
    product.name = "renamed"
    with hops() as seen, pytest.warns(RemovedInDjango60Warning, match="asave") as caught:
        await product.asave(False, False, None, ["name"])
    assert [w.filename for w in caught] == [__file__] and seen == []
    assert (await P().aget(pk=product.pk)).name == "renamed"
    with pytest.warns(RemovedInDjango60Warning), pytest.raises(TypeError, match="multiple"):
        await product.asave(False, force_insert=True)


async def test_djangos_own_harmless_receivers_keep_deletes_native(shop: Any) -> None:
    from django.db.models.signals import pre_delete

    def clear_site_cache(sender: Any, **kwargs: Any) -> None:
        pass  # a stand-in for django.contrib.sites' own (that app is not installed here)

    clear_site_cache.__module__ = "django.contrib.sites.models"
    clear_site_cache.__qualname__ = "clear_site_cache"
    pre_delete.connect(clear_site_cache, sender=Order)
    try:
        with hops() as seen:
            await P().filter(sku="S5").adelete()
    finally:
        pre_delete.disconnect(clear_site_cache, sender=Order)
    assert seen == []


async def test_async_for_over_a_raw_query(shop: Any, threads: list[int]) -> None:
    raw = P().raw("SELECT * FROM shop_product WHERE price_cents > %s ORDER BY id", [200])
    with hops() as seen:
        skus = [p.sku async for p in raw]
        again = [p.sku async for p in raw]  # evaluated already: no query
    assert skus == again == ["S3", "S4", "S5"] and seen == [] and len(threads) == 1
