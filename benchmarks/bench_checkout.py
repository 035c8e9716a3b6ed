"""The CPU of one checkout + return, with no contention: our pools beside their peers.

    python benchmarks/bench_checkout.py [--rounds 7] [--ops 3000] [--only async|sync]

What the steady load matrix's p99 *wait* comes down to when nothing queues
(benchmarks/soak_matrix.py, 0.5x and 1x the cap): the pure CPU of a checkout.
One process, one thread, one connection in use at a time; the variants run
interleaved (the order flips every round), ``--ops`` checkouts each per round;
printed per variant: the medians over the rounds of CPU us/op (``process_time``),
p50/p99 of the checkout alone (what the matrix times) and of checkout + return,
and the ratio of our CPU/op to the peer's.

- async: ``Pool.connect()`` + ``close()`` of the fairy, in SQLAlchemy's greenlet
  (as a session runs it), on our ``GuardedPool`` (``ConnectionPool().engine``,
  with its listeners: liveness, stats, breaker) against bare SQLAlchemy's
  ``AsyncAdaptedQueuePool`` (``create_async_engine``); both with
  ``pool_reset_on_return=None`` (ours has it; a session ends its transaction);
- sync, ORM: ``connections[alias].ensure_connection()`` + ``close()``, the ENGINE
  against ``django.db.backends.postgresql`` with its pool (same sizes);
- sync, pool: ``checkout.checkout(stats, guard, pool.getconn)`` + ``checkin`` +
  ``putconn`` (breaker, liveness, stats, leak tracking off as by default) against
  bare psycopg_pool ``getconn()`` + ``putconn()``.

The server is ``DATABASE_URL`` when set, otherwise the embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POOL = {"min_size": 2, "max_size": 4, "timeout": 5}


def setup_django() -> dict[str, Any]:
    """Configure Django with our ENGINE and Django's pooled backend; return the fields."""
    import django
    from django.conf import settings

    from django_asyncpool.config import parse_url
    from testproject import pgserver

    url = os.environ.get("DATABASE_URL") or pgserver.embedded_url()
    db = parse_url(url)
    conn = {k: db[k] for k in ("NAME", "USER", "PASSWORD", "HOST", "PORT")}

    def alias(engine: str, **options: Any) -> dict[str, Any]:
        return {"ENGINE": engine, **conn, "CONN_MAX_AGE": 0, "OPTIONS": options}

    settings.configure(
        DEBUG=False,
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        INSTALLED_APPS=["django.contrib.contenttypes", "django_asyncpool"],
        DATABASES={
            "default": alias(
                "django_asyncpool",
                pool=dict(POOL),
                async_pool={"pool_size": 2, "max_overflow": 2, "timeout": 5},
            ),
            "stock": alias("django.db.backends.postgresql", pool=dict(POOL)),
        },
    )
    django.setup()
    return conn


class Round:
    """One variant's figures in one round."""

    def __init__(self, cpu: float, ops: int, takes: list[float], whole: list[float]) -> None:
        self.cpu_us = cpu / ops * 1e6
        self.take = sorted(takes)
        self.whole = sorted(whole)

    @staticmethod
    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def timed(get: Callable[[], Any], give: Callable[[Any], None], ops: int) -> Round:
    """Run ``ops`` checkouts + returns; time each checkout alone and with its return."""
    takes = [0.0] * ops
    whole = [0.0] * ops
    perf = time.perf_counter
    cpu = time.process_time()
    for i in range(ops):
        t0 = perf()
        got = get()
        t1 = perf()
        give(got)
        t2 = perf()
        takes[i] = t1 - t0
        whole[i] = t2 - t0
    return Round(time.process_time() - cpu, ops, takes, whole)


def report(title: str, results: dict[str, list[Round]], pairs: list[tuple[str, str]]) -> None:
    med = statistics.median
    print(f"\n== {title}: medians of {len(next(iter(results.values())))} rounds")
    print(
        f"  {'variant':44s} {'CPU us/op':>9s} {'take p50':>9s} {'p99':>7s}"
        f" {'take+return p50':>15s} {'p99':>7s}  (us)"
    )
    for name, rounds in results.items():
        print(
            f"  {name:44s} {med(r.cpu_us for r in rounds):9.1f}"
            f" {med(Round.pct(r.take, 0.5) for r in rounds) * 1e6:9.1f}"
            f" {med(Round.pct(r.take, 0.99) for r in rounds) * 1e6:7.1f}"
            f" {med(Round.pct(r.whole, 0.5) for r in rounds) * 1e6:15.1f}"
            f" {med(Round.pct(r.whole, 0.99) for r in rounds) * 1e6:7.1f}"
        )
    for ours, peer in pairs:
        a, b = results[ours], results[peer]
        cpu = med(x.cpu_us / y.cpu_us for x, y in zip(a, b, strict=True))
        p99 = med(
            Round.pct(x.take, 0.99) / Round.pct(y.take, 0.99) for x, y in zip(a, b, strict=True)
        )
        print(f"  {ours} / {peer}: CPU {cpu:.2f}x, take p99 {p99:.2f}x")


