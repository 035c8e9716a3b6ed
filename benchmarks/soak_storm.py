"""Soak: a cancellation storm, then what the checkout liveness check costs.

    python benchmarks/soak_storm.py [--requests 2000] [--rounds 5] [--seconds 1.5]

1. Cancellation storm (scenario 4 of docs/reliability.md): ``--requests``
   requests at once, a third of them cancelled at random points (waiting for a
   connection, mid-query, mid-commit). Prints: cancelled, failed, connections
   leaked (in use afterwards), backends left 'active' or 'idle in transaction'
   on the server, and the time for pool_size + max_overflow requests at once
   afterwards (full strength).
2. The liveness check (scenario 2's cost): ``pool.connection()`` + ``select 1`` at
   concurrency 32 with the default check (a non-blocking poll of the socket,
   a ping only after ``liveness_bypass`` idle seconds) against a ping on every
   checkout (``liveness_bypass = 0``, what ``pool_pre_ping`` does), interleaved
   rounds, medians and ratio; and the poll's own cost per checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

import django

django.setup()

from django.conf import settings  # noqa: E402
from django.db import connections  # noqa: E402
from sqlalchemy import text  # noqa: E402

from django_asyncpool import ConnectionPool  # noqa: E402
from django_asyncpool.core.liveness import socket_readable  # noqa: E402

APP = "asyncpool-soak-storm"


def add_alias(alias: str, **options: Any) -> str:
    entry = {
        **settings.DATABASES["default"],
        "OPTIONS": {"application_name": APP, **options},
    }
    settings.DATABASES[alias] = entry
    connections.settings[alias] = entry
    return alias


async def server_count(pool: ConnectionPool, state: str) -> int:
    async with pool.connection() as conn:  # its own backend is 'active': not counted
        return int(
            await conn.fetchval(
                "select count(*) from pg_stat_activity where application_name = $1 "
                "and state = $2 and pid <> pg_backend_pid()",
                APP,
                state,
            )
        )


async def storm(requests: int) -> None:
    alias = add_alias("storm", async_pool={"pool_size": 10, "max_overflow": 5, "timeout": 10})
    pool = ConnectionPool(alias)
    async with pool.connection() as conn:
        await conn.execute(
            "create table if not exists soak_items (id int primary key, n int not null);"
            "insert into soak_items select g, 0 from generate_series(1, 100) g "
            "on conflict do nothing"
        )

    async def work(i: int) -> None:
        kind = i % 3
        if kind == 0:  # a write, then the commit round trip
            async with pool.session_scope() as session:
                await session.execute(
                    text("update soak_items set n = n + 1 where id = :id"), {"id": 1 + i % 100}
                )
                await session.execute(text("select pg_sleep(0.002)"))
        elif kind == 1:
            async with pool.connection() as conn:
                await conn.fetchval("select pg_sleep(0.005)")
        else:
            async with pool.session_scope(readonly=True) as session:
                await session.execute(text("select pg_sleep(0.003), count(*) from soak_items"))

    rng = random.Random(4)
    started = time.monotonic()
    tasks = [asyncio.create_task(work(i)) for i in range(requests)]
    loop = asyncio.get_running_loop()
    # Spread over the time the storm takes (~ requests / 15 connections x ~5 ms).
    horizon = requests * 0.005 / 15 * 1.5
    for task in rng.sample(tasks, requests // 3):
        loop.call_later(rng.random() * horizon, task.cancel)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    took = time.monotonic() - started
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    failed = [r for r in results if isinstance(r, Exception)]
    metrics = pool.metrics
    await asyncio.sleep(0.2)
    active = await server_count(pool, "active")
    idle_tx = await server_count(pool, "idle in transaction")
    started = time.monotonic()
    async with asyncio.timeout(10):
        await asyncio.gather(*(work(3 * i + 1) for i in range(15)))
    full = time.monotonic() - started
    print(
        f"cancellation storm: {requests} requests in {took:.2f}s, {cancelled} cancelled, "
        f"{len(failed)} failed; leaked (in use afterwards) {metrics['in_use']}, waiting "
        f"{metrics['waiting']}; server backends active {active}, idle in transaction "
        f"{idle_tx}; pool_size + max_overflow (15) at once afterwards in {full:.2f}s; "
        f"connections discarded {metrics['invalidated']}"
    )
    for r in failed[:3]:
        print(f"  failed: {r!r}"[:300])
    await pool.close()


async def liveness(rounds: int, seconds: float) -> None:
    variants = {
        "poll (default)": ConnectionPool(add_alias("live_poll", liveness_bypass=0.5)),
        "ping every checkout": ConnectionPool(add_alias("live_ping", liveness_bypass=0)),
    }
    for pool in variants.values():
        async with pool.connection() as conn:
            await conn.fetchval("select 1")

    async def measure(pool: ConnectionPool) -> float:
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                async with pool.connection() as conn:
                    await conn.fetchval("select 1")
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(32)))
        return done / (time.perf_counter() - started)

    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, pool in variants.items():
            results[name].append(await measure(pool))
    base = statistics.median(results["poll (default)"])
    for name, values in results.items():
        median = statistics.median(values)
        print(f"liveness {name:22s} {median:9.0f} ops/s  {median / base:5.2f}x")
    async with variants["poll (default)"].connection() as conn:
        n = 20000
        fd = conn._transport.get_extra_info("socket").fileno()
        started = time.perf_counter()
        for _ in range(n):
            socket_readable(fd)
        poll = (time.perf_counter() - started) / n
    print(
        f"liveness poll alone: {poll * 1e6:.2f} us per checkout "
        f"({poll * base * 100:.1f}% of the time per checkout + query, one loop, 32 tasks)"
    )
    for pool in variants.values():
        await pool.close()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.5)
    args = parser.parse_args(argv)
    asyncio.run(storm(args.requests))
    asyncio.run(liveness(args.rounds, args.seconds))


if __name__ == "__main__":
    main(sys.argv[1:])
