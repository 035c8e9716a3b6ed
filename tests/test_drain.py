"""A drain on demand (``drain()``, ``dbpool_check --drain``): real server, real processes.

Every pool of the alias replaces its connections: the sync pool, the ``session_scope()``
engines (read-write and read-only) and the native async ORM pool. The idle connections
are gone from the server at once; one in use finishes its transaction on the same
backend and is replaced when it comes back. Backends are told apart by an
``application_name`` of their own, as in tests/test_demotion.py.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connections, transaction
from prometheus_client import REGISTRY
from sqlalchemy import text

import django_asyncpool
from django_asyncpool import drain, session_scope
from django_asyncpool.core import registry as _registry
from django_asyncpool.orm import native as _asyncorm

from .breaker_worker import Worker
from .conftest import metric_value, wait_until

APP = "asyncpool-drain"
KINDS = ("sync", "async", "async_readonly", "async_orm")
REFRESH = 0.05  # storage_refresh of the shared-storage tests


def options(**extra: Any) -> dict[str, Any]:
    return {
        "pool": {"min_size": 2, "max_size": 4, "timeout": 5},
        "async_pool": {"pool_size": 8, "max_overflow": 0, "timeout": 5},  # 2 of each kind
        "async_orm": True,
        "application_name": APP,
        **extra,
    }


def server_pids(pg: Any) -> set[int]:
    out = pg.psql(f"select pid from pg_stat_activity where application_name = '{APP}'")
    return {int(line) for line in out.split()}


def _pid(alias: str) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute("select pg_backend_pid()")
        return int(cursor.fetchone()[0])


async def async_pid(kind: str, alias: str) -> int:
    """One checkout of ``kind``: its backend pid (the connection goes back to its pool)."""
    if kind == "async_orm":
        return await _asyncorm.run(alias, _pid, alias)
    async with session_scope(using=alias, readonly=kind == "async_readonly") as session:
        return int((await session.execute(text("select pg_backend_pid()"))).scalar_one())


def sync_pid(alias: str) -> int:
    try:
        return _pid(alias)
    finally:
        connections[alias].close()  # back to the pool


async def two_of_each(alias: str) -> set[int]:
    """Open two connections of each async kind at once (they stay idle); return their pids."""
    found: set[int] = set()
    for kind in KINDS[1:]:
        found |= set(await asyncio.gather(async_pid(kind, alias), async_pid(kind, alias)))
    return found


def drains(alias: str) -> dict[str, int]:
    return {side: _registry.stats(alias, side).drains for side in ("sync", "async", "async_orm")}


@pytest.fixture
def drained(make_alias: Callable[..., str], db_access: None) -> str:
    """An alias whose every kind of pool has its own application_name."""
    return make_alias(OPTIONS=options())


def test_drain_replaces_every_idle_connection_of_every_pool_kind(
    drained: str, pg: Any, caplog: pytest.LogCaptureFixture
) -> None:
    alias = drained
    with asyncio.Runner() as runner:
        sync_pid(alias)
        runner.run(two_of_each(alias))
        assert wait_until(lambda: len(server_pids(pg)) >= 2 + 6)  # min_size 2, 2 per async kind
        before = server_pids(pg)
        counted = drains(alias)
        with caplog.at_level(logging.INFO, logger="django_asyncpool"):
            reached = drain(alias)  # no loop running here: theirs drain when they run again
        assert reached == {"sync": 1, "async": 1, "async_orm": 1}
        # The sync pool's idle connections are gone at once, replaced (min_size 2).
        assert wait_until(lambda: len(server_pids(pg) & before) == 6, timeout=5)
        runner.run(asyncio.sleep(0))  # the loop runs: its pools close their idle ones
        assert wait_until(lambda: not (server_pids(pg) & before), timeout=5), (
            before,
            server_pids(pg),
        )
        # New connections in their place, on every kind.
        assert sync_pid(alias) not in before
        for kind in KINDS[1:]:
            assert runner.run(async_pid(kind, alias)) not in before, kind
    after = drains(alias)
    assert {side: after[side] - counted[side] for side in after} == {
        "sync": 1,
        "async": 1,
        "async_orm": 1,
    }
    lines = [r for r in caplog.records if "replacing every connection" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "drain() was called" in lines[0].getMessage()


def test_drain_counts_in_the_snapshot_and_metrics(drained: str) -> None:
    from django_asyncpool.metrics import flush

    sync_pid(drained)
    flush()
    snap = next(s for s in _registry.snapshots(drained) if s["pool"] == "sync")
    page = _metrics_page()
    before = metric_value(page, "db_pool_drains_total", alias=drained, pool="sync")
    drain(drained)
    flush()
    after = next(s for s in _registry.snapshots(drained) if s["pool"] == "sync")
    assert after["drains"] == snap["drains"] + 1
    page = _metrics_page()
    assert metric_value(page, "db_pool_drains_total", alias=drained, pool="sync") == before + 1


def _metrics_page() -> str:
    from prometheus_client import generate_latest

    return generate_latest(REGISTRY).decode()


@pytest.mark.parametrize("kind", KINDS)
def test_a_connection_in_use_finishes_its_transaction_and_is_replaced_when_back(
    drained: str, pg: Any, kind: str
) -> None:
    alias = drained
    if kind == "sync":
        with transaction.atomic(using=alias):
            first = _pid(alias)
            with connections[alias].cursor() as cursor:
                cursor.execute("create temporary table t (x int)")  # transaction state
            drain(alias)
            assert first in server_pids(pg)  # not killed mid-transaction
            with connections[alias].cursor() as cursor:
                cursor.execute("insert into t values (1)")
                cursor.execute("select count(*) from t")
                assert cursor.fetchone()[0] == 1
            assert _pid(alias) == first
        connections[alias].close()  # back to the pool: closed there
        assert wait_until(lambda: first not in server_pids(pg), timeout=5)
        assert sync_pid(alias) != first
        return

    async def scenario() -> tuple[int, int, int]:
        if kind == "async_orm":
            async with django_asyncpool.atomic(using=alias):
                first = await _asyncorm.run(alias, _pid, alias)
                drain(alias)
                assert first in server_pids(pg)
                await _asyncorm.run(alias, _count_rows, alias)
                again = await _asyncorm.run(alias, _pid, alias)
        else:
            async with session_scope(using=alias, readonly=kind == "async_readonly") as session:
                first = (await session.execute(text("select pg_backend_pid()"))).scalar_one()
                await session.execute(text("select 1"))
                drain(alias)
                assert first in server_pids(pg)
                await asyncio.sleep(0.05)  # the loop turns: the idle ones close, not this one
                again = (await session.execute(text("select pg_backend_pid()"))).scalar_one()
        gone = await _until(lambda: first not in server_pids(pg))
        return first, again, gone

    with asyncio.Runner() as runner:
        first, again, gone = runner.run(scenario())
        assert again == first  # the same backend until the end of the transaction
        assert gone, "the drained connection was kept after it came back"
        assert runner.run(async_pid(kind, alias)) != first


def test_a_loop_running_in_another_thread_closes_its_idle_connections_at_once(
    drained: str, pg: Any
) -> None:
    # uvicorn's case: the loop runs for good in its own thread; drain() comes from another.
    alias = drained
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        before = asyncio.run_coroutine_threadsafe(two_of_each(alias), loop).result(10)
        assert before <= server_pids(pg)
        drain(alias)
        assert wait_until(lambda: not (server_pids(pg) & before), timeout=2)
        for kind in KINDS[1:]:
            pid = asyncio.run_coroutine_threadsafe(async_pid(kind, alias), loop).result(10)
            assert pid not in before, kind
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(loop.shutdown_asyncgens())  # the pools close with the loop
        loop.close()


def _count_rows(alias: str) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute("select count(*) from pg_class")
        return int(cursor.fetchone()[0])


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def test_drain_of_an_unknown_alias_names_the_known_ones() -> None:
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="default"):
        drain("nope")


# -- dbpool_check --drain -------------------------------------------------------------------


def test_the_command_says_it_cannot_reach_other_processes_without_redis(
    drained: str, pg: Any
) -> None:
    sync_pid(drained)
    assert wait_until(lambda: len(server_pids(pg)) >= 2)
    before = server_pids(pg)
    out, err = _command("--drain", drained)
    assert "OTHER PROCESSES CANNOT BE REACHED" in out
    assert "restart them" in out and "OPTIONS['circuit_breaker']['storage']" in out
    assert "only this process's connections were replaced" in out
    _no_password(out + err, drained)
    assert wait_until(lambda: not (server_pids(pg) & before), timeout=5)  # this process's


def test_the_command_refuses_an_unknown_alias_naming_the_known_ones(db_access: None) -> None:
    with pytest.raises(CommandError) as info:
        _command("--drain", "nope")
    assert info.value.returncode == 2
    assert "nope" in str(info.value) and "default" in str(info.value)


def _command(*args: str) -> tuple[str, str]:
    """Run dbpool_check; return its output (raise its CommandError with the output on it)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("dbpool_check", *args, stdout=out, stderr=err)
    except CommandError as exc:
        exc.output = out.getvalue() + err.getvalue()  # type: ignore[attr-defined]
        raise
    return out.getvalue(), err.getvalue()


