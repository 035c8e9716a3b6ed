"""Benchmark the sync side of ENGINE ``django_asyncpool`` against Django's own pool.

Two figures, each from variants run side by side in one process, interleaved
(fail-fast: the order flips every round; ORM: each round alternates short slices
A B B A ...), reported as medians over the rounds and ratios:

1. Fail-fast latency: ``ensure_connection()`` on an alias whose breaker is open,
   against one failing connect to the same unreachable target without a breaker
   (plain ``psycopg.connect``, and the ENGINE with a breaker that never opens).
2. ORM throughput, one thread: ``Model.objects.get(pk=...)`` through ENGINE
   ``django_asyncpool`` and through ``django.db.backends.postgresql`` with its pool
   on, same pool sizes. Each op is a "request" (get, then ``connection.close()``,
   which returns the connection to the pool, as ``request_finished`` does); the
   variant that keeps the connection between ops is measured too.

The server is ``DATABASE_URL`` (``postgresql+asyncpg://...``) when set, otherwise
an embedded PostgreSQL started for this run; the table ``asyncpool_bench_item``
(1,000 rows) is created there if missing. Usage::

    .venv/bin/python benchmarks/bench_sync.py [--rounds 10] [--seconds 2.5] [--slice 0.05]
                                              [--calls 1000] [--only failfast|orm]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OURS = "django_asyncpool"
STOCK = "django.db.backends.postgresql"
POOL = {"min_size": 2, "max_size": 4, "timeout": 5}
ROWS = 1000


def setup_django() -> None:
    """Configure Django with one alias per compared variant."""
    import django
    from django.conf import settings

    from django_asyncpool.config import parse_url
    from testproject import pgserver

    url = os.environ.get("DATABASE_URL") or pgserver.embedded_url()
    db = parse_url(url)
    conn = {k: db[k] for k in ("NAME", "USER", "PASSWORD", "HOST", "PORT")}
    unreachable = {**conn, "HOST": "127.0.0.1", "PORT": pgserver.free_port()}

    def alias(engine: str, fields: dict[str, Any], **options: Any) -> dict[str, Any]:
        return {"ENGINE": engine, **fields, "CONN_MAX_AGE": 0, "OPTIONS": options}

    settings.configure(
        DEBUG=False,
        USE_TZ=True,
        TIME_ZONE="UTC",
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        INSTALLED_APPS=["django.contrib.contenttypes", "django_asyncpool"],
        DATABASES={
            "default": alias(OURS, conn, pool=dict(POOL)),
            "stock": alias(STOCK, conn, pool=dict(POOL)),
            # The breaker opens after 3 failures and stays open for the whole run.
            "down": alias(
                OURS,
                unreachable,
                pool=dict(POOL),
                circuit_breaker={"fail_max": 3, "reset_timeout": 3600},
                retry={"max_tries": 1},
            ),
            # Same target, a breaker that never opens and no retries: one failing connect.
            "down_nobreaker": alias(
                OURS,
                unreachable,
                pool=dict(POOL),
                circuit_breaker={"fail_max": 10**9, "reset_timeout": 3600},
                retry={"max_tries": 1},
            ),
        },
        LOGGING_CONFIG=None,
    )
    django.setup()
    # The breaker logs an error when it opens and a warning per failed connect.
    # psycopg_pool logs a warning per failed connect of its workers.
    for name in ("django_asyncpool", "psycopg.pool"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def bench_model() -> Any:
    """Return a model of its own (not the demo's, which may change) for the lookups."""
    from django.db import models

    class BenchItem(models.Model):
        name = models.CharField(max_length=100)
        price_cents = models.IntegerField()

        class Meta:
            app_label = "django_asyncpool"  # always installed; the table is the script's
            db_table = "asyncpool_bench_item"

    return BenchItem


def ensure_rows(model: Any) -> list[int]:
    """Create the table (if missing) with ROWS rows; return their primary keys."""
    from django.db import connections

    conn = connections["default"]
    if model._meta.db_table not in conn.introspection.table_names():
        with conn.schema_editor() as editor:
            editor.create_model(model)
    missing = ROWS - model.objects.count()
    if missing > 0:
        model.objects.bulk_create(model(name=f"item {i}", price_cents=i) for i in range(missing))
    pks = list(model.objects.order_by("pk").values_list("pk", flat=True)[:ROWS])
    conn.close()
    return pks


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} us"


