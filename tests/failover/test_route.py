"""Read failover (OPTIONS["failover_to"]): replicas that are down, against real servers.

The quick tests use a replica alias on a port nothing listens on (every connect is
refused) in front of the test database. The slow one runs a second real PostgreSQL
server as the replica, stops it under read load and starts it again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import OperationalError, connections, router
from health_check.exceptions import ServiceUnavailable
from prometheus_client import REGISTRY
from sqlalchemy import text

from django_asyncpool import (
    CircuitOpenError,
    ConnectionPool,
    DatabaseUnavailable,
    ReadOnlyError,
    session_scope,
)
from django_asyncpool.asgi import warm_up_async
from django_asyncpool.checks import problems
from django_asyncpool.core import registry as _registry
from django_asyncpool.failover import route as _failover
from django_asyncpool.health import PoolCheck
from django_asyncpool.routers import FailoverMixin
from testproject.pgserver import LocalPostgres
from testproject.shop.models import Product

from ..conftest import closed_port, throwaway_server, wait_until

# The ORM tests read and write through aliases made during the test, which Django's
# test case refuses; db_access, set up after the test case, lets every alias connect.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("db_access")]

#: Fails fast: one refused connect opens the breaker, which tries again after 1 s.
DOWN_FAST = {
    "pool": {"min_size": 0, "max_size": 4, "timeout": 2},
    "async_pool": {"pool_size": 4, "max_overflow": 0, "timeout": 2},
    "circuit_breaker": {"fail_max": 1, "reset_timeout": 1},
    "retry": {"max_tries": 1},
}
PORT = text("select inet_server_port()")


def failovers(alias: str, to: str) -> float:
    labels = {"alias": alias, "to": to}
    return REGISTRY.get_sample_value("db_pool_failovers_total", labels) or 0.0


@pytest.fixture
def dead_replica(make_alias: Callable[..., str]) -> Callable[..., str]:
    """Return a function making an alias on a closed port that fails over to ``to``."""

    def make(*to: str) -> str:
        options = {**DOWN_FAST, "failover_to": list(to)}
        return make_alias(HOST="127.0.0.1", PORT=closed_port(), OPTIONS=options)

    return make


class PickedRoutes:
    """The user's own router: reads to ``read``, writes to ``write``."""

    read = "replica"
    write = "default"

    def db_for_read(self, model: type[Any], **hints: Any) -> str:
        return PickedRoutes.read

    def db_for_write(self, model: type[Any], **hints: Any) -> str:
        return PickedRoutes.write

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        return True


class MixedRouter(FailoverMixin, PickedRoutes):
    """The user's router with failover mixed in."""


@pytest.fixture
def routes(settings: Any) -> Iterator[type[PickedRoutes]]:
    """Route the ORM through MixedRouter; set ``routes.read`` / ``routes.write``."""
    settings.DATABASE_ROUTERS = [f"{__name__}.MixedRouter"]
    yield PickedRoutes
    PickedRoutes.read, PickedRoutes.write = "replica", "default"


# -- the chain, and its checks ------------------------------------------------------------------


def test_chain_follows_failover_to_breadth_first_and_ends_a_cycle(make_alias) -> None:
    first, second, third = make_alias(), make_alias(), make_alias()
    connections.settings[first]["OPTIONS"]["failover_to"] = [second, "default"]
    connections.settings[second]["OPTIONS"]["failover_to"] = [third, first]  # a cycle
    connections.settings[third]["OPTIONS"]["failover_to"] = ["nope"]  # unknown: skipped
    assert _failover.chain(first) == (first, second, "default", third)
    assert _failover.chain(second) == (second, third, first, "default")
    assert _failover.chain("default") == ("default",)