def _no_password(output: str, alias: str) -> None:
    password = connections[alias].settings_dict.get("PASSWORD")
    if password:
        assert password not in output


@pytest.fixture
def worker(db_access: None) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(alias: str, **overrides: Any) -> Worker:
        settings = copy.deepcopy(connections["default"].settings_dict)
        settings.update(**overrides)
        made = Worker(alias, json.loads(json.dumps(settings, default=str)))
        started.append(made)
        return made

    yield start
    for made in started:
        made.close()


@pytest.mark.slow
def test_the_command_makes_another_process_replace_its_connections_through_redis(
    make_alias: Callable[..., str], worker: Callable[..., Worker], redis_server: Any, pg: Any
) -> None:
    shared = options(
        circuit_breaker={"storage": redis_server.url, "storage_refresh": REFRESH},
    )
    shared["pool"] = {"min_size": 1, "max_size": 2, "timeout": 5}
    alias = make_alias(OPTIONS=shared)
    other = worker(alias, OPTIONS=shared)
    first = other.ask("pids")
    assert wait_until(lambda: {first["sync"], first["async"]} <= server_pids(pg))
    started = time.monotonic()
    out, err = _command("--drain", alias)
    took = time.monotonic() - started
    assert f"drain #1 asked through Redis at {redis_server.url}" in out, out
    assert "1 other process confirmed" in out, out
    assert f"within {REFRESH:g}s" in out
    _no_password(out + err, alias)
    # The other process's idle sync connection went at once, from its follower thread,
    # within its refresh interval (the command's wait covers it: counted, below).
    assert wait_until(lambda: first["sync"] not in server_pids(pg), timeout=2 * REFRESH + 1)
    assert took < 3
    second = other.ask("pids")
    assert second["sync"] != first["sync"]
    assert second["async"] != first["async"]  # its loop ran again: the old one closed first
    assert first["async"] not in server_pids(pg)
    assert second["drains"] == {"sync": 1, "async": 1}
    # A second drain: the number goes up, the other process follows again.
    out, _ = _command("--drain", alias, "--format", "json")
    report = json.loads(out)["drains"][0]
    assert report["drain"] == 2 and len(report["processes"]) == 1
    assert wait_until(lambda: second["sync"] not in server_pids(pg), timeout=2)


