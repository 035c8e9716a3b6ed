"""``_stats``: the one snapshot shape, and every renderer showing the same figures.

The Prometheus metrics, ``dbpool_check --format json``, the demo's ``/pool/`` and the
health check all render the pools' snapshots (``_registry.snapshots()``): for one
pool state they must agree, figure for figure.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from typing import Any

import httpx
import pytest
from django.core.management import call_command
from django.db import connections
from prometheus_client import REGISTRY

from django_asyncpool import ConnectionPool
from django_asyncpool.core import registry as _registry
from django_asyncpool.core import stats as _stats
from testproject.asgi import application

pytestmark = pytest.mark.usefixtures("db_access")

#: Snapshot key -> (metric, extra labels) rendering it.
GAUGES = {
    "idle": ("db_connection_state", {"state": "idle"}),
    "in_use": ("db_connection_state", {"state": "in_use"}),
    "waiting": ("db_connection_state", {"state": "waiting"}),
    "size": ("db_pool_size", {}),
    "min_size": ("db_pool_min_size", {}),
    "max_size": ("db_pool_max_size", {}),
}
COUNTERS = {
    "checkouts": ("db_connection_attempts_total", {"outcome": "success"}),
    "timeouts": ("db_pool_timeouts_total", {}),
    "created": ("db_pool_connections_created_total", {}),
    "reused": ("db_pool_connections_reused_total", {}),
    "invalidated": ("db_pool_connections_invalidated_total", {}),
    "retries": ("db_pool_retries_total", {}),
    "leaks": ("db_pool_leaks_total", {}),
}


def test_a_snapshot_has_the_same_keys_for_every_pool(make_alias) -> None:
    alias = make_alias(OPTIONS={"pool": {"min_size": 1, "max_size": 3}})
    sync = connections[alias].pool
    assert sync is not None
    with connections[alias].cursor() as cursor:
        cursor.execute("select 1")
    connections[alias].close()

    async def use() -> dict[str, Any]:
        async with ConnectionPool(alias).connection() as conn:
            await conn.fetchval("select 1")
        return ConnectionPool(alias).metrics

    async_snap = asyncio.run(use())
    sync_snap = sync.snapshot()
    assert tuple(sync_snap) == tuple(async_snap) == _stats.SNAPSHOT_KEYS
    assert (sync_snap["pool"], async_snap["pool"]) == ("sync", "async")
    assert sync_snap["max_size"] == 3 and async_snap["max_size"] == 15  # 10 + 5 by default
    for snap in (sync_snap, async_snap):
        assert snap["checkouts"] >= 1 and snap["size"] == snap["idle"] + snap["in_use"]
        assert snap["breaker_state"] == "closed"


def test_metrics_dbpool_check_and_pool_page_render_the_same_figures(make_alias) -> None:
    alias = make_alias(
        OPTIONS={"pool": {"min_size": 1, "max_size": 4}, "async_pool": {"pool_size": 3}}
    )
    sync = connections[alias].pool
    assert sync is not None
    held = [sync.getconn(), sync.getconn()]  # two sync connections in use throughout
    try:
        out = io.StringIO()
        # dbpool_check runs its async probe in an event loop of its own: from a thread.
        thread = threading.Thread(
            target=call_command,
            args=("dbpool_check", "--database", alias, "--format", "json"),
            kwargs={"stdout": out},
        )
        thread.start()
        thread.join(30)
        command = json.loads(out.getvalue())["aliases"][0]

        def scrape(side: str, name: str, labels: dict[str, str]) -> float | None:
            # A read of the registry flushes the metrics from the snapshots first.
            return REGISTRY.get_sample_value(name, {"alias": alias, "pool": side, **labels})

        async def render() -> tuple[dict[str, Any], dict[str, Any], dict[Any, Any]]:
            async with ConnectionPool(alias).connection():  # one async connection in use
                transport = httpx.ASGITransport(app=application)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                    page = (await c.get("/pool/")).json()[alias]
                snaps = {s["pool"]: s for s in _registry.snapshots(alias)}
                scraped = {
                    (side, key): scrape(side, name, labels)
                    for side in snaps
                    for key, (name, labels) in {**GAUGES, **COUNTERS}.items()
                }
                return page, snaps, scraped

        page, snaps, scraped = asyncio.run(render())
    finally:
        for conn in held:
            sync.putconn(conn)

    # The sync pool did not change between the command's probe and now.
    assert command["sync"]["pool"] == page["sync"] == snaps["sync"]
    assert snaps["sync"]["in_use"] == 2 and snaps["async"]["in_use"] == 1
    # The async pool's counters agree; its gauges are per event loop (the command's
    # loop is gone): the page and the snapshot were taken in the same loop.
    counters = ("attempts", "checkouts", "created", "failures", "timeouts", "rejected")
    assert {k: page["async"][k] for k in counters} == {k: snaps["async"][k] for k in counters}
    assert page["async"]["in_use"] == snaps["async"]["in_use"] == 1
    assert command["async"]["pool"]["attempts"] < snaps["async"]["attempts"]
    assert command["breaker"]["state"] == snaps["sync"]["breaker_state"] == "closed"

    # Metrics: scraped while the async connection was held, from the same snapshots.
    for side, snap in snaps.items():
        for key in {**GAUGES, **COUNTERS}:
            assert scraped[side, key] == snap[key], (side, key, scraped[side, key], snap[key])
        assert (
            REGISTRY.get_sample_value(
                "db_pool_breaker_state", {"alias": alias, "state": snap["breaker_state"]}
            )
            == 1
        )
