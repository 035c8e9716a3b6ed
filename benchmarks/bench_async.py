"""The async pool against raw asyncpg and bare SQLAlchemy, side by side in one process.

    python benchmarks/bench_async.py [--seconds 1.5] [--rounds 5]

Primary-key lookup on a 10k-row table at concurrency 1 and 32. The variants run
interleaved, round after round, in one process; medians of ops/s and ratios are
printed. Uses DATABASE_URL, or starts the embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

import asyncpg
import django
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

django.setup()


from django_asyncpool import ConnectionPool  # noqa: E402
from django_asyncpool.sqla.engines import connect_kwargs  # noqa: E402

ROWS = 10_000
SQL = "select id, name from bench_items where id = $1"
TEXT = text("select id, name from bench_items where id = :pk")


async def prepare(kwargs: dict) -> None:
    conn = await asyncpg.connect(**kwargs)
    await conn.execute(
        "drop table if exists bench_items;"
        "create table bench_items (id int primary key, name text not null);"
        f"insert into bench_items select g, 'item ' || g from generate_series(1, {ROWS}) g;"
        "analyze bench_items"
    )
    await conn.close()


async def measure(
    fn: Callable[[int], Awaitable[object]], concurrency: int, seconds: float
) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        rnd = random.Random()
        while time.perf_counter() < deadline:
            await fn(rnd.randint(1, ROWS))
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def main(seconds: float, rounds: int) -> None:
    from django_asyncpool.core import registry as _registry

    config = connect_kwargs(_registry.config("default"))
    await prepare(config)
    size, overflow = 10, 5  # the same cap for every variant

    raw_pool = await asyncpg.create_pool(min_size=size, max_size=size + overflow, **config)

    async def creator() -> asyncpg.Connection:
        return await asyncpg.connect(**config)

    bare = create_async_engine(
        "postgresql+asyncpg://", async_creator=creator, pool_size=size, max_overflow=overflow
    )
    pool = ConnectionPool()

    async def raw_asyncpg(pk: int) -> object:
        async with raw_pool.acquire() as conn:
            return await conn.fetchrow(SQL, pk)

    async def bare_session(pk: int) -> object:
        async with AsyncSession(bare) as session, session.begin():
            return (await session.execute(TEXT, {"pk": pk})).one()

    async def scope(pk: int) -> object:
        async with pool.session_scope() as session:
            return (await session.execute(TEXT, {"pk": pk})).one()

    async def scope_readonly(pk: int) -> object:
        async with pool.session_scope(readonly=True) as session:
            return (await session.execute(TEXT, {"pk": pk})).one()

    async def fast_path(pk: int) -> object:
        async with pool.connection() as conn:
            return await conn.fetchrow(SQL, pk)

    variants = {
        "raw asyncpg pool.acquire+fetchrow": raw_asyncpg,
        "bare AsyncSession+begin": bare_session,
        "session_scope()": scope,
        "session_scope(readonly=True)": scope_readonly,
        "pool.connection()": fast_path,
    }
    for fn in variants.values():  # warm every pool up
        await asyncio.gather(*(fn(pk) for pk in range(1, 33)))

    for concurrency in (1, 32):
        results: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, fn in variants.items():
                results[name].append(await measure(fn, concurrency, seconds))
        med = {name: statistics.median(v) for name, v in results.items()}
        raw, sess = med["raw asyncpg pool.acquire+fetchrow"], med["bare AsyncSession+begin"]
        print(f"\nconcurrency {concurrency}: median of {rounds} rounds of {seconds}s")
        print(f"  {'variant':36} {'ops/s':>8} {'vs raw':>7} {'vs bare session':>16}")
        for name, value in med.items():
            print(f"  {name:36} {value:8.0f} {value / raw:7.2f} {value / sess:16.2f}")
        print(
            "  bars: session_scope >= 0.95x bare session; readonly >= 2x bare session; "
            "connection() >= 0.9x raw"
        )
        print(
            f"  -> session_scope {med['session_scope()'] / sess:.2f}x, readonly "
            f"{med['session_scope(readonly=True)'] / sess:.2f}x, connection() "
            f"{med['pool.connection()'] / raw:.2f}x"
        )

    await raw_pool.close()
    await bare.dispose()
    await pool.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.rounds))
