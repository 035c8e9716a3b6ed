"""The native async ORM against the sync ORM: the same queries, the same answers (issue 15).

Every query runs twice on one alias with ``OPTIONS["async_orm"]`` on: through the sync
ORM in a thread (``sync_to_async``, Django's own path) and through Django's async API
(``async for``, ``aget``, ``acount``, ``acreate``, ...), which that option makes native.
The two results must be equal down to the types and reprs of every value, on the
model of ``testproject.fieldzoo`` (every concrete field type of the postgresql
backend), under three time-zone settings.

Before the package knows ``OPTIONS["async_orm"]`` both sides take the thread path and
the test checks that it sees the thread hop; once it does, every async call here must
run without one (:func:`hops` records ``sync_to_async`` calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.postgres.aggregates import ArrayAgg, BoolOr, JSONBAgg
from django.db import connections, models, transaction
from django.db.backends.postgresql.psycopg_any import DateRange, DateTimeTZRange, NumericRange
from django.db.models import (
    Avg,
    BinaryField,
    Case,
    CharField,
    Count,
    DateField,
    Exists,
    F,
    IntegerField,
    JSONField,
    Max,
    Min,
    OuterRef,
    Q,
    QuerySet,
    StdDev,
    Subquery,
    Sum,
    Value,
    When,
    Window,
)
from django.db.models.fields.json import KT
from django.db.models.functions import (
    Cast,
    Coalesce,
    Concat,
    ExtractHour,
    ExtractIsoWeekDay,
    ExtractYear,
    Left,
    Length,
    Rank,
    TruncDay,
    Upper,
)
from django.test import override_settings
from django.utils import timezone

from django_asyncpool import config as _config
from django_asyncpool.core import registry as _registry
from testproject.fieldzoo.models import Country, Maker, Specimen
from tests.conftest import add_alias, hops, remove_alias

#: The package runs Django's async QuerySet API natively when it knows this option.
NATIVE = "async_orm" in _config.OUR_KEYS

#: (USE_TZ, TIME_ZONE, the alias's own TIME_ZONE): UTC; a database time zone that is not
#: UTC with aware datetimes (+05:45, so dates and hours move); naive local datetimes.
TZ_CONFIGS = {
    "utc": (True, "UTC", None),
    "aware-db-kathmandu": (True, "UTC", "Asia/Kathmandu"),
    "naive-new-york": (False, "America/New_York", None),
}

#: JSON's null in a filter: JSONNull() since Django 6.1, which deprecates None for it.
JSON_NULL: Any = models.JSONNull() if hasattr(models, "JSONNull") else None

#: Django 6.0 made StringAgg general (and deprecated the postgres one).
StringAgg: Any = getattr(models, "StringAgg", None)
if StringAgg is None:
    from django.contrib.postgres.aggregates import StringAgg


def moment(*args: int) -> dt.datetime:
    """Return a datetime as the current settings want it: aware in UTC, or naive."""
    value = dt.datetime(*args, tzinfo=dt.UTC)  # type: ignore[misc]
    if timezone.is_naive(timezone.now()):
        return timezone.make_naive(value, timezone.get_default_timezone())
    return value


# -- the zoo ---------------------------------------------------------------------------------


def full_row() -> dict[str, Any]:
    """Return the values of a specimen with every field set to an ordinary value."""
    return {
        "char": "Alpha",
        "text": "The quick brown fox",
        "slug": "alpha",
        "email": "a@example.com",
        "url": "https://example.com/a",
        "file": "uploads/a.txt",
        "integer": 7,
        "big_integer": 2**40,
        "small_integer": 3,
        "positive_integer": 10,
        "positive_big_integer": 2**50,
        "positive_small_integer": 5,
        "float": 1.5,
        "decimal": Decimal("12.34"),
        "boolean": True,
        "null_boolean": False,
        "date": dt.date(2024, 2, 29),
        "time": dt.time(13, 45, 7, 123456),
        # late in the evening (UTC): another day in Kathmandu
        "datetime": moment(2024, 2, 29, 23, 30, 15, 654321),
        "duration": dt.timedelta(days=1, seconds=5, microseconds=7),
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "json": {"a": 1, "b": [1, "x", None, True], "nested": {"c": 1.5, "d": "ü"}},
        "binary": b"\x00\x01\xff",
        "ip": "192.168.0.1",
        "ints": [1, 2, 3],
        "grid": [["a", "b"], ["c", "d"]],
        "int_range": NumericRange(1, 10),
        "big_range": NumericRange(2**40, None),
        "decimal_range": NumericRange(Decimal("1.5"), Decimal("2.5"), "(]"),
        "date_range": DateRange(dt.date(2024, 1, 1), dt.date(2024, 12, 31)),
        "datetime_range": DateTimeTZRange(moment(2024, 1, 1), moment(2024, 6, 1, 12)),
    }


def zoo_rows(makers: dict[str, Maker]) -> dict[str, dict[str, Any]]:
    """Return the specimens by name: ordinary, extreme, empty and grouping rows."""
    rows = {
        "full": {**full_row(), "maker": makers["acme"]},
        "edge": {
            "char": "Ωmega 🦄",
            "text": "",
            "slug": "omega",
            "email": "ω@example.org",
            "url": "http://[::1]:8000/x?y=1",
            "file": "",
            "integer": -(2**31),
            "big_integer": -(2**63),
            "small_integer": -32768,
            "positive_integer": 2**31 - 1,
            "positive_big_integer": 2**63 - 1,
            "positive_small_integer": 32767,
            "float": math.inf,
            "decimal": Decimal("-12345678901234567890.0123456789"),
            "boolean": False,
            "null_boolean": True,
            "date": dt.date(1, 1, 1),
            "time": dt.time(0, 0),
            "datetime": moment(1900, 1, 1, 0, 0, 0, 1),
            "duration": -dt.timedelta(days=3, microseconds=1),
            "uuid": uuid.UUID(int=0),
            "json": [1, 2.5, "x", {"k": None}, 2**70],
            "binary": b"",
            "ip": "2001:db8::1",
            "ints": [None, -1],
            "grid": [],
            "int_range": NumericRange(empty=True),
            "big_range": NumericRange(None, 0),
            "decimal_range": NumericRange(None, None),
            "date_range": DateRange(dt.date(2020, 1, 1), dt.date(2020, 1, 2), "[]"),
            "datetime_range": DateTimeTZRange(None, moment(2000, 1, 1)),
            "maker": makers["kaiju"],
        },
        "nulls": {
            "char": "nulls",
            "slug": "nulls",
            "url": "",
            "big_integer": 0,
            "small_integer": 0,
            "positive_integer": 0,
            "positive_big_integer": 0,
            "positive_small_integer": 0,
            "boolean": False,
        },
        "json-null": {**full_row(), "char": "Beta", "json": Value(None, JSONField())},
        "json-string": {**full_row(), "char": "Beta", "json": "just text"},
        "nan": {**full_row(), "float": math.nan, "maker": makers["loner"]},
    }
    for i in range(6):  # something to group, count and order
        rows[f"g{i}"] = {
            **full_row(),
            "char": ("Alpha", "Beta", "gamma")[i % 3],
            "integer": i,
            "decimal": Decimal(i) / 3,
            "datetime": moment(2024, 3, 1, i * 4, i),
            "json": {"a": i % 3, "tag": f"t{i}"},
            "ints": [i, i + 1],
            "ip": f"10.0.0.{i}",
            "maker": (makers["acme"], makers["kaiju"], makers["loner"], None)[i % 4],
        }
    return rows


#: The makers of the zoo, and their countries.
MAKERS = {"acme": "SE", "kaiju": "JP", "loner": None}


@dataclass
class Zoo:
    """The ids of the zoo's rows: ``zoo["full"]`` (a specimen), ``zoo["maker:acme"]``."""

    makers: dict[str, int]
    specimens: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, name: str) -> int:
        return self.makers[name] if name.startswith("maker:") else self.specimens[name]


