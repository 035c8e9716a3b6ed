"""The sync pool (``_syncpool.SyncPool``): what it relies on in psycopg_pool, its snapshot,
its checkout check and what it counts, on a real server."""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from typing import Any

import psycopg
import psycopg_pool
import pytest
from psycopg_pool import base as pool_base
from psycopg_pool import pool as pool_module

from django_asyncpool.core import registry as _registry
from django_asyncpool.core import stats as _stats
from django_asyncpool.errors import SyncPoolTimeout
from django_asyncpool.sync import pool as _syncpool
from django_asyncpool.sync.pool import PING, SyncPool

from ..conftest import query, wait_until


def test_the_psycopg_pool_internals_it_relies_on_still_exist() -> None:
    """Fails loudly on a psycopg_pool upgrade that renames what SyncPool uses."""
    documented = _syncpool.__doc__ or ""
    pool = psycopg_pool.ConnectionPool("", open=False)
    try:
        for name in ("_opened", "_lock", "_nconns", "_stats", "_waiting", "_min_size"):
            assert hasattr(pool, name), name
            assert f"``{name}``" in documented, name
    finally:
        pool.close()
    methods = (
        "_maybe_grow_pool",
        "_add_connection",
        "_connect",
        "_check_open_getconn",
        "_getconn_with_check_loop",
        "_getconn_unchecked",
        "_set_connection_expiry_date",
        "_start_initial_tasks",
        "run_task",
        "schedule_task",
    )
    for name in methods:
        assert callable(getattr(psycopg_pool.ConnectionPool, name, None)), name
        assert f"``{name}``" in documented, name
    for name in ("AddConnection", "MaintenanceTask", "Schedule"):
        assert isinstance(getattr(pool_module, name, None), type), name
        assert name in documented, name
    assert hasattr(pool_base.AttemptWithBackoff, "update_delay")
    assert "AttemptWithBackoff" in documented
    # The counters SyncPool adds to, and the stats keys it reads.
    pool = psycopg_pool.ConnectionPool("", open=False)
    try:
        assert isinstance(pool._stats, collections.Counter)
        assert {"pool_size", "pool_available", "requests_waiting"} <= set(pool.get_stats())
    finally:
        pool.close()


def test_the_snapshot_has_the_one_shape(make_wrapper) -> None:
    wrapper = make_wrapper(OPTIONS={"pool": {"min_size": 1, "max_size": 3}})
    query(wrapper)
    pool = wrapper.pool
    assert pool is not None
    snap = pool.snapshot()
    assert tuple(snap) == _stats.SNAPSHOT_KEYS
    assert snap["alias"] == wrapper.alias and snap["pool"] == "sync"
    assert (snap["min_size"], snap["max_size"]) == (1, 3)
    assert snap["in_use"] == 0 and snap["size"] == snap["idle"] >= 1
    assert snap["attempts"] >= 1 and snap["created"] >= 1
    assert re.fullmatch(r"size \d+/3, in use 0, idle \d+, waiting 0", pool.describe_state())


def test_checkout_check_is_its_own_keyword(make_wrapper) -> None:
    """OPTIONS["pool"]["check"] and CONN_HEALTH_CHECKS select SyncPool's checkout_check,
    run once per checkout (psycopg_pool's own loop, which sleeps after a failed check,
    never runs it)."""
    seen: list[Any] = []
    checked = make_wrapper(OPTIONS={"pool": {"max_size": 1, "check": seen.append}})
    query(checked)
    query(checked)
    assert checked.pool is not None
    assert checked.pool.checkout_check == seen.append
    assert len(seen) == 2  # every checkout, the first one too

    pinged = make_wrapper(CONN_HEALTH_CHECKS=True, OPTIONS={"pool": {"max_size": 1}})
    query(pinged)
    assert pinged.pool is not None and pinged.pool.checkout_check == PING
    pings = pinged.pool.stats.pings
    query(pinged)
    assert pinged.pool.stats.pings == pings + 1

    plain = make_wrapper(OPTIONS={"pool": {"max_size": 1}})
    query(plain)
    assert plain.pool is not None and plain.pool.checkout_check is None


