"""The process lifecycle (``core.process``): one fork hook and one exit hook, in stated order."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.db import connections

from django_asyncpool import ConnectionPool, metrics  # noqa: F401  (registers its parts)
from django_asyncpool.core import process, registry
from django_asyncpool.failover import route  # noqa: F401  (registers its part)

from ..conftest import in_forked_child, query


def test_every_part_of_the_stated_orders_is_registered() -> None:
    assert set(process.registered("fork")) == set(process.FORK_ORDER)
    assert set(process.registered("exit")) == set(process.EXIT_ORDER)


def test_a_part_the_orders_do_not_name_is_refused() -> None:
    with pytest.raises(ValueError, match="FORK_ORDER"):
        process.at_fork("mine", lambda: None)
    with pytest.raises(ValueError, match="EXIT_ORDER"):
        process.at_exit("mine", lambda: None)


def test_a_forked_child_runs_the_parts_in_the_stated_order(
    monkeypatch: pytest.MonkeyPatch, make_alias: Callable[..., str], db_access: None
) -> None:
    alias = make_alias(OPTIONS={"pool": {"min_size": 1, "max_size": 1}})
    query(connections[alias])
    ConnectionPool(alias)
    ran: list[str] = []
    pools_at_wrappers: list[bool] = []

    def recording(part: str, hook: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            ran.append(part)
            if part == "wrappers":  # the registry forgot the parent's pools before
                pools_at_wrappers.append(bool(registry.sync_pools or registry.async_pools))
            return hook()

        return run

    for part in process.FORK_ORDER:
        hook = process.registered("fork")[part]
        monkeypatch.setattr(process, "_at_fork", {**process._at_fork, part: recording(part, hook)})

    status, report = in_forked_child(lambda: (ran, pools_at_wrappers))()
    assert status == 0
    assert report == repr((list(process.FORK_ORDER), [False]))
    assert ran == []  # the parent ran none of them
    assert alias in registry.sync_pools and alias in registry.async_pools