@pytest.fixture(scope="module")
def zoo(django_db_setup: Any, django_db_blocker: Any) -> Iterator[Zoo]:
    """The specimens, committed for the whole module (both paths read them)."""
    if not connections["default"].settings_dict["NAME"].startswith("test_"):
        pytest.fail("No test database: select test_the_zoo_is_in_the_test_database too.")
    with django_db_blocker.unblock():
        se = Country.objects.create(code="SE")
        jp = Country.objects.create(code="JP")
        countries = {"SE": se, "JP": jp, None: None}
        makers = {
            name: Maker.objects.create(name=name.title(), country=countries[code])
            for name, code in MAKERS.items()
        }
        made = Zoo({f"maker:{name}": maker.pk for name, maker in makers.items()})
        for name, values in zoo_rows(makers).items():
            made.specimens[name] = Specimen.objects.create(**values).pk
        try:
            yield made
        finally:
            Specimen.objects.all().delete()
            Maker.objects.all().delete()
            Country.objects.all().delete()
            connections["default"].close()


# Not on the whole module: Django's TestCase refuses other aliases and other threads.
@pytest.mark.django_db
def test_the_zoo_is_in_the_test_database(zoo: Zoo) -> None:
    """Make pytest-django create the test database (it does so for marked tests only)."""
    assert Specimen.objects.count() == len(zoo.specimens) == 12


@pytest.fixture(scope="module", params=list(TZ_CONFIGS))
def alias(request: pytest.FixtureRequest, zoo: Zoo) -> Iterator[str]:
    """An alias on the test database with ``async_orm`` on, under one time-zone setting."""
    use_tz, time_zone, db_time_zone = TZ_CONFIGS[request.param]
    with override_settings(USE_TZ=use_tz, TIME_ZONE=time_zone):
        options = {**connections["default"].settings_dict["OPTIONS"], "async_orm": True}
        name = add_alias(OPTIONS=options, TIME_ZONE=db_time_zone)
        try:
            yield name
        finally:
            asyncio.run(sync_to_async(lambda: connections[name].close())())  # the thread path's
            remove_alias(name)


# -- running a query both ways ---------------------------------------------------------------


def snapshot(value: Any) -> Any:
    """Return a comparable form of a result: types and reprs, model instances field by field.

    A model instance gives what it loaded (``__dict__``: fields, annotations), its
    ``_state`` and the related instances select_related() cached, recursively.
    """
    if isinstance(value, Specimen | Maker | Country):
        return (
            type(value).__name__,
            value._state.db,
            value._state.adding,
            {k: snapshot(v) for k, v in sorted(vars(value).items()) if k != "_state"},
            {k: snapshot(v) for k, v in sorted(value._state.fields_cache.items())},
        )
    if isinstance(value, dict):
        return ("dict", [(snapshot(k), snapshot(v)) for k, v in value.items()])
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # values_list(named=True)
        return ("Row", value._fields, [snapshot(v) for v in value])
    if isinstance(value, list | tuple):
        return (type(value).__name__, [snapshot(v) for v in value])
    if isinstance(value, memoryview):
        return ("memoryview", bytes(value))
    return (type(value).__name__, repr(value))


def outcome(run: Callable[[], Any]) -> Any:
    """Return ``("ok", snapshot)`` of what ``run`` returns, or the exception it raises."""
    try:
        return ("ok", snapshot(run()))
    except Exception as exc:
        return ("raised", type(exc).__module__, type(exc).__qualname__, str(exc))