def run_rounds(
    variants: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]], rounds: int, ops: int
) -> dict[str, list[Round]]:
    results: dict[str, list[Round]] = {name: [] for name in variants}
    for get, give in variants.values():  # warm up
        timed(get, give, 200)
    names = list(variants)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].append(timed(*variants[name], ops))
    return results


async def bench_async(conn: dict[str, Any], rounds: int, ops: int) -> None:
    import asyncpg
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.util.concurrency import greenlet_spawn

    from django_asyncpool import ConnectionPool
    from django_asyncpool.core.registry import config
    from django_asyncpool.sqla.engines import connect_kwargs

    kwargs = connect_kwargs(config("default"))

    async def creator() -> Any:
        return await asyncpg.connect(**kwargs)

    bare = create_async_engine(
        "postgresql+asyncpg://",
        async_creator=creator,
        pool_size=2,
        max_overflow=2,
        pool_reset_on_return=None,
    )
    ours = ConnectionPool("default")
    pools = {
        "ours: GuardedPool.connect()+close()": ours.engine.sync_engine.pool,
        "bare SQLAlchemy: QueuePool.connect()+close()": bare.sync_engine.pool,
    }

    def in_greenlet() -> dict[str, list[Round]]:
        variants = {name: (pool.connect, _close) for name, pool in pools.items()}
        return run_rounds(variants, rounds, ops)

    results = await greenlet_spawn(in_greenlet)
    report("async checkout", results, [tuple(pools)])  # type: ignore[list-item]
    await bare.dispose()
    await ours.close()


def _close(fairy: Any) -> None:
    fairy.close()


def bench_sync(conn: dict[str, Any], rounds: int, ops: int) -> None:
    import psycopg
    import psycopg_pool
    from django.db import connections

    from django_asyncpool.core import checkout
    from django_asyncpool.core import registry as _registry

    def ensure(alias: str) -> tuple[Callable[[], Any], Callable[[Any], None]]:
        wrapper = connections[alias]
        return wrapper.ensure_connection, lambda _: wrapper.close()

    results = run_rounds(
        {
            "ours: ENGINE ensure_connection()+close()": ensure("default"),
            "Django pool: ensure_connection()+close()": ensure("stock"),
        },
        rounds,
        ops,
    )
    report("sync checkout, ORM", results, [tuple(results)])  # type: ignore[list-item]

    wrapper = connections["default"]
    wrapper.ensure_connection()
    wrapper.close()
    pool = wrapper.pool
    stats, guard = _registry.stats("default", "sync"), _registry.guard("default")

    # As the ENGINE calls it (base.py, get_new_connection): no frame of the harness's own.
    ours_get = functools.partial(checkout.checkout, stats, guard, pool.getconn)

    def ours_give(c: Any) -> None:
        checkout.checkin(stats, c)
        pool.putconn(c)

    params = {
        "dbname": conn["NAME"],
        "user": conn["USER"],
        "password": conn["PASSWORD"],
        "host": conn["HOST"],
        "port": conn["PORT"],
    }
    bare = psycopg_pool.ConnectionPool(
        kwargs={**{k: v for k, v in params.items() if v}, "autocommit": True},
        connection_class=psycopg.Connection,
        min_size=POOL["min_size"],
        max_size=POOL["max_size"],
        timeout=POOL["timeout"],
        open=True,
    )
    bare.wait()
    results = run_rounds(
        {
            "ours: checkout.checkout(SyncPool.getconn)+putconn": (ours_get, ours_give),
            "bare psycopg_pool getconn()+putconn()": (bare.getconn, bare.putconn),
        },
        rounds,
        ops,
    )
    report("sync checkout, pool", results, [tuple(results)])  # type: ignore[list-item]
    bare.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--only", choices=["async", "sync"])
    args = parser.parse_args()
    conn = setup_django()
    print(f"load average {os.getloadavg()[0]:.2f}")
    if args.only in (None, "async"):
        asyncio.run(bench_async(conn, args.rounds, args.ops))
    if args.only in (None, "sync"):
        bench_sync(conn, args.rounds, args.ops)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