def test_checks_report_bad_failover_settings() -> None:
    base = {"ENGINE": "django_asyncpool", "NAME": "app", "OPTIONS": {}}
    databases = {
        "default": base,
        "r1": {**base, "OPTIONS": {"failover_to": ["r2", "default"]}},
        "r2": {**base, "OPTIONS": {"failover_to": ["r1"]}},
        "r3": {**base, "OPTIONS": {"failover_to": ["replcia", "legacy"]}},
        "r4": {**base, "OPTIONS": {"failover_to": "default"}},
        "r5": {**base, "OPTIONS": {"failover_to": ["r5"]}},
        "legacy": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
    }
    found = {(p.id, p.alias): p for p, _ in problems(databases, {}) if p.alias}
    assert set(found) == {
        ("dbpool.E043", "r1"),
        ("dbpool.E043", "r2"),
        ("dbpool.E041", "r3"),
        ("dbpool.E042", "r3"),
        ("dbpool.E040", "r4"),
        ("dbpool.E043", "r5"),
    }
    assert "r1 -> r2 -> r1" in found["dbpool.E043", "r1"].message
    assert "r5 -> r5" in found["dbpool.E043", "r5"].message
    assert "'replcia', which is not in settings.DATABASES" in found["dbpool.E041", "r3"].message
    assert "default, r1, r2, r3, r4, r5" in found["dbpool.E041", "r3"].hint
    assert "'django.db.backends.sqlite3'" in found["dbpool.E042", "r3"].message
    assert "must be a list of database aliases, got 'default'" in found["dbpool.E040", "r4"].message
    only = problems(databases, {}, aliases=["r4"])
    assert [p.id for p, _ in only] == ["dbpool.E040"]


# -- the async pool, in front of the test database -------------------------------------------


async def test_reads_of_a_dead_replica_go_to_the_next_alias(dead_replica, caplog) -> None:
    replica = dead_replica("default")
    before = failovers(replica, "default")
    with caplog.at_level(logging.WARNING, logger="django_asyncpool"):
        # The first read finds the breaker closed: it tries the replica, is refused
        # (which opens the breaker) and goes on; the later ones skip the replica.
        async with session_scope(using=replica) as session:
            # Still one transaction (now() is its start), begun READ ONLY.
            first = (await session.execute(text("select now()"))).scalar()
            await asyncio.sleep(0.01)
            assert (await session.execute(text("select now()"))).scalar() == first
            read_only = text("select current_setting('transaction_read_only')")
            assert (await session.execute(read_only)).scalar() == "on"
        assert _registry.guard(replica).state == "open"
        async with session_scope(using=replica, readonly=True) as session:
            assert (await session.execute(text("select 2"))).scalar() == 2
        async with ConnectionPool(replica).connection() as conn:
            assert await conn.fetchval("select 3") == 3
        session = await ConnectionPool(replica).get_connection()
        try:
            assert (await session.execute(text("select 4"))).scalar() == 4
            assert (await session.execute(read_only)).scalar() == "on"
        finally:
            await session.close()
    assert failovers(replica, "default") == before + 4
    lines = [r.getMessage() for r in caplog.records if "fail over to" in r.getMessage()]
    assert lines == [
        f"Reads of database {replica!r} fail over to 'default': it could not be reached "
        "(DatabaseUnavailable). Writes do not fail over."
    ]


async def test_writes_never_fail_over(dead_replica, caplog) -> None:
    replica = dead_replica("default")
    marker = "written-through-failover"
    with pytest.raises(ReadOnlyError, match="writes never fail over") as info:
        async with session_scope(using=replica) as session:
            await session.execute(
                text("insert into shop_product (sku, name, price_cents) values (:s, 'x', 1)"),
                {"s": marker},
            )
    assert info.value.alias == replica
    assert "had failed over to 'default'" in str(info.value)
    with pytest.raises(Exception, match="read-only transaction"):
        async with ConnectionPool(replica).connection() as conn:
            await conn.execute(
                "insert into shop_product (sku, name, price_cents) values ($1, 'x', 1)", marker
            )
    async with session_scope() as session:
        count = "select count(*) from shop_product where sku = :s"
        assert (await session.execute(text(count), {"s": marker})).scalar() == 0
        # The primary's own scopes, on the same pooled connections, are not read-only.
        read_only = text("select current_setting('transaction_read_only')")
        assert (await session.execute(read_only)).scalar() == "off"


