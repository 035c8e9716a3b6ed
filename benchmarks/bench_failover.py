"""What OPTIONS["failover_to"] costs on the async pool, side by side in one process.

    python benchmarks/bench_failover.py [--seconds 1.5] [--rounds 5]

Primary-key lookups through ``session_scope()``, ``session_scope(readonly=True)`` and
``connection()`` of three aliases of one server: ``default`` (no failover), ``healthy``
(``failover_to=["default"]``, its breaker closed: what every read of a replica with
failover pays) and ``down`` (``failover_to=["default"]`` on a closed port, its breaker
open: every read fails over to ``default``). Concurrency 1 and 32, interleaved round
after round; medians of ops/s, their ratios to ``default`` and this process's CPU per
op are printed, then the cost of the failover code alone (no round trip) per call: an
async checkout and the ORM router's ``route()``. Uses DATABASE_URL, or starts the
embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

import django
from sqlalchemy import text

django.setup()

from bench_async import ROWS, SQL, prepare  # noqa: E402
from django.conf import settings  # noqa: E402
from django.db import connections  # noqa: E402

from django_asyncpool import ConnectionPool  # noqa: E402
from django_asyncpool.core import registry as _registry  # noqa: E402
from django_asyncpool.errors import PoolError  # noqa: E402
from django_asyncpool.failover import route as _failover  # noqa: E402

TEXT = text("select id, name from bench_items where id = :pk")
SIZES = {"pool_size": 10, "max_overflow": 5}


async def measure(
    fn: Callable[[int], Awaitable[object]], concurrency: int, seconds: float
) -> tuple[float, float]:
    """Return (ops/s, this process's CPU microseconds per op): the CPU figure is what
    the failover code adds, and is steadier than ops/s on a shared machine."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        pk = 0
        while time.perf_counter() < deadline:
            pk = pk % ROWS + 1
            await fn(pk)
            done += 1

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    took, cpu = time.perf_counter() - started, time.process_time() - cpu
    return done / took, cpu / max(done, 1) * 1e6


def add_alias(name: str, **overrides: object) -> None:
    settings_dict = copy.deepcopy(connections["default"].settings_dict)
    options = {"async_pool": SIZES, **overrides.pop("OPTIONS", {})}  # type: ignore[dict-item]
    settings_dict.update(overrides, OPTIONS=options)
    settings.DATABASES[name] = settings_dict
    connections.settings[name] = settings_dict


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main(seconds: float, rounds: int) -> None:
    from django_asyncpool.sqla.engines import connect_kwargs

    await prepare(connect_kwargs(_registry.config("default")))
    add_alias("healthy", OPTIONS={"failover_to": ["default"]})
    add_alias(
        "down",
        HOST="127.0.0.1",
        PORT=closed_port(),
        OPTIONS={
            "failover_to": ["default"],
            "circuit_breaker": {"fail_max": 1, "reset_timeout": 3600},
            "retry": {"max_tries": 1},
        },
    )
    try:
        async with ConnectionPool("down").connection(failover=False):
            pass
    except PoolError:
        pass  # refused: its breaker is open for the whole run
    assert _registry.guard("down").state == "open"

    def variants(alias: str) -> dict[str, Callable[[int], Awaitable[object]]]:
        pool = ConnectionPool(alias)

        async def scope(pk: int) -> object:
            async with pool.session_scope() as session:
                return (await session.execute(TEXT, {"pk": pk})).one()

        async def readonly(pk: int) -> object:
            async with pool.session_scope(readonly=True) as session:
                return (await session.execute(TEXT, {"pk": pk})).one()

        async def fast(pk: int) -> object:
            async with pool.connection() as conn:
                return await conn.fetchrow(SQL, pk)

        return {"session_scope()": scope, "readonly": readonly, "connection()": fast}

    aliases = ("default", "healthy", "down")
    table = {alias: variants(alias) for alias in aliases}
    for alias in aliases:  # warm every pool up
        for fn in table[alias].values():
            await asyncio.gather(*(fn(1 + pk % ROWS) for pk in range(32)))

    for concurrency in (1, 32):
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(rounds):
            for kind in table["default"]:
                for alias in aliases:
                    got = await measure(table[alias][kind], concurrency, seconds)
                    results.setdefault((alias, kind), []).append(got)
        print(f"\nconcurrency {concurrency}: medians of {rounds} rounds of {seconds}s")
        print(f"  {'path':16} {'alias':8} {'ops/s':>7} {'ratio':>6} {'CPU us/op':>10} {'extra':>7}")
        for kind in table["default"]:
            base_ops = statistics.median(r[0] for r in results["default", kind])
            base_cpu = statistics.median(r[1] for r in results["default", kind])
            for alias in aliases:
                ops = statistics.median(r[0] for r in results[alias, kind])
                cpu = statistics.median(r[1] for r in results[alias, kind])
                print(
                    f"  {kind:16} {alias:8} {ops:7.0f} {ops / base_ops:6.2f} {cpu:10.1f} "
                    f"{cpu - base_cpu:+7.1f}"
                )

    # The failover code alone, no round trip: median of 5 runs of 100k calls each.
    calls = 100_000

    async def attempt(alias: str) -> str:
        return alias

    async def per_call(fn: Callable[[], object]) -> float:
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(calls):
                result = fn()
                if asyncio.iscoroutine(result):
                    await result
            runs.append((time.perf_counter() - started) / calls * 1e6)
        return statistics.median(runs)

    print("\nthe failover code alone, us per call (median of 5 x 100k):")
    base = await per_call(lambda: attempt("default"))
    print(f"  {'a checkout without failover (baseline)':44} {base:6.2f}")
    for alias in ("healthy", "down"):
        took = await per_call(lambda a=alias: _failover.through_chain(a, attempt))
        print(f"  {f'async checkout of {alias!r}':44} {took:6.2f}  (+{took - base:.2f})")
    for alias in aliases:
        took = await per_call(lambda a=alias: _failover.route(a))
        print(f"  {f'ORM route({alias!r}) -> {_failover.route(alias)!r}':44} {took:6.2f}")

    for alias in aliases:
        await ConnectionPool(alias).close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.rounds))