def test_a_process_that_starts_after_a_drain_does_not_drain_for_it(
    make_alias: Callable[..., str], worker: Callable[..., Worker], redis_server: Any
) -> None:
    shared = options(circuit_breaker={"storage": redis_server.url, "storage_refresh": REFRESH})
    alias = make_alias(OPTIONS=shared)
    out, _ = _command("--drain", alias)  # drain #1, before the other process exists
    assert "0 other processes confirmed" in out
    other = worker(alias, OPTIONS=shared)
    other.ask("pids")
    time.sleep(4 * REFRESH)
    assert other.ask("pids")["drains"] == {"sync": 0, "async": 0}


def test_a_redis_that_does_not_answer_is_said_and_the_exit_status_is_1(
    make_alias: Callable[..., str], db_access: None
) -> None:
    from .conftest import closed_port

    url = f"redis://:hunter2secret@127.0.0.1:{closed_port()}/0"
    alias = make_alias(OPTIONS=options(circuit_breaker={"storage": url, "storage_timeout": 0.2}))
    with pytest.raises(CommandError) as info:
        _command("--drain", alias)
    assert info.value.returncode == 1
    output = info.value.output  # type: ignore[attr-defined]
    assert "OTHER PROCESSES CANNOT BE REACHED" in output
    assert f"Redis at redis://127.0.0.1:{url.rsplit(':', 1)[1]} cannot be used" in output
    assert "hunter2secret" not in output + str(info.value)