def test_dead_connections_are_counted_as_invalidated_once(make_wrapper) -> None:
    """Found dead at checkout (a failed check) and returned broken: counted when it happens."""
    fail = [True]

    def check(conn: psycopg.Connection[Any]) -> None:
        if fail and fail.pop():
            raise psycopg.OperationalError("failed the user's check")

    wrapper = make_wrapper(OPTIONS={"pool": {"min_size": 1, "max_size": 2, "check": check}})
    stats = wrapper._sync_stats
    before = stats.invalidated
    query(wrapper)  # the first connection fails the check: replaced
    assert stats.invalidated == before + 1
    wrapper.ensure_connection()
    wrapper.connection.close()  # returned broken
    wrapper.close()
    assert stats.invalidated == before + 2
    from django_asyncpool import metrics

    metrics.flush()  # nothing harvested from the pool on top
    assert stats.invalidated == before + 2


def test_liveness_bypass_is_the_window_without_a_ping(make_wrapper) -> None:
    wrapper = make_wrapper(OPTIONS={"pool": {"max_size": 1}, "liveness_bypass": 30})
    query(wrapper)
    pool = wrapper.pool
    assert isinstance(pool, SyncPool) and pool.liveness_bypass == 30
    pings = pool.stats.pings
    query(wrapper)  # returned a moment ago: no round trip
    assert pool.stats.pings == pings


def test_too_many_waiting_is_the_applications_load_not_an_outage(make_wrapper) -> None:
    """psycopg_pool's TooManyRequests (OPTIONS["pool"]["max_waiting"]) is a pool timeout:
    raised at once with what to do, never retried, never counted by the breaker."""
    wrapper = make_wrapper(
        OPTIONS={"pool": {"min_size": 1, "max_size": 1, "max_waiting": 1, "timeout": 5}}
    )
    query(wrapper)
    wrapper.ensure_connection()  # holds the pool's one connection

    def another() -> Any:
        return type(wrapper)(wrapper.settings_dict, wrapper.alias)  # the same alias's pool

    waiter = threading.Thread(target=lambda: query(another()))
    try:
        waiter.start()
        assert wrapper.pool is not None
        assert wait_until(lambda: wrapper.pool.get_stats().get("requests_waiting", 0) == 1)
        with pytest.raises(SyncPoolTimeout, match=r"size 1/1, in use 1.*max_waiting"):
            another().ensure_connection()
        guard = _registry.guard(wrapper.alias)
        assert guard.breaker.fail_counter == 0 and guard.state == "closed"
        assert wrapper._sync_stats.retries == 0 and wrapper._sync_stats.timeouts == 1
    finally:
        wrapper.close()
        waiter.join(10)
    assert not waiter.is_alive()


def test_a_connection_held_too_long_is_logged_once_with_its_taker(make_wrapper, caplog) -> None:
    wrapper = make_wrapper(OPTIONS={"pool": {"min_size": 0, "max_size": 2}, "leak_threshold": 0.1})
    query(wrapper)  # taken and given back at once: no leak
    pool = wrapper.pool
    assert pool is not None and pool.stats.leaks == 0

    def keep_a_connection() -> None:
        wrapper.ensure_connection()

    with caplog.at_level(logging.WARNING, logger="django_asyncpool"):
        keep_a_connection()
        time.sleep(0.6)  # several sweeps past the threshold
        wrapper.close()
    reports = [r.getMessage() for r in caplog.records if "leak_threshold (0.1s)" in r.getMessage()]
    assert len(reports) == 1, reports
    assert "keep_a_connection" in reports[0]  # the stack of the code that took it
    assert pool.stats.leaks == 1