async def test_all_down_raises_the_first_alias_error_naming_the_others(dead_replica) -> None:
    second = dead_replica()
    first = dead_replica(second)
    connections.settings[second]["OPTIONS"]["failover_to"] = [first]  # a loop: tried once each
    with pytest.raises(DatabaseUnavailable) as info:
        async with session_scope(using=first) as session:
            await session.execute(text("select 1"))
    assert info.value.alias == first
    message = str(info.value)
    assert message.startswith(f"Could not connect to database {first!r}")
    assert f"Its failover aliases ({second!r}) could not serve the read either" in message
    # Both breakers are open now: it fails fast, with the first alias's error.
    started = time.monotonic()
    with pytest.raises(CircuitOpenError) as fast:
        async with ConnectionPool(first).connection():
            pass
    assert time.monotonic() - started < 0.05
    assert fast.value.alias == first
    assert "circuit breaker is open" in str(fast.value)
    assert f"({second!r}) could not serve the read either" in str(fast.value)
    assert _failover.route(first) == first  # the ORM: its own alias, and its own error
    assert _failover.route(second) == second


async def test_an_alias_without_failover_to_is_untouched(dead_replica) -> None:
    replica = dead_replica()
    assert ConnectionPool(replica).failover_to == ()
    with pytest.raises(DatabaseUnavailable) as info:
        async with session_scope(using=replica) as session:
            await session.execute(text("select 1"))
    assert "failover" not in str(info.value)


def test_dbpool_check_probes_the_alias_itself_and_says_where_reads_go(dead_replica, make_alias):
    replica = dead_replica("default")
    live = make_alias(OPTIONS={"failover_to": ["default"]})
    out = io.StringIO()
    with pytest.raises(CommandError) as info:
        call_command("dbpool_check", "--database", replica, "--database", live, stdout=out)
    assert info.value.returncode == 1  # the replica is down, whatever serves its reads
    assert f"{replica}: '{replica}' (" in out.getvalue()
    assert "; reads fail over to 'default'" in out.getvalue()
    assert f"{live}: '{live}' (" in out.getvalue()
    assert "; reads go to itself" in out.getvalue()
    out = io.StringIO()
    with pytest.raises(CommandError):
        call_command("dbpool_check", "--database", replica, "--format", "json", stdout=out)
    (entry,) = json.loads(out.getvalue())["aliases"]
    assert entry["failover_to"] == ["default"] and entry["reads_go_to"] == "default"
    assert entry["async"]["ok"] is False and entry["sync"]["ok"] is False


async def test_health_check_and_warmup_probe_the_alias_itself(make_alias) -> None:
    options = {**DOWN_FAST, "circuit_breaker": {"fail_max": 50}, "failover_to": ["default"]}
    replica = make_alias(HOST="127.0.0.1", PORT=closed_port(), OPTIONS={**options, "warmup": 5})
    # Its reads fail over, so a probe through the failover would say it is fine.
    async with ConnectionPool(replica).connection() as conn:
        assert await conn.fetchval("select 1") == 1
    with pytest.raises(ServiceUnavailable, match="DatabaseUnavailable"):
        await PoolCheck(alias=replica).run()
    with pytest.raises(DatabaseUnavailable):
        await warm_up_async()


# -- the ORM through the routers ----------------------------------------------------------------


@pytest.mark.parametrize("listed", ["mixin", "first-in-list"])
def test_the_router_fails_reads_over_and_leaves_writes(dead_replica, routes, settings, listed):
    if listed == "first-in-list":
        settings.DATABASE_ROUTERS = [
            "django_asyncpool.routers.FailoverRouter",
            f"{__name__}.PickedRoutes",
        ]
    replica = routes.read = dead_replica("default")
    assert router.db_for_read(Product) == replica  # its breaker is closed
    with pytest.raises(DatabaseUnavailable):  # a read before the breaker opens fails
        list(Product.objects.all())
    assert _registry.guard(replica).state == "open"
    before = failovers(replica, "default")
    assert router.db_for_read(Product) == "default"
    assert list(Product.objects.filter(sku="none")) == []
    assert failovers(replica, "default") >= before + 2
    assert router.db_for_write(Product) == "default"
    with pytest.raises(CircuitOpenError):  # an explicit write to the replica: refused
        Product.objects.using(replica).create(sku="w", name="w", price_cents=1)
    routes.write = replica  # the user's router sends a write to the replica: no failover
    assert router.db_for_write(Product) == replica
    with pytest.raises(CircuitOpenError):
        Product.objects.create(sku="w", name="w", price_cents=1)
    assert not Product.objects.using("default").filter(sku="w").exists()