async def aoutcome(run: Callable[[], Awaitable[Any]]) -> Any:
    """:func:`outcome` of a coroutine."""
    try:
        return ("ok", snapshot(await run()))
    except Exception as exc:
        return ("raised", type(exc).__module__, type(exc).__qualname__, str(exc))


async def in_thread(alias: str, run: Callable[[], Any]) -> Any:
    """Return :func:`outcome` of ``run`` on the thread path, the connection back afterwards."""

    def call() -> Any:
        try:
            return outcome(run)
        finally:
            connections[alias].close()

    return await sync_to_async(call)()


async def natively(alias: str, run: Callable[[], Awaitable[Any]]) -> Any:
    """Return :func:`aoutcome` of ``run``, checking that it took the native path.

    Native: no ``sync_to_async``, every query on this (the loop's) thread, and no
    checkout from the alias's sync pool (the thread path's only way to the database).
    """
    sync_pool = _registry.stats(alias, "sync")
    attempts = sync_pool.attempts
    threads: list[int] = []

    def where(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        threads.append(threading.get_ident())
        return execute(sql, params, many, context)

    with hops() as seen, connections[alias].execute_wrapper(where):
        result = await aoutcome(run)
    if NATIVE:
        assert seen == [], f"thread hops on the native path: {seen}"
        assert set(threads) <= {threading.get_ident()}, "a query ran in another thread"
        assert sync_pool.attempts == attempts, "the sync pool was used"
    else:
        assert seen, "the thread path hops through sync_to_async: the spy saw nothing"
    return result


# -- read queries ----------------------------------------------------------------------------

Build = Callable[[QuerySet[Specimen], Zoo], Any]


@dataclass(frozen=True)
class Read:
    """A query (``build``) and how it is run: ``op`` "list", "iterator" or a terminal."""

    name: str
    build: Build
    op: str = "list"
    args: Callable[[Zoo], tuple[Any, ...]] = lambda zoo: ()
    kwargs: Callable[[Zoo], dict[str, Any]] = lambda zoo: {}
    #: Whether the query raises (both sides must); None: it returns nothing, and no error.
    raises: bool | None = False


READS = [
    # rows, related rows
    Read("all", lambda q, z: q.order_by("pk")),
    Read("select_related_chain", lambda q, z: q.select_related("maker__country").order_by("pk")),
    Read("select_related_one", lambda q, z: q.select_related("maker").order_by("-pk")),
    Read(
        "only",
        lambda q, z: (
            q.only("char", "decimal", "maker__name").select_related("maker").order_by("pk")
        ),
    ),
    Read("defer", lambda q, z: q.defer("json", "binary").order_by("pk")),
    Read(
        "other_model",
        lambda q, z: Maker.objects.using(q.db).select_related("country").order_by("name"),
    ),
    # filters and lookups
    Read("exact", lambda q, z: q.filter(char="Alpha").order_by("pk")),
    Read("iexact_unicode", lambda q, z: q.filter(char__iexact="ωMEGA 🦄")),
    Read("icontains", lambda q, z: q.filter(text__icontains="QUICK").order_by("pk")),
    Read(
        "startswith_or_regex",
        lambda q, z: q.filter(Q(slug__startswith="al") | Q(char__regex=r"^Ω")),
    ),
    Read("in", lambda q, z: q.filter(integer__in=[7, -(2**31), 3]).order_by("pk")),
    Read("in_empty", lambda q, z: q.filter(pk__in=[]), raises=None),
    Read("range", lambda q, z: q.filter(integer__range=(0, 10)).order_by("pk")),
    Read(
        "range_datetime",
        lambda q, z: q.filter(
            datetime__range=(moment(2024, 1, 1), moment(2024, 3, 1, 12))
        ).order_by("pk"),
    ),
    Read("isnull_fk", lambda q, z: q.filter(maker__isnull=True).order_by("pk")),
    Read("isnull_null_boolean", lambda q, z: q.filter(null_boolean__isnull=True)),
    Read("gt_decimal", lambda q, z: q.filter(decimal__gt=Decimal("0.5")).order_by("pk")),
    Read("lt_float", lambda q, z: q.filter(float__lt=2).order_by("pk")),
    Read("uuid", lambda q, z: q.filter(uuid=uuid.UUID(int=0))),
    Read("ip", lambda q, z: q.filter(ip="2001:db8::1")),
    Read("binary", lambda q, z: q.filter(binary=b"\x00\x01\xff").order_by("pk")),
    Read("duration", lambda q, z: q.filter(duration__gt=dt.timedelta(0)).order_by("pk")),
    # JSON
    Read("json_contains", lambda q, z: q.filter(json__contains={"a": 1}).order_by("pk")),
    Read("json_key", lambda q, z: q.filter(json__a=2)),
    Read("json_nested_key", lambda q, z: q.filter(json__nested__d="ü").order_by("pk")),
    Read("json_index", lambda q, z: q.filter(json__b__1="x").order_by("pk")),
    Read("json_has_key", lambda q, z: q.filter(json__has_key="tag").order_by("pk")),
    Read("json_string", lambda q, z: q.filter(json="just text")),
    Read("json_null", lambda q, z: q.filter(json=JSON_NULL)),
    Read("json_sql_null", lambda q, z: q.filter(json__isnull=True)),
    # arrays and ranges
    Read("array_contains", lambda q, z: q.filter(ints__contains=[1]).order_by("pk")),
    Read("array_overlap", lambda q, z: q.filter(ints__overlap=[3, -1]).order_by("pk")),
    Read("array_len", lambda q, z: q.filter(ints__len=2).order_by("pk")),
    Read("array_index", lambda q, z: q.filter(ints__0=1).order_by("pk")),
    Read("array_nested", lambda q, z: q.filter(grid__0__1="b").order_by("pk")),
    Read("array_slice", lambda q, z: q.values_list("pk", "ints__0_2", "grid__0").order_by("pk")),
    Read("range_contains", lambda q, z: q.filter(int_range__contains=3).order_by("pk")),
    Read("range_contained_by", lambda q, z: q.filter(int_range__contained_by=NumericRange(0, 100))),
    Read("range_isempty", lambda q, z: q.filter(int_range__isempty=True)),
    Read("range_startswith", lambda q, z: q.filter(big_range__startswith=2**40).order_by("pk")),
    Read(
        "date_range_overlap",
        lambda q, z: q.filter(
            date_range__overlap=DateRange(dt.date(2020, 1, 2), dt.date(2020, 2, 1))
        ),
    ),
    Read(
        "datetime_range_contains",
        lambda q, z: q.filter(datetime_range__contains=moment(2024, 3, 1)).order_by("pk"),
    ),
    # date and time transforms: the time zone decides the answers
    Read("date_year", lambda q, z: q.filter(date__year=2024).order_by("pk")),
    Read("datetime_date", lambda q, z: q.filter(datetime__date=dt.date(2024, 3, 1)).order_by("pk")),
    Read("datetime_hour", lambda q, z: q.filter(datetime__hour__in=[23, 18, 5]).order_by("pk")),
    Read("datetime_week_day", lambda q, z: q.filter(datetime__week_day__in=[5, 6]).order_by("pk")),
    Read("time_hour", lambda q, z: q.filter(time__hour__gte=12).order_by("pk")),
    Read("dates", lambda q, z: q.dates("date", "month")),
    Read("datetimes", lambda q, z: q.datetimes("datetime", "hour")),
    # F expressions
    Read(
        "f_compare", lambda q, z: q.filter(positive_integer__gt=F("small_integer")).order_by("pk")
    ),
    Read(
        "f_arithmetic",
        lambda q, z: q.annotate(
            x=F("big_integer") / 3 + F("small_integer"),
            d=F("decimal") * F("positive_small_integer"),
        ).order_by("pk"),
    ),
    Read(
        "f_related",
        lambda q, z: q.annotate(code=F("maker__country__code")).filter(code="SE").order_by("pk"),
    ),
    Read("f_duration", lambda q, z: q.annotate(later=F("datetime") + F("duration")).order_by("pk")),
    # Case/When, Value() of every kind, casts
    Read(
        "case_when",
        lambda q, z: q.annotate(
            kind=Case(
                When(integer__gt=5, then=Value("big")),
                When(integer__isnull=True, then=Value("none")),
                default=Value("small"),
            )
        ).order_by("kind", "pk"),
    ),
    Read(
        "values_typed",
        lambda q, z: q.annotate(
            v_dec=Value(Decimal("1.10")),
            v_uuid=Value(uuid.UUID(int=5)),
            v_json=Value({"k": [1, None]}, JSONField()),
            v_dur=Value(dt.timedelta(hours=1)),
            v_date=Value(dt.date(2000, 1, 1)),
            v_time=Value(moment(2000, 1, 1, 12)),
            v_bool=Value(True),
            v_bytes=Value(b"\x00", BinaryField()),
            v_null=Value(None, CharField()),
        ).order_by("pk")[:2],
    ),
    Read(
        "cast_coalesce",
        lambda q, z: q.annotate(
            c=Coalesce("integer", Value(0)),
            s=Cast("decimal", CharField()),
            j=Cast("json", CharField()),
            d=Cast("datetime", DateField()),
        ).order_by("pk"),
    ),
    Read(
        "cast_error", lambda q, z: q.annotate(bad=Cast(Value("abc"), IntegerField())), raises=True
    ),
    # annotations whose parameter repeats in SELECT and GROUP BY (Django #34255)
    Read(
        "group_by_left",
        lambda q, z: (
            q.annotate(initial=Left("char", 1))
            .values("initial")
            .annotate(n=Count("pk"))
            .order_by("initial")
        ),
    ),
    Read(
        "group_by_json_key",
        lambda q, z: (
            q.annotate(a=KT("json__a"))
            .values("a")
            .annotate(n=Count("pk"), total=Sum("integer"))
            .order_by("a")
        ),
    ),
    Read(
        "group_by_trunc_day",
        lambda q, z: (
            q.annotate(day=TruncDay("datetime"))
            .values("day")
            .annotate(n=Count("pk"))
            .order_by("day")
        ),
    ),
    Read(
        "group_by_concat",
        lambda q, z: (
            q.values(key=Concat("char", Value("-"), "slug", output_field=CharField()))
            .annotate(n=Count("pk"))
            .order_by("key")
        ),
    ),
    Read(
        "group_by_case",
        lambda q, z: (
            q.values(size=Case(When(integer__gte=3, then=Value("many")), default=Value("few")))
            .annotate(n=Count("pk"), top=Max("decimal"))
            .order_by("size")
        ),
    ),
    Read(
        "extract",
        lambda q, z: (
            q.annotate(
                y=ExtractYear("datetime"),
                h=ExtractHour("datetime"),
                d=ExtractIsoWeekDay("datetime"),
            )
            .values("pk", "y", "h", "d")
            .order_by("pk")
        ),
    ),
    # subqueries, windows, sets
    Read(
        "exists",
        lambda q, z: q.filter(
            Exists(Maker.objects.filter(pk=OuterRef("maker_id"), country__code="SE"))
        ).order_by("pk"),
    ),
    Read(
        "exists_annotate",
        lambda q, z: q.annotate(
            has=Exists(Country.objects.filter(makers=OuterRef("maker")))
        ).order_by("pk"),
    ),
    Read(
        "subquery",
        lambda q, z: q.annotate(
            maker_name=Subquery(Maker.objects.filter(pk=OuterRef("maker_id")).values("name")[:1])
        ).order_by("pk"),
    ),
    Read(
        "in_subquery",
        lambda q, z: q.filter(maker__in=Maker.objects.filter(country__isnull=False)).order_by("pk"),
    ),
    Read(
        "window",
        lambda q, z: q.annotate(
            rank=Window(Rank(), partition_by=F("char"), order_by=F("integer").desc(nulls_last=True))
        ).order_by("pk"),
    ),
    Read(
        "union", lambda q, z: q.filter(integer=7).union(q.filter(maker__isnull=True)).order_by("id")
    ),
    # ordering, distinct, slicing
    Read("order_nulls_last", lambda q, z: q.order_by(F("decimal").desc(nulls_last=True), "pk")),
    Read("order_related", lambda q, z: q.order_by("maker__country__code", "maker__name", "pk")),
    Read("order_float_nan_inf", lambda q, z: q.order_by("float", "pk")),
    Read("order_json_key", lambda q, z: q.order_by("json__a", "pk")),
    Read("distinct", lambda q, z: q.values("char").distinct().order_by("char")),
    Read("distinct_on", lambda q, z: q.order_by("char", "-integer").distinct("char")),
    Read("slice", lambda q, z: q.order_by("pk")[1:4]),
    Read("slice_offset", lambda q, z: q.order_by("-pk")[9:]),
    # values, values_list, flat, named
    Read(
        "values",
        lambda q, z: q.values(
            "pk", "json", "uuid", "ip", "datetime", "maker__name", "maker__country__code"
        ).order_by("pk"),
    ),
    Read(
        "values_list",
        lambda q, z: q.values_list(
            "pk",
            "decimal",
            "duration",
            "time",
            "int_range",
            "decimal_range",
            "date_range",
            "datetime_range",
        ).order_by("pk"),
    ),
    Read("values_list_flat", lambda q, z: q.values_list("binary", flat=True).order_by("pk")),
    Read(
        "values_list_named",
        lambda q, z: q.values_list("pk", "char", "date", named=True).order_by("pk"),
    ),
    Read(
        "values_expressions",
        lambda q, z: q.values(upper=Upper("char"), size=Length("text")).order_by("pk"),
    ),
    Read("values_slice", lambda q, z: q.values_list("pk", flat=True).order_by("pk")[:2]),
    # terminals
    Read("iterator", lambda q, z: q.select_related("maker").order_by("pk"), "iterator"),
    Read(
        "get",
        lambda q, z: q.select_related("maker__country"),
        "get",
        kwargs=lambda z: {"pk": z["full"]},
    ),
    Read("get_does_not_exist", lambda q, z: q, "get", kwargs=lambda z: {"pk": -1}, raises=True),
    Read("get_multiple", lambda q, z: q, "get", kwargs=lambda z: {"char": "Alpha"}, raises=True),
    Read("first", lambda q, z: q.filter(char="Beta"), "first"),
    Read("first_none", lambda q, z: q.filter(pk=-1), "first"),
    Read("last", lambda q, z: q.order_by("datetime"), "last"),
    Read("latest", lambda q, z: q, "latest", args=lambda z: ("datetime",)),
    Read("earliest", lambda q, z: q, "earliest", args=lambda z: ("date", "pk")),
    Read("count", lambda q, z: q.filter(json__has_key="a"), "count"),
    Read("count_distinct_values", lambda q, z: q.values("char").distinct(), "count"),
    Read("exists_true", lambda q, z: q.filter(char="Alpha"), "exists"),
    Read("exists_false", lambda q, z: q.filter(char="nobody"), "exists"),
    Read(
        "contains",
        lambda q, z: q.filter(char="Alpha"),
        "contains",
        args=lambda z: (Specimen(pk=z["full"]),),
    ),
    Read("in_bulk", lambda q, z: q, "in_bulk", args=lambda z: ([z["full"], z["edge"], -1],)),
    Read(
        "in_bulk_field",
        lambda q, z: Country.objects.using(q.db),
        "in_bulk",
        kwargs=lambda z: {"field_name": "code"},
    ),
    Read(
        "aggregate",
        lambda q, z: q,
        "aggregate",
        kwargs=lambda z: {
            "s": Sum("integer"),
            "a": Avg("decimal"),
            "lo": Min("datetime"),
            "hi": Max("date"),
            "makers": Count("maker", distinct=True),
            "sd": StdDev("small_integer"),
            "fl": Sum("float"),
        },
    ),
    Read(
        "aggregate_postgres",
        lambda q, z: q.exclude(char="nulls"),
        "aggregate",
        kwargs=lambda z: {
            "slugs": ArrayAgg("slug", order_by=("slug", "pk")),
            "chars": StringAgg("char", Value(","), order_by="pk"),
            "js": JSONBAgg("json", order_by="pk"),
            "any": BoolOr("boolean"),
        },
    ),
    Read(
        "aggregate_empty",
        lambda q, z: q.filter(pk__in=[]),
        "aggregate",
        kwargs=lambda z: {"n": Count("pk"), "s": Sum("integer", default=0)},
    ),
    Read(
        "aggregate_annotated",
        lambda q, z: q.annotate(n=Length("char")),
        "aggregate",
        kwargs=lambda z: {"total": Sum("n")},
    ),
]


def both_ways(
    read: Read, q: QuerySet[Any], zoo: Zoo
) -> tuple[Callable[[], Any], Callable[[], Awaitable[Any]]]:
    """Return ``read`` as a sync call (for the thread path) and as a coroutine function."""
    args, kwargs = read.args(zoo), read.kwargs(zoo)

    def sync() -> Any:
        qs = read.build(q, zoo)
        if read.op == "list":
            return list(qs)
        if read.op == "iterator":
            return list(qs.iterator(chunk_size=2))
        return getattr(qs, read.op)(*args, **kwargs)

    async def native() -> Any:
        qs = read.build(q, zoo)
        if read.op == "list":
            return [row async for row in qs]
        if read.op == "iterator":
            return [row async for row in qs.aiterator(chunk_size=2)]
        return await getattr(qs, f"a{read.op}")(*args, **kwargs)

    return sync, native


async def run_read(read: Read, q: QuerySet[Any], zoo: Zoo) -> tuple[Any, Any]:
    """Run ``read`` through the thread path and natively; return both outcomes."""
    sync, native = both_ways(read, q, zoo)
    return await in_thread(q.db, sync), await natively(q.db, native)


@pytest.mark.parametrize("read", READS, ids=[r.name for r in READS])
async def test_read(read: Read, alias: str, zoo: Zoo) -> None:
    thread, native = await run_read(read, Specimen.objects.using(alias), zoo)
    assert native == thread
    # Not a comparison of two identical errors, nor of two empty lists, unless meant.
    assert (thread[0] == "raised") is bool(read.raises), thread
    if read.op in {"list", "iterator"} and read.raises is not None:
        assert thread[1][1], "the query found nothing: it compares too little"


async def test_reads_at_once(alias: str, zoo: Zoo) -> None:
    """Every read in its own task, all at the same time: each gets its own answer."""
    q = Specimen.objects.using(alias)
    calls = [both_ways(read, q, zoo) for read in READS]
    expected = [await in_thread(alias, sync) for sync, _ in calls]
    got = await natively(alias, lambda: asyncio.gather(*(aoutcome(n) for _, n in calls)))
    assert got[0] == "ok"
    for read, thread, native in zip(READS, expected, got[1][1], strict=True):
        # gather() returned each outcome() as a tuple, which snapshot() took apart.
        assert native == snapshot(thread), read.name


# -- writes ----------------------------------------------------------------------------------
#
# Each side writes its own rows, tagged by their slug ("thread-..." or "native-..."); what
# each write returns must be equal, ids and slugs aside, and so must the rows it left.

TAGGED = {"id", "slug"}


def untagged(snap: Any) -> Any:
    """Return ``snap`` with the ids and slugs of its model instances blanked."""
    if isinstance(snap, tuple) and len(snap) == 5 and snap[0] in {"Specimen", "Maker", "Country"}:
        name, db, adding, fields, related = snap
        fields = {k: "(tagged)" if k in TAGGED else untagged(v) for k, v in fields.items()}
        return name, db, adding, fields, {k: untagged(v) for k, v in related.items()}
    if isinstance(snap, tuple | list):
        return type(snap)(untagged(v) for v in snap)
    if isinstance(snap, dict):
        return {k: untagged(v) for k, v in snap.items()}
    return snap


def stored(alias: str, tag: str) -> list[tuple[Any, ...]]:
    """Return the rows of ``tag`` (ids and slugs left out), in slug order."""
    names = [f.attname for f in Specimen._meta.concrete_fields if f.name not in TAGGED]
    qs = Specimen.objects.using(alias).filter(slug__startswith=f"{tag}-").order_by("slug")
    return list(qs.values_list(*names))


def row(zoo: Zoo, tag: str, n: int = 1, **changes: Any) -> dict[str, Any]:
    """Return the values of a new specimen of ``tag``: the full row, ``changes`` on top."""
    return {**full_row(), "slug": f"{tag}-{n}", "maker_id": zoo["maker:acme"], **changes}


async def seed(alias: str, zoo: Zoo, count: int = 3) -> None:
    """Give each side ``count`` rows of its own to change."""

    def make() -> None:
        for tag in ("thread", "native"):
            for n in range(count):
                values = row(zoo, tag, n, integer=n, json={"n": n}) if n else row(zoo, tag, n)
                Specimen.objects.using(alias).create(**values)

    outcome_ = await in_thread(alias, make)
    assert outcome_[0] == "ok", outcome_


async def both(
    alias: str, sync: Callable[[str], Any], native: Callable[[str], Awaitable[Any]]
) -> Any:
    """Run ``sync("thread")`` in a thread and ``native("native")`` natively; compare.

    Return the thread path's outcome, for the test to check it did something.
    """
    thread = await in_thread(alias, lambda: sync("thread"))
    mine = await natively(alias, lambda: native("native"))
    assert untagged(mine) == untagged(thread)
    after = await in_thread(alias, lambda: stored(alias, "thread"))
    assert await in_thread(alias, lambda: stored(alias, "native")) == after
    return thread


@pytest.fixture
def scratch(alias: str, zoo: Zoo) -> Iterator[str]:
    """The alias; the rows a test adds are deleted afterwards, the zoo is left as it was."""
    yield alias

    def clean() -> None:
        Specimen.objects.using(alias).exclude(pk__in=zoo.specimens.values()).delete()
        Maker.objects.using(alias).exclude(name__in=["Acme", "Kaiju", "Loner"]).delete()
        Country.objects.using(alias).exclude(code__in=["SE", "JP"]).delete()
        connections[alias].close()

    asyncio.run(sync_to_async(clean)())


async def test_create(scratch: str, zoo: Zoo) -> None:
    objects = Specimen.objects.using(scratch)
    thread = await both(
        scratch,
        lambda tag: objects.create(**row(zoo, tag)),
        lambda tag: objects.acreate(**row(zoo, tag)),
    )
    assert thread[0] == "ok"


async def test_create_nulls_and_extremes(scratch: str, zoo: Zoo) -> None:
    objects = Specimen.objects.using(scratch)
    extremes = {
        "big_integer": -(2**63),
        "positive_big_integer": 2**63 - 1,
        "float": -math.inf,
        "decimal": Decimal("99999999999999999999.9999999999"),
        "json": Value(None, JSONField()),
        "ints": [None],
        "int_range": NumericRange(empty=True),
        "datetime_range": DateTimeTZRange(None, None),
    }
    nulls = {k: None for k in ("email", "integer", "float", "decimal", "datetime", "json")}
    nulls.update(binary=None, ip=None, uuid=None, maker_id=None, date_range=None)

    def sync(tag: str) -> Any:
        return [
            objects.create(**row(zoo, tag, 1, **extremes)),
            objects.create(**row(zoo, tag, 2, **nulls)),
        ]

    async def native(tag: str) -> Any:
        return [
            await objects.acreate(**row(zoo, tag, 1, **extremes)),
            await objects.acreate(**row(zoo, tag, 2, **nulls)),
        ]

    assert (await both(scratch, sync, native))[0] == "ok"


async def test_bulk_create(scratch: str, zoo: Zoo) -> None:
    objects = Specimen.objects.using(scratch)

    def made(tag: str) -> list[Specimen]:
        return [Specimen(**row(zoo, tag, n, integer=n, ints=[n] * n)) for n in range(4)]

    thread = await both(
        scratch,
        lambda tag: objects.bulk_create(made(tag), batch_size=3),
        lambda tag: objects.abulk_create(made(tag), batch_size=3),
    )
    assert thread[0] == "ok" and len(thread[1][1]) == 4


async def test_update(scratch: str, zoo: Zoo) -> None:
    await seed(scratch, zoo)
    changes = {
        "integer": F("integer") + 1,
        "json": {"x": [1, None]},
        "datetime": moment(2030, 1, 2, 3, 4, 5),
        "decimal": F("decimal") * 2,
        "ints": [9, None],
        "int_range": NumericRange(5, 6),
        "null_boolean": None,
        "text": Concat("text", Value("!")),
    }

    def mine(tag: str) -> QuerySet[Specimen]:
        return Specimen.objects.using(scratch).filter(
            slug__startswith=f"{tag}-", integer__range=(1, 5)
        )

    thread = await both(
        scratch, lambda tag: mine(tag).update(**changes), lambda tag: mine(tag).aupdate(**changes)
    )
    assert thread == ("ok", ("int", "2"))


async def test_save(scratch: str, zoo: Zoo) -> None:
    await seed(scratch, zoo, count=1)
    objects = Specimen.objects.using(scratch)

    def sync(tag: str) -> Any:
        obj = objects.get(slug=f"{tag}-0")
        obj.char, obj.json, obj.duration = "changed", ["a"], dt.timedelta(0)
        obj.save()
        obj.text = "only this"
        obj.save(update_fields=["text"])
        new = Specimen(**row(zoo, tag, 1, char="saved"))
        new.save(using=scratch)
        return [obj, new]

    async def native(tag: str) -> Any:
        obj = await objects.aget(slug=f"{tag}-0")
        obj.char, obj.json, obj.duration = "changed", ["a"], dt.timedelta(0)
        await obj.asave()
        obj.text = "only this"
        await obj.asave(update_fields=["text"])
        new = Specimen(**row(zoo, tag, 1, char="saved"))
        await new.asave(using=scratch)
        return [obj, new]

    assert (await both(scratch, sync, native))[0] == "ok"


async def test_bulk_update(scratch: str, zoo: Zoo) -> None:
    await seed(scratch, zoo)
    objects = Specimen.objects.using(scratch)

    def changed(objs: list[Specimen]) -> list[Specimen]:
        for n, obj in enumerate(objs):
            obj.char, obj.json, obj.decimal = f"bulk {n}", {"n": [n]}, Decimal(n) / 7
        return objs

    def sync(tag: str) -> Any:
        objs = changed(list(objects.filter(slug__startswith=f"{tag}-").order_by("slug")))
        return objects.bulk_update(objs, ["char", "json", "decimal"], batch_size=2)

    async def native(tag: str) -> Any:
        objs = [o async for o in objects.filter(slug__startswith=f"{tag}-").order_by("slug")]
        return await objects.abulk_update(changed(objs), ["char", "json", "decimal"], batch_size=2)

    assert await both(scratch, sync, native) == ("ok", ("int", "3"))


async def test_get_or_create_and_update_or_create(scratch: str, zoo: Zoo) -> None:
    await seed(scratch, zoo, count=1)
    objects = Specimen.objects.using(scratch)

    def sync(tag: str) -> Any:
        return [
            objects.get_or_create(slug=f"{tag}-0", defaults=row(zoo, tag, 9)),
            objects.get_or_create(slug=f"{tag}-1", defaults=row(zoo, tag, 1, char="made")),
            objects.update_or_create(slug=f"{tag}-0", defaults={"char": "updated"}),
            objects.update_or_create(
                slug=f"{tag}-2", defaults={"char": "x"}, create_defaults=row(zoo, tag, 2)
            ),
        ]

    async def native(tag: str) -> Any:
        return [
            await objects.aget_or_create(slug=f"{tag}-0", defaults=row(zoo, tag, 9)),
            await objects.aget_or_create(slug=f"{tag}-1", defaults=row(zoo, tag, 1, char="made")),
            await objects.aupdate_or_create(slug=f"{tag}-0", defaults={"char": "updated"}),
            await objects.aupdate_or_create(
                slug=f"{tag}-2", defaults={"char": "x"}, create_defaults=row(zoo, tag, 2)
            ),
        ]

    assert (await both(scratch, sync, native))[0] == "ok"


async def test_delete(scratch: str, zoo: Zoo) -> None:
    await seed(scratch, zoo)
    objects = Specimen.objects.using(scratch)

    def sync(tag: str) -> Any:
        one = objects.get(slug=f"{tag}-0")
        return [one.delete(), one.pk, objects.filter(slug__startswith=f"{tag}-").delete()]

    async def native(tag: str) -> Any:
        one = await objects.aget(slug=f"{tag}-0")
        return [
            await one.adelete(),
            one.pk,
            await objects.filter(slug__startswith=f"{tag}-").adelete(),
        ]

    thread = await both(scratch, sync, native)
    assert thread[0] == "ok" and "fieldzoo.Specimen" in repr(thread)


async def test_delete_cascade_and_set_null(scratch: str, zoo: Zoo) -> None:
    """Deleting a country deletes its makers (CASCADE) and unsets their specimens' maker."""

    def setup() -> None:
        for tag, code in (("thread", "XT"), ("native", "XN")):
            country = Country.objects.using(scratch).create(code=code)
            maker = Maker.objects.using(scratch).create(name=f"{tag} maker", country=country)
            Specimen.objects.using(scratch).create(**row(zoo, tag, maker_id=maker.pk))

    assert (await in_thread(scratch, setup))[0] == "ok"
    countries = Country.objects.using(scratch)
    codes = {"thread": "XT", "native": "XN"}
    thread = await both(
        scratch,
        lambda tag: countries.filter(code=codes[tag]).delete(),
        lambda tag: countries.filter(code=codes[tag]).adelete(),
    )
    assert "fieldzoo.Maker" in repr(thread)


async def test_refresh_from_db(scratch: str, zoo: Zoo) -> None:
    def sync(tag: str) -> Any:
        obj = Specimen(pk=zoo["full"])
        obj._state.db = scratch
        obj.refresh_from_db()
        return obj

    async def native(tag: str) -> Any:
        obj = Specimen(pk=zoo["full"])
        obj._state.db = scratch
        await obj.arefresh_from_db()
        return obj

    thread = await both(scratch, sync, native)
    assert thread[0] == "ok"


async def test_errors(scratch: str, zoo: Zoo) -> None:
    """IntegrityError, DataError: the same classes and messages, nothing left behind."""
    objects = Specimen.objects.using(scratch)
    countries = Country.objects.using(scratch)

    def sync(tag: str) -> Any:
        return [
            outcome(lambda: countries.create(code="SE")),
            outcome(lambda: objects.create(**row(zoo, tag, small_integer=40_000))),
            outcome(lambda: objects.create(**row(zoo, tag, maker_id=-1))),
        ]

    async def native(tag: str) -> Any:
        return [
            await aoutcome(lambda: countries.acreate(code="SE")),
            await aoutcome(lambda: objects.acreate(**row(zoo, tag, small_integer=40_000))),
            await aoutcome(lambda: objects.acreate(**row(zoo, tag, maker_id=-1))),
        ]

    thread = await both(scratch, sync, native)
    kinds = [error[1][2][1] for error in thread[1][1]]  # the snapshot of each outcome()
    assert kinds == [repr("IntegrityError"), repr("DataError"), repr("IntegrityError")], thread


async def test_atomic(scratch: str, zoo: Zoo) -> None:
    """``django_asyncpool.atomic`` as Django's ``transaction.atomic``: nested, rolled back."""
    from django_asyncpool import atomic

    objects = Specimen.objects.using(scratch)

    def sync(tag: str) -> Any:
        seen = []
        with transaction.atomic(using=scratch):
            first = objects.create(**row(zoo, tag, 1))
            objects.filter(pk=first.pk).update(integer=F("integer") + 1)
            seen.append(objects.filter(slug__startswith=f"{tag}-").values_list("integer"))
            with contextlib.suppress(ValueError), transaction.atomic(using=scratch):
                objects.create(**row(zoo, tag, 2))
                raise ValueError("the savepoint goes")
            seen.append(objects.filter(slug__startswith=f"{tag}-").count())
        with contextlib.suppress(ValueError), transaction.atomic(using=scratch):
            objects.create(**row(zoo, tag, 3))
            raise ValueError("the transaction goes")
        return [first, *(list(s) if isinstance(s, QuerySet) else s for s in seen)]

    async def native(tag: str) -> Any:
        seen = []
        async with atomic(using=scratch):
            first = await objects.acreate(**row(zoo, tag, 1))
            await objects.filter(pk=first.pk).aupdate(integer=F("integer") + 1)
            seen.append(
                [r async for r in objects.filter(slug__startswith=f"{tag}-").values_list("integer")]
            )
            with contextlib.suppress(ValueError):
                async with atomic(using=scratch):
                    await objects.acreate(**row(zoo, tag, 2))
                    raise ValueError("the savepoint goes")
            seen.append(await objects.filter(slug__startswith=f"{tag}-").acount())
        with contextlib.suppress(ValueError):
            async with atomic(using=scratch):
                await objects.acreate(**row(zoo, tag, 3))
                raise ValueError("the transaction goes")
        return [first, *seen]

    thread = await both(scratch, sync, native)
    # In the transaction: its own row, updated (7 + 1); after the savepoint: still one.
    assert thread[1][1][1:] == [("list", [("tuple", [("int", "8")])]), ("int", "1")], thread
