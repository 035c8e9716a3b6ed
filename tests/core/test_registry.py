"""The per-alias registry (``_registry``): configs, guards, stats, both pools, reset, fork."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from django.conf import settings
from django.db import connections
from django.test import override_settings

from django_asyncpool import ConnectionPool
from django_asyncpool.core import registry as _registry
from django_asyncpool.orm import pool as _ormpool

from ..conftest import in_forked_child, query


def test_aliases_are_the_ones_of_this_engine(
    make_alias: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert {"default", "replica"} <= set(_registry.aliases())
    alias = make_alias()
    assert alias in _registry.aliases()
    monkeypatch.setitem(settings.DATABASES, "other", {"ENGINE": "django.db.backends.sqlite3"})
    assert "other" not in _registry.aliases()
    assert alias in _registry.aliases()


def test_config_is_cached_until_the_alias_settings_change(make_alias: Callable[..., str]) -> None:
    alias = make_alias(OPTIONS={"circuit_breaker": {"fail_max": 3}})
    first = _registry.config(alias)
    assert first.breaker.fail_max == 3
    assert _registry.config(alias) is first  # read once
    connections[alias].settings_dict["OPTIONS"] = {"circuit_breaker": {"fail_max": 4}}
    again = _registry.config(alias)
    assert again is not first
    assert again.breaker.fail_max == 4
    assert _registry.config(alias) is again


def test_config_is_read_again_when_the_environment_changes(
    make_alias: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No NAME and no HOST: DATABASE_URL gives the connection fields (the wrapper keeps
    # them from when it was made, as Django keeps its settings_dict).
    alias = make_alias(NAME="", HOST="", PORT="", OPTIONS={})
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@db1.example:5432/first")
    first = _registry.config(alias)
    assert (first.host, first.dbname) == ("db1.example", "first")
    assert first.async_pool.pool_size != 7
    assert _registry.config(alias) is first
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@db2.example:5432/second")
    second = _registry.config(alias)
    assert second is not first  # read again
    assert _registry.config(alias) is second
    monkeypatch.setenv("DB_POOL_SIZE", "7")
    assert _registry.config(alias).async_pool.pool_size == 7


def test_config_of_an_alias_that_is_not_ours_says_which_are() -> None:
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured) as info:
        _registry.config("nosuchalias")
    assert "default" in str(info.value)


def test_reset_closes_the_pools_and_makes_a_new_guard_keeping_the_stats(
    make_alias: Callable[..., str], db_access: None
) -> None:
    alias = make_alias(OPTIONS={"pool": {"min_size": 0, "max_size": 2}})
    wrapper = connections[alias]
    query(wrapper)
    sync_pool = _registry.sync_pools[alias]
    assert wrapper.pool is sync_pool  # DatabaseWrapper._connection_pools is the registry's dict
    async_pool = ConnectionPool(alias)
    assert _registry.async_pools[alias] is async_pool
    guard = _registry.guard(alias)
    guard.entered["open"] += 1  # as if the breaker had opened once
    stats = _registry.stats(alias, "sync")
    checkouts = stats.checkouts
    assert checkouts >= 1

    _registry.reset(alias)

    assert alias not in _registry.sync_pools
    assert alias not in _registry.async_pools
    assert sync_pool.closed
    assert ConnectionPool(alias) is not async_pool
    assert _registry.guard(alias) is not guard
    assert _registry.guard(alias).entered["open"] == 1  # transitions last the process
    assert _registry.stats(alias, "sync") is stats
    query(wrapper)  # a new sync pool, counted in the same stats
    assert _registry.sync_pools[alias] is not sync_pool
    assert stats.checkouts == checkouts + 1


def _databases(**breaker: Any) -> dict[str, Any]:
    databases = copy.deepcopy(settings.DATABASES)
    databases["default"]["OPTIONS"]["circuit_breaker"] = breaker
    return databases


async def test_reset_drops_the_native_orm_pools_of_every_loop(
    make_alias: Callable[..., str],
) -> None:
    alias = make_alias(OPTIONS={"async_orm": True})
    old = _ormpool.holder(alias)  # made on this loop, no connection opened yet
    assert (alias, old) in _ormpool.holders()
    _registry.reset(alias)
    assert [a for a, _ in _ormpool.holders() if a == alias] == []
    assert alias not in {snap["alias"] for snap in _registry.snapshots() if snap["in_use"]}
    assert _ormpool.holder(alias) is not old  # made again, from the settings of now


def test_every_kind_of_pool_is_registered() -> None:
    assert {"sync", "async", "async_orm"} <= set(_registry.kinds())


def test_override_settings_reaches_the_guard() -> None:
    before = _registry.guard("default")
    fail_max = before.breaker.fail_max
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Overriding setting DATABASES ..."
        with override_settings(DATABASES=_databases(fail_max=fail_max + 7)):
            assert _registry.guard("default").breaker.fail_max == fail_max + 7
    after = _registry.guard("default")
    assert after is not before
    assert after.breaker.fail_max == fail_max


def test_a_forked_child_has_none_of_the_parents_pools_or_guards(
    make_alias: Callable[..., str], db_access: None
) -> None:
    alias = make_alias(OPTIONS={"pool": {"min_size": 1, "max_size": 2}})
    query(connections[alias])
    ConnectionPool(alias)
    parent_guard = _registry.guard(alias)
    assert alias in _registry.sync_pools and alias in _registry.async_pools

    def seen() -> dict[str, bool]:
        found = {
            "sync": dict(_registry.sync_pools),
            "async": dict(_registry.async_pools),
            "guards": _registry.guards(),
            "same_guard": _registry.guard(alias) is parent_guard,
        }
        return {k: bool(v) for k, v in found.items()}

    status, report = in_forked_child(seen)()
    assert status == 0
    assert report == repr({"sync": False, "async": False, "guards": False, "same_guard": False})
    # The parent keeps its own.
    assert alias in _registry.sync_pools
    assert _registry.guard(alias) is parent_guard
    query(connections[alias])