def test_the_trial_runs_in_the_background_and_reads_come_back(proxy, make_alias, caplog):
    options = {**DOWN_FAST, "failover_to": ["default"]}
    replica = make_alias(HOST=proxy.host, PORT=proxy.port, OPTIONS=options)
    proxy.cut()
    with pytest.raises(DatabaseUnavailable):
        connections[replica].ensure_connection()
    guard = _registry.guard(replica)
    assert guard.state == "open"
    assert _failover.route(replica) == "default"
    proxy.restore()
    time.sleep(1.05)  # reset_timeout: the next read starts the trial, and goes on meanwhile
    with caplog.at_level(logging.WARNING, logger="django_asyncpool"):
        assert _failover.route(replica) == "default"
        assert wait_until(lambda: guard.state == "closed", timeout=5)
        assert _failover.route(replica) == replica
    assert f"Reads of database {replica!r} are back on it (they went to 'default')" in caplog.text
    connections[replica].close()


# -- two real servers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_server() -> Iterator[LocalPostgres]:
    """A second embedded PostgreSQL server, for the replica; destroyed afterwards."""
    with throwaway_server("asyncpool-replica-", "create database replica") as server:
        yield server


class Load:
    """Reads of the replica alias, async and through the ORM, recorded with their outcome."""

    def __init__(self, replica: str, ports: dict[int, str]) -> None:
        self.replica = replica
        self.ports = ports
        self.stop = threading.Event()
        #: (kind, started, ended, where it was served or the error)
        self.results: list[tuple[str, float, float, str | BaseException]] = []
        self.threads = [threading.Thread(target=asyncio.run, args=(self.async_readers(),))]
        self.threads += [threading.Thread(target=self.orm_reader) for _ in range(2)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)

    def record(self, kind: str, started: float, outcome: str | BaseException) -> None:
        self.results.append((kind, started, time.monotonic(), outcome))

    async def async_readers(self) -> None:
        async def read(kind: str) -> None:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    if kind == "connection":
                        async with ConnectionPool(self.replica).connection() as conn:
                            port = await conn.fetchval("select inet_server_port()")
                    else:
                        readonly = kind == "readonly"
                        async with session_scope(using=self.replica, readonly=readonly) as s:
                            port = (await s.execute(PORT)).scalar()
                    self.record(kind, started, self.ports[port])
                except Exception as exc:
                    self.record(kind, started, exc)
                await asyncio.sleep(0.005)

        # asyncio.run() disposes this loop's engines as it ends.
        await asyncio.gather(*(read(k) for k in ("scope", "readonly", "connection")))

    def orm_reader(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                name = Product.objects.filter(sku="marker").values_list("name", flat=True).get()
                self.record("orm", started, name)
            except Exception as exc:
                self.record("orm", started, exc)
            finally:
                connections.close_all()  # the end of a request
            time.sleep(0.005)

    def served(self, kind: str, since: float, by: str) -> int:
        return sum(1 for k, t, _, o in list(self.results) if k == kind and t > since and o == by)

    def errors(self, since: float, until: float = float("inf")) -> list[tuple[str, str]]:
        """Return the reads that failed among those started in (since, until]."""
        return [
            (k, repr(o))
            for k, t, _, o in list(self.results)
            if since < t <= until and isinstance(o, BaseException)
        ]

    def failed_before(self, moment: float) -> list[tuple[str, str]]:
        """Return the reads that failed and were over before ``moment``."""
        return [
            (k, repr(o))
            for k, _, ended, o in list(self.results)
            if ended < moment and isinstance(o, BaseException)
        ]


@pytest.mark.slow
def test_a_stopped_replica_under_read_load_fails_over_and_comes_back(
    make_alias, pg, second_server, routes, caplog
) -> None:
    default = connections["default"].settings_dict
    replica = routes.read = make_alias(
        HOST=second_server.host,
        PORT=second_server.port,
        NAME="replica",
        OPTIONS={
            "pool": {"min_size": 0, "max_size": 4, "timeout": 2},
            "async_pool": {"pool_size": 4, "max_overflow": 0, "timeout": 2},
            "circuit_breaker": {"fail_max": 2, "reset_timeout": 1},
            "retry": {"max_tries": 1},
            "failover_to": ["default"],
        },
    )
    assert connections[replica].settings_dict["USER"] == default["USER"]
    with connections[replica].schema_editor() as editor:
        editor.create_model(Product)
    Product.objects.using(replica).create(sku="marker", name="replica", price_cents=1)
    Product.objects.using("default").create(sku="marker", name="primary", price_cents=1)
    connections[replica].close()
    guard = _registry.guard(replica)
    ports = {second_server.port: "replica", pg.port: "primary"}
    kinds = ("scope", "readonly", "connection", "orm")
    counted = failovers(replica, "default")
    try:
        with (
            caplog.at_level(logging.WARNING, logger="django_asyncpool"),
            Load(replica, ports) as load,
        ):
            started = time.monotonic()
            assert wait_until(lambda: all(load.served(k, started, "replica") >= 3 for k in kinds))

            stopped = time.monotonic()  # pg_ctl returns once the server is down
            second_server.stop("fast")
            assert wait_until(lambda: guard.state != "closed", step=0.01)
            # Seen open, so in effect: pybreaker tells its listeners (opened_at) first and
            # stores the state after, and reads in between still go to the replica.
            opened = time.monotonic()
            time.sleep(2.5)  # two reset_timeouts: trials fail in the background

            # Writes through the router still go to the primary; to the replica they fail.
            written = Product.objects.create(sku="during-outage", name="w", price_cents=1)
            assert written._state.db == "default"
            with pytest.raises(OperationalError):
                Product.objects.using(replica).create(sku="to-replica", name="w", price_cents=1)
            with pytest.raises(ReadOnlyError):
                asyncio.run(_insert(replica, "async-to-replica"))
            assert Product.objects.using("default").filter(sku__startswith="to").count() == 0
            assert not Product.objects.using("default").filter(sku="async-to-replica").exists()
            connections.close_all()

            assert all(load.served(k, opened, "primary") >= 3 for k in kinds)
            assert all(load.served(k, opened, "replica") == 0 for k in kinds)

            second_server.start()
            assert wait_until(lambda: guard.state == "closed", timeout=15)
            closed = time.monotonic()
            assert wait_until(lambda: all(load.served(k, closed, "replica") >= 3 for k in kinds))
        before_open = load.errors(0, opened)  # in flight at the stop, or started before the open
        after_open = load.errors(opened)
        print(
            f"\nerrors before the breaker opened: {len(before_open)} "
            f"(the breaker was seen open {opened - stopped:.3f}s after the stop began): "
            f"{dict(collections.Counter(kind for kind, _ in before_open))}"
        )
        assert after_open == []
        assert load.failed_before(stopped) == []  # in flight at the stop: "before" above
        assert failovers(replica, "default") > counted
        changes = [r.getMessage() for r in caplog.records if "fail over to" in r.getMessage()]
        assert 1 <= len(changes) <= 3, changes  # once per change, not once per read
        assert (
            f"Reads of database {replica!r} are back on it (they went to 'default')" in caplog.text
        )
    finally:
        if not second_server.is_running():
            second_server.start()
        Product.objects.using("default").filter(sku__in=["marker", "during-outage"]).delete()
        with contextlib.suppress(Exception):
            connections[replica].close()


async def _insert(alias: str, sku: str) -> None:
    async with session_scope(using=alias) as session:
        await session.execute(
            text("insert into shop_product (sku, name, price_cents) values (:s, 'w', 1)"),
            {"s": sku},
        )