# -- 1. fail-fast latency ---------------------------------------------------------------


def bench_fail_fast(calls: int, rounds: int) -> dict[str, Any]:
    import psycopg
    from django.db import OperationalError, connections

    from django_asyncpool import CircuitOpenError
    from django_asyncpool.core import registry as _registry

    down, nobreaker = connections["down"], connections["down_nobreaker"]
    params = down.get_connection_params()
    dsn = {k: params[k] for k in ("dbname", "user", "password", "host", "port")}

    def plain_connect() -> None:
        try:
            psycopg.connect(**dsn, connect_timeout=5).close()
        except psycopg.OperationalError:
            return
        raise RuntimeError("the unreachable target accepted a connection")

    def engine_call(wrapper: Any, expected: type[BaseException]) -> Callable[[], None]:
        def call() -> None:
            try:
                wrapper.ensure_connection()
            except expected:
                return
            raise RuntimeError("the unreachable target accepted a connection")

        return call

    open_call = engine_call(down, CircuitOpenError)
    failing_engine = engine_call(nobreaker, OperationalError)

    # Open the breaker: fail_max failing connects.
    guard = _registry.guard("down", down)
    for _ in range(3):
        engine_call(down, OperationalError)()
    assert guard.state == "open", guard.state

    variants: dict[str, tuple[Callable[[], None], int]] = {
        "open breaker (ENGINE)": (open_call, calls // rounds),
        "plain psycopg.connect, refused": (plain_connect, max(calls // rounds // 5, 10)),
        "ENGINE, breaker never opens": (failing_engine, max(calls // rounds // 20, 3)),
    }
    for call, _ in variants.values():  # warm-up
        call()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            call, n = variants[name]
            for _ in range(n):
                t0 = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - t0)
    assert guard.state == "open", guard.state
    for alias in ("down", "down_nobreaker"):
        connections[alias].close_pool()
    return samples


# -- 2. ORM throughput --------------------------------------------------------------------


class Round:
    """Operations, wall time and this thread's CPU time of one variant in one round."""

    def __init__(self) -> None:
        self.ops = 0
        self.wall = 0.0
        self.cpu = 0.0

    @property
    def rate(self) -> float:
        return self.ops / self.wall

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.ops * 1e6


def bench_orm(
    rounds: int, seconds: float, aliases: dict[str, str] | None = None, slice_s: float = 0.05
) -> dict[tuple[str, bool], list[Round]]:
    """Return the rounds of each (variant, close per op); variants name aliases.

    A round gives each variant ``seconds``, cut into slices of ``slice_s`` that
    alternate A B B A ...: load from other processes comes and goes within a second,
    and short alternating slices share it out evenly between the variants (with
    0.25 s slices, per-round ratios on a loaded machine spread 0.66-1.15; with
    0.05 s slices 0.80-1.08).
    """
    from django.db import connections

    model = bench_model()
    pks = ensure_rows(model)
    n = len(pks)
    clock, cpu_clock = time.perf_counter, time.thread_time

    def run(alias: str, close: bool, duration: float, into: Round) -> None:
        conn = connections[alias]
        manager = model.objects.db_manager(alias)
        ops = into.ops
        started, cpu_started = clock(), cpu_clock()
        deadline = started + duration
        while True:
            for _ in range(20):
                manager.get(pk=pks[ops % n])
                if close:
                    conn.close()  # back to the pool, as request_finished does
                ops += 1
            if clock() >= deadline:
                break
        into.wall += clock() - started
        into.cpu += cpu_clock() - cpu_started
        into.ops = ops
        conn.close()

    aliases = aliases or {"ours": "default", "stock": "stock"}
    names = list(aliases)
    slices = max(1, round(seconds / slice_s))
    results: dict[tuple[str, bool], list[Round]] = {}
    for close in (True, False):
        for alias in aliases.values():
            run(alias, close, min(seconds, 1.0), Round())  # warm-up: pool open, caches
        for _ in range(rounds):
            gc.collect()
            this = {name: Round() for name in names}
            for i in range(slices):
                for name in names if i % 2 == 0 else names[::-1]:
                    run(aliases[name], close, seconds / slices, this[name])
            for name in names:
                results.setdefault((name, close), []).append(this[name])
    return results


def report_orm(results: dict[tuple[str, bool], list[Round]]) -> None:
    for close in (True, False):
        label = "get + close() per op (a request)" if close else "get only, connection kept"
        ours, stock = results[("ours", close)], results[("stock", close)]
        ratios = [o.rate / s.rate for o, s in zip(ours, stock, strict=True)]
        ours_rate = statistics.median(r.rate for r in ours)
        stock_rate = statistics.median(r.rate for r in stock)
        ours_cpu = statistics.median(r.cpu_us for r in ours)
        stock_cpu = statistics.median(r.cpu_us for r in stock)
        print(f"  {label}:")
        for name, engine, rate, cpu in (
            ("ours ", OURS, ours_rate, ours_cpu),
            ("stock", STOCK, stock_rate, stock_cpu),
        ):
            print(f"    {name} {engine + ':':31} {rate:7,.0f} ops/s, client CPU {cpu:6.1f} us/op")
        print(
            f"    ours/stock: {statistics.median(ratios):.3f}x (median of per-round ratios; "
            f"range {min(ratios):.3f}-{max(ratios):.3f}; ratio of medians "
            f"{ours_rate / stock_rate:.3f}x); client CPU {ours_cpu - stock_cpu:+.1f} us/op"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument("--seconds", type=float, default=2.5, help="seconds per ORM round")
    parser.add_argument("--calls", type=int, default=1000, help="open-breaker calls in all")
    parser.add_argument(
        "--slice", type=float, default=0.05, help="seconds per alternating ORM slice"
    )
    parser.add_argument("--only", choices=["failfast", "orm"], help="run one figure only")
    args = parser.parse_args()

    setup_django()
    import django
    import psycopg
    import psycopg_pool

    print(
        f"Python {sys.version.split()[0]}, Django {django.get_version()}, "
        f"psycopg {psycopg.__version__}, psycopg_pool {psycopg_pool.__version__}, "
        f"{os.cpu_count()} CPUs, server: "
        f"{'DATABASE_URL' if os.environ.get('DATABASE_URL') else 'embedded'}"
    )

    if args.only in (None, "failfast"):
        samples = bench_fail_fast(args.calls, args.rounds)
        print("\n1. Fail-fast latency (unreachable target: a closed port on 127.0.0.1)")
        for name, values in samples.items():
            print(
                f"  {name:32} n={len(values):5}  median {us(statistics.median(values)):>12}"
                f"  p99 {us(percentile(values, 0.99)):>12}"
            )
        fast = statistics.median(samples["open breaker (ENGINE)"])
        for name in samples:
            if name != "open breaker (ENGINE)":
                print(
                    f"  open breaker is {statistics.median(samples[name]) / fast:,.1f}x faster "
                    f"than '{name}' (medians)"
                )

    if args.only in (None, "orm"):
        print(
            f"\n2. ORM throughput, one thread, Model.objects.get(pk=...), pool {POOL}, "
            f"{args.rounds} rounds of {args.seconds:g}s per variant in alternating "
            f"{args.slice:g}s slices"
        )
        report_orm(bench_orm(args.rounds, args.seconds, slice_s=args.slice))


if __name__ == "__main__":
    main()
